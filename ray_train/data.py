"""Inputs of a training run: the train log as a Ray Dataset, the item catalogue, popularity and
mutual information, and the Arrow -> torch collate that turns list columns into ``Ragged`` (and,
with a streamed catalogue, the denormalised positives into ``TrainBatch.item``).

Two inputs, two mechanisms:

* **The train log** (``<prepared>/train``) is a Ray Dataset. Ray Train splits it across workers with
  ``streaming_split(world, equal=True)`` (its default ``DataConfig``), so every rank receives the
  same number of rows; keeping full batches only (``iter_train_batches``), every rank then runs
  the same number of steps (``steps_per_epoch``), which DDP and ``ray.train.report`` (a barrier)
  both require.

  Shuffling, two levels, both reproducible from ``train.seed``:

  1. ``randomize_block_order(RandomSeedConfig(seed, reseed_after_execution=True))`` on the driver,
     over blocks of ``BLOCK_BATCHES * batch_size`` rows: a new block order every epoch
     (each epoch is a new execution of the dataset). Without it every epoch would see the blocks
     in the order Spark wrote them. It costs no data movement: only block references are permuted
     (but it is a barrier: an epoch starts once all blocks are read).
  2. A local shuffle buffer in each worker (``SHUFFLE_BUFFER_BATCHES * batch_size`` rows) seeded per
     (seed, epoch, rank): mixes rows across neighbouring blocks, so a batch is not one user's
     session. A full ``random_shuffle`` (an all-to-all exchange of the whole log every epoch) is
     not needed for a batch softmax: what matters is that a batch mixes users and items.

  After a worker restart the dataset's execution counter starts again, so block order after a
  restart repeats earlier epochs' orders; the local buffer is seeded from the epoch itself.
  ``preserve_order`` keeps Ray Data from reordering blocks by task completion, so the seeded
  shuffles are reproducible.

  Small logs (uncompressed size <= ``MATERIALIZE_FRACTION`` of the object store) are materialized
  once: each epoch then permutes in-memory blocks instead of re-reading Parquet, which removes a
  per-epoch start-up of seconds. Larger logs stream from Parquet every epoch.

* **The item catalogue** (``<prepared>/items``), ``train.catalogue``:

  - ``replicated`` (``auto`` below ``ray_train.streaming.REPLICATE_MAX_BYTES`` per worker): loaded
    whole into every worker as a ``common.catalogue.Catalogue``: the SSL task samples items
    uniformly from the whole catalogue (never-clicked items included) and the main task looks up
    positive items' features by index, both random access into local tensors.

    Memory per worker (``catalogue_bytes``), per item: 8 bytes per single-valued item feature
    (int64; ``item_id`` is one), per multi-valued feature 8 bytes (offset) + 8 bytes per value,
    4 bytes of ``log_q`` (float32) and 8 bytes of ``item_indices``:
    ``8 * (1 + singles + multis) + 8 * values + 4``.
    The default synthetic catalogue (item_id + 5 single-valued features + ``tags`` with 1.84 values
    on average) measures 82.9 bytes per item: 1M items ~ 83 MB, 10M items ~ 0.8 GB per worker,
    times the workers of a node.
  - ``streaming`` (``auto`` above the limit; ``ray_train/streaming.py``): the catalogue lives once
    in the cluster, in shard actors. ``read_train_dataset(catalogue_service=...)`` denormalises
    the clicked items' features and ``log_q`` into the train rows (columns ``POSITIVE_PREFIX +
    <column>``, a Ray Data map stage before the block order is randomized) and the collate turns
    them into ``TrainBatch.item`` / ``log_q``; the SSL items come from
    ``streaming.UniformItemStream`` (exact uniform draws with ``sampling_generator``).

Batches: ``iter_torch_batches(collate_fn=RaggedCollate(...))`` turns Arrow chunks of
``CHUNK_BATCHES`` batches into ``TrainBatch`` es in Ray Data's prefetch thread (overlapping the
model step); ``iter_train_batches`` cuts them into batches (views). Ray's per-batch bookkeeping
runs in Python under the GIL, so paying it per chunk rather than per batch keeps the training
thread fed (``bench/ingest.py``). Ray's default collate fails on ``list<int32>`` columns;
``RaggedCollate`` converts them with vectorised Arrow compute (``list_value_length`` /
``list_flatten``), which honour slices and chunked arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from common.catalogue import Catalogue, int64_numpy as _to_int64
from common.catalogue import ragged_from_arrow as arrow_to_ragged
from common.features import ITEM_ID, FeatureSpec, feature_column, side
from common.manifest import join
from common.ragged import FeatureBatch, Ragged

# Rows of a block of the train Dataset, in batches: the unit ``randomize_block_order`` permutes.
BLOCK_BATCHES = 8
# Ray Data hands over chunks of this many batches, split into batches in torch: Ray's per-batch
# work (batching, shuffle buffer, collate, thread hand-off) holds the GIL and is paid per chunk.
CHUNK_BATCHES = 8
# The local shuffle buffer holds at least this many batches of rows before it yields a chunk.
SHUFFLE_BUFFER_BATCHES = 16

# Where each table lives when the manifest's ``tables`` section does not list it (data contract).
DEFAULT_TABLES = {
    "items": "items",
    "train": "train",
    "eval": "eval",
    "item_popularity": "stats/item_popularity",
    "mutual_info": "stats/mutual_info",
}


def table_uri(prepared: str, manifest: dict[str, Any], name: str) -> str:
    """Absolute location of a prepared table: ``manifest["tables"][name]`` (relative to the
    prepared folder) or the data contract's default path."""
    rel = manifest.get("tables", {}).get(name, DEFAULT_TABLES[name])
    if "://" in rel or rel.startswith("/"):
        return rel
    base = prepared if "://" in prepared else _abspath(prepared)
    return join(base, rel)


def _abspath(path: str) -> str:
    import os

    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# Arrow -> torch
# ---------------------------------------------------------------------------------------------


def arrow_to_long(column: pa.Array | pa.ChunkedArray, what: str = "column") -> Tensor:
    """A single-valued int column as int64 ``[rows]``."""
    if column.null_count:
        raise ValueError(
            f"{what}: {column.null_count} nulls out of {len(column)} rows; missing values are "
            f"encoded as OOV (1) by spark_jobs.prepare. Rerun it."
        )
    return torch.from_numpy(_to_int64(column))


@dataclass
class TrainBatch:
    """One training batch: ``user`` features (``[B]`` tensors / ``Ragged`` with ``B`` rows,
    keyed by FeatureSpec.name, history included) and the clicked ``item_index`` int64 ``[B]``.

    With a streamed catalogue (``train.catalogue: streaming``) the batch also carries the clicked
    items' features ``item`` (keyed by item FeatureSpec.name, ``item_id`` included) and their
    ``log_q`` float32 ``[B]``, denormalised into the rows by Ray Data; otherwise both are None and
    the worker looks them up in its replicated ``Catalogue``."""

    user: FeatureBatch
    item_index: Tensor
    item: Optional[FeatureBatch] = None
    log_q: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return int(self.item_index.shape[0])

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(
            {k: v.to(device) for k, v in self.user.items()},
            self.item_index.to(device),
            None if self.item is None else {k: v.to(device) for k, v in self.item.items()},
            None if self.log_q is None else self.log_q.to(device),
        )

    def slice(self, start: int, length: int) -> "TrainBatch":
        """Rows ``start .. start + length`` (views, no copy)."""
        return TrainBatch(
            {k: _slice_rows(v, start, length) for k, v in self.user.items()},
            self.item_index[start : start + length],
            None if self.item is None else {k: _slice_rows(v, start, length) for k, v in self.item.items()},
            None if self.log_q is None else self.log_q[start : start + length],
        )


def slice_features(features: FeatureBatch, start: int, length: int) -> FeatureBatch:
    """Rows ``start .. start + length`` of every feature (views, no copy)."""
    return {k: _slice_rows(v, start, length) for k, v in features.items()}


def _slice_rows(x: Tensor | Ragged, start: int, length: int) -> Tensor | Ragged:
    if not isinstance(x, Ragged):
        return x[start : start + length]
    stop = start + length
    begin = int(x.offsets[start]) if start < x.num_rows else x.values.numel()
    end = int(x.offsets[stop]) if stop < x.num_rows else x.values.numel()
    return Ragged(x.values[begin:end], x.offsets[start:stop] - begin)


def train_columns(specs: list[FeatureSpec]) -> list[str]:
    """Columns of ``train/`` the trainer reads: the clicked item and every user-side feature."""
    cols = [feature_column(ITEM_ID)]
    for s in side(specs, "user"):
        if s.column not in cols:
            cols.append(s.column)
    return cols


# Streamed catalogue: the clicked item's features and log_q are denormalised into each train row
# as columns ``POSITIVE_PREFIX + <items/ column>`` (the item id is the row's own ``item_index``).
POSITIVE_PREFIX = "pos__"
LOG_Q_COLUMN = "log_q"


def positive_columns(specs: list[FeatureSpec]) -> list[str]:
    """The denormalised item columns of a train row (streamed catalogue), ``log_q`` last."""
    return [POSITIVE_PREFIX + s.column for s in side(specs, "item") if s.name != ITEM_ID] + [
        POSITIVE_PREFIX + LOG_Q_COLUMN
    ]


def item_features_from_table(
    table: pa.Table, specs: list[FeatureSpec], prefix: str = "", what: str = "items"
) -> FeatureBatch:
    """Item features of an Arrow table of item rows (columns ``prefix + <items/ column>``, the id
    from the unprefixed ``item_index``) as a ``FeatureBatch`` keyed by item FeatureSpec.name, in
    the layout ``Catalogue.lookup`` returns (int64 tensors, ``Ragged`` for multi-valued features)."""
    out: FeatureBatch = {}
    for s in side(specs, "item"):
        column = s.column if s.name == ITEM_ID else prefix + s.column
        if column not in table.column_names:
            raise ValueError(
                f"{what}: {table.num_rows} item rows lack column {column!r} (has {table.column_names}); "
                f"the manifest's features and the items/ table come from different preparations"
            )
        col, label = table.column(column), f"{what}/{column} (feature {s.name!r})"
        out[s.name] = arrow_to_ragged(col, label) if s.multi else arrow_to_long(col, label)
    return out


def collate_table(table: pa.Table, specs: list[FeatureSpec], positives: bool = False) -> TrainBatch:
    """An Arrow batch of ``train/`` rows -> ``TrainBatch``; list columns become ``Ragged``.
    ``positives``: the rows also carry the clicked item's features and ``log_q``
    (``positive_columns``, streamed catalogue), collated into ``TrainBatch.item`` / ``log_q``."""
    wanted = train_columns(specs) + (positive_columns(specs) if positives else [])
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ValueError(
            f"train batch of {table.num_rows} rows lacks column(s) {missing} (has {table.column_names}); "
            f"the manifest's features and the train/ table come from different preparations"
        )
    user: FeatureBatch = {}
    for s in side(specs, "user"):
        col = table.column(s.column)
        what = f"train/{s.column} (feature {s.name!r})"
        user[s.name] = arrow_to_ragged(col, what) if s.multi else arrow_to_long(col, what)
    item = arrow_to_long(table.column(feature_column(ITEM_ID)), f"train/{feature_column(ITEM_ID)}")
    if not positives:
        return TrainBatch(user, item)
    item_feats = item_features_from_table(table, specs, POSITIVE_PREFIX, "train")
    log_q = _float32(table.column(POSITIVE_PREFIX + LOG_Q_COLUMN))
    return TrainBatch(user, item, item_feats, log_q)


def _float32(column: pa.Array | pa.ChunkedArray) -> Tensor:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return torch.from_numpy(column.to_numpy(zero_copy_only=False).astype(np.float32))  # a writable copy


try:  # Ray is optional for the pure functions above (the benchmark's in-memory path uses them).
    from ray.data.collate_fn import ArrowBatchCollateFn as _ArrowCollateBase
except ImportError:  # pragma: no cover
    _ArrowCollateBase = object  # type: ignore[assignment,misc]


class RaggedCollate(_ArrowCollateBase):  # type: ignore[misc,valid-type]
    """``iter_torch_batches`` collate: Arrow table in, ``TrainBatch`` out. Runs in Ray Data's
    prefetch threads, so it must be (and is) free of shared mutable state."""

    def __init__(self, specs: list[FeatureSpec], positives: bool = False) -> None:
        self.specs = list(specs)
        self.positives = positives

    def __call__(self, batch: pa.Table) -> TrainBatch:
        return collate_table(batch, self.specs, self.positives)


# ---------------------------------------------------------------------------------------------
# The train log as a Ray Dataset
# ---------------------------------------------------------------------------------------------


# Columns that identify an event for the data-fraction down-sample.
SAMPLE_KEY_COLUMNS = ("user_index", "item_index", "timestamp")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 ``[n]`` (wraps mod 2^64): a well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_unit(user_index: np.ndarray, item_index: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """A deterministic number in [0, 1) per event, float64 ``[n]``, from (user, item, time) only:
    ``train.data_fraction = f`` keeps the events with ``sample_unit < f``, so the kept events do
    not depend on the seed, the method, the file layout or the number of workers, and the 10%
    sample is a subset of the 50% one."""
    with np.errstate(over="ignore"):
        h = _splitmix64(user_index.astype(np.uint64))
        h = _splitmix64(h ^ item_index.astype(np.uint64))
        h = _splitmix64(h ^ timestamp.astype(np.int64).view(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _KeepFraction:
    """Ray Data batch filter: the rows whose ``sample_unit`` is below ``fraction``."""

    def __init__(self, fraction: float, columns: list[str]) -> None:
        self.fraction = fraction
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = [_to_int64(batch.column(c)) for c in SAMPLE_KEY_COLUMNS]
        keep = sample_unit(*keys) < self.fraction
        return batch.filter(pa.array(keep)).select(self.columns)


def read_train_dataset(
    prepared: str,
    manifest: dict[str, Any],
    specs: list[FeatureSpec],
    seed: int,
    batch_size: int,
    materialize: bool = False,
    data_fraction: float = 1.0,
    catalogue_service: Any = None,
):
    """``<prepared>/train`` as a Ray Dataset of the columns the trainer needs, cut into blocks of
    ``BLOCK_BATCHES * batch_size`` rows (the unit ``randomize_block_order`` permutes), its
    block order reshuffled every epoch, reproducibly from ``seed``.

    ``materialize``: read the log once into the object store (see ``should_materialize``); every
    epoch then only permutes block references instead of listing and reading the files again,
    which removes a per-epoch start-up of seconds (tasks to schedule, files to open).

    ``data_fraction < 1``: only the events with ``sample_unit(user_index, item_index, timestamp)
    < data_fraction`` (the paper's reduced-training-data setting; the same events every run).

    ``catalogue_service`` (a ``ray_train.streaming.CatalogueService``, streamed catalogue): every
    block also gets the clicked items' features and ``log_q`` (``positive_columns``), looked up
    from the catalogue's shard actors by a Ray Data map stage (``JoinPositives``) before the
    block order is randomized, so the workers never hold the catalogue."""
    import ray.data
    from ray.data import RandomSeedConfig

    columns = train_columns(specs)
    ds = ray.data.read_parquet(table_uri(prepared, manifest, "train"))
    ds.context.execution_options.preserve_order = True  # same blocks in the same order every run
    if data_fraction < 1.0:
        ds = ds.select_columns(list(dict.fromkeys(columns + list(SAMPLE_KEY_COLUMNS))))
        ds = ds.map_batches(_KeepFraction(data_fraction, columns), batch_format="pyarrow", batch_size=None)
    else:
        ds = ds.select_columns(columns)
    ds = ds.repartition(target_num_rows_per_block=BLOCK_BATCHES * batch_size)
    if catalogue_service is not None:
        from ray_train.streaming import JoinPositives

        ds = ds.map_batches(JoinPositives(catalogue_service), batch_format="pyarrow", batch_size=None)
    if materialize:
        ds = ds.materialize()
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


# Materialize the train log when its uncompressed size is at most this fraction of the cluster's
# object store: it then stays in memory (shared by the workers of a node) without crowding out the
# blocks in flight; larger logs stream from Parquet every epoch.
MATERIALIZE_FRACTION = 0.25


def parquet_uncompressed_bytes(uri: str, columns: list[str]) -> int:
    """Uncompressed bytes of ``columns`` over all files of a Parquet table, from the file footers
    only (no data read): an estimate of its in-memory Arrow size."""
    wanted = set(columns)
    return sum(chunk.total_uncompressed_size for name, chunk in parquet_column_chunks(uri) if name in wanted)


def parquet_column_chunks(uri: str) -> Iterator[tuple[str, Any]]:
    """``(top-level column name, ColumnChunkMetaData)`` of every column chunk of every row group
    of every file of a Parquet table, from the footers only."""
    import pyarrow.dataset as pads

    for fragment in pads.dataset(uri, format="parquet").get_fragments():
        meta = fragment.metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                yield col.path_in_schema.split(".")[0], col


def should_materialize(table_bytes: int, object_store_bytes: float) -> bool:
    return table_bytes <= MATERIALIZE_FRACTION * object_store_bytes


def steps_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: ``equal=True`` gives each rank ``num_rows // world`` rows,
    ``drop_last`` keeps full batches only."""
    return (num_rows // world_size) // batch_size


def iter_train_batches(
    shard: Any,
    specs: list[FeatureSpec],
    batch_size: int,
    shuffle_seed: int,
    prefetch_chunks: int = 2,
    positives: bool = False,
) -> Iterator[TrainBatch]:
    """Full batches of one epoch from a worker's dataset shard (``ray.train.get_dataset_shard``):
    ``rows // batch_size`` of them, the remainder dropped. Ray Data delivers shuffled, collated
    chunks of ``CHUNK_BATCHES`` batches (prefetched in its threads), cut here into batches."""
    chunks = shard.iter_torch_batches(
        batch_size=CHUNK_BATCHES * batch_size,
        collate_fn=RaggedCollate(specs, positives),
        drop_last=False,  # only the last chunk can be short; its full batches are kept below
        local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
        local_shuffle_seed=shuffle_seed,
        prefetch_batches=prefetch_chunks,
    )
    for chunk in chunks:
        for start in range(0, chunk.num_rows - batch_size + 1, batch_size):
            yield chunk.slice(start, batch_size)


# ---------------------------------------------------------------------------------------------
# Catalogue, popularity, mutual information (loaded whole by every worker)
# ---------------------------------------------------------------------------------------------


def read_table(uri: str, columns: Optional[list[str]] = None) -> pa.Table:
    """Read a whole Parquet table (local path or URI), failing with the location if it is absent."""
    try:
        return pq.read_table(uri, columns=columns)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"cannot read the prepared table {uri!r} ({exc}); run `python -m spark_jobs.prepare` "
            f"and point paths.prepared at its output"
        ) from exc


def load_catalogue(prepared: str, manifest: dict[str, Any], specs: list[FeatureSpec]) -> Catalogue:
    """The ``items/`` table as a ``Catalogue`` (every item, never-clicked ones included)."""
    cols = [s.column for s in side(specs, "item")]
    return Catalogue.from_arrow(read_table(table_uri(prepared, manifest, "items"), cols), specs)


def load_log_q(prepared: str, manifest: dict[str, Any], catalogue: Catalogue) -> Tensor:
    """``log_q`` (log sampling probability of each item in a batch) as float32 ``[catalogue.num_rows]``
    indexed by item_index. Every real catalogue item must have a row in ``stats/item_popularity``
    (items without train events get the floor probability there); dummy rows 0/1 hold 0."""
    uri = table_uri(prepared, manifest, "item_popularity")
    t = read_table(uri, ["item_index", "log_q"])
    idx = _to_int64(t.column("item_index"))
    logq = t.column("log_q").to_numpy()
    out = torch.zeros(catalogue.num_rows, dtype=torch.float32)
    if idx.size and (idx.min() < 0 or idx.max() >= catalogue.num_rows):
        raise ValueError(
            f"{uri}: item_index spans [{idx.min()}, {idx.max()}] but the catalogue has rows "
            f"0..{catalogue.num_rows - 1}; items/ and stats/ come from different preparations"
        )
    have = np.zeros(catalogue.num_rows, dtype=bool)
    have[idx] = True
    missing = catalogue.item_indices.numpy()[~have[catalogue.item_indices.numpy()]]
    if missing.size:
        raise ValueError(
            f"{uri}: {missing.size} of {catalogue.num_items} catalogue items have no popularity row "
            f"(e.g. item_index {missing[:5].tolist()}); the data contract gives every item one. "
            f"Rerun spark_jobs.prepare."
        )
    if not np.all(np.isfinite(logq)):
        raise ValueError(f"{uri}: log_q holds non-finite values; probabilities must be > 0")
    out[torch.from_numpy(idx)] = torch.from_numpy(logq.astype(np.float32))
    return out


def load_mutual_info(prepared: str, manifest: dict[str, Any]) -> dict[frozenset[str], float]:
    """``stats/mutual_info`` as ``{frozenset({feature_a, feature_b}): mi}`` (nats)."""
    t = read_table(table_uri(prepared, manifest, "mutual_info"), ["feature_a", "feature_b", "mi"])
    a, b, mi = (t.column(c).to_pylist() for c in ("feature_a", "feature_b", "mi"))
    return {frozenset((x, y)): float(m) for x, y, m in zip(a, b, mi)}


def catalogue_bytes(catalogue: Catalogue, log_q: Optional[Tensor] = None) -> int:
    """Bytes a worker holds for the catalogue (feature tensors, item indices, log_q)."""
    total = catalogue.item_indices.element_size() * catalogue.item_indices.numel()
    for x in catalogue.features.values():
        parts = (x.values, x.offsets) if isinstance(x, Ragged) else (x,)
        total += sum(p.element_size() * p.numel() for p in parts)
    if log_q is not None:
        total += log_q.element_size() * log_q.numel()
    return total


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, rank); independent streams per tuple."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator for SSL item sampling and view masks of one (seed, epoch, rank)."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, rank, 1))


def sampling_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of the streamed catalogue's SSL item draws of one (seed, epoch, rank)
    (``ray_train.streaming.UniformItemStream``); the view masks keep ``epoch_generator``."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, rank, 3))


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the local shuffle buffer of one (seed, epoch, rank); fits in 32 bits for numpy."""
    return derive_seed(seed, epoch, rank, 2) & 0xFFFFFFFF
