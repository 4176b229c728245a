"""Pairwise mutual information between item features, in one aggregation pass.

The SSL "correlated feature masking" (CFM) of Yao et al. masks groups of item features that are
mutually informative; this job measures that dependence for every unordered pair of item features.

Estimator (plug-in, natural log, nats)::

    MI(A, B) = sum_{a,b} P(a,b) ln(P(a,b) / (P(a) P(b)))  =  H(A) + H(B) - H(A,B)
    NMI(A, B) = 2 MI / (H(A) + H(B))     (sklearn ``normalized_mutual_info_score``, arithmetic mean)

Population: every catalogue item with weight 1 (``catalogue``), or every item with weight = its
number of train events (``train_events``; items with no train event drop out).

Multi-valued features: a population unit with weight ``w`` spreads it evenly over the cross product
of its value sets: each ``(a, b)`` in ``S_A x S_B`` gets ``w / (|S_A| |S_B|)`` (a single-valued side
is a set of one). An empty (or null) set counts as the single value 0, the mask index; duplicates
inside a set are ignored. Summing the joint over ``b`` gives every ``a`` in ``S_A`` the weight
``w / |S_A|`` whatever the partner feature, so the marginals are the joint's row/column sums, P is
a proper distribution per pair, and one marginal per feature serves every pair it is in.

Degenerate cases, as sklearn defines them: a feature with a single value in the population has
H = 0 and MI = 0 with anything; NMI is 1.0 when both features of a pair are constant
(H(A) + H(B) = 0: "both labellings agree perfectly") and 0.0 when only one is (MI = 0).

How it is one pass (the data is read once and shuffled once at full size):

1. per input row, one array of packed ``long`` keys ``(id << 2V) | (a << V) | b``: one per pair
   (id = pair number) and one per feature marginal (id = P + feature number, b = 0); multi-valued
   pairs use ``transform``/``flatten`` to enumerate the cross product inside the row;
2. explode once, ``groupBy(key)`` and count (or sum the split weights): the only large shuffle;
3. ``n * ln(n)`` per cell, then ``groupBy(id)``: ``S = sum n``, ``T = sum n ln n`` and the number
   of cells, so ``H = ln S - T / S`` per pair (joint) and per feature (marginal); a few dozen rows;
4. gather those rows into one map and emit one row per pair with MI = H(A) + H(B) - H(A,B).

Packing one ``long`` instead of grouping on (pair, a, b) halves the shuffled key bytes and lets the
aggregation use the fast single-long-key hash map. Indices must fit in ``V`` bits
(``V = (63 - id_bits) // 2``, 28 bits for 8 features); a value outside ``[0, 2^V)`` fails the job
with an error that names the column, rather than colliding silently.

    python -m spark_jobs.mutual_info --config conf/ml-100k.yaml
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (spark-submit spark_jobs/mutual_info.py): the package must import from the
    # --py-files zip or the repo root, and the script's folder must not shadow top-level modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path.pop(0)
    sys.path.append(os.path.dirname(_here))

from typing import Any, Optional, Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common.config import Config
from common.features import ITEM_ID, MASK_INDEX, FeatureSpec, feature_column, side, specs_from_manifest
from common.manifest import manifest_exists, read_manifest

OUTPUT_TABLE = "stats/mutual_info"
MULTI_VALUED_TREATMENT = (
    "each population unit's weight is split evenly over the cross product of its value sets "
    "(w / (|A| |B|) per (a, b)); an empty set counts as the single value 0 (mask index)"
)

# (name, column, is_multi) as in the manifest's item FeatureSpecs.
FeatureTriple = tuple[str, str, bool]


def _value_bits(num_ids: int) -> tuple[int, int]:
    """Bits for the id field and for each value field of a packed key (sign bit kept clear)."""
    id_bits = max(1, (num_ids - 1).bit_length())
    value_bits = (63 - id_bits) // 2
    return id_bits, value_bits


def _checked(c: Column, column: str, limit: int) -> Column:
    """``c`` as a long, failing the job if it cannot be packed into ``value_bits`` bits."""
    bad = c.isNull() | (c < 0) | (c >= limit)
    msg = F.concat(
        F.lit(f"mutual_info: column {column!r} holds index "),
        F.coalesce(c.cast("string"), F.lit("null")),
        F.lit(
            f"; encoded indices must be in [0, {limit}) to be packed into the aggregation key. "
            f"Check that {column!r} is an encoded vocabulary index (docs/data_contract.md), or "
            f"measure fewer features at once (fewer pairs leave more bits per index)."
        ),
    )
    return F.when(bad, F.raise_error(msg)).otherwise(c).cast("long")


def _validate(items: DataFrame, features: Sequence[FeatureTriple], weights: Optional[DataFrame]) -> None:
    if len(features) < 2:
        raise ValueError(
            f"pairwise_mutual_info needs at least 2 features, got {len(features)}: {list(features)}; "
            f"declare item features under features.item in the config"
        )
    names = [f[0] for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"feature names must be unique, got {names}")
    fields = {f.name: f.dataType for f in items.schema.fields}
    for name, column, is_multi in features:
        if column not in fields:
            raise ValueError(
                f"feature {name!r}: column {column!r} is not in the items table (columns: "
                f"{sorted(fields)}); the manifest's feature specs and items/ disagree, rerun "
                f"`python -m spark_jobs.prepare`"
            )
        dtype = fields[column]
        if is_multi:
            ok = isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, T.IntegralType)
            want = "array<int>"
        else:
            ok = isinstance(dtype, T.IntegralType)
            want = "an integer"
        if not ok:
            raise ValueError(
                f"feature {name!r}: column {column!r} has type {dtype.simpleString()}, expected {want} "
                f"({'multi' if is_multi else 'single'}-valued encoded feature, docs/data_contract.md)"
            )
    if weights is not None:
        if "item_index" not in fields:
            raise ValueError(f"weights are joined on item_index, but the items table has only {sorted(fields)}")
        wcols = set(weights.columns)
        if not {"item_index", "weight"} <= wcols:
            raise ValueError(f"weights must have columns item_index and weight, got {sorted(wcols)}")


def pairwise_mutual_info(
    items: DataFrame,
    features: Sequence[FeatureTriple],
    weights: Optional[DataFrame] = None,
) -> DataFrame:
    """Plug-in MI and NMI of every unordered feature pair, from one aggregation over ``items``.

    ``items``: one row per population unit with the feature columns (``[n_items]`` rows).
    ``features``: ``(name, column, is_multi)``; pairs are ``(features[i], features[j])``, ``i < j``.
    ``weights``: optional ``(item_index, weight)``: the unit's weight (e.g. its train event count);
    items without a row or with weight <= 0 drop out. Without it every row weighs 1.

    Returns ``feature_a`` string, ``feature_b`` string, ``mi`` double (nats), ``nmi`` double in
    [0, 1]; one row per pair in feature order. An empty population gives null ``mi``/``nmi``.
    """
    features = list(features)
    _validate(items, features, weights)
    nf = len(features)
    pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
    npairs = len(pairs)
    id_bits, vbits = _value_bits(npairs + nf)
    limit = 1 << vbits
    any_multi = any(m for _, _, m in features)

    df = items
    if weights is not None:
        w = weights.select(F.col("item_index"), F.col("weight")).where(F.col("weight") > 0)
        df = df.join(w, on="item_index", how="inner")

    # Values per feature: a guarded long for single-valued columns; for multi-valued columns the
    # de-duplicated set with empty/null -> [0], plus its size.
    single: dict[int, Column] = {}
    multi: dict[int, tuple[Column, Column]] = {}
    proj = []
    for k, (_, column, is_multi) in enumerate(features):
        if is_multi:
            arr = F.array_distinct(F.col(column))
            arr = F.when(F.coalesce(F.size(arr), F.lit(0)) <= 0, F.array(F.lit(MASK_INDEX))).otherwise(arr)
            arr = F.transform(arr, lambda x, c=column: _checked(x, c, limit))
            proj.append(arr.alias(f"_v{k}"))
        else:
            proj.append(_checked(F.col(column), column, limit).alias(f"_v{k}"))
    if weights is not None:
        proj.append(F.col("weight").alias("_w"))
    df = df.select(*proj)
    for k, (_, _, is_multi) in enumerate(features):
        if is_multi:
            multi[k] = (F.col(f"_v{k}"), F.size(F.col(f"_v{k}")).cast("double"))
        else:
            single[k] = F.col(f"_v{k}")

    def key(ident: int, a: Column, b: Optional[Column]) -> Column:
        packed = F.lit(ident << (2 * vbits)).cast("long").bitwiseOR(F.shiftleft(a, vbits))
        return packed if b is None else packed.bitwiseOR(b)

    if not any_multi:
        # Every (unit, pair) contributes exactly one cell: an array of keys, weight carried along.
        keys = [key(p, single[i], single[j]) for p, (i, j) in enumerate(pairs)]
        keys += [key(npairs + k, single[k], None) for k in range(nf)]
        exploded = df.select(F.explode(F.array(*keys)).alias("key"), *(["_w"] if weights is not None else []))
        if weights is None:
            cells = exploded.groupBy("key").agg(F.count(F.lit(1)).alias("n"))
        else:
            cells = exploded.groupBy("key").agg(F.sum("_w").alias("n"))
    else:
        # Split weights: (key, weight) structs, the cross products enumerated inside each row.
        w = F.col("_w").cast("double") if weights is not None else F.lit(1.0)

        def cell(k: Column, weight: Column) -> Column:
            return F.struct(k.alias("key"), weight.alias("w"))

        # Factories, not default arguments: Spark's lambdas must take only the element.
        def with_b(p: int, b: Column, n: Column):
            return lambda a: cell(key(p, a, b), w / n)

        def with_a(p: int, a: Column, n: Column):
            return lambda b: cell(key(p, a, b), w / n)

        def cross(p: int, vb: Column, n: Column):
            return lambda a: F.transform(vb, lambda b: cell(key(p, a, b), w / n))

        parts: list[Column] = []
        singles: list[Column] = []
        for p, (i, j) in enumerate(pairs):
            if i in single and j in single:
                singles.append(cell(key(p, single[i], single[j]), w))
            elif i in multi and j in single:
                va, na = multi[i]
                parts.append(F.transform(va, with_b(p, single[j], na)))
            elif i in single and j in multi:
                vb, nb = multi[j]
                parts.append(F.transform(vb, with_a(p, single[i], nb)))
            else:
                (va, na), (vb, nb) = multi[i], multi[j]
                parts.append(F.flatten(F.transform(va, cross(p, vb, na * nb))))
        for k in range(nf):
            if k in single:
                singles.append(cell(key(npairs + k, single[k], None), w))
            else:
                vk, nk = multi[k]
                parts.append(F.transform(vk, with_b(npairs + k, None, nk)))
        if singles:
            parts.insert(0, F.array(*singles))
        allcells = parts[0] if len(parts) == 1 else F.concat(*parts)
        exploded = df.select(F.inline(allcells))
        cells = exploded.groupBy("key").agg(F.sum("w").alias("n"))

    # Per id (pair joint or feature marginal): S = total weight, T = sum n ln n, number of cells.
    ent = (
        cells.select(
            F.shiftright(F.col("key"), 2 * vbits).cast("int").alias("id"),
            F.col("n").cast("double").alias("n"),
        )
        .groupBy("id")
        .agg(
            F.sum("n").alias("s"),
            F.sum(F.col("n") * F.log(F.col("n"))).alias("t"),
            F.count(F.lit(1)).alias("cells"),
        )
        .select(
            "id",
            "cells",
            # A single cell is exactly zero entropy; elsewhere clip rounding below 0.
            F.when(F.col("cells") == 1, F.lit(0.0))
            .otherwise(F.greatest(F.log(F.col("s")) - F.col("t") / F.col("s"), F.lit(0.0)))
            .alias("h"),
        )
    )
    # A few dozen rows into one map, then one output row per pair: no self-joins, no re-reads.
    table = ent.agg(F.map_from_entries(F.collect_list(F.struct("id", F.struct("h", "cells")))).alias("m"))
    m = F.col("m")
    rows = [
        F.struct(
            F.lit(features[i][0]).alias("feature_a"),
            F.lit(features[j][0]).alias("feature_b"),
            m[npairs + i]["h"].alias("ha"),
            m[npairs + j]["h"].alias("hb"),
            m[p]["h"].alias("hab"),
            m[npairs + i]["cells"].alias("ca"),
            m[npairs + j]["cells"].alias("cb"),
        )
        for p, (i, j) in enumerate(pairs)
    ]
    out = table.select(F.inline(F.array(*rows)))
    constant = (F.col("ca") == 1) | (F.col("cb") == 1)
    out = out.withColumn(
        "mi",
        # No cells at all (empty population): null, not a misleading 0 (greatest() skips nulls).
        F.when(F.col("hab").isNull(), F.lit(None).cast("double"))
        .when(constant, F.lit(0.0))
        .otherwise(
            F.greatest(F.col("ha") + F.col("hb") - F.col("hab"), F.lit(0.0))
        ),
    )
    out = out.withColumn(
        "nmi",
        F.when(F.col("mi").isNull(), F.lit(None).cast("double"))
        .when((F.col("ca") == 1) & (F.col("cb") == 1), F.lit(1.0))
        .when(F.col("mi") == 0.0, F.lit(0.0))
        .otherwise(F.least(F.greatest(2.0 * F.col("mi") / (F.col("ha") + F.col("hb")), F.lit(0.0)), F.lit(1.0))),
    )
    return out.select("feature_a", "feature_b", "mi", "nmi")


def item_feature_triples(specs: Sequence[FeatureSpec]) -> list[FeatureTriple]:
    """The item-side features, in manifest order, as ``(name, column, is_multi)``."""
    return [(s.name, s.column, s.multi) for s in side(specs, "item")]


def _feature_triples(cfg: Config, items: DataFrame) -> list[FeatureTriple]:
    """From the manifest when the prepared folder has one; else from the config and items/ schema.

    ``spark_jobs.prepare`` writes the manifest only after every step, so inside a full preparation
    the specs are rebuilt the same way the encoder declares them: the id first, then
    ``features.item`` in config order; a column is multi-valued when it is an array.
    """
    prepared = cfg.paths.prepared
    if manifest_exists(prepared):
        manifest = read_manifest(prepared)
        if "features" in manifest:
            return item_feature_triples(specs_from_manifest(manifest))
    types = {f.name: f.dataType for f in items.schema.fields}
    out: list[FeatureTriple] = []
    for name in [ITEM_ID, *cfg.features.item]:
        column = feature_column(name)
        if column not in types:
            raise ValueError(
                f"items/ under {prepared!r} has no column {column!r} for item feature {name!r} "
                f"(columns: {sorted(types)}); rerun `python -m spark_jobs.prepare --config <config>`"
            )
        out.append((name, column, isinstance(types[column], T.ArrayType)))
    return out


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Read ``items/`` (and ``train/``), write ``stats/mutual_info/``, return the manifest section."""
    from spark_jobs.io import prepared_path, read_table, write_table_atomic

    prepared = cfg.paths.prepared
    items = read_table(spark, prepared_path(prepared, "items"))
    features = _feature_triples(cfg, items)
    population = cfg.prepare.mi_population
    weights = None
    if population == "train_events":
        train = read_table(spark, prepared_path(prepared, "train"))
        weights = train.groupBy("item_index").agg(F.count(F.lit(1)).alias("weight"))

    rows = pairwise_mutual_info(items, features, weights).collect()
    expected = len(features) * (len(features) - 1) // 2
    if len(rows) != expected or any(r["mi"] is None for r in rows):
        source = "train/ joined to items/ on item_index" if weights is not None else "items/"
        raise ValueError(
            f"mutual information over population {population!r} came out empty ({len(rows)} rows, "
            f"expected {expected} pairs with values): {source} under {prepared!r} has no rows with "
            f"positive weight. Check that encode ran, or set prepare.mi_population: catalogue."
        )
    schema = T.StructType(
        [
            T.StructField("feature_a", T.StringType(), False),
            T.StructField("feature_b", T.StringType(), False),
            T.StructField("mi", T.DoubleType(), False),
            T.StructField("nmi", T.DoubleType(), False),
        ]
    )
    # The result is a few rows: write what was collected instead of recomputing the pass.
    result = spark.createDataFrame([tuple(r) for r in rows], schema).coalesce(1)
    write_table_atomic(result, prepared_path(prepared, OUTPUT_TABLE))
    return {
        "mutual_info": {
            "population": population,
            "pairs": len(rows),
            "multi_valued_treatment": MULTI_VALUED_TREATMENT,
        }
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from spark_jobs.cli import run_job

    return run_job("Pairwise mutual information between item features -> stats/mutual_info/", run, argv)


if __name__ == "__main__":
    main()
