"""Item popularity vs numpy: counts, probabilities, log_q, batch probabilities, the floor."""

from __future__ import annotations

import numpy as np
import pytest

from spark_jobs.popularity import item_popularity


def _reference(clicks: np.ndarray, n_items: int, batch_size: int, floor_events: float):
    counts = np.bincount(clicks, minlength=n_items).astype(np.int64)
    total = counts.sum()
    p = np.where(counts > 0, counts / total, floor_events / total)
    return counts, p, np.log(p), -np.expm1(batch_size * np.log1p(-p))


@pytest.mark.parametrize("seed,batch_size,floor_events", [(0, 256, 0.5), (1, 8, 1.0), (2, 1024, 0.1)])
def test_item_popularity_matches_numpy(spark, seed, batch_size, floor_events):
    rng = np.random.default_rng(seed)
    n_items = 30
    # Zipf-ish clicks over the first 24 items: the last 6 are never clicked.
    w = 1.0 / np.arange(1, 25) ** 1.2
    clicks = rng.choice(24, size=400, p=w / w.sum())
    items = spark.createDataFrame([(f"i{i}", i + 2) for i in range(n_items)], "item_id string, item_index int")
    train = spark.createDataFrame([(f"u{k % 7}", f"i{c}") for k, c in enumerate(clicks)], "user_id string, item_id string")

    out = item_popularity(train, items, batch_size, floor_events)
    assert [(f.name, f.dataType.simpleString()) for f in out.schema.fields] == [
        ("item_id", "string"), ("item_index", "int"), ("count", "bigint"),
        ("probability", "double"), ("log_q", "double"), ("batch_probability", "double"),
    ]
    rows = sorted(out.collect(), key=lambda r: r["item_index"])
    assert [r["item_id"] for r in rows] == [f"i{i}" for i in range(n_items)], "one row per catalogue item"
    counts, p, log_q, batch = _reference(clicks, n_items, batch_size, floor_events)
    np.testing.assert_array_equal([r["count"] for r in rows], counts)
    np.testing.assert_allclose([r["probability"] for r in rows], p, rtol=1e-12, atol=0)
    np.testing.assert_allclose([r["log_q"] for r in rows], log_q, rtol=1e-12, atol=0)
    np.testing.assert_allclose([r["batch_probability"] for r in rows], batch, rtol=1e-12, atol=0)
    # The textbook formula agrees (it only loses digits to cancellation for tiny p).
    np.testing.assert_allclose([r["batch_probability"] for r in rows], 1 - (1 - p) ** batch_size, rtol=1e-9)
    zero = [r for r in rows if r["count"] == 0]
    assert len(zero) == n_items - len(np.unique(clicks)) >= 6
    assert all(r["probability"] == pytest.approx(floor_events / len(clicks), rel=1e-15) for r in zero)
    assert sum(r["probability"] for r in rows if r["count"] > 0) == pytest.approx(1.0, rel=1e-12)


def test_one_item_with_every_event_has_batch_probability_one(spark):
    items = spark.createDataFrame([("a", 2), ("b", 3)], "item_id string, item_index int")
    train = spark.createDataFrame([("u", "a")] * 4, "user_id string, item_id string")
    rows = {r["item_id"]: r for r in item_popularity(train, items, 16, 0.5).collect()}
    assert (rows["a"]["count"], rows["a"]["probability"], rows["a"]["log_q"], rows["a"]["batch_probability"]) == (4, 1.0, 0.0, 1.0)
    assert rows["b"]["count"] == 0
    assert rows["b"]["probability"] == pytest.approx(0.125, rel=1e-15)
    assert rows["b"]["log_q"] == pytest.approx(np.log(0.125), rel=1e-15)
    assert rows["b"]["batch_probability"] == pytest.approx(1 - 0.875**16, rel=1e-12)


def test_bad_arguments_are_refused(spark):
    items = spark.createDataFrame([("a", 2)], "item_id string, item_index int")
    train = spark.createDataFrame([("u", "a")], "user_id string, item_id string")
    with pytest.raises(ValueError, match="floor_events"):
        item_popularity(train, items, 16, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        item_popularity(train, items, 0, 0.5)
