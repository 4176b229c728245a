"""The streamed item catalogue (``train.catalogue: streaming``): the encoded catalogue held once in
the cluster, sharded over Ray actors, instead of once per train worker.

Why: a replicated ``Catalogue`` costs every train worker ``8 * (2 + singles + multis) + 8 * values
+ 4`` bytes per item (``ray_train.data.catalogue_bytes``), times the workers of a node. Past
``REPLICATE_MAX_BYTES`` per worker, ``train.catalogue: auto`` streams instead.

Layout. ``CatalogueService.start`` cuts the item_index space into ``num_shards`` contiguous
ranges and starts one ``CatalogueShard`` actor per range (``SPREAD`` over the nodes, no CPU
reserved, restarted on failure: a restarted shard reloads its range from Parquet). Each shard
reads only its range of ``items/`` and ``stats/item_popularity`` (a filtered Arrow dataset scan)
and keeps it as one Arrow table sorted by ``item_index``: the item feature columns as stored
(int32 / ``list<int32>``) plus ``log_q`` float32. The whole cluster holds about one copy of the
catalogue (Arrow's int32 layout, about half the replicated tensors' bytes); a train worker holds
only the rows of the batches in flight.

Who asks for what:

* **Positives.** ``ray_train.data.read_train_dataset`` adds a Ray Data map stage
  (``JoinPositives``) that looks up every block's clicked items in the shards and appends their
  features and ``log_q`` as columns ``pos__<column>`` / ``pos__log_q`` (one request per shard per
  block of ``BLOCK_BATCHES * batch_size`` rows, run by Ray Data's tasks ahead of the trainer). The
  Arrow collate turns them into ``TrainBatch.item`` / ``TrainBatch.log_q``, equal to
  ``Catalogue.lookup`` / ``load_log_q`` on the same rows (tested). The stage runs before the
  block order is randomized and keeps the rows of each block, so the train log's blocks,
  shuffles and equal split are exactly those of the replicated path.
* **SSL items: exact uniform sampling with replacement over the whole catalogue.** The shards
  number the real items 0 .. N-1 in item_index order (shard ``s`` holds positions
  ``starts[s] .. starts[s + 1] - 1``); position -> item is a bijection onto the catalogue's real
  items, never-clicked ones included (tested). Each rank draws positions with
  ``torch.randint(N, ...)`` from its own generator, seeded per (seed, epoch, rank)
  (``ray_train.data.sampling_generator``): the same exact draw ``Catalogue.sample_uniform``
  makes, so the draws are i.i.d. uniform over the catalogue. ``UniformItemStream`` fetches the
  rows of ``CHUNK_BATCHES`` steps per request (one request per shard), keeping ``depth`` requests
  in flight ahead of the training step. Every rank draws exactly as many batches as it trains
  steps, so no rank runs short and step counts stay equal. A mid-epoch resume redraws (without
  fetching) the positions of the skipped steps, so the stream continues exactly.

Cost of streaming, compared to the replicated path: the Ray Data stage's lookups (one actor call
per shard per train block, pipelined with training); per rank, one actor call per shard per
``CHUNK_BATCHES`` steps for the SSL items (prefetched); the train rows grow by the item columns
in the object store; and the shards' memory, once per cluster.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from common.catalogue import int64_numpy
from common.features import FIRST_INDEX, ITEM_ID, FeatureSpec, side
from common.ragged import FeatureBatch
from ray_train.data import (
    CHUNK_BATCHES,
    POSITIVE_PREFIX,
    item_features_from_table,
    parquet_column_chunks,
    slice_features,
)

# ``train.catalogue: auto`` streams when a replicated catalogue would take more than this per
# train worker (about 13M items of the default synthetic schema, 83 bytes each).
REPLICATE_MAX_BYTES = 1 << 30
# Shards: at least MIN_SHARDS (lookups served in parallel), at least one per node, and about
# SHARD_TARGET_BYTES (replicated-layout bytes) each.
MIN_SHARDS = 2
SHARD_TARGET_BYTES = 512 << 20
# Threads per shard actor: lookups are read-only Arrow ``take`` calls, which release the GIL.
SHARD_CONCURRENCY = 4

ITEM_INDEX = "item_index"
LOG_Q = "log_q"
_MAX_INDEX = 2**31  # item_index is int32


# ---------------------------------------------------------------------------------------------
# Which path
# ---------------------------------------------------------------------------------------------


def estimate_replicated_bytes(items_uri: str, specs: list[FeatureSpec]) -> tuple[int, int]:
    """``(items, bytes)``: the number of items in ``items/`` and the bytes a replicated
    ``Catalogue`` plus ``log_q`` would take per worker (``ray_train.data.catalogue_bytes``), from
    the Parquet footers only. Multi-valued features count the footers' leaf values (an empty list
    counts as one, so this errs high)."""
    import pyarrow.dataset as pads

    item_specs = side(specs, "item")
    multi = {s.column for s in item_specs if s.multi}
    singles = sum(1 for s in item_specs if not s.multi)
    rows = pads.dataset(items_uri, format="parquet").count_rows()  # footers only
    values = sum(chunk.num_values for name, chunk in parquet_column_chunks(items_uri) if name in multi)
    row_space = rows + FIRST_INDEX
    total = 8 * rows + 8 * row_space * (singles + len(multi)) + 8 * values + 4 * row_space
    return rows, total


def choose_catalogue_mode(setting: str, replicated_bytes: int) -> str:
    """``replicated`` or ``streaming`` for ``train.catalogue`` = ``setting``."""
    if setting in ("replicated", "streaming"):
        return setting
    if setting != "auto":
        raise ValueError(f"train.catalogue must be auto, replicated or streaming, got {setting!r}")
    return "streaming" if replicated_bytes > REPLICATE_MAX_BYTES else "replicated"


def plan_shards(replicated_bytes: int, num_items: int, num_nodes: int) -> int:
    """Number of shard actors: >= MIN_SHARDS, >= one per node, ~SHARD_TARGET_BYTES each, and
    never more than there are items."""
    want = max(MIN_SHARDS, num_nodes, math.ceil(replicated_bytes / SHARD_TARGET_BYTES))
    return max(1, min(want, num_items))


# ---------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------


class CatalogueShard:
    """The catalogue items with ``lo <= item_index < hi``, sorted by item_index, as one Arrow
    table: ``item_index``, the item feature columns, ``log_q`` (float32). Run as a Ray actor by
    ``CatalogueService``; a plain object otherwise. Read-only after construction."""

    def __init__(self, items_uri: str, popularity_uri: str, specs: list[FeatureSpec], lo: int, hi: int) -> None:
        import pyarrow.dataset as pads

        self.lo, self.hi = int(lo), int(hi)
        item_specs = side(specs, "item")
        columns = [ITEM_INDEX] + [s.column for s in item_specs if s.name != ITEM_ID]
        in_range = (pc.field(ITEM_INDEX) >= self.lo) & (pc.field(ITEM_INDEX) < self.hi)
        where = f"items/ rows with {self.lo} <= item_index < {self.hi} ({items_uri})"
        try:
            table = pads.dataset(items_uri, format="parquet").to_table(columns=columns, filter=in_range)
        except (FileNotFoundError, OSError) as exc:
            raise FileNotFoundError(f"cannot read the prepared table {items_uri!r} ({exc})") from exc
        for name in table.column_names:
            if table.column(name).null_count:
                raise ValueError(
                    f"{where}: column {name} holds {table.column(name).null_count} nulls; the prepared "
                    f"tables encode missing values as OOV (1) or empty lists. Rerun spark_jobs.prepare."
                )
        table = table.sort_by(ITEM_INDEX).combine_chunks()
        idx = int64_numpy(table.column(ITEM_INDEX))
        if idx.size and idx.min() < FIRST_INDEX:
            raise ValueError(f"{where}: item_index must start at {FIRST_INDEX}, got {int(idx.min())}")
        if idx.size > 1 and np.any(idx[1:] == idx[:-1]):
            dup = int(idx[1:][idx[1:] == idx[:-1]][0])
            raise ValueError(f"{where}: item_index must be unique (one row per item), {dup} repeats")

        pop = pads.dataset(popularity_uri, format="parquet").to_table(columns=[ITEM_INDEX, LOG_Q], filter=in_range)
        pop = pop.sort_by(ITEM_INDEX)
        pop_idx = int64_numpy(pop.column(ITEM_INDEX))
        pop_logq = pop.column(LOG_Q).to_numpy(zero_copy_only=False) if pop.num_rows else np.zeros(0)
        if pop_idx.size:
            at = np.minimum(np.searchsorted(pop_idx, idx), pop_idx.size - 1)
            found = pop_idx[at] == idx
        else:
            at, found = np.zeros(idx.size, np.int64), np.zeros(idx.size, bool)
        if not found.all():
            missing = idx[~found]
            raise ValueError(
                f"{popularity_uri}: {missing.size} catalogue items have no popularity row (e.g. item_index "
                f"{missing[:5].tolist()}); the data contract gives every item one. Rerun spark_jobs.prepare."
            )
        logq = pop_logq[at].astype(np.float32) if idx.size else np.zeros(0, np.float32)
        if not np.all(np.isfinite(logq)):
            raise ValueError(f"{popularity_uri}: log_q holds non-finite values; probabilities must be > 0")
        self.table = table.append_column(LOG_Q, pa.array(logq, pa.float32()))
        self.item_index = idx

    def num_items(self) -> int:
        return int(self.item_index.size)

    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def lookup(self, item_index: np.ndarray) -> pa.Table:
        """The rows of ``item_index`` (int ``[n]``, each in this shard's range), in that order."""
        q = np.asarray(item_index, dtype=np.int64)
        at = np.searchsorted(self.item_index, q)
        ok = at < self.item_index.size
        ok[ok] = self.item_index[at[ok]] == q[ok]
        if not ok.all():
            raise KeyError(
                f"item_index {q[~ok][:5].tolist()} not in the catalogue (items/ rows {self.lo} <= "
                f"item_index < {self.hi}); train/ and items/ come from different preparations"
            )
        return self.table.take(pa.array(at))

    def rows_at(self, positions: np.ndarray) -> pa.Table:
        """The rows at shard-local positions ``0 .. num_items - 1`` (the k-th item by item_index)."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.item_index.size):
            raise IndexError(f"positions span [{p.min()}, {p.max()}], the shard has {self.item_index.size} items")
        return self.table.take(pa.array(p))


# ---------------------------------------------------------------------------------------------
# The sharded catalogue
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueService:
    """Handles of the shard actors and how keys map to them; picklable (Ray Data tasks and train
    workers receive it). Shard ``s`` holds the items with ``lower[s] <= item_index < lower[s+1]``
    (the last one open-ended) and catalogue positions ``starts[s] .. starts[s+1] - 1``."""

    shards: tuple[Any, ...]
    lower: tuple[int, ...]
    starts: tuple[int, ...]

    @property
    def num_items(self) -> int:
        return self.starts[-1]

    @staticmethod
    def start(
        items_uri: str, popularity_uri: str, specs: list[FeatureSpec], num_shards: int, row_space: int
    ) -> "CatalogueService":
        """Start ``num_shards`` shard actors over equal item_index ranges of ``[FIRST_INDEX,
        row_space)`` and wait until each has loaded its range."""
        import ray

        num_shards = max(1, int(num_shards))
        step = max(1, math.ceil(max(row_space - FIRST_INDEX, 1) / num_shards))
        lower = [0] + [FIRST_INDEX + k * step for k in range(1, num_shards)]
        upper = lower[1:] + [_MAX_INDEX]
        actor = ray.remote(CatalogueShard).options(
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=SHARD_CONCURRENCY,
            scheduling_strategy="SPREAD",
        )
        shards = [actor.remote(items_uri, popularity_uri, list(specs), lo, hi) for lo, hi in zip(lower, upper)]
        counts = ray.get([s.num_items.remote() for s in shards])
        if sum(counts) == 0:
            for s in shards:
                ray.kill(s)
            raise ValueError(f"{items_uri}: the items table has 0 rows; the catalogue is empty")
        starts = [0] + np.cumsum(counts).tolist()
        return CatalogueService(tuple(shards), tuple(lower), tuple(int(x) for x in starts))

    def shutdown(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)

    def nbytes(self) -> int:
        """Bytes the shards hold in all (Arrow buffers)."""
        import ray

        return int(sum(ray.get([s.nbytes.remote() for s in self.shards])))

    def lookup_async(self, item_index: np.ndarray) -> "PendingRows":
        """Start fetching the rows of ``item_index`` (int ``[n]``); ``.result()`` is the table."""
        q = np.asarray(item_index, dtype=np.int64)
        if q.size and q.min() < 0:
            raise KeyError(f"negative item_index {int(q.min())}")
        shard_of = np.searchsorted(np.asarray(self.lower), q, side="right") - 1
        return self._fetch(shard_of, q, "lookup")

    def rows_at_async(self, positions: np.ndarray) -> "PendingRows":
        """Start fetching the items at catalogue positions (int ``[n]`` in ``0 .. num_items - 1``,
        the k-th real item by item_index)."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.num_items):
            raise IndexError(f"positions span [{p.min()}, {p.max()}], the catalogue has {self.num_items} items")
        starts = np.asarray(self.starts[:-1])
        # side="right" - 1: the last shard starting at or before p, which is never an empty one.
        shard_of = np.searchsorted(starts, p, side="right") - 1
        return self._fetch(shard_of, p - starts[shard_of], "rows_at")

    def lookup(self, item_index: np.ndarray) -> pa.Table:
        return self.lookup_async(item_index).result()

    def rows_at(self, positions: np.ndarray) -> pa.Table:
        return self.rows_at_async(positions).result()

    def _fetch(self, shard_of: np.ndarray, keys: np.ndarray, method: str) -> "PendingRows":
        order = np.argsort(shard_of, kind="stable")
        sorted_shards = shard_of[order]
        cuts = np.searchsorted(sorted_shards, np.arange(len(self.shards) + 1))
        refs = []
        for s in range(len(self.shards)):
            a, b = int(cuts[s]), int(cuts[s + 1])
            if b > a or (not refs and s == len(self.shards) - 1):  # an empty query still gets a schema
                refs.append(getattr(self.shards[s], method).remote(keys[order[a:b]]))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return PendingRows(refs, inverse)


class PendingRows:
    """Shard replies in flight; ``result()`` waits and returns the rows in query order."""

    def __init__(self, refs: list[Any], inverse: np.ndarray) -> None:
        self.refs = refs
        self.inverse = inverse

    def result(self) -> pa.Table:
        import ray

        parts = ray.get(self.refs)
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        if np.array_equal(self.inverse, np.arange(self.inverse.size)):
            return table
        return table.take(pa.array(self.inverse))


# ---------------------------------------------------------------------------------------------
# Positives: a Ray Data stage
# ---------------------------------------------------------------------------------------------


class JoinPositives:
    """Ray Data batch UDF: appends the clicked items' features and ``log_q`` (looked up in the
    shards by the row's ``item_index``) as ``ray_train.data.POSITIVE_PREFIX + <column>``."""

    def __init__(self, service: CatalogueService) -> None:
        self.service = service

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.service.lookup(int64_numpy(batch.column(ITEM_INDEX)))
        for name in rows.column_names:
            if name != ITEM_INDEX:
                batch = batch.append_column(POSITIVE_PREFIX + name, rows.column(name))
        return batch


# ---------------------------------------------------------------------------------------------
# SSL items: exact uniform draws, per (seed, epoch, rank)
# ---------------------------------------------------------------------------------------------


def draw_positions(num_items: int, n: int, generator: torch.Generator) -> np.ndarray:
    """``n`` catalogue positions i.i.d. uniform on ``0 .. num_items - 1`` (with replacement): the
    draw ``Catalogue.sample_uniform`` makes."""
    return torch.randint(num_items, (n,), generator=generator).numpy()


class UniformItemStream:
    """SSL item batches of one (seed, epoch, rank): batch ``k`` is ``batch_size`` items drawn
    uniformly with replacement from the whole catalogue with ``generator`` (positions
    ``draw_positions``, then their rows from the shards), as a ``FeatureBatch`` like
    ``Catalogue.lookup`` returns. Rows are fetched ``chunk_batches`` batches per request, ``depth``
    requests ahead; which items batch ``k`` holds depends only on the generator's seed and ``k``.
    ``start_batch``: the first batches to skip (drawn, not fetched), to resume mid-epoch."""

    def __init__(
        self,
        service: CatalogueService,
        specs: list[FeatureSpec],
        batch_size: int,
        generator: torch.Generator,
        chunk_batches: int = CHUNK_BATCHES,
        depth: int = 2,
        start_batch: int = 0,
    ) -> None:
        self.service = service
        self.specs = list(specs)
        self.batch_size = int(batch_size)
        self.generator = generator
        self.chunk_batches = max(1, int(chunk_batches))
        self.depth = max(1, int(depth))
        self.pending: deque[PendingRows] = deque()
        self.ready: deque[FeatureBatch] = deque()
        for _ in range(start_batch):
            draw_positions(service.num_items, self.batch_size, generator)

    def _request(self) -> None:
        n = self.service.num_items
        positions = np.concatenate(
            [draw_positions(n, self.batch_size, self.generator) for _ in range(self.chunk_batches)]
        )
        self.pending.append(self.service.rows_at_async(positions))

    def __iter__(self) -> "UniformItemStream":
        return self

    def __next__(self) -> FeatureBatch:
        if not self.ready:
            while len(self.pending) < self.depth:
                self._request()
            feats = item_features_from_table(self.pending.popleft().result(), self.specs, "", "catalogue shards")
            self._request()
            for k in range(self.chunk_batches):
                self.ready.append(slice_features(feats, k * self.batch_size, self.batch_size))
        return self.ready.popleft()


def start_service(
    items_uri: str, popularity_uri: str, specs: list[FeatureSpec], replicated_bytes: int, num_items: int,
    num_nodes: Optional[int] = None,
) -> CatalogueService:
    """Start the shards for a catalogue of ``num_items`` items (``replicated_bytes`` in the
    replicated layout) on the connected Ray cluster."""
    import ray

    if num_nodes is None:
        num_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    item_id = next(s for s in specs if s.side == "item" and s.name == ITEM_ID)
    shards = plan_shards(replicated_bytes, num_items, num_nodes)
    return CatalogueService.start(items_uri, popularity_uri, specs, shards, int(item_id.vocab_size))
