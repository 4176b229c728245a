"""Pairwise item-feature mutual information: sklearn / numpy references, weights, one-pass plan."""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import types as T
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from common.config import from_dict
from common.features import FeatureSpec
from common.manifest import read_manifest, write_manifest
from spark_jobs import mutual_info
from spark_jobs.mutual_info import (
    BLOCK_CELLS,
    MULTI_VALUED_TREATMENT,
    FeatureStats,
    feature_stats,
    pairwise_mutual_info,
    plan_groups,
)

TOL = 1e-9
# Every engine and plan must give the same numbers: the Arrow engine (what run() uses), and the
# built-in SQL engine without stats (one explode, one aggregation) and with them (blocks of
# low-cardinality features + radix-partitioned high-cardinality pairs).
PLANS = ["arrow", "one_aggregation", "blocks_and_radix"]


def _plans_by_seed(plans: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """``(seed, plan)`` pairs: every seed on the Arrow engine (what ``run()`` uses), the first
    seed on every other plan, so that each plan is checked without multiplying Spark jobs."""
    return [(seed, plan) for plan in plans for seed in (seeds if plan == "arrow" else seeds[:1])]


def _mi(items, feats, weights=None, plan="arrow"):
    """Collected result of one plan. ``tiny_blocks``: blocks_and_radix with a block budget of 64
    cells, so that tiny test data has pairs in both branches, multi-valued ones included.
    ``arrow_tiny``: the Arrow engine counting chunks of 7 rows (so partial counts are merged inside
    a partition too) with the sort-based (sparse) path for every pair and marginal."""
    if plan == "tiny_blocks":
        saved = mutual_info.BLOCK_CELLS
        mutual_info.BLOCK_CELLS = 64
        try:
            return _mi(items, feats, weights, "blocks_and_radix")
        finally:
            mutual_info.BLOCK_CELLS = saved
    if plan == "arrow_tiny":
        saved = (mutual_info.ARROW_CHUNK_ROWS, mutual_info.DENSE_MIN_SPACE, mutual_info.DENSE_SPACE_PER_ROW)
        mutual_info.ARROW_CHUNK_ROWS, mutual_info.DENSE_MIN_SPACE, mutual_info.DENSE_SPACE_PER_ROW = 7, 0, 0
        try:
            return _mi(items, feats, weights, "arrow")
        finally:
            mutual_info.ARROW_CHUNK_ROWS, mutual_info.DENSE_MIN_SPACE, mutual_info.DENSE_SPACE_PER_ROW = saved
    if plan == "arrow":
        return _by_pair(pairwise_mutual_info(items, feats, weights))
    stats = feature_stats(items, feats) if plan != "one_aggregation" else None
    return _by_pair(pairwise_mutual_info(items, feats, weights, stats=stats, engine="sql"))


def _single_items(spark, rng, n: int, cards: list[int]):
    """``item_index`` plus ``f_k`` int32 columns with values in 2..card+1 (a card of 1 is constant)."""
    cols = {"item_index": np.arange(n, dtype=np.int32)}
    for k, card in enumerate(cards):
        cols[f"f_{k}"] = (rng.integers(0, card, n) + 2).astype(np.int32)
    pdf = pd.DataFrame(cols)
    schema = T.StructType([T.StructField(c, T.IntegerType(), False) for c in pdf.columns])
    return pdf, spark.createDataFrame([tuple(int(v) for v in row) for row in pdf.itertuples(index=False)], schema)


def _by_pair(out) -> dict[tuple[str, str], tuple[float, float]]:
    return {(r["feature_a"], r["feature_b"]): (r["mi"], r["nmi"]) for r in out.collect()}


@pytest.mark.parametrize("seed,plan", _plans_by_seed([*PLANS, "arrow_tiny"], [0, 1, 2]))
def test_single_valued_matches_sklearn(spark, seed, plan):
    rng = np.random.default_rng(seed)
    # A constant feature, a binary one, small and large vocabularies, and the unique item id.
    # The id (250-400 values) with the 300-value feature is above BLOCK_CELLS, so the
    # blocks_and_radix plan exercises both its branches.
    cards = [1, 2, int(rng.integers(3, 8)), int(rng.integers(10, 40)), 150, 300]
    n = int(rng.integers(250, 400))
    pdf, items = _single_items(spark, rng, n, cards)
    feats = [("item_id", "item_index", False)] + [(f"k{k}", f"f_{k}", False) for k in range(len(cards))]
    got = _mi(items, feats, plan=plan)

    assert list(got) == [(feats[i][0], feats[j][0]) for i in range(len(feats)) for j in range(i + 1, len(feats))]
    column = dict((name, col) for name, col, _ in feats)
    for (a, b), (mi, nmi) in got.items():
        x, y = pdf[column[a]].to_numpy(), pdf[column[b]].to_numpy()
        assert mi == pytest.approx(mutual_info_score(x, y), abs=TOL), (a, b)
        assert nmi == pytest.approx(normalized_mutual_info_score(x, y), abs=TOL), (a, b)
        assert mi >= 0.0 and 0.0 <= nmi <= 1.0
    # Degenerate cases as sklearn defines them: constant vs anything has MI 0 and NMI 0; the id
    # is unique per item, so MI(id, B) = H(B).
    assert got[("item_id", "k0")] == (0.0, 0.0)
    h_k3 = mutual_info_score(pdf["f_3"], pdf["f_3"])
    assert got[("item_id", "k3")][0] == pytest.approx(h_k3, abs=TOL)


@pytest.mark.parametrize("plan", PLANS)
def test_two_constant_features_have_nmi_one(spark, plan):
    schema = T.StructType([T.StructField(c, T.IntegerType(), False) for c in ("item_index", "f_a", "f_b", "f_c")])
    rows = [(i, 5, 7, 2 + i % 3) for i in range(30)]
    items = spark.createDataFrame(rows, schema)
    got = _mi(items, [("a", "f_a", False), ("b", "f_b", False), ("c", "f_c", False)], plan=plan)
    a, b, c = np.full(30, 5), np.full(30, 7), np.array([2 + i % 3 for i in range(30)])
    assert got[("a", "b")] == (0.0, 1.0) == (mutual_info_score(a, b), normalized_mutual_info_score(a, b))
    assert got[("a", "c")] == (0.0, 0.0) == (mutual_info_score(a, c), normalized_mutual_info_score(a, c))


# ---------------------------------------------------------------------------------------------
# Multi-valued features and weights: an independent pure-Python reference of the treatment
# ---------------------------------------------------------------------------------------------


def _reference(units: list[dict], features, weights: dict[int, float] | None):
    """Weighted plug-in MI/NMI by brute force over python dicts: the treatment in the docstring."""

    def values(v, multi):
        if not multi:
            return [int(v)]
        s = sorted(set(v or []))
        return s if s else [0]

    out = {}
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            (na, ca, ma), (nb, cb, mb) = features[i], features[j]
            joint: dict[tuple[int, int], float] = defaultdict(float)
            for u in units:
                w = 1.0 if weights is None else float(weights.get(u["item_index"], 0))
                if w <= 0:
                    continue
                va, vb = values(u[ca], ma), values(u[cb], mb)
                for a in va:
                    for b in vb:
                        joint[(a, b)] += w / (len(va) * len(vb))
            total = sum(joint.values())
            pa: dict[int, float] = defaultdict(float)
            pb: dict[int, float] = defaultdict(float)
            for (a, b), n in joint.items():
                pa[a] += n / total
                pb[b] += n / total
            mi = sum(n / total * math.log((n / total) / (pa[a] * pb[b])) for (a, b), n in joint.items())
            ha = -sum(p * math.log(p) for p in pa.values())
            hb = -sum(p * math.log(p) for p in pb.values())
            if len(pa) == 1 and len(pb) == 1:
                nmi = 1.0
            elif len(pa) == 1 or len(pb) == 1:
                mi, nmi = 0.0, 0.0
            else:
                nmi = 2 * mi / (ha + hb)
            out[(na, nb)] = (max(mi, 0.0), nmi)
    return out


MULTI_SCHEMA = T.StructType(
    [
        T.StructField("item_index", T.IntegerType(), False),
        T.StructField("item_id", T.StringType(), False),
        T.StructField("f_cat", T.IntegerType(), False),
        T.StructField("f_tags", T.ArrayType(T.IntegerType(), True), True),
        T.StructField("f_genres", T.ArrayType(T.IntegerType(), True), True),
        T.StructField("f_price", T.IntegerType(), False),
    ]
)
MULTI_FEATURES = [
    ("item_id", "item_index", False),
    ("cat", "f_cat", False),
    ("tags", "f_tags", True),
    ("genres", "f_genres", True),
    ("price", "f_price", False),
]


def _multi_units(rng, n: int) -> list[dict]:
    units = []
    for i in range(n):
        cat = int(rng.integers(2, 6))
        k = int(rng.integers(0, 4))
        # Tags depend on the category; genres are independent; sets may be empty or null.
        tags = [int(t) for t in (cat + rng.integers(0, 4, k)) % 9 + 2]
        genres = None if rng.random() < 0.1 else [int(g) for g in rng.integers(2, 7, int(rng.integers(0, 3)))]
        if i % 17 == 0:
            tags = tags + tags  # duplicates inside a set count once
        units.append(
            {"item_index": i, "item_id": f"i{i}", "f_cat": cat, "f_tags": tags, "f_genres": genres,
             "f_price": int(rng.integers(2, 5))}
        )
    return units


@pytest.mark.parametrize("seed,plan", _plans_by_seed([*PLANS, "tiny_blocks", "arrow_tiny"], [0, 1]))
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_valued_treatment_matches_reference(spark, seed, weighted, plan):
    rng = np.random.default_rng(100 + seed)
    units = _multi_units(rng, int(rng.integers(60, 160)))
    items = spark.createDataFrame([tuple(u[f.name] for f in MULTI_SCHEMA.fields) for u in units], MULTI_SCHEMA)
    weights = None
    wdf = None
    if weighted:
        # Some items absent, some with weight 0: both drop out of the population.
        weights = {u["item_index"]: int(rng.integers(0, 5)) for u in units if rng.random() < 0.8}
        wdf = spark.createDataFrame(list(weights.items()), "item_index int, weight long")
    got = _mi(items, MULTI_FEATURES, wdf, plan=plan)
    want = _reference(units, MULTI_FEATURES, weights)
    assert set(got) == set(want)
    for pair, (mi, nmi) in want.items():
        assert got[pair][0] == pytest.approx(mi, abs=TOL), pair
        assert got[pair][1] == pytest.approx(nmi, abs=TOL), pair
    # The planted dependence shows: tags follow the category, genres do not.
    assert got[("cat", "tags")][0] > got[("cat", "genres")][0]


@pytest.mark.parametrize("engine", ["arrow", "sql"])
def test_empty_set_is_the_mask_value(spark, engine):
    # An empty tag set must count as the value 0, i.e. exactly like a row tagged [0].
    rows_empty = [(0, "a", 2, [], [], 2), (1, "b", 3, [5], [], 2), (2, "c", 3, [], [], 3), (3, "d", 2, [5, 6], [], 3)]
    rows_zero = [(i, s, c, t or [0], g, p) for i, s, c, t, g, p in rows_empty]
    one = _by_pair(pairwise_mutual_info(spark.createDataFrame(rows_empty, MULTI_SCHEMA), MULTI_FEATURES, engine=engine))
    two = _by_pair(pairwise_mutual_info(spark.createDataFrame(rows_zero, MULTI_SCHEMA), MULTI_FEATURES, engine=engine))
    assert one.keys() == two.keys()
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-12)
    assert one[("cat", "tags")][0] > 0


# ---------------------------------------------------------------------------------------------
# train_events weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,plan", _plans_by_seed(PLANS, [0, 1]))
def test_train_event_weights_equal_repeated_rows(spark, seed, plan):
    rng = np.random.default_rng(200 + seed)
    pdf, items = _single_items(spark, rng, 120, [3, 6, 25])
    counts = rng.integers(0, 6, len(pdf))
    wdf = spark.createDataFrame(
        [(int(i), int(c)) for i, c in zip(pdf["item_index"], counts)], "item_index int, weight long"
    )
    feats = [("item_id", "item_index", False), ("a", "f_0", False), ("b", "f_1", False), ("c", "f_2", False)]
    got = _mi(items, feats, wdf, plan=plan)
    repeated = pdf.loc[np.repeat(np.arange(len(pdf)), counts)]
    column = {name: col for name, col, _ in feats}
    for (a, b), (mi, nmi) in got.items():
        x, y = repeated[column[a]].to_numpy(), repeated[column[b]].to_numpy()
        assert mi == pytest.approx(mutual_info_score(x, y), abs=TOL), (a, b)
        assert nmi == pytest.approx(normalized_mutual_info_score(x, y), abs=TOL), (a, b)
    # Unweighted differs: the weights are really applied.
    plain = _mi(items, feats, plan=plan)
    assert abs(plain[("a", "b")][0] - got[("a", "b")][0]) > 1e-6


# ---------------------------------------------------------------------------------------------
# Planted structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS)
def test_planted_structure(spark, plan):
    rng = np.random.default_rng(7)
    n = 6000
    x = rng.integers(0, 8, n)
    copy = x  # deterministic function of x
    noisy = np.where(rng.random(n) < 0.7, x // 2, rng.integers(0, 4, n))
    indep = rng.integers(0, 5, n)
    schema = "item_index int, f_x int, f_copy int, f_noisy int, f_indep int"
    rows = [(i, int(x[i]) + 2, int(copy[i]) * 3 + 2, int(noisy[i]) + 2, int(indep[i]) + 2) for i in range(n)]
    items = spark.createDataFrame(rows, schema)
    feats = [("x", "f_x", False), ("copy", "f_copy", False), ("noisy", "f_noisy", False), ("indep", "f_indep", False)]
    got = _mi(items, feats, plan=plan)
    assert got[("x", "copy")][1] == pytest.approx(1.0, abs=1e-12)
    assert got[("x", "copy")][0] == pytest.approx(math.log(8), abs=0.02)
    assert got[("x", "noisy")][0] > 0.4
    assert got[("x", "indep")][0] < 0.01
    assert got[("noisy", "indep")][0] < 0.01


# ---------------------------------------------------------------------------------------------
# One aggregation pass
# ---------------------------------------------------------------------------------------------


def _jobs_and_plan(spark, items, feats, stats=None, engine="sql"):
    sc = spark.sparkContext
    group = f"mi-test-{uuid.uuid4().hex}"
    sc.setJobGroup(group, "mutual info job count")
    try:
        out = pairwise_mutual_info(items, feats, stats=stats, engine=engine)
        out.collect()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    # With adaptive execution the string holds the final plan, then the initial one: keep the first.
    plan = out._jdf.queryExecution().executedPlan().toString().split("== Initial Plan ==")[0]
    return len(sc.statusTracker().getJobIdsForGroup(group)), plan


@pytest.fixture()
def parquet_items(spark, tmp_path):
    rng = np.random.default_rng(3)
    pdf, _ = _single_items(spark, rng, 400, [2, 3, 5, 7, 11, 13, 17, 300])
    path = str(tmp_path / "items")
    spark.createDataFrame(pdf.astype("int32")).write.parquet(path)
    return spark.read.parquet(path)


def test_all_pairs_in_one_aggregation_pass(spark, parquet_items):
    few = [(f"k{k}", f"f_{k}", False) for k in range(3)]
    many = [("item_id", "item_index", False)] + [(f"k{k}", f"f_{k}", False) for k in range(8)]

    jobs_few, _ = _jobs_and_plan(spark, parquet_items, few)
    jobs_many, plan = _jobs_and_plan(spark, parquet_items, many)
    # 3 pairs or 36 pairs: the same (small) number of Spark jobs, so nothing runs per pair.
    assert jobs_many == jobs_few
    assert 1 <= jobs_many <= 6
    # The input is scanned once and exploded once; one aggregation is keyed by the packed cell.
    assert plan.count("FileScan parquet") == 1, plan
    assert plan.count("explode(") == 1, plan
    assert plan.count("HashAggregate(keys=[key#") == 2, plan  # its partial and final halves


def test_blocks_and_radix_plan_is_constant_in_the_number_of_pairs(spark, parquet_items):
    # Both plans have a block branch and a radix branch: (item_id, k7) has 400 x 301 cells.
    few = [("item_id", "item_index", False), ("k0", "f_0", False), ("k7", "f_7", False)]
    many = [("item_id", "item_index", False)] + [(f"k{k}", f"f_{k}", False) for k in range(8)]
    jobs_few, _ = _jobs_and_plan(spark, parquet_items, few, feature_stats(parquet_items, few))
    jobs_many, plan = _jobs_and_plan(spark, parquet_items, many, feature_stats(parquet_items, many))
    assert jobs_many == jobs_few
    assert 1 <= jobs_many <= 8
    # One scan per branch: the blocks (map-side aggregated) and the radix-partitioned pairs.
    assert plan.count("FileScan parquet") == 2, plan
    assert "hashpartitioning(key#" in plan and "RoundRobin" not in plan


@pytest.mark.parametrize("seed", range(5))
def test_plan_groups_serves_every_pair_and_marginal_once(seed):
    rng = np.random.default_rng(seed)
    nf = int(rng.integers(2, 10))
    cards = [int(c) for c in rng.choice([1, 2, 3, 10, 50, 300, 5000, 10**6], nf)]
    groups = plan_groups(nf, cards)
    npairs = nf * (nf - 1) // 2
    served = [item for g in groups for item in g.serves]
    assert sorted(served) == list(range(npairs + nf))
    pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
    for g in groups:
        size = math.prod(cards[k] for k in g.members)
        if g.direct:
            # A direct group is one item whose id is the group id: a big pair or a big marginal.
            assert g.serves == (g.gid,) and size > BLOCK_CELLS
        else:
            assert size <= BLOCK_CELLS and g.gid >= npairs + nf
        for item in g.serves:
            members = pairs[item] if item < npairs else (item - npairs,)
            assert set(members) <= set(g.members)
    # Without cardinalities every pair and marginal is its own direct group.
    assert all(g.direct for g in plan_groups(nf, None)) and len(plan_groups(nf, None)) == npairs + nf


@pytest.mark.parametrize("engine", ["arrow", "sql"])
def test_out_of_range_index_fails_with_a_clear_error(spark, engine):
    items = spark.createDataFrame([(0, 2, 3), (1, -4, 3)], "item_index int, f_a int, f_b int")
    feats = [("a", "f_a", False), ("b", "f_b", False)]
    with pytest.raises(Exception, match="f_a.*-4.*expected an encoded vocabulary index"):
        pairwise_mutual_info(items, feats, engine=engine).collect()
    # With stats, the bound is the cardinality they state.
    with pytest.raises(Exception, match="f_b.*index 3.*\\[0, 3\\)"):
        pairwise_mutual_info(items.where("f_a >= 0"), feats, stats=FeatureStats((3, 3), 2), engine=engine).collect()
    # Inside a multi-valued set too.
    tags = spark.createDataFrame([(0, 2, [3, -1])], "item_index int, f_a int, f_t array<int>")
    with pytest.raises(Exception, match="f_t.*-1.*expected an encoded vocabulary index"):
        pairwise_mutual_info(tags, [("a", "f_a", False), ("t", "f_t", True)], engine=engine).collect()


def test_arrow_engine_rejects_nulls_and_unknown_engines(spark):
    feats = [("a", "f_a", False), ("b", "f_b", False)]
    items = spark.createDataFrame([(0, 2, 3), (1, None, 3)], "item_index int, f_a int, f_b int")
    with pytest.raises(Exception, match="f_a.*index null.*expected an encoded vocabulary index"):
        pairwise_mutual_info(items, feats).collect()
    tags = spark.createDataFrame([(0, 2, [3, None])], "item_index int, f_a int, f_t array<int>")
    with pytest.raises(Exception, match="f_t.*index null"):
        pairwise_mutual_info(tags, [("a", "f_a", False), ("t", "f_t", True)]).collect()
    with pytest.raises(ValueError, match="engine must be"):
        pairwise_mutual_info(items, feats, engine="pandas")


def test_arrow_plan_scans_once_in_a_constant_number_of_jobs(spark, parquet_items):
    few = [(f"k{k}", f"f_{k}", False) for k in range(3)]
    many = [("item_id", "item_index", False)] + [(f"k{k}", f"f_{k}", False) for k in range(8)]
    jobs_few, _ = _jobs_and_plan(spark, parquet_items, few, engine="arrow")
    jobs_many, plan = _jobs_and_plan(spark, parquet_items, many, engine="arrow")
    assert jobs_many == jobs_few
    assert 1 <= jobs_many <= 6
    # One scan (no stats job), one vectorised counting pass, one grouped merge per pair/marginal.
    assert plan.count("FileScan parquet") == 1, plan
    assert plan.count("MapInArrow") == 1, plan
    assert plan.count("FlatMapGroupsInArrow") == 1, plan


# ---------------------------------------------------------------------------------------------
# The Arrow engine's numpy kernels, without Spark
# ---------------------------------------------------------------------------------------------


def test_unit_dedupes_sets_and_gives_empty_sets_the_mask_index():
    import pyarrow as pa

    col = pa.array([[5, 3, 5], [], None, [4], [2, 2]], pa.list_(pa.int32()))
    for arr in (col, col.slice(1)):  # a sliced list array (a later chunk of a batch) too
        u = mutual_info._unit(arr, "f_t", True, 10, "test")
        want = [sorted(set(v or [])) or [0] for v in arr.to_pylist()]
        assert u.lens.tolist() == [len(v) for v in want]
        assert u.values.tolist() == [x for v in want for x in v]
        assert u.rows.tolist() == [r for r, v in enumerate(want) for _ in v]
        assert u.starts.tolist() == [0, *np.cumsum([len(v) for v in want]).tolist()]


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_and_sparse_counts_agree(weighted):
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 40, 500), rng.integers(0, 30, 500)
    w = rng.random(500) if weighted else None
    dense = mutual_info._count(a, b, w, (1 << 20, 8))
    sparse = mutual_info._count(a, b, w, (0, 0))
    assert np.array_equal(dense[0], sparse[0])
    assert np.allclose(dense[1], sparse[1], rtol=0, atol=1e-12)
    want: dict[tuple[int, int], float] = defaultdict(float)
    for k in range(500):
        want[(int(a[k]), int(b[k]))] += 1.0 if w is None else float(w[k])
    got = {(int(c) >> 32, int(c) & 0xFFFFFFFF): n for c, n in zip(*sparse)}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], abs=1e-12) for k in want)
    # Merging two halves' partial counts gives the counts of the whole.
    half = [mutual_info._count(a[s], b[s], None if w is None else w[s]) for s in (slice(0, 200), slice(200, 500))]
    merged = mutual_info._merge(half)
    assert np.array_equal(merged[0], sparse[0]) and np.allclose(merged[1], sparse[1], rtol=0, atol=1e-12)


def test_bad_arguments_are_reported(spark):
    items = spark.createDataFrame([(0, 2, [3])], "item_index int, f_a int, f_t array<int>")
    with pytest.raises(ValueError, match="at least 2 features"):
        pairwise_mutual_info(items, [("a", "f_a", False)])
    with pytest.raises(ValueError, match="f_missing.*not in the items table"):
        pairwise_mutual_info(items, [("a", "f_a", False), ("m", "f_missing", False)])
    with pytest.raises(ValueError, match="f_t.*array<int>.*expected an integer"):
        pairwise_mutual_info(items, [("a", "f_a", False), ("t", "f_t", False)])
    with pytest.raises(ValueError, match="item_index and weight"):
        pairwise_mutual_info(items, [("a", "f_a", False), ("t", "f_t", True)], items.select("item_index"))


# ---------------------------------------------------------------------------------------------
# run(): prepared folder in, stats/mutual_info/ + manifest section out
# ---------------------------------------------------------------------------------------------


def _config(tmp_path, population: str, engine: str = "arrow"):
    return from_dict(
        {
            "features": {"item": {"cat": "categorical", "tags": {"type": "multi"}}},
            "paths": {"prepared": str(tmp_path / "prepared"), "raw": str(tmp_path / "raw"), "runs": str(tmp_path / "runs")},
            "prepare": {"mi_population": population, "mi_engine": engine},
        }
    )


ITEM_SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 12),
    FeatureSpec("cat", "item", "categorical", False, "f_cat", 5),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 9),
    # User-side specs are in the manifest too and must be ignored.
    FeatureSpec("region", "user", "categorical", False, "f_region", 4),
]


def _write_prepared(spark, cfg, with_manifest: bool = True):
    prepared = cfg.paths.prepared
    items = [(i, f"i{i}", 2 + i % 3, [2 + (i % 3), 3 + (i % 5)] if i % 4 else []) for i in range(10)]
    spark.createDataFrame(items, "item_index int, item_id string, f_cat int, f_tags array<int>").write.parquet(
        f"{prepared}/items"
    )
    events = [(f"u{e % 4}", f"i{i}", i, 1000 + e, e % 4, []) for e, i in enumerate([0, 0, 0, 1, 2, 2, 5, 7, 7, 7, 7])]
    spark.createDataFrame(
        events,
        "user_id string, item_id string, item_index int, timestamp long, user_index int, history array<int>",
    ).write.parquet(f"{prepared}/train")
    if with_manifest:
        write_manifest(prepared, {"version": 1, "features": [s.to_json() for s in ITEM_SPECS]})
    return items, events


@pytest.mark.parametrize("population,engine", [("catalogue", "arrow"), ("train_events", "arrow"), ("train_events", "sql")])
def test_run_writes_stats_table(spark, tmp_path, population, engine):
    cfg = _config(tmp_path, population, engine)
    items, events = _write_prepared(spark, cfg)
    section = mutual_info.run(spark, cfg)
    assert section == {
        "mutual_info": {"population": population, "pairs": 3, "multi_valued_treatment": MULTI_VALUED_TREATMENT}
    }
    table = pd.read_parquet(f"{cfg.paths.prepared}/stats/mutual_info")
    assert list(table.columns) == ["feature_a", "feature_b", "mi", "nmi"]
    assert [tuple(p) for p in table[["feature_a", "feature_b"]].to_numpy()] == [
        ("item_id", "cat"), ("item_id", "tags"), ("cat", "tags")
    ]
    units = [{"item_index": i, "f_cat": c, "f_tags": t} for i, _, c, t in items]
    weights = None
    if population == "train_events":
        weights = defaultdict(int)
        for _, _, i, *_ in events:
            weights[i] += 1
    feats = [("item_id", "item_index", False), ("cat", "f_cat", False), ("tags", "f_tags", True)]
    want = _reference(units, feats, weights)
    for row in table.itertuples():
        assert row.mi == pytest.approx(want[(row.feature_a, row.feature_b)][0], abs=TOL)
        assert row.nmi == pytest.approx(want[(row.feature_a, row.feature_b)][1], abs=TOL)
    # The manifest is merged by cli.run_job / prepare, not by run(): left untouched here.
    assert "mutual_info" not in read_manifest(cfg.paths.prepared)


def test_run_without_manifest_uses_config_and_schema(spark, tmp_path):
    # Inside spark_jobs.prepare the manifest is written last; run() must still find the features.
    cfg = _config(tmp_path, "catalogue")
    _write_prepared(spark, cfg, with_manifest=False)
    mutual_info.run(spark, cfg)
    table = pd.read_parquet(f"{cfg.paths.prepared}/stats/mutual_info")
    assert [tuple(p) for p in table[["feature_a", "feature_b"]].to_numpy()] == [
        ("item_id", "cat"), ("item_id", "tags"), ("cat", "tags")
    ]


def test_run_reports_an_empty_population(spark, tmp_path):
    cfg = _config(tmp_path, "train_events")
    _write_prepared(spark, cfg)
    spark.createDataFrame(
        [("u", "i99", 99, 1, 0, [])],
        "user_id string, item_id string, item_index int, timestamp long, user_index int, history array<int>",
    ).write.mode("overwrite").parquet(f"{cfg.paths.prepared}/train")
    with pytest.raises(ValueError, match="came out empty.*train/"):
        mutual_info.run(spark, cfg)


def test_main_merges_the_manifest_section(spark, tmp_path):
    cfg = _config(tmp_path, "catalogue")
    _write_prepared(spark, cfg)
    mutual_info.main(
        ["--config", str(Path(__file__).resolve().parents[2] / "conf" / "default.yaml"), "--set", f"paths.prepared={cfg.paths.prepared}",
         "features.item={cat: categorical, tags: multi}"]
    )
    m = read_manifest(cfg.paths.prepared)
    assert m["mutual_info"]["pairs"] == 3 and m["mutual_info"]["population"] == "catalogue"
