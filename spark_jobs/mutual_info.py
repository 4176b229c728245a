"""Pairwise mutual information between item features, all pairs in one Spark job.

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

All pairs in one Spark job, not one per pair: every pair joint ``(pair, a, b)`` and every marginal
``(feature, a)`` is an "item" (id = pair number, or P + feature number for a marginal) whose cells
are counted in the same pass; per item, ``S = sum n``, ``T = sum n ln n`` and the number of cells
give ``H = ln S - T / S``, a few dozen rows gathered into one map from which one row per pair is
emitted, MI = H(A) + H(B) - H(A,B). Two engines, the same numbers (tests check both against
sklearn):

* ``engine="arrow"`` (the default, what ``run`` uses; no stats job, one scan of the input): each
  partition's rows reach a ``mapInArrow`` function as Arrow batches and are counted with numpy, all
  pairs of a chunk of rows in one pass: per pair a combined joint code ``a * |B| + b`` and one
  ``np.bincount`` when the joint space is small against the chunk, else one sort of ``a << 32 | b``
  and run lengths. Each partition emits, per item, its sorted distinct cells and their weights as
  two binary blobs (one row per item, not one per cell); ``groupBy(id).applyInArrow`` merges the
  partitions' partial counts (a linear merge of sorted runs) and returns ``(id, cells, h)``. This is
  a Python function although built-ins exist, on purpose: profiling the SQL engine showed the time
  is Spark's aggregation hash map (see below), ~36 updates per row for 8 features, against ~1-3 ns
  per row per pair for a bincount. Multi-valued sets are de-duplicated (empty -> ``[0]``) and
  expanded per pair with ``np.repeat`` (the cross product when both features are multi-valued).
  Indices must be integers in ``[0, 2^31)`` (or below the ``FeatureStats`` cardinalities when
  given); a null, negative or too large index fails the job with a message naming the column.
* ``engine="sql"`` (built-in functions only): every cell is packed into one ``long`` key
  ``id << S | fields``; the number of keys per row is constant, so is the number of Spark jobs.
  Then ``n * ln(n)`` per cell and ``groupBy(id)``. Multi-valued sets are expanded with
  ``posexplode`` (no higher-order functions, everything codegen'd); a pair's key is emitted only
  from the expansion rows of the sets it involves. Two plans:

  - without ``FeatureStats`` (the literal single pass): one scan, one ``explode`` of all keys, one
    ``groupBy(key)`` with map-side partial aggregation, one large shuffle.
  - with ``FeatureStats`` (``feature_stats``: max index + 1 per feature and the row count, one
    cheap aggregation job): profiling showed the cost is the hash map, ~10-30 ns per update while
    it holds up to ~10^5 keys, ~250 ns at 10^6 and ~1 us at 10^7 (Spark 4.3, local[2]), and in the
    plan above every low-cardinality update pays the price of the high-cardinality cells sharing
    its map. So features whose joint value space fits in ``BLOCK_CELLS`` are counted together as
    blocks: one key per row for the whole block (pre-aggregating identical value tuples) in a small
    map-side map, after which each pair and marginal the block covers is derived from its (few)
    cells by a second, tiny aggregation; pairs (and marginals) above that are "radix" aggregated:
    ``repartition(n, key)`` with ``n`` sized so each partition's map holds ~``CELLS_PER_PARTITION``
    cells, no map-side map (their cells are nearly unique per row). The two branches scan the
    input once each; each pair is still counted exactly once.

  Field widths: without stats every index gets ``(63 - id_bits) // 2`` bits (28 for 8 features);
  with stats, ``bits(cardinality)``. An index outside its range fails the job with an error that
  names the column, rather than colliding silently.

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

from dataclasses import dataclass
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

# Features whose joint value space has at most this many cells are counted together as one block
# key (one hash-map update per row for the whole block instead of one per pair). Blocks stay
# small enough that the map-side hash map is cache-resident: measured ~10-30 ns per update up to
# ~10^5 distinct keys, ~250 ns at 10^6 and ~1 us at 10^7 (Spark 4.3, local[2]).
BLOCK_CELLS = 1 << 16
# High-cardinality pairs (joint space > BLOCK_CELLS) gain nothing from map-side partial
# aggregation (their cells are nearly unique per row); they are hash-partitioned by cell first
# ("radix" aggregation) into enough partitions that each partition's hash map holds about this
# many cells, capped at MAX_RADIX_PARTITIONS.
CELLS_PER_PARTITION = 1 << 17
MAX_RADIX_PARTITIONS = 256

# (name, column, is_multi) as in the manifest's item FeatureSpecs.
FeatureTriple = tuple[str, str, bool]


@dataclass(frozen=True)
class KeyGroup:
    """Features counted together under one key id.

    ``direct``: a single pair or feature whose cells are final (``gid`` is that item's id).
    Otherwise a block: its cells are tuples of all members' values, from which every pair and
    marginal it ``serves`` is derived by a second (small) aggregation.
    """

    gid: int
    members: tuple[int, ...]
    serves: tuple[int, ...]
    direct: bool


def plan_groups(
    num_features: int, cardinalities: Optional[Sequence[int]], block_cells: Optional[int] = None
) -> list[KeyGroup]:
    """Cover every pair and every marginal by exactly one group.

    Item ids: pair ``(i, j)`` (``i < j``, row-major) is ``p``; the marginal of feature ``k`` is
    ``P + k`` with ``P`` pairs. Without cardinalities every item is its own direct group.
    With them, pairs and marginals whose value space fits in ``block_cells`` are packed greedily
    into blocks (seeded by the largest uncovered pair, grown by the feature that covers most
    uncovered pairs); the rest are direct groups.
    """
    block_cells = BLOCK_CELLS if block_cells is None else block_cells
    pairs = [(i, j) for i in range(num_features) for j in range(i + 1, num_features)]
    pair_id = {pq: p for p, pq in enumerate(pairs)}
    npairs = len(pairs)
    if cardinalities is None:
        return [KeyGroup(p, pq, (p,), True) for p, pq in enumerate(pairs)] + [
            KeyGroup(npairs + k, (k,), (npairs + k,), True) for k in range(num_features)
        ]
    card = [max(1, int(c)) for c in cardinalities]
    small = {pq for pq in pairs if card[pq[0]] * card[pq[1]] <= block_cells}
    blocks: list[list[int]] = []
    uncovered = set(small)
    while uncovered:
        i, j = max(sorted(uncovered), key=lambda pq: card[pq[0]] * card[pq[1]])
        block, size = [i, j], card[i] * card[j]
        while True:
            best, best_gain = None, 0
            for k in range(num_features):
                if k in block or size * card[k] > block_cells:
                    continue
                gain = sum((min(k, g), max(k, g)) in uncovered for g in block)
                if gain > best_gain or (gain == best_gain and gain > 0 and card[k] < card[best]):
                    best, best_gain = k, gain
            if best is None:
                break
            block.append(best)
            size *= card[best]
        block.sort()
        blocks.append(block)
        uncovered -= {(a, b) for a in block for b in block if a < b}
    in_block = {k for b in blocks for k in b}
    for k in range(num_features):
        if card[k] <= block_cells and k not in in_block:
            blocks.append([k])

    groups: list[KeyGroup] = []
    served: set[int] = set()
    for p, (i, j) in enumerate(pairs):
        if (i, j) not in small:
            groups.append(KeyGroup(p, (i, j), (p,), True))
            served.add(p)
    for k in range(num_features):
        if card[k] > block_cells:
            groups.append(KeyGroup(npairs + k, (k,), (npairs + k,), True))
            served.add(npairs + k)
    next_id = npairs + num_features
    for block in blocks:
        items = [pair_id[(a, b)] for a in block for b in block if a < b and pair_id[(a, b)] not in served]
        items += [npairs + k for k in block if npairs + k not in served]
        served.update(items)
        groups.append(KeyGroup(next_id, tuple(block), tuple(items), False))
        next_id += 1
    assert served == set(range(npairs + num_features))
    return groups


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _checked(c: Column, column: str, limit: int, bound: str) -> Column:
    """``c`` as a long, failing the job if it is outside ``[0, limit)``."""
    bad = c.isNull() | (c < 0) | (c >= limit)
    msg = F.concat(
        F.lit(f"mutual_info: column {column!r} holds index "),
        F.coalesce(c.cast("string"), F.lit("null")),
        F.lit(f"; expected an encoded vocabulary index in [0, {limit}) ({bound}). {_FIX}"),
    )
    return F.when(bad, F.raise_error(msg)).otherwise(c).cast("long")


_FIX = (
    "Check that the column holds encoded indices (docs/data_contract.md) and that the "
    "FeatureStats passed in were computed on this table (feature_stats)."
)


def _validate(
    items: DataFrame,
    features: Sequence[FeatureTriple],
    weights: Optional[DataFrame],
    cardinalities: Optional[Sequence[int]],
) -> None:
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
    if cardinalities is not None and len(cardinalities) != len(features):
        raise ValueError(
            f"stats hold {len(cardinalities)} cardinalities for {len(features)} features {names}; "
            f"compute them with feature_stats(items, features) for the same feature list"
        )
    if weights is not None:
        if "item_index" not in fields:
            raise ValueError(f"weights are joined on item_index, but the items table has only {sorted(fields)}")
        wcols = set(weights.columns)
        if not {"item_index", "weight"} <= wcols:
            raise ValueError(f"weights must have columns item_index and weight, got {sorted(wcols)}")


@dataclass(frozen=True)
class FeatureStats:
    """What the execution plan needs to know about the data (never changes the result)."""

    # Exclusive upper bound of each feature's indices: max index + 1 (an empty set counts as 0).
    cardinalities: tuple[int, ...]
    # Population units (rows of ``items``); an upper bound is fine.
    rows: int


def feature_stats(items: DataFrame, features: Sequence[FeatureTriple]) -> FeatureStats:
    """Max index + 1 per feature and the row count, in one aggregation job (an action: it runs)."""
    exprs = [F.count(F.lit(1)).alias("rows")]
    for k, (_, column, is_multi) in enumerate(features):
        c = F.array_max(F.col(column)) if is_multi else F.col(column)
        exprs.append(F.max(c).alias(f"m{k}"))
    row = items.agg(*exprs).collect()[0]
    cards = tuple(1 if row[f"m{k}"] is None else max(1, int(row[f"m{k}"]) + 1) for k in range(len(features)))
    return FeatureStats(cards, int(row["rows"]))


# ---------------------------------------------------------------------------------------------
# The Arrow engine (what ``run`` uses): vectorised counting per partition, one merge per item
# ---------------------------------------------------------------------------------------------
#
# Why a Python (Arrow batch) function here although built-ins exist: profiling the two Spark SQL
# plans above showed the time is Spark's aggregation hash map, not the scan: 28 pairs + 8
# marginals of 8 features are 36 hash-map updates per row, at ~10-30 ns each while a map is
# cache-resident and ~1 us at 10^7 keys (local[2]); the blocks + radix plan still paid Spark's
# per-row shuffle and aggregation for the ~10^7 high-cardinality cells, and a second scan for the
# stats. Counting a pair with numpy over a whole partition is one ``bincount`` of a dense joint
# code (~1-3 ns per row) or, for pairs whose joint space is much larger than the partition, one
# sort (``np.unique``). Each partition then emits, per pair and per marginal, its sorted distinct
# cells and their weights as two binary blobs (one row per item, not one per cell); Spark shuffles
# those few rows by item and a grouped Arrow function merges the partial counts (a linear merge of
# sorted runs) into S = sum n, T = sum n ln n and the number of cells. One scan, one shuffle of a
# few dozen rows per partition, one Spark job whatever the number of pairs.

# Rows counted together in one numpy pass (batches are accumulated up to this many rows), which
# bounds the worker's memory: ~8 bytes per feature per row plus the cells it emits.
ARROW_CHUNK_ROWS = 1 << 21
# A pair is counted with a dense bincount when its (local) joint space is at most this many
# times the chunk's row count (else sort-based): bincount is O(rows + space), a sort O(rows log rows).
DENSE_SPACE_PER_ROW = 8
DENSE_MIN_SPACE = 1 << 16
# At most this many cells per emitted row (16 MiB per blob; Arrow binary offsets are 32-bit).
EMIT_CELLS = 1 << 21
# A cell's code packs its two indices: a << 32 | b (indices are < 2^31, checked).
_PACK = 32
_INDEX_LIMIT = 1 << 31


def _bad_index(column: str, value: Any, limit: int, bound: str) -> ValueError:
    return ValueError(
        f"mutual_info: column {column!r} holds index {value}; expected an encoded vocabulary index "
        f"in [0, {limit}) ({bound}). {_FIX}"
    )


def _check_range(values, column: str, limit: int, bound: str) -> None:
    import numpy as np

    if len(values) == 0:
        return
    lo, hi = values.min(), values.max()
    if lo < 0:
        raise _bad_index(column, int(lo), limit, bound)
    if hi >= limit:
        raise _bad_index(column, int(values[np.argmax(values >= limit)]), limit, bound)


class _Unit:
    """One feature over the rows of a chunk, as numpy arrays.

    Single-valued: ``values`` has one index per row. Multi-valued: ``values`` holds each row's
    de-duplicated set (empty or null -> ``[0]``), rows in order, ``rows`` the row of each element,
    ``lens`` the set size per row (>= 1) and ``starts`` each row's first element.
    """

    __slots__ = ("values", "rows", "lens", "starts")

    def __init__(self, values, rows=None, lens=None, starts=None):
        self.values, self.rows, self.lens, self.starts = values, rows, lens, starts


def _unit(col, column: str, is_multi: bool, limit: int, bound: str) -> _Unit:
    import numpy as np
    import pyarrow.compute as pc

    if not is_multi:
        if col.null_count:
            raise _bad_index(column, "null", limit, bound)
        values = col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        _check_range(values, column, limit, bound)
        return _Unit(values)
    n = len(col)
    lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(col)  # respects slicing; null lists contribute nothing
    if flat.null_count:
        raise _bad_index(column, "null", limit, bound)
    values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    _check_range(values, column, limit, bound)
    rows = np.repeat(np.arange(n, dtype=np.int64), lens)
    # De-duplicate inside each set and give empty sets the mask index: one sort of row * M + value
    # (skipped when the sets are already strictly increasing and none is empty). The keys are
    # nearly sorted already (rows ascending), which a stable sort (timsort) does in ~linear time;
    # np.unique is avoided on purpose here (hash-based in numpy 2.x, ~100x slower on this input).
    m = int(values.max()) + 1 if len(values) else 1
    key = rows * m + values
    empty = np.flatnonzero(lens == 0)
    if len(empty) or (len(key) > 1 and not bool(np.all(key[1:] > key[:-1]))):
        key = np.sort(np.concatenate([key, empty * m + MASK_INDEX]), kind="stable")
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
        rows, values = key // m, key % m
        lens = np.bincount(rows, minlength=n).astype(np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    return _Unit(values, rows, lens, starts)


def _count(a, b, w, dense: tuple[int, int] = (DENSE_MIN_SPACE, DENSE_SPACE_PER_ROW)):
    """Distinct cells of ``(a, b)`` (``b`` None: of ``a``) as sorted codes and summed weights.

    ``w``: per-element weights, a scalar, or None (1 each). ``dense``: (min space, space per row)
    below which the dense bincount is used.
    """
    import numpy as np

    n = len(a)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    if w is not None and np.ndim(w) == 0:
        w = np.full(n, float(w))
    ca = int(a.max()) + 1
    cb = 1 if b is None else int(b.max()) + 1
    space = ca * cb
    if space <= max(dense[0], dense[1] * n):
        code = a if b is None else a * cb + b
        c = np.bincount(code, weights=w, minlength=space)
        nz = np.flatnonzero(c)
        codes = nz if b is None else ((nz // cb) << _PACK) | (nz % cb)
        return codes, c[nz].astype(np.float64, copy=False)
    # Sparse: sort the codes, sum runs of equal codes (not np.unique: see _unit).
    code = a if b is None else (a << _PACK) | b
    if w is None:
        code = np.sort(code)
        starts = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]]))
        return code[starts], np.diff(np.append(starts, n)).astype(np.float64)
    order = np.argsort(code)
    code = code[order]
    starts = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]]))
    return code[starts], np.add.reduceat(w[order], starts)


def _merge(parts):
    """Sum partial ``(codes, counts)`` with sorted codes: a stable sort merges the sorted runs."""
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    codes = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    if len(codes) == 0:
        return codes, counts
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    return codes[starts], np.add.reduceat(counts[order], starts)


def _count_chunk(table, features: Sequence[FeatureTriple], weighted: bool, limits, bound: str, dense=None):
    """Partial cells of every pair (ids ``0..P-1``) and marginal (``P + k``) of one chunk."""
    import numpy as np

    dense = (DENSE_MIN_SPACE, DENSE_SPACE_PER_ROW) if dense is None else dense

    units = [
        _unit(table.column(f"_c{k}").combine_chunks(), column, is_multi, limits[k], bound)
        for k, (_, column, is_multi) in enumerate(features)
    ]
    wrow = table.column("_w").to_numpy().astype(np.float64) if weighted else None
    nf = len(features)
    out = []
    for i in range(nf):
        for j in range(i + 1, nf):
            ui, uj = units[i], units[j]
            mi, mj = ui.rows is not None, uj.rows is not None
            if not mi and not mj:
                a, b, w = ui.values, uj.values, wrow
            elif mi and not mj:
                r = ui.rows
                a, b = ui.values, uj.values[r]
                w = (1.0 if wrow is None else wrow[r]) / ui.lens[r]
            elif mj and not mi:
                r = uj.rows
                a, b = ui.values[r], uj.values
                w = (1.0 if wrow is None else wrow[r]) / uj.lens[r]
            else:
                # The cross product of the two sets of every row.
                per = uj.lens[ui.rows]
                ek = np.repeat(np.arange(len(ui.values), dtype=np.int64), per)
                r = ui.rows[ek]
                pos = np.arange(len(ek), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
                a, b = ui.values[ek], uj.values[uj.starts[r] + pos]
                w = (1.0 if wrow is None else wrow[r]) / (ui.lens[r] * uj.lens[r])
            out.append(_count(a, b, w, dense))
    for u in units:
        if u.rows is None:
            out.append(_count(u.values, None, wrow, dense))
        else:
            out.append(_count(u.values, None, (1.0 if wrow is None else wrow[u.rows]) / u.lens[u.rows], dense))
    return out


def _partition_cells(features: Sequence[FeatureTriple], weighted: bool, limits, bound: str):
    """The ``mapInArrow`` function: Arrow batches in, ``(id, codes, counts)`` rows out.

    The tuning constants are read here, on the driver, and travel in the closure (so that tests
    can shrink them); the workers' copies of the module are not consulted.
    """
    chunk_rows, emit_cells = ARROW_CHUNK_ROWS, EMIT_CELLS
    dense = (DENSE_MIN_SPACE, DENSE_SPACE_PER_ROW)

    def cells(batches):
        import pyarrow as pa

        partial: Optional[list] = None  # per item: (sorted codes, counts) of the chunks so far
        pending, rows = [], 0

        def flush():
            nonlocal partial, pending, rows
            if rows:
                got = _count_chunk(pa.Table.from_batches(pending), features, weighted, limits, bound, dense)
                partial = got if partial is None else [_merge([q, p]) for q, p in zip(partial, got)]
            pending, rows = [], 0

        for batch in batches:
            for off in range(0, batch.num_rows, chunk_rows):
                piece = batch.slice(off, chunk_rows)
                pending.append(piece)
                rows += piece.num_rows
                if rows >= chunk_rows:
                    flush()
        flush()
        if partial is None:
            return
        for item, (codes, counts) in enumerate(partial):
            for lo in range(0, max(1, len(codes)), emit_cells):
                hi = lo + emit_cells
                yield pa.RecordBatch.from_arrays(
                    [pa.array([item], pa.int32()), *_pack(codes[lo:hi], counts[lo:hi])], names=_CELL_COLUMNS
                )

    return cells


_CELL_COLUMNS = ["id", "width", "codes", "counts"]
_CELL_SCHEMA = "id int, width long, codes binary, counts binary"


def _pack(codes, counts):
    """Cells as ``(width, codes, counts)`` Arrow arrays of one row, in as few bytes as is exact.

    Most of what the job moves is the high-cardinality pairs' cells, so they travel compactly:
    codes ``a << 32 | b`` as uint32 ``a * width + b`` when that fits (``width`` = max b + 1; 0 means
    raw int64 codes), counts as int32 when they are all whole numbers below 2^31 (else float64).
    """
    import numpy as np
    import pyarrow as pa

    width = 0
    if len(codes):
        hi, lo = codes >> _PACK, codes & ((1 << _PACK) - 1)
        width = int(lo.max()) + 1
        if (int(hi.max()) + 1) * width <= 1 << 32:
            codes = (hi * width + lo).astype(np.uint32)
        else:
            width = 0
    whole = len(counts) and counts.max() < _INDEX_LIMIT and bool(np.all(counts == np.floor(counts)))
    if whole:
        counts = counts.astype(np.int32)
    return (
        pa.array([width], pa.int64()),
        pa.array([codes.tobytes()], pa.binary()),
        pa.array([counts.tobytes()], pa.binary()),
    )


def _unpack(width: int, codes: bytes, counts: bytes):
    """The inverse of ``_pack`` for one row: int64 codes, float64 counts."""
    import numpy as np

    if width:
        local = np.frombuffer(codes, dtype=np.uint32).astype(np.int64)
        c = ((local // width) << _PACK) | (local % width)
    else:
        c = np.frombuffer(codes, dtype=np.int64)
    # int32 counts take 4 bytes per cell, float64 ones 8: the length tells which.
    n = np.frombuffer(counts, dtype=np.int32 if len(c) and len(counts) == 4 * len(c) else np.float64)
    return c, n.astype(np.float64)


def _item_entropy(table):
    """The grouped ``applyInArrow`` function: one item's partial cells -> ``(id, cells, h)``."""
    import numpy as np
    import pyarrow as pa

    parts = [
        _unpack(width, c, n)
        for width, c, n in zip(
            table.column("width").to_pylist(), table.column("codes").to_pylist(), table.column("counts").to_pylist()
        )
    ]
    _, n = _merge(parts)
    s = float(n.sum())
    t = float(np.dot(n, np.log(n)))
    cells = len(n)
    # A single cell is exactly zero entropy; elsewhere clip rounding below 0.
    h = 0.0 if cells == 1 else max(np.log(s) - t / s, 0.0)
    return pa.table(
        {
            "id": pa.array([table.column("id")[0].as_py()], pa.int32()),
            "cells": pa.array([cells], pa.int64()),
            "h": pa.array([h], pa.float64()),
        }
    )


def pairwise_mutual_info(
    items: DataFrame,
    features: Sequence[FeatureTriple],
    weights: Optional[DataFrame] = None,
    stats: Optional[FeatureStats] = None,
    engine: str = "arrow",
) -> DataFrame:
    """Plug-in MI and NMI of every unordered feature pair, all pairs in one aggregation job.

    ``items``: one row per population unit with the feature columns (``[n_items]`` rows).
    ``features``: ``(name, column, is_multi)``; pairs are ``(features[i], features[j])``, ``i < j``.
    ``weights``: optional ``(item_index, weight)``: the unit's weight (e.g. its train event count);
    items without a row or with weight <= 0 drop out. Without it every row weighs 1.
    ``engine``: ``"arrow"`` (default, what ``run`` uses): one scan, each partition counted with
    numpy in a ``mapInArrow`` function, partial counts merged per pair by a grouped Arrow function;
    ``"sql"``: built-in Spark SQL only (see the module docstring). Same numbers (tested).
    ``stats``: optional ``feature_stats(items, features)``. The result never depends on it. With
    ``engine="sql"`` it picks the plan: without it, one explode and one map-side aggregation over
    all pair keys; with it, low-cardinality features are counted as blocks and high-cardinality
    pairs are radix-partitioned. With ``engine="arrow"`` it only tightens the index check. An index
    at or above its cardinality (or negative, or null) fails the job with a clear message.

    Returns ``feature_a`` string, ``feature_b`` string, ``mi`` double (nats), ``nmi`` double in
    [0, 1]; one row per pair in feature order. An empty population gives null ``mi``/``nmi``.
    """
    features = list(features)
    if engine not in ("arrow", "sql"):
        raise ValueError(f"engine must be 'arrow' or 'sql', got {engine!r}")
    cardinalities = None if stats is None else stats.cardinalities
    _validate(items, features, weights, cardinalities)
    nf = len(features)
    pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
    npairs = len(pairs)
    if engine == "arrow":
        ent = _arrow_entropies(items, features, weights, cardinalities)
    else:
        ent = _sql_entropies(items, features, weights, stats)

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
        .otherwise(F.greatest(F.col("ha") + F.col("hb") - F.col("hab"), F.lit(0.0))),
    )
    out = out.withColumn(
        "nmi",
        F.when(F.col("mi").isNull(), F.lit(None).cast("double"))
        .when((F.col("ca") == 1) & (F.col("cb") == 1), F.lit(1.0))
        .when(F.col("mi") == 0.0, F.lit(0.0))
        .otherwise(F.least(F.greatest(2.0 * F.col("mi") / (F.col("ha") + F.col("hb")), F.lit(0.0)), F.lit(1.0))),
    )
    return out.select("feature_a", "feature_b", "mi", "nmi")


def _sql_entropies(
    items: DataFrame,
    features: Sequence[FeatureTriple],
    weights: Optional[DataFrame],
    stats: Optional[FeatureStats],
) -> DataFrame:
    """``(id, cells, h)`` per pair joint and feature marginal with built-in Spark SQL only."""
    cardinalities = None if stats is None else stats.cardinalities
    nf = len(features)
    pairs = [(i, j) for i in range(nf) for j in range(i + 1, nf)]
    npairs = len(pairs)
    groups = plan_groups(nf, cardinalities)
    id_bits = _bits(max(g.gid for g in groups) + 1)
    shift = 63 - id_bits
    if cardinalities is None:
        width = [shift // 2] * nf
        limit = [1 << (shift // 2)] * nf
        bound = f"at most {shift // 2} bits per index when measuring {nf} features"
    else:
        limit = [max(1, int(c)) for c in cardinalities]
        width = [_bits(c) for c in limit]
        bound = "the cardinality in the FeatureStats passed in"
    for g in groups:
        if sum(width[k] for k in g.members) > shift:
            cols = [features[k][1] for k in g.members]
            raise ValueError(
                f"indices of {cols} (cardinalities {[limit[k] for k in g.members]}) need "
                f"{sum(width[k] for k in g.members)} bits together, more than the {shift} an "
                f"aggregation key has left with {nf} features; measure fewer features at once"
            )

    df = items
    if weights is not None:
        w = weights.select(F.col("item_index"), F.col("weight")).where(F.col("weight") > 0)
        df = df.join(w, on="item_index", how="inner")
    multi = [k for k, (_, _, m) in enumerate(features) if m]
    proj = []
    for k, (_, column, is_multi) in enumerate(features):
        if is_multi:
            # The value set: de-duplicated, empty or null -> [0] (the mask index).
            arr = F.array_distinct(F.col(column))
            arr = F.when(F.coalesce(F.size(arr), F.lit(0)) <= 0, F.array(F.lit(MASK_INDEX))).otherwise(arr)
            proj.append(arr.alias(f"_a{k}"))
        else:
            proj.append(_checked(F.col(column), column, limit[k], bound).alias(f"_s{k}"))
    if weights is not None:
        proj.append(F.col("weight").alias("_w"))
    df = df.select(*proj)
    # Multi-valued sets: one row per combination of their values (posexplode, codegen'd; no
    # higher-order functions). A group's key is emitted only from the rows whose position is 0 in
    # every multi-valued feature it does not contain, so each unit still counts once per group.
    for k in multi:
        column = features[k][1]
        rest = [c for c in df.columns if c != f"_a{k}"]
        df = df.select(
            *rest, F.size(F.col(f"_a{k}")).alias(f"_n{k}"), F.posexplode(f"_a{k}").alias(f"_p{k}", f"_m{k}")
        )
        df = df.select(
            *[c for c in df.columns if c != f"_m{k}"],
            _checked(F.col(f"_m{k}"), column, limit[k], bound).alias(f"_s{k}"),
        )

    def offsets(members: Sequence[int]) -> dict[int, int]:
        """Bit offset of each member's field: the last member in the lowest bits."""
        out, off = {}, 0
        for k in reversed(members):
            out[k] = off
            off += width[k]
        return out

    def group_key(g: KeyGroup) -> Column:
        """The row's cell of group ``g`` as a packed long; null on rows that repeat a unit."""
        off = offsets(g.members)
        key = F.lit(g.gid << shift).cast("long")
        for k in g.members:
            key = key.bitwiseOR(F.shiftleft(F.col(f"_s{k}"), off[k]))
        others = [k for k in multi if k not in g.members]
        if others:
            first = F.col(f"_p{others[0]}") == 0
            for k in others[1:]:
                first = first & (F.col(f"_p{k}") == 0)
            key = F.when(first, key)
        return key

    def count_cells(gs: list[KeyGroup], radix: bool) -> DataFrame:
        """``(key, n)``: the weight of every cell of groups ``gs``; one explode, one aggregation."""
        carry = [F.col("_w")] if weights is not None else []
        carry += [F.col(f"_n{k}") for k in multi]
        ex = df.select(F.explode(F.array(*[group_key(g) for g in gs])).alias("key"), *carry)
        if multi:
            ex = ex.where(F.col("key").isNotNull())
        if radix:
            parts = int(df.sparkSession.conf.get("spark.sql.shuffle.partitions"))
            cells = 0
            for g in gs:
                size = 1
                for k in g.members:
                    size *= limit[k]
                cells += min(size, stats.rows)
            parts = max(parts, min(MAX_RADIX_PARTITIONS, -(-cells // CELLS_PER_PARTITION)))
            ex = ex.repartition(parts, "key")
        if not multi:
            if weights is None:
                return ex.groupBy("key").agg(F.count(F.lit(1)).alias("n"))
            return ex.groupBy("key").agg(F.sum("_w").alias("n"))
        # A cell of a group with multi-valued members carries w / prod(|set|) of those members.
        gid = F.shiftright(F.col("key"), shift)
        divisor = F.lit(1.0)
        for k in multi:
            ids = [g.gid for g in gs if k in g.members]
            if ids:
                divisor = divisor * F.when(gid.isin(ids), F.col(f"_n{k}").cast("double")).otherwise(F.lit(1.0))
        w = F.col("_w").cast("double") if weights is not None else F.lit(1.0)
        return ex.groupBy("key").agg(F.sum(w / divisor).alias("n"))

    def derived(g: KeyGroup) -> Column:
        """The keys of the items block ``g`` serves, from one of its cells."""
        off = offsets(g.members)
        value = {
            k: F.shiftright(F.col("key"), off[k]).bitwiseAND(F.lit((1 << width[k]) - 1)) for k in g.members
        }
        out = []
        for item in g.serves:
            base = F.lit(item << shift).cast("long")
            if item < npairs:
                i, j = pairs[item]
                out.append(base.bitwiseOR(F.shiftleft(value[i], width[j])).bitwiseOR(value[j]))
            else:
                out.append(base.bitwiseOR(value[item - npairs]))
        return F.array(*out)

    direct = [g for g in groups if g.direct]
    blocks = [g for g in groups if not g.direct]
    parts: list[DataFrame] = []
    if direct:
        parts.append(count_cells(direct, radix=cardinalities is not None))
    if blocks:
        bcells = count_cells(blocks, radix=False)
        gid = F.shiftright(F.col("key"), shift)
        case = None
        for g in blocks:
            case = F.when(gid == g.gid, derived(g)) if case is None else case.when(gid == g.gid, derived(g))
        parts.append(
            bcells.select(F.explode(case).alias("key"), F.col("n")).groupBy("key").agg(F.sum("n").alias("n"))
        )
    cells = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])

    # Per item (pair joint or feature marginal): S = total weight, T = sum n ln n, number of cells.
    return (
        cells.select(
            F.shiftright(F.col("key"), shift).cast("int").alias("id"),
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


def _arrow_entropies(
    items: DataFrame,
    features: Sequence[FeatureTriple],
    weights: Optional[DataFrame],
    cardinalities: Optional[Sequence[int]],
) -> DataFrame:
    """``(id, cells, h)`` per pair joint and feature marginal: the Arrow engine (see above)."""
    if cardinalities is None:
        limits = [_INDEX_LIMIT] * len(features)
        bound = "indices are packed as 31-bit integers"
    else:
        limits = [max(1, int(c)) for c in cardinalities]
        bound = "the cardinality in the FeatureStats passed in"
    df = items
    if weights is not None:
        w = weights.select(F.col("item_index"), F.col("weight")).where(F.col("weight") > 0)
        df = df.join(w, on="item_index", how="inner")
    proj = [F.col(column).alias(f"_c{k}") for k, (_, column, _) in enumerate(features)]
    if weights is not None:
        proj.append(F.col("weight").cast("double").alias("_w"))
    cells = df.select(*proj).mapInArrow(_partition_cells(features, weights is not None, limits, bound), _CELL_SCHEMA)
    return cells.groupBy("id").applyInArrow(_item_entropy, "id int, cells long, h double")


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

    # arrow: one scan, no stats job; sql: built-ins only, with the stats job that picks its plan.
    engine = cfg.prepare.mi_engine
    stats = feature_stats(items, features) if engine == "sql" else None
    rows = pairwise_mutual_info(items, features, weights, stats, engine=engine).collect()
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

