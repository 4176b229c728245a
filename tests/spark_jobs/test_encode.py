"""Encoded tables: catalogue coverage, decoding back to raw values, cold flags, user features,
feature specs, and the written tables' schemas against docs/data_contract.md."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import from_dict
from common.features import FeatureSpec
from spark_jobs import encode, popularity
from spark_jobs.split import assign_split, time_boundary
from spark_jobs.vocab import bucket_labels

ITEM_FEATURES = {
    "category": "categorical",
    "tags": {"type": "multi", "sep": "|"},
    "price": {"type": "bucketized", "boundaries": [10, 50]},
}
USER_FEATURES = {
    "age": {"type": "bucketized", "boundaries": [18, 30]},
    "region": "categorical",
    "langs": {"type": "multi", "sep": ","},
}


def _config(prepared: str = "unused", split: dict | None = None, min_count: int = 2, history: int = 3):
    return from_dict(
        {
            "features": {"item": ITEM_FEATURES, "user": USER_FEATURES},
            "paths": {"prepared": prepared},
            "prepare": {
                "vocab_min_count": min_count,
                "history_length": history,
                "split": split or {"kind": "time", "eval_fraction": 0.25},
            },
            "train": {"batch_size": 8},
        }
    )


def _dataset(seed: int):
    """Items i0..i13 (i12, i13 never clicked), users u0..u5 (u6 and u7 click but have no row)."""
    rng = np.random.default_rng(seed)
    n_items = 14
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "category": rng.choice(np.array(["a", "b", "c", " a", None, "rare"], dtype=object), size=n_items),
            "tags": ["|".join(rng.choice(["x", "y", "z", "solo" + str(i), ""], size=int(rng.integers(0, 4)))) for i in range(n_items)],
            "price": [None if i == 3 else float(v) for i, v in enumerate(rng.uniform(0, 100, size=n_items).round(1))],
        }
    )
    items.loc[5, "tags"] = None
    users = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(6)],
            "age": ["15", "22", "40", "abc", "18", None],
            "region": ["n", "s", "n", "e", None, "n"],
            "langs": ["en,fr", "en", "", None, "de,en,de", "fr"],
        }
    )
    n = 90
    # Users u0..u7 with skewed activity; items 0..11 only, so the last two are never clicked.
    user = rng.choice(8, size=n, p=np.array([8, 6, 5, 4, 3, 2, 1, 1]) / 30)
    inter = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in user],
            "item_id": [f"i{i}" for i in rng.integers(0, 12, size=n)],
            "timestamp": rng.integers(100, 160, size=n).astype(np.int64),
        }
    )
    return items, users, inter


def _rows(pdf: pd.DataFrame) -> list[tuple]:
    # pandas 3 stores a missing string as NaN; Spark wants None.
    return [tuple(None if _missing(v) else v for v in r) for r in pdf.itertuples(index=False, name=None)]


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _spark_frames(spark, items, users, inter):
    sitems = spark.createDataFrame(_rows(items), "item_id string, category string, tags string, price double")
    susers = spark.createDataFrame(_rows(users), "user_id string, age string, region string, langs string")
    sinter = spark.createDataFrame(
        [(u, i, int(t)) for u, i, t in inter.itertuples(index=False, name=None)], "user_id string, item_id string, timestamp long"
    )
    return sitems, susers, sinter


def _materialise(spark, df, tmp: Path):
    """Write and read back, as ``encode.run`` does: cuts the lineage, and Parquet's size statistics
    let Spark broadcast the small tables instead of shuffling them."""
    path = str(tmp / uuid.uuid4().hex)
    df.write.parquet(path)
    return spark.read.parquet(path)


def _prepare(spark, cfg, seed, tmp: Path):
    items, users, inter = _dataset(seed)
    sitems, susers, sinter = (_materialise(spark, df, tmp) for df in _spark_frames(spark, items, users, inter))
    log = _materialise(spark, assign_split(sinter, cfg.prepare.split, time_boundary(sinter, cfg.prepare.split)), tmp)
    vocabs = {k: _materialise(spark, v, tmp) for k, v in encode.build_vocabs(log, sitems, susers, cfg).items()}
    return items, users, inter, sitems, susers, log, vocabs


def _vocab_dicts(vocabs) -> dict[str, dict[str, int]]:
    return {name: {r["value"]: r["index"] for r in v.collect()} for name, v in vocabs.items()}


def _norm(v):
    if _missing(v):
        return None
    s = str(v).strip()
    return s or None


def _multi(cell, sep):
    out = []
    for p in ([] if _missing(cell) else cell.split(sep)):
        p = p.strip()
        if p and p not in out:
            out.append(p)
    return out


def _bucket(v, boundaries):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if np.isnan(x):
        return None
    return bucket_labels(boundaries)[int(np.digitize([x], boundaries)[0])]


def _expected_multi(values, vocab):
    out = []
    for v in values:
        i = vocab.get(v, 1)
        if i not in out:
            out.append(i)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_items_cover_the_catalogue_and_decode_back_to_raw(spark, seed, tmp_path):
    cfg = _config()
    items, users, inter, sitems, susers, log, vocabs = _prepare(spark, cfg, seed, tmp_path)
    enc = {r["item_id"]: r for r in encode.encode_items(sitems, vocabs, cfg).collect()}
    v = _vocab_dicts(vocabs)

    assert sorted(enc) == sorted(items["item_id"]), "every catalogue item, clicked or not, one row each"
    assert len({r["item_index"] for r in enc.values()}) == len(items)
    assert all(r["item_index"] >= 2 for r in enc.values())

    # The item id vocabulary counts train events only (never-clicked and eval-only items: 0).
    train_counts = Counter()
    for r in log.collect():
        if r["split"] == "train":
            train_counts[r["item_id"]] += 1
    id_counts = {r["value"]: r["count"] for r in vocabs["item_id"].collect()}
    assert id_counts == {i: train_counts.get(i, 0) for i in items["item_id"]}
    ranked = sorted(items["item_id"], key=lambda i: (-train_counts.get(i, 0), i))
    assert [enc[i]["item_index"] for i in ranked] == list(range(2, 2 + len(items)))

    # Category: values seen fewer than min_count=2 times in the catalogue decode to OOV.
    cat_counts = Counter(x for x in map(_norm, items["category"]) if x is not None)
    tag_lists = {r.item_id: _multi(r.tags, "|") for r in items.itertuples()}
    tag_counts = Counter(t for ts in tag_lists.values() for t in ts)
    for row in items.itertuples():
        got = enc[row.item_id]
        c = _norm(row.category)
        assert got["f_category"] == (v["category"][c] if c is not None and cat_counts[c] >= 2 else 1)
        if got["f_category"] != 1:
            assert {i: s for s, i in v["category"].items()}[got["f_category"]] == c
        assert got["f_tags"] == _expected_multi(tag_lists[row.item_id], v["tags"])
        assert all(t in v["tags"] or tag_counts[t] < 2 for t in tag_lists[row.item_id])
        b = _bucket(row.price, (10.0, 50.0))
        assert got["f_price"] == v["price"].get(b, 1)
    assert enc["i5"]["f_tags"] == []
    assert enc["i3"]["f_price"] == 1  # missing price -> OOV


@pytest.mark.parametrize(
    "seed,split",
    [(0, {"kind": "time", "eval_fraction": 0.25}), (1, {"kind": "leave_last", "leave_last_n": 2})],
)
def test_interactions_cold_flag_user_features_and_history(spark, seed, split, tmp_path):
    cfg = _config(split=split)
    items, users, inter, sitems, susers, log, vocabs = _prepare(spark, cfg, seed, tmp_path)
    items_enc = _materialise(spark, encode.encode_items(sitems, vocabs, cfg), tmp_path)
    users_enc = _materialise(spark, encode.encode_users(susers, vocabs, cfg), tmp_path)

    expected_cols = ["user_id", "item_id", "item_index", "timestamp", "user_index", "f_age", "f_region", "f_langs", "history", "cold"]
    for df in encode.encode_interactions(log, items_enc, users_enc, vocabs, cfg):
        assert df.columns == expected_cols
    # encode_interactions = encode_log + split_encoded; one cached log serves both halves.
    encoded = encode.encode_log(log, items_enc, users_enc, vocabs, cfg).cache()
    train, evaluation = encode.split_encoded(encoded)
    tr, ev = train.collect(), evaluation.collect()
    encoded.unpersist()
    assert len(tr) + len(ev) == len(inter) and len(tr) > 0 and len(ev) > 0

    # Cold vs pandas: eval events whose item has no train event.
    split_of = pd.DataFrame([r.asDict() for r in log.collect()])
    train_items = set(split_of.loc[split_of["split"] == "train", "item_id"])
    assert not any(r["cold"] for r in tr)
    assert Counter((r["user_id"], r["item_id"], r["timestamp"], r["cold"]) for r in ev) == Counter(
        (u, i, int(t), i not in train_items)
        for u, i, t in split_of.loc[split_of["split"] == "eval", ["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None)
    )

    v = _vocab_dicts(vocabs)
    item_index = {r["item_id"]: r["item_index"] for r in items_enc.collect()}
    index_item = {i: s for s, i in item_index.items()}
    user_train_counts = Counter(split_of.loc[split_of["split"] == "train", "user_id"])
    user_rows = {r.user_id: r for r in users.itertuples()}
    for r in tr + ev:
        assert r["item_index"] == item_index[r["item_id"]]
        assert r["user_index"] == (v["user_id"][r["user_id"]] if user_train_counts[r["user_id"]] >= 2 else 1)
        raw = user_rows.get(r["user_id"])
        if raw is None:  # u6, u7 have no users row: single-valued -> OOV, multi -> empty
            assert (r["f_age"], r["f_region"], r["f_langs"]) == (1, 1, [])
        else:
            assert r["f_age"] == v["age"].get(_bucket(raw.age, (18.0, 30.0)), 1)
            assert r["f_region"] == v["region"].get(_norm(raw.region), 1)
            assert r["f_langs"] == _expected_multi(_multi(raw.langs, ","), v["langs"])
        # History decodes to items this user clicked strictly earlier.
        assert len(r["history"]) <= cfg.prepare.history_length
        mine = inter[inter["user_id"] == r["user_id"]]
        for h in r["history"]:
            assert (mine.loc[mine["item_id"] == index_item[h], "timestamp"] < r["timestamp"]).any()


def test_feature_specs_order_and_sizes():
    cfg = _config()
    sizes = {"item_id": 16, "user_id": 5, "category": 4, "tags": 2, "price": 5, "age": 5, "region": 3, "langs": 4}
    specs = encode.feature_specs(cfg, sizes)
    assert [(s.name, s.side, s.source, s.multi, s.column, s.vocab_size) for s in specs] == [
        ("item_id", "item", "id", False, "item_index", 16),
        ("category", "item", "categorical", False, "f_category", 4),
        ("tags", "item", "multi", True, "f_tags", 2),
        ("price", "item", "bucketized", False, "f_price", 5),
        ("user_id", "user", "id", False, "user_index", 5),
        ("age", "user", "bucketized", False, "f_age", 5),
        ("region", "user", "categorical", False, "f_region", 3),
        ("langs", "user", "multi", True, "f_langs", 4),
        ("history", "user", "history", True, "history", 16),
    ]
    assert specs[-1].shares_embedding_with == "item_id"
    assert all(s.shares_embedding_with is None for s in specs[:-1])
    assert [FeatureSpec.from_json(s.to_json()) for s in specs] == specs
    with pytest.raises(ValueError, match="no vocab size for"):
        encode.feature_specs(cfg, {"item_id": 3})


# The tables of docs/data_contract.md, column by column, in order.
CONTRACT = {
    "vocab": [("value", "string"), ("index", "int"), ("count", "bigint")],
    "items": [("item_index", "int"), ("item_id", "string"), ("f_category", "int"), ("f_tags", "array<int>"), ("f_price", "int")],
    "events": [
        ("user_id", "string"), ("item_id", "string"), ("item_index", "int"), ("timestamp", "bigint"),
        ("user_index", "int"), ("f_age", "int"), ("f_region", "int"), ("f_langs", "array<int>"),
        ("history", "array<int>"), ("cold", "boolean"),
    ],
    "stats/item_popularity": [
        ("item_id", "string"), ("item_index", "int"), ("count", "bigint"),
        ("probability", "double"), ("log_q", "double"), ("batch_probability", "double"),
    ],
}


def _schema(spark, path: Path) -> list[tuple[str, str]]:
    return [(f.name, f.dataType.simpleString()) for f in spark.read.parquet(str(path)).schema.fields]


def test_run_writes_the_contract_tables(spark, tmp_path):
    cfg = _config(prepared=str(tmp_path / "prepared"))
    items, users, inter = _dataset(0)
    sitems, susers, sinter = _spark_frames(spark, items, users, inter)
    root = tmp_path / "prepared"
    sinter.write.parquet(str(root / "validated" / "interactions"))
    sitems.write.parquet(str(root / "validated" / "items"))
    susers.write.parquet(str(root / "validated" / "users"))

    sections = encode.run(spark, cfg)
    sections.update(popularity.run(spark, cfg))
    json.dumps(sections)  # the manifest must be plain JSON

    for name in ("item_id", "user_id", "category", "tags", "price", "age", "region", "langs"):
        assert _schema(spark, root / "vocab" / name) == CONTRACT["vocab"], name
        assert sections["tables"][f"vocab/{name}"] == f"vocab/{name}"
        n = spark.read.parquet(str(root / "vocab" / name)).count()
        assert sections["vocab"][name]["size"] == n + 2
    assert _schema(spark, root / "items") == CONTRACT["items"]
    assert _schema(spark, root / "train") == CONTRACT["events"]
    assert _schema(spark, root / "eval") == CONTRACT["events"]
    assert _schema(spark, root / "stats" / "item_popularity") == CONTRACT["stats/item_popularity"]
    assert not [p.name for p in root.iterdir() if p.name.startswith("._")], "temporary folders left behind"

    train = pd.read_parquet(root / "train")
    evaluation = pd.read_parquet(root / "eval")
    s = sections["split"]
    ts = np.sort(inter["timestamp"].to_numpy())
    assert s["kind"] == "time" and s["boundary"] == ts[(len(ts) * 75) // 100]
    assert (s["train_rows"], s["eval_rows"]) == (len(train), len(evaluation))
    assert s["train_rows"] == int((inter["timestamp"] < s["boundary"]).sum())
    assert s["train_users"] == train["user_id"].nunique() and s["eval_users"] == evaluation["user_id"].nunique()
    assert s["cold_eval_rows"] == int(evaluation["cold"].sum())
    assert s["cold_eval_rows"] == int((~evaluation["item_id"].isin(set(train["item_id"]))).sum())
    assert sections["counts"] == {"items": 14, "train": len(train), "eval": len(evaluation), "users": inter["user_id"].nunique()}
    assert sections["tables"]["items"] == "items" and sections["tables"]["train"] == "train"

    specs = {d["name"]: d for d in sections["features"]}
    assert specs["history"]["vocab_size"] == specs["item_id"]["vocab_size"] == sections["vocab"]["item_id"]["size"] == 16
    for name, sec in sections["vocab"].items():
        assert specs[name]["vocab_size"] == sec["size"]

    pop = sections["popularity"]
    assert pop["total_train_events"] == len(train)
    assert pop["items_with_zero_count"] == len(set(items["item_id"]) - set(train["item_id"]))
    assert pop["floor_probability"] == pytest.approx(0.5 / len(train), rel=1e-15)
    assert pop["batch_size"] == 8
