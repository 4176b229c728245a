"""``spark_jobs.synthetic``: determinism, sizes, referential integrity, the long tail, the
never-clicked items and the planted feature dependencies (checked with pandas / sklearn)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mutual_info_score

from common.config import SyntheticConfig, from_dict
from spark_jobs.sources import load_sources
from spark_jobs.synthetic import generate, main, never_clicked_count

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_items=300, num_users=200, num_interactions=5000, num_categories=10)


def frames(spark, cfg: SyntheticConfig):
    g = generate(spark, cfg)
    return g.items.toPandas(), g.users.toPandas(), g.interactions.toPandas()


def sorted_rows(df: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, df.astype(str).itertuples(index=False)))


@pytest.fixture(scope="module")
def small(spark):
    return frames(spark, SyntheticConfig(**SMALL, seed=7))


def test_identical_across_runs_and_partitionings(spark, small):
    items, users, inter = small
    again = frames(spark, SyntheticConfig(**SMALL, seed=7, num_partitions=3))
    for a, b in zip((items, users, inter), again):
        assert sorted_rows(a) == sorted_rows(b)
    other = frames(spark, SyntheticConfig(**SMALL, seed=8))
    assert sorted_rows(inter) != sorted_rows(other[2])


def test_schema_and_sizes(small):
    items, users, inter = small
    assert list(items.columns) == ["item_id", "category", "subcategory", "brand", "color", "price", "tags"]
    assert list(users.columns) == ["user_id", "region", "age"]
    assert list(inter.columns) == ["user_id", "item_id", "time"]
    assert len(items) == 300 and items["item_id"].is_unique
    assert len(users) == 200 and users["user_id"].is_unique
    assert len(inter) == 5000
    assert items["item_id"].str.fullmatch(r"i\d{7}").all() and users["user_id"].str.fullmatch(r"u\d{7}").all()
    assert items["category"].nunique() == 10
    assert items["price"].between(1, 500).all()
    assert users["age"].between(15, 80).all() and users["region"].nunique() == 5
    n_tags = items["tags"].str.split("|").map(len)
    assert n_tags.between(1, 3).all() and (n_tags > 1).any()
    span = inter["time"].max() - inter["time"].min()
    assert 300 * 86400 < span <= 365 * 86400


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_referential_integrity_and_never_clicked(spark, seed):
    cfg = SyntheticConfig(**SMALL, seed=seed, never_clicked_fraction=0.2)
    items, users, inter = frames(spark, cfg)
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert set(inter["user_id"]) <= set(users["user_id"])
    unclicked = set(items["item_id"]) - set(inter["item_id"])
    planted = never_clicked_count(cfg)
    assert planted == 60
    # The planted 60 are never clicked; a few tail items may also go unclicked by chance.
    assert planted <= len(unclicked) <= planted + 30
    # Without planting, far fewer catalogue items are unclicked.
    _, _, inter0 = frames(spark, SyntheticConfig(**SMALL, seed=seed, never_clicked_fraction=0.0))
    assert len(set(items["item_id"]) - set(inter0["item_id"])) < planted


@pytest.mark.parametrize("seed", [7, 11])
def test_popularity_is_long_tailed_and_some_users_are_heavy(spark, seed):
    _, users, inter = frames(spark, SyntheticConfig(**SMALL, seed=seed))
    counts = inter["item_id"].value_counts()
    top = counts.iloc[: 30].sum()  # top 10% of the 300-item catalogue
    assert top / len(inter) > 0.40
    per_user = inter["user_id"].value_counts()
    assert per_user.iloc[0] > 4 * per_user.median()


def test_zipf_exponent_controls_the_tail(spark):
    flat = frames(spark, SyntheticConfig(**SMALL, zipf_exponent=0.3))[2]["item_id"].value_counts()
    steep = frames(spark, SyntheticConfig(**SMALL, zipf_exponent=1.5))[2]["item_id"].value_counts()
    assert steep.iloc[:30].sum() > flat.iloc[:30].sum() + 1000


def entropy(s: pd.Series) -> float:
    p = s.value_counts(normalize=True).to_numpy()
    return float(-(p * np.log(p)).sum())


def test_planted_item_dependencies(spark):
    items = generate(spark, SyntheticConfig(num_items=2000, num_users=10, num_interactions=10)).items.toPandas()
    h_sub = entropy(items["subcategory"])
    h_sub_given_cat = h_sub - mutual_info_score(items["category"], items["subcategory"])
    assert h_sub_given_cat < 0.4 * h_sub  # 3 subcategories per category: ln 3 of ln 30
    assert h_sub_given_cat == pytest.approx(math.log(3), abs=0.1)
    assert (items["subcategory"].str.split("_").str[0] == items["category"]).all()
    mi_brand = mutual_info_score(items["category"], items["brand"])
    mi_color = mutual_info_score(items["category"], items["color"])
    assert mi_brand > 1.5
    # Plug-in MI bias for 8 x 10 values over 2000 rows is ~0.016 nats; independence reads near it.
    assert mi_color < 0.05
    assert entropy(items["color"]) == pytest.approx(math.log(8), abs=0.02)
    tags = items.assign(tag=items["tags"].str.split("|")).explode("tag")
    own = pd.Series([t.startswith(c + "_") for t, c in zip(tags["tag"], tags["category"])])
    assert 0.7 < own.mean() < 0.9  # 80% from the category pool
    price_by_cat = items.groupby("category")["price"].median()
    assert price_by_cat.max() < 2.0 * price_by_cat.min()  # price is not a category proxy


def test_users_prefer_their_regions_categories(small):
    items, users, inter = small
    m = inter.merge(items, on="item_id", how="left").merge(users, on="user_id", how="left")
    residue = m["category"].str[1:].astype(int) % 5
    region = m["region"].str[1:].astype(int)
    # 0.8 (preference) * 0.8 (region) + chance ~0.2 * 0.36 = ~0.71; without structure 0.2.
    assert (residue == region).mean() > 0.55


def test_preference_strength_zero_removes_category_preference(spark):
    items, users, inter = frames(spark, SyntheticConfig(**SMALL, preference_strength=0.0))
    m = inter.merge(items, on="item_id", how="left").merge(users, on="user_id", how="left")
    residue = m["category"].str[1:].astype(int) % 5
    region = m["region"].str[1:].astype(int)
    assert abs((residue == region).mean() - 0.2) < 0.05


def test_synthetic_source_selects_declared_features(spark):
    cfg = from_dict(
        {
            "dataset": {"kind": "synthetic", "synthetic": {"num_items": 50, "num_users": 20, "num_interactions": 100}},
            "features": {"item": {"brand": "categorical", "tags": "multi"}, "user": {"age": "categorical"}},
        }
    )
    raw = load_sources(spark, cfg)
    assert raw.items.columns == ["item_id", "brand", "tags"]
    assert raw.users.columns == ["user_id", "age"]
    assert raw.interactions.columns == ["user_id", "item_id", "time"]
    bad = from_dict({"dataset": {"kind": "synthetic"}, "features": {"item": {"genre": "multi"}, "user": {}}})
    with pytest.raises(ValueError, match=r"\['genre'\].*'category', 'subcategory', 'brand', 'color', 'price', 'tags'"):
        load_sources(spark, bad)


def test_standalone_writes_raw_tables_readable_as_tables(spark, tmp_path, capsys):
    raw_dir = tmp_path / "raw"
    argv = [
        "--set",
        f"paths.raw={raw_dir}",
        "dataset.synthetic.num_items=40",
        "dataset.synthetic.num_users=15",
        "dataset.synthetic.num_interactions=120",
    ]
    summary = main(["--config", str(ROOT / "conf" / "default.yaml"), *argv])
    printed = json.loads(capsys.readouterr().out)
    assert printed == summary
    assert summary["synthetic"]["rows"] == {"interactions": 120, "items": 40, "users": 15}
    # The printed overrides read the tables back through dataset.kind: tables.
    cfg = from_dict({}).with_overrides(
        ["features.item.color=categorical", "features.user.region=categorical", *summary["synthetic"]["read_back_with"]]
    )
    back = load_sources(spark, cfg)
    assert back.interactions.count() == 120 and back.items.count() == 40 and back.users.count() == 15
    gen = generate(spark, SyntheticConfig(num_items=40, num_users=15, num_interactions=120))
    assert sorted(map(tuple, back.interactions.collect())) == sorted(map(tuple, gen.interactions.collect()))


def test_new_items_only_appear_at_the_end_of_the_timeline(spark):
    from spark_jobs.synthetic import SPAN_SECONDS, START_TIME

    cfg = SyntheticConfig(**SMALL, seed=3, new_item_fraction=0.1, new_item_window=0.05)
    _, _, inter = frames(spark, cfg)
    window_start = START_TIME + (1 - cfg.new_item_window) * SPAN_SECONDS
    first_click = inter.groupby("item_id")["time"].min()
    late = first_click[first_click >= window_start]
    # Roughly new_item_fraction of the clicked items start late; all their clicks are late.
    assert 0.03 < len(late) / len(first_click) < 0.2
    assert (inter[inter["item_id"].isin(late.index)]["time"] >= window_start).all()
    # With no new items, (almost) every item with a few clicks has one before the window.
    _, _, plain = frames(spark, SyntheticConfig(**SMALL, seed=3, new_item_fraction=0.0))
    counts = plain.groupby("item_id")["time"].agg(["min", "size"])
    assert (counts[counts["size"] >= 5]["min"] < window_start).all()
