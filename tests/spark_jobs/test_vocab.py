"""Vocabularies vs pandas / numpy references: normalisation, ordering, min_count, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.config import FeatureDecl
from spark_jobs.vocab import bucket_labels, build_vocab, feature_values, vocab_size

SEEDS = (0, 1, 2)


def _vocab_rows(df) -> list[tuple[str, int, int]]:
    return sorted((r["value"], r["index"], r["count"]) for r in df.collect())


def _reference_vocab(values: list[str], min_count: int, universe: tuple[str, ...] = (), keep_all: bool = False):
    counts = pd.Series(values, dtype=object).value_counts()
    counts = counts.reindex(sorted(set(counts.index) | set(universe)), fill_value=0)
    table = pd.DataFrame({"value": counts.index, "count": counts.to_numpy()})
    if not keep_all:
        table = table[table["count"] >= min_count]
    table = table.sort_values(["count", "value"], ascending=[False, True], kind="stable")
    return sorted(zip(table["value"], range(2, 2 + len(table)), table["count"].astype(int)))


def _random_categorical(seed: int, n: int = 120) -> list:
    rng = np.random.default_rng(seed)
    pool = ["a", "b", " b ", "c", "dd", "e", "", "  ", None, "Zz", "é"]
    # Zipf-like weights so that counts tie and differ.
    w = 1.0 / np.arange(1, len(pool) + 1)
    return list(rng.choice(np.array(pool, dtype=object), size=n, p=w / w.sum()))


@pytest.mark.parametrize("seed", SEEDS)
def test_categorical_vocab_matches_pandas(spark, seed):
    raw = _random_categorical(seed)
    df = spark.createDataFrame([(i, v) for i, v in enumerate(raw)], "id long, color string")
    values = feature_values(df, "color", FeatureDecl(type="categorical"))
    normalised = [v.strip() for v in raw if v is not None and v.strip()]
    assert sorted(r["value"] for r in values.collect()) == sorted(normalised)

    for min_count in (1, 3, 10):
        got = _vocab_rows(build_vocab(values, min_count))
        assert got == _reference_vocab(normalised, min_count)
        indices = sorted(i for _, i, _ in got)
        assert indices == list(range(2, 2 + len(got))), "indices must be dense from 2 (0 and 1 reserved)"


@pytest.mark.parametrize("seed", SEEDS)
def test_vocab_is_deterministic_across_runs_and_input_order(spark, seed):
    raw = _random_categorical(seed, n=200)
    rows = [(i, v) for i, v in enumerate(raw)]
    shuffled = [rows[i] for i in np.random.default_rng(seed + 100).permutation(len(rows))]
    decl = FeatureDecl(type="categorical")
    a = build_vocab(feature_values(spark.createDataFrame(rows, "id long, c string"), "c", decl), 2)
    b = build_vocab(feature_values(spark.createDataFrame(rows, "id long, c string"), "c", decl), 2)
    c = build_vocab(feature_values(spark.createDataFrame(shuffled, "id long, c string").repartition(3), "c", decl), 2)
    assert _vocab_rows(a) == _vocab_rows(b) == _vocab_rows(c)


def test_ties_are_broken_by_value_and_min_count_drops_rare_values(spark):
    values = spark.createDataFrame([(v,) for v in ["b", "a", "c", "c", "b", "a", "d"]], "value string")
    # Counts: a=2, b=2, c=2, d=1 -> a, b, c by value, d last; min_count 2 drops d (it maps to OOV).
    assert _vocab_rows(build_vocab(values, 1)) == [("a", 2, 2), ("b", 3, 2), ("c", 4, 2), ("d", 5, 1)]
    assert _vocab_rows(build_vocab(values, 2)) == [("a", 2, 2), ("b", 3, 2), ("c", 4, 2)]
    assert _vocab_rows(build_vocab(values, 2, keep_all=True)) == [("a", 2, 2), ("b", 3, 2), ("c", 4, 2), ("d", 5, 1)]


def test_universe_values_get_zero_counts_after_clicked_ones(spark):
    clicks = spark.createDataFrame([(v,) for v in ["i3", "i3", "i1"]], "value string")
    catalogue = spark.createDataFrame([(v,) for v in ["i1", "i2", "i3", "i0"]], "value string")
    got = _vocab_rows(build_vocab(clicks, 5, keep_all=True, universe=catalogue))
    assert got == [("i0", 4, 0), ("i1", 3, 1), ("i2", 5, 0), ("i3", 2, 2)]
    assert got == _reference_vocab(["i3", "i3", "i1"], 5, universe=("i0", "i1", "i2", "i3"), keep_all=True)
    assert vocab_size(build_vocab(clicks, 5, keep_all=True, universe=catalogue)) == 6
    # Nothing survives min_count: the table still needs rows 0 and 1.
    assert vocab_size(build_vocab(clicks, 5)) == 2


def _reference_multi(cell, sep: str) -> list[str]:
    if cell is None:
        return []
    parts = cell if isinstance(cell, list) else cell.split(sep)
    out: list[str] = []
    for p in parts:
        if p is None:
            continue
        p = p.strip()
        if p and p not in out:
            out.append(p)
    return out


# "." is a regex metacharacter: splitting must treat the separator literally.
@pytest.mark.parametrize("seed,sep", [(0, "|"), (1, "."), (2, ","), (3, "|")])
def test_multi_values_from_strings_match_python(spark, seed, sep):
    rng = np.random.default_rng(seed)
    tokens = ["x", "y", " z", "w ", "", "x"]
    cells = []
    for _ in range(40):
        k = int(rng.integers(0, 5))
        cells.append(None if k == 0 and rng.random() < 0.5 else sep.join(rng.choice(tokens, size=k)))
    df = spark.createDataFrame(list(enumerate(cells)), "id long, tags string")
    got = sorted(r["value"] for r in feature_values(df, "tags", FeatureDecl(type="multi", sep=sep)).collect())
    expected = sorted(v for c in cells for v in _reference_multi(c, sep))
    assert got == expected
    assert _vocab_rows(build_vocab(feature_values(df, "tags", FeatureDecl(type="multi", sep=sep)), 2)) == _reference_vocab(expected, 2)


def test_multi_values_from_array_column_are_deduplicated_per_row(spark):
    cells = [["a", "b", "a"], [" b", None, ""], None, [], ["c"]]
    df = spark.createDataFrame(list(enumerate(cells)), "id long, genres array<string>")
    got = sorted(r["value"] for r in feature_values(df, "genres", FeatureDecl(type="multi")).collect())
    assert got == ["a", "b", "b", "c"]


def test_bucket_labels_are_readable():
    assert bucket_labels((18, 25, 65)) == ["(-inf,18)", "[18,25)", "[25,65)", "[65,inf)"]
    assert bucket_labels((0.5, 2.0)) == ["(-inf,0.5)", "[0.5,2)", "[2,inf)"]


@pytest.mark.parametrize("seed", SEEDS)
def test_bucketized_values_match_numpy_digitize(spark, seed):
    boundaries = (18.0, 25.0, 35.0, 65.0)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, size=60).astype(float)
    x[:4] = boundaries  # exact boundaries go to the bucket they open (left-closed)
    x[4] = np.nan
    labels = bucket_labels(boundaries)
    expected = sorted(labels[i] for i in np.digitize(x[~np.isnan(x)], boundaries))
    decl = FeatureDecl(type="bucketized", boundaries=boundaries)

    numeric = spark.createDataFrame([(i, None if np.isnan(v) else float(v)) for i, v in enumerate(x)], "id long, age double")
    assert sorted(r["value"] for r in feature_values(numeric, "age", decl).collect()) == expected

    # Numeric strings (CSV input), with padding and garbage that must count as missing.
    as_text = [(i, "" if np.isnan(v) else f" {int(v)} ") for i, v in enumerate(x)] + [(999, "abc"), (1000, None)]
    text = spark.createDataFrame(as_text, "id long, age string")
    assert sorted(r["value"] for r in feature_values(text, "age", decl).collect()) == expected


def test_categorical_from_numbers_is_cast_to_string(spark):
    df = spark.createDataFrame([(1, 1990), (2, 1990), (3, None), (4, 2001)], "id long, year int")
    got = _vocab_rows(build_vocab(feature_values(df, "year", FeatureDecl(type="categorical")), 1))
    assert got == [("1990", 2, 2), ("2001", 3, 1)]


def test_missing_feature_column_names_the_columns(spark):
    df = spark.createDataFrame([(1, "a")], "id long, color string")
    with pytest.raises(ValueError, match="'size' is missing.*color"):
        feature_values(df, "size", FeatureDecl(type="categorical"))
