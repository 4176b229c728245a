"""Split and history vs brute-force pandas references, on logs full of timestamp ties."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from common.config import SplitConfig
from spark_jobs.split import add_history, assign_split, boundary_rank, time_boundary

SCHEMA = "user_id string, item_id string, timestamp long"


def _random_log(seed: int, n: int = 150, users: int = 8, items: int = 25, span: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    item = rng.integers(0, items, size=n)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, users, size=n)],
            "item_id": [f"i{i}" for i in item],
            # A narrow span: many events of one user share a second.
            "timestamp": rng.integers(1_000, 1_000 + span, size=n).astype(np.int64),
            "item_index": (item + 2).astype(np.int32),
        }
    )


def _to_spark(spark, pdf: pd.DataFrame, with_index: bool = False):
    cols = ["user_id", "item_id", "timestamp"] + (["item_index"] if with_index else [])
    schema = SCHEMA + (", item_index int" if with_index else "")
    rows = [tuple(r) for r in pdf[cols].itertuples(index=False, name=None)]
    return spark.createDataFrame([(str(a), str(b), int(c), *[int(x) for x in rest]) for a, b, c, *rest in rows], schema)


def test_boundary_rank_uses_the_configured_decimal():
    # (1 - 0.1) * 30 is 26.999999999999996 in floats; the configured fraction means exactly 27.
    assert boundary_rank(30, 0.1) == 27
    assert boundary_rank(10, 0.3) == 7
    assert boundary_rank(1, 0.5) == 0
    assert boundary_rank(3, 0.01) == 2


def test_time_boundary_hand_computed(spark):
    df = spark.createDataFrame([("u", f"i{t}", t) for t in range(1, 11)], SCHEMA)
    cfg = SplitConfig(kind="time", eval_fraction=0.3)
    b = time_boundary(df, cfg)
    assert b == 8  # sorted ts 1..10, rank floor(0.7 * 10) = 7 -> 8
    got = Counter(r["split"] for r in assign_split(df, cfg, b).collect())
    assert got == {"train": 7, "eval": 3}
    assert time_boundary(df, SplitConfig(kind="leave_last")) is None


@pytest.mark.parametrize("seed,percent", [(0, 10), (1, 25), (2, 30), (3, 50)])
def test_time_split_matches_numpy(spark, seed, percent):
    pdf = _random_log(seed)
    df = _to_spark(spark, pdf).repartition(3)
    cfg = SplitConfig(kind="time", eval_fraction=percent / 100)
    b = time_boundary(df, cfg)
    ts = np.sort(pdf["timestamp"].to_numpy())
    # Integer arithmetic, independent of the implementation's Fraction.
    assert b == ts[(len(ts) * (100 - percent)) // 100]
    rows = assign_split(df, cfg, b).collect()
    expected = Counter(
        (u, i, int(t), "eval" if t >= b else "train")
        for u, i, t in pdf[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None)
    )
    assert Counter((r["user_id"], r["item_id"], r["timestamp"], r["split"]) for r in rows) == expected
    assert sum(1 for r in rows if r["split"] == "eval") >= percent * len(rows) // 100


def _reference_leave_last(pdf: pd.DataFrame, n: int) -> Counter:
    out = Counter()
    for _, g in pdf.groupby("user_id"):
        g = g.sort_values(["timestamp", "item_id"], kind="stable")
        labels = ["train"] * len(g)
        if len(g) > n:
            labels[-n:] = ["eval"] * n
        for (u, i, t), lab in zip(g[["user_id", "item_id", "timestamp"]].itertuples(index=False, name=None), labels):
            out[(u, i, int(t), lab)] += 1
    return out


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 2), (2, 3)])
def test_leave_last_matches_pandas(spark, seed, n):
    pdf = _random_log(seed, n=80, users=12)
    # A user with exactly n events and one with a single event: both stay in train.
    extra = pd.DataFrame(
        {"user_id": ["few"] * n + ["one"], "item_id": ["i1"] * n + ["i2"], "timestamp": list(range(n)) + [5]}
    )
    pdf = pd.concat([pdf, extra], ignore_index=True)
    cfg = SplitConfig(kind="leave_last", leave_last_n=n)
    got = assign_split(_to_spark(spark, pdf).repartition(2), cfg, None).collect()
    got_counter = Counter((r["user_id"], r["item_id"], r["timestamp"], r["split"]) for r in got)
    assert got_counter == _reference_leave_last(pdf, n)
    assert all(r["split"] == "train" for r in got if r["user_id"] in ("few", "one"))
    eval_per_user = Counter(r["user_id"] for r in got if r["split"] == "eval")
    assert set(eval_per_user.values()) == {n}


def _reference_history(pdf: pd.DataFrame, length: int) -> Counter:
    """Brute force: for each event, every earlier event of the user, sorted (timestamp, item_index)."""
    out = Counter()
    for row in pdf.itertuples(index=False):
        past = pdf[(pdf["user_id"] == row.user_id) & (pdf["timestamp"] < row.timestamp)]
        past = past.sort_values(["timestamp", "item_index"], kind="stable")
        hist = tuple(int(x) for x in past["item_index"].to_numpy()[-length:]) if length else ()
        out[(row.user_id, row.item_id, int(row.timestamp), hist)] += 1
    return out


@pytest.mark.parametrize("seed,length", [(0, 1), (1, 3), (2, 5), (3, 40)])
def test_history_matches_brute_force_and_never_leaks(spark, seed, length):
    pdf = _random_log(seed, n=120, users=5, span=15)
    df = _to_spark(spark, pdf, with_index=True).repartition(3)
    out = add_history(df, length)
    assert out.schema["history"].dataType.simpleString() == "array<int>"
    assert out.columns == ["user_id", "item_id", "timestamp", "item_index", "history"]
    rows = out.collect()
    assert len(rows) == len(pdf)
    got = Counter((r["user_id"], r["item_id"], r["timestamp"], tuple(r["history"])) for r in rows)
    assert got == _reference_history(pdf, length)

    # No leakage, checked directly: every history item is an event of that user strictly earlier.
    earliest = pdf.groupby(["user_id", "item_index"])["timestamp"].min().to_dict()
    for r in rows:
        assert len(r["history"]) <= length
        for item in r["history"]:
            assert earliest[(r["user_id"], item)] < r["timestamp"]


def test_history_excludes_simultaneous_events_and_orders_oldest_first(spark):
    rows = [
        ("u", "a", 10, 2),
        ("u", "b", 20, 3),
        ("u", "c", 20, 4),  # same second as b: neither sees the other
        ("u", "d", 30, 5),
        ("u", "e", 40, 6),
        ("v", "a", 15, 2),
    ]
    df = spark.createDataFrame(rows, SCHEMA + ", item_index int")
    got = {r["item_id"] + r["user_id"]: r["history"] for r in add_history(df, 3).collect()}
    assert got == {
        "au": [],
        "bu": [2],
        "cu": [2],
        "du": [2, 3, 4],
        "eu": [3, 4, 5],
        "av": [],
    }


def test_history_length_zero_gives_empty_arrays(spark):
    df = spark.createDataFrame([("u", "a", 1, 2), ("u", "b", 2, 3)], SCHEMA + ", item_index int")
    out = add_history(df, 0)
    assert out.schema["history"].dataType.simpleString() == "array<int>"
    assert [r["history"] for r in out.collect()] == [[], []]


def test_time_split_needs_a_boundary(spark):
    df = spark.createDataFrame([("u", "a", 1)], SCHEMA)
    with pytest.raises(ValueError, match="boundary"):
        assign_split(df, SplitConfig(kind="time"), None)


def test_validation_holdout_hand_computed(spark):
    from spark_jobs.split import split_log

    df = spark.createDataFrame([("u", f"i{t}", t) for t in range(1, 11)], SCHEMA)
    log, boundary, withheld = split_log(df, SplitConfig(kind="time", eval_fraction=0.3, holdout="validation"))
    # Eval = ts 8..10 (withheld); train ts 1..7 split again: rank floor(0.7 * 7) = 4 -> boundary 5.
    assert withheld == 3 and boundary == 5
    got = {r["timestamp"]: r["split"] for r in log.collect()}
    assert got == {t: ("eval" if t >= 5 else "train") for t in range(1, 8)}


@pytest.mark.parametrize("seed,kind", [(0, "time"), (1, "leave_last"), (2, "time")])
def test_validation_holdout_never_contains_eval_events(spark, seed, kind):
    from spark_jobs.split import split_log

    pdf = _random_log(seed, n=200)
    df = _to_spark(spark, pdf).repartition(2)
    base = SplitConfig(kind=kind, eval_fraction=0.2, leave_last_n=2)
    outer, _, zero = split_log(df, base)
    assert zero == 0
    outer_pd = outer.toPandas()
    inner, _, withheld = split_log(df, SplitConfig(kind=kind, eval_fraction=0.2, leave_last_n=2, holdout="validation"))
    inner_pd = inner.toPandas()
    key = ["user_id", "item_id", "timestamp"]
    # input = train + validation + withheld, and the withheld events are exactly the eval split.
    assert len(inner_pd) + withheld == len(pdf)
    assert withheld == int((outer_pd["split"] == "eval").sum())
    eval_keys = Counter(map(tuple, outer_pd.loc[outer_pd["split"] == "eval", key].values.tolist()))
    train_keys = Counter(map(tuple, outer_pd.loc[outer_pd["split"] == "train", key].values.tolist()))
    assert Counter(map(tuple, inner_pd[key].values.tolist())) == train_keys
    # Validation is carved from train by the same rule: splitting the outer train part directly agrees.
    again, _, _ = split_log(_to_spark(spark, outer_pd[outer_pd["split"] == "train"]), base)
    assert Counter(map(tuple, again.toPandas()[key + ["split"]].values.tolist())) == Counter(
        map(tuple, inner_pd[key + ["split"]].values.tolist())
    )
    assert (inner_pd["split"] == "eval").any() and eval_keys
