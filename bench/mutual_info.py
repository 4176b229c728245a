"""Benchmark: pairwise feature mutual information, single-pass Spark vs per-pair Spark vs DuckDB.

    python bench/mutual_info.py                      # 2M rows, 8 features (1 multi-valued), local[2]
    python bench/mutual_info.py --rows 200000 --features 6 --multi 0 --repeats 2

One generated table (numpy -> one Parquet file with several row groups, in a temp dir) and three
implementations of the same estimator (plug-in MI in nats, multi-valued weights split evenly over
the cross product of value sets, empty set -> value 0; see ``spark_jobs/mutual_info.py``):

1. ``single-pass``: ``spark_jobs.mutual_info.pairwise_mutual_info`` as ``run`` calls it (Arrow
   engine: one scan, each partition counted with numpy in ``mapInArrow``, partial counts merged per
   pair by a grouped Arrow function; every pair in one Spark job). ``single-pass-sql``
   (``--no-sql`` to skip) is the built-in-only engine with ``feature_stats`` (timed too), the plan
   ``run`` used before: blocks of low-cardinality features + radix-partitioned high-cardinality
   pairs;
2. ``per-pair``: the obvious Spark loop: for each pair a ``groupBy(a, b)`` over the Parquet file
   (plus one ``groupBy(a)`` per feature for the marginals), reduced to (sum n, sum n ln n, cells)
   in Spark and collected; MI assembled on the driver. Not a straw man: nothing large is collected;
3. ``duckdb``: the same computation as one SQL statement (``UNION ALL`` of per-pair ``GROUP BY``s,
   ``unnest`` for the multi-valued feature) on the same Parquet file, with DuckDB's thread count set
   to the Spark core count so both get the same CPUs.

The three results must agree (max |diff| of MI and NMI < 1e-6) or the script exits with status 1.
Each implementation is run once to warm up (JIT, file cache), then timed ``--repeats`` times; the
median is reported. Spark reads the Parquet file on every run (nothing is cached).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TOLERANCE = 1e-6

# (name, column, is_multi) -> entropies keyed like the Spark job: ("pair", i, j) and ("feat", k).
Features = list[tuple[str, str, bool]]


def cores_of(master: str) -> int:
    m = re.fullmatch(r"local\[(\d+|\*)\]", master)
    if m is None:
        if master == "local":
            return 1
        raise SystemExit(f"--master must be local, local[N] or local[*] for this benchmark, got {master!r}")
    return os.cpu_count() or 1 if m.group(1) == "*" else int(m.group(1))


def cardinalities(n_single: int) -> list[int]:
    """Log-spaced from 2 to 10,000: a mix of tiny and large vocabularies."""
    if n_single == 1:
        return [10_000]
    return [int(round(c)) for c in np.geomspace(2, 10_000, n_single)]


def generate(path: str, rows: int, n_features: int, n_multi: int, seed: int) -> Features:
    """Write the table; returns the feature triples. Indices start at 2 as the encoder's do."""
    rng = np.random.default_rng(seed)
    n_single = n_features - n_multi
    cards = cardinalities(n_single)
    cols: dict[str, pa.Array] = {}
    values: list[np.ndarray] = []
    for k, card in enumerate(cards):
        values.append(rng.integers(0, card, rows))
    # Planted dependence: the two smallest features follow coarsened versions of the two largest
    # ones 80% of the time (so those pairs have clearly positive MI, the rest near zero).
    if n_single >= 4:
        for small, large in ((0, n_single - 1), (1, n_single - 2)):
            follow = rng.random(rows) < 0.8
            coarse = values[large] * cards[small] // cards[large]
            values[small] = np.where(follow, coarse, values[small])
    feats: Features = []
    for k, v in enumerate(values):
        name = f"s{k}_c{cards[k]}"
        cols[f"f_{name}"] = pa.array((v + 2).astype(np.int32))
        feats.append((name, f"f_{name}", False))
    for m in range(n_multi):
        # Tag-like: 0..3 distinct tags out of 30, correlated with the smallest single feature.
        card = 30
        lengths = rng.integers(0, 4, rows)
        base = values[0] % card
        offsets = np.zeros(rows + 1, dtype=np.int32)
        offsets[1:] = np.cumsum(lengths)
        first = np.repeat(base, lengths)
        pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        # Positions 0, 1, 2 of a row get base, base+7, base+14 (mod card): distinct within a row.
        flat = ((first + 7 * pos) % card + 2).astype(np.int32)
        name = f"m{m}_c{card}"
        cols[f"f_{name}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        feats.append((name, f"f_{name}", True))
    table = pa.table(cols)
    # Several row groups so that Spark can split the single file across its cores.
    pq.write_table(table, path, row_group_size=max(1, rows // 16))
    return feats


# ---------------------------------------------------------------------------------------------
# Shared assembly: entropies -> MI / NMI (the same rules as spark_jobs.mutual_info)
# ---------------------------------------------------------------------------------------------


def entropy(s: float, t: float, cells: int) -> float:
    return 0.0 if cells == 1 else max(math.log(s) - t / s, 0.0)


def assemble(feats: Features, ent: dict[tuple, tuple[float, int]]) -> dict[tuple[str, str], tuple[float, float]]:
    out = {}
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            ha, ca = ent[("feat", i)]
            hb, cb = ent[("feat", j)]
            hab, _ = ent[("pair", i, j)]
            mi = 0.0 if (ca == 1 or cb == 1) else max(ha + hb - hab, 0.0)
            if ca == 1 and cb == 1:
                nmi = 1.0
            elif mi == 0.0:
                nmi = 0.0
            else:
                nmi = min(max(2 * mi / (ha + hb), 0.0), 1.0)
            out[(feats[i][0], feats[j][0])] = (mi, nmi)
    return out


# ---------------------------------------------------------------------------------------------
# The three implementations
# ---------------------------------------------------------------------------------------------


def single_pass(spark, path: str, feats: Features, engine: str = "arrow") -> dict:
    from spark_jobs.mutual_info import feature_stats, pairwise_mutual_info

    items = spark.read.parquet(path)
    # As spark_jobs.mutual_info.run calls it; the SQL engine's plan needs the stats job (timed).
    stats = feature_stats(items, feats) if engine == "sql" else None
    rows = pairwise_mutual_info(items, feats, stats=stats, engine=engine).collect()
    return {(r["feature_a"], r["feature_b"]): (r["mi"], r["nmi"]) for r in rows}


def per_pair(spark, path: str, feats: Features) -> dict:
    from pyspark.sql import functions as F

    def values(df, k: int):
        _, column, is_multi = feats[k]
        if not is_multi:
            return df.select(F.col(column).alias(f"v{k}"), F.lit(1.0).alias(f"w{k}"))
        arr = F.array_distinct(F.col(column))
        arr = F.when(F.coalesce(F.size(arr), F.lit(0)) <= 0, F.array(F.lit(0))).otherwise(arr)
        return df.select(arr.alias("_a")).select(
            F.explode("_a").alias(f"v{k}"), (1.0 / F.size("_a")).alias(f"w{k}")
        )

    def reduce(cells) -> tuple[float, int]:
        r = cells.agg(
            F.sum("n").alias("s"), F.sum(F.col("n") * F.log("n")).alias("t"), F.count(F.lit(1)).alias("c")
        ).collect()[0]
        return entropy(r["s"], r["t"], r["c"]), r["c"]

    ent: dict[tuple, tuple[float, int]] = {}
    for k in range(len(feats)):
        df = spark.read.parquet(path)
        ent[("feat", k)] = reduce(values(df, k).groupBy(f"v{k}").agg(F.sum(f"w{k}").alias("n")))
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            df = spark.read.parquet(path)
            # A row's cells for (i, j): the cross product of its two value lists, weights multiplied.
            ci, cj = feats[i][1], feats[j][1]
            both = df.select(ci, cj)
            sel = []
            for k, c in ((i, ci), (j, cj)):
                if feats[k][2]:
                    arr = F.array_distinct(F.col(c))
                    arr = F.when(F.coalesce(F.size(arr), F.lit(0)) <= 0, F.array(F.lit(0))).otherwise(arr)
                    sel.append(arr.alias(f"a{k}"))
                else:
                    sel.append(F.array(F.col(c)).alias(f"a{k}"))
            x = both.select(*sel)
            x = x.select(
                F.explode(f"a{i}").alias("a"),
                f"a{j}",
                (1.0 / (F.size(f"a{i}") * F.size(f"a{j}"))).alias("w"),
            ).select("a", F.explode(f"a{j}").alias("b"), "w")
            ent[("pair", i, j)] = reduce(x.groupBy("a", "b").agg(F.sum("w").alias("n")))
    return assemble(feats, ent)


def duckdb_sql(path: str, feats: Features) -> str:
    cols = []
    for _, column, is_multi in feats:
        if is_multi:
            cols.append(
                f"CASE WHEN {column} IS NULL OR len(list_distinct({column})) = 0 THEN [0] "
                f"ELSE list_distinct({column}) END AS {column}"
            )
        else:
            cols.append(column)
    parts = []
    ident = 0
    ids: dict[tuple, int] = {}

    def src(cs: list[int]) -> str:
        """A sub-select with one row per cell of features ``cs`` and its weight ``w``."""
        sel, weights = [], []
        for k in cs:
            column, is_multi = feats[k][1], feats[k][2]
            if is_multi:
                sel.append(f"unnest({column}) AS v{k}")
                weights.append(f"len({column})")
            else:
                sel.append(f"{column} AS v{k}")
        w = "1.0" if not weights else "1.0 / (" + " * ".join(weights) + ")"
        inner = f"SELECT {', '.join(sel)}, {w} AS w FROM t"
        # Two unnests in one SELECT zip the lists; nest them to get the cross product instead.
        if len([k for k in cs if feats[k][2]]) == 2:
            i, j = cs
            inner = (
                f"SELECT v{i}, unnest({feats[j][1]}) AS v{j}, w FROM "
                f"(SELECT unnest({feats[i][1]}) AS v{i}, {feats[j][1]}, "
                f"1.0 / (len({feats[i][1]}) * len({feats[j][1]})) AS w FROM t)"
            )
        return inner

    for k in range(len(feats)):
        ids[("feat", k)] = ident
        parts.append(f"SELECT {ident} AS id, sum(w) AS n FROM ({src([k])}) GROUP BY v{k}")
        ident += 1
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            ids[("pair", i, j)] = ident
            parts.append(f"SELECT {ident} AS id, sum(w) AS n FROM ({src([i, j])}) GROUP BY v{i}, v{j}")
            ident += 1
    body = "\n  UNION ALL ".join(parts)
    sql = (
        f"WITH t AS (SELECT {', '.join(cols)} FROM read_parquet('{path}')),\n"
        f"cells AS (\n  {body}\n)\n"
        f"SELECT id, sum(n)::DOUBLE AS s, sum(n * ln(n))::DOUBLE AS t, count(*) AS c FROM cells GROUP BY id"
    )
    return sql, ids


def duck(con, path: str, feats: Features) -> dict:
    sql, ids = duckdb_sql(path, feats)
    got = {row[0]: row[1:] for row in con.execute(sql).fetchall()}
    ent = {key: (entropy(*got[i]), got[i][2]) for key, i in ids.items()}
    return assemble(feats, ent)


# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], dict], repeats: int) -> tuple[float, list[float], dict]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise SystemExit(f"the implementations disagree on the pairs: {sorted(set(a) ^ set(b))}")
    return max(max(abs(a[k][0] - b[k][0]), abs(a[k][1] - b[k][1])) for k in a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=8, help="item features in total (default 8)")
    ap.add_argument("--multi", type=int, default=1, help="how many of them are multi-valued (default 1)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffle-partitions", type=int, default=0, help="default: the core count")
    ap.add_argument("--driver-memory", default="3g")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-per-pair", action="store_true", help="do not time the per-pair baseline")
    ap.add_argument("--no-sql", action="store_true", help="do not time the built-in-only (SQL) engine")
    args = ap.parse_args(argv)
    if args.features < 2 or not 0 <= args.multi < args.features:
        raise SystemExit("need --features >= 2 and 0 <= --multi < --features")
    cores = cores_of(args.master)
    partitions = args.shuffle_partitions or cores

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import duckdb
    from pyspark.sql import SparkSession

    tmp = tempfile.mkdtemp(prefix="bench-mi-")
    try:
        path = os.path.join(tmp, "items.parquet")
        t0 = time.perf_counter()
        feats = generate(path, args.rows, args.features, args.multi, args.seed)
        size_mb = os.path.getsize(path) / 2**20
        print(
            f"data: {args.rows:,} rows, {len(feats)} features "
            f"({', '.join(n + (' [multi]' if m else '') for n, _, m in feats)}), "
            f"{len(feats) * (len(feats) - 1) // 2} pairs, {size_mb:.1f} MiB Parquet, "
            f"generated in {time.perf_counter() - t0:.1f}s"
        )
        spark = (
            SparkSession.builder.master(args.master)
            .appName("bench-mutual-info")
            .config("spark.driver.memory", args.driver_memory)
            .config("spark.sql.shuffle.partitions", str(partitions))
            .config("spark.sql.adaptive.enabled", "true")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        con = duckdb.connect()
        # Same CPUs for both engines: DuckDB gets as many threads as Spark has cores.
        con.execute(f"SET threads TO {cores}")
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared machine)")
        print(
            f"spark: {args.master}, spark.sql.shuffle.partitions={partitions}, AQE on, driver memory "
            f"{args.driver_memory}; duckdb {duckdb.__version__}: threads={cores}; "
            f"median of {args.repeats} after 1 warm-up"
        )

        results, timings = {}, {}
        runs = [
            ("single-pass", lambda: single_pass(spark, path, feats)),
            ("single-pass-sql", lambda: single_pass(spark, path, feats, engine="sql")),
            ("per-pair", lambda: per_pair(spark, path, feats)),
            ("duckdb", lambda: duck(con, path, feats)),
        ]
        for name, fn in runs:
            if (name == "per-pair" and args.skip_per_pair) or (name == "single-pass-sql" and args.no_sql):
                continue
            med, times, res = timed(fn, args.repeats)
            results[name], timings[name] = res, med
            print(f"  {name:<17} median {med:8.2f}s   runs {', '.join(f'{t:.2f}' for t in times)}", flush=True)
        spark.stop()
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ref = results["single-pass"]
    print("\nagreement (max |diff| over MI and NMI of all pairs):")
    worst = 0.0
    for name in results:
        if name == "single-pass":
            continue
        d = max_diff(ref, results[name])
        worst = max(worst, d)
        print(f"  single-pass vs {name:<17} {d:.3e}")

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("\n| implementation | seconds (median) |\n|---|---:|")
    for name, sec in timings.items():
        print(f"| {name} | {sec:.2f} |")
    if "per-pair" in timings:
        print(f"\nper-pair / single-pass = {timings['per-pair'] / timings['single-pass']:.2f}x  (target >= 5)")
    print(f"single-pass / duckdb   = {timings['single-pass'] / timings['duckdb']:.2f}x  (target <= 2)")
    # Planted: s0 and s1 follow the two largest features, the tags follow s0; s1-s2 is independent.
    # (High-cardinality pairs also show the plug-in estimator's upward bias, ~cells / (2 rows).)
    names = [n for n, _, _ in feats]
    show = [(0, len(names) - 1 - args.multi), (1, len(names) - 2 - args.multi), (1, 2)]
    show += [(0, len(names) - 1)] if args.multi else []
    print("\nplanted dependent pairs, then an independent one:")
    for i, j in show:
        if max(i, j) < len(names) and i != j and (names[i], names[j]) in ref:
            mi, nmi = ref[(names[i], names[j])]
            print(f"  {names[i]:<12} {names[j]:<12} mi {mi:.4f} nats  nmi {nmi:.4f}")
    if worst >= TOLERANCE:
        print(f"FAIL: results differ by {worst:.3e} >= {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
