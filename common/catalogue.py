"""The whole encoded item catalogue, in memory, indexed by ``item_index``.

The SSL task needs item batches drawn uniformly from the catalogue (never-clicked items included,
that is what lets SSL help the long tail), and evaluation/export need every item's features. Both
are a gather from per-feature tensors whose row ``r`` is the item with ``item_index == r``. Rows 0
(MASK) and 1 (OOV) are not items: their features are all MASK (0) for single-valued features and
empty for multi-valued ones, and they are never sampled nor listed in ``item_indices``.

The source is the ``items/`` Parquet table of the data contract (``docs/data_contract.md``):
``item_index`` int32 plus one column per item feature (``int32`` or ``list<int32>``).

Train workers hold one (``train.catalogue: replicated``) up to a size the README states; past it
(``streaming``) the catalogue is sharded over Ray actors instead (``ray_train/streaming.py``), whose
SSL draws are the same exact ``torch.randint`` over item positions that ``sample_uniform`` makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from common.features import FIRST_INDEX, ITEM_ID, MASK_INDEX, FeatureSpec, side
from common.ragged import FeatureBatch, Ragged


def int64_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An integer Arrow array (plain, sliced or chunked) as an int64 numpy array."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros(0, dtype=np.int64)
        parts = [c.to_numpy(zero_copy_only=False) for c in column.chunks]
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
    else:
        arr = column.to_numpy(zero_copy_only=False)
    return arr.astype(np.int64, copy=False)


def ragged_from_arrow(column: pa.Array | pa.ChunkedArray, what: str = "column") -> Ragged:
    """A ``list<int>`` column (plain, sliced or chunked) as ``Ragged(values int64 [nnz], offsets
    int64 [rows])``, one row per list.

    ``ListArray.values`` ignores a slice's offset; ``list_flatten`` and ``list_value_length``
    honour it and accept chunked arrays, so no chunk needs combining first. Nulls are rejected: the
    data contract encodes missing values as empty lists, so a null list means a broken preparation."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"{what}: expected a list<int32> column, got {column.type}")
    if column.null_count:
        raise ValueError(
            f"{what}: {column.null_count} null lists out of {len(column)} rows; the prepared tables "
            f"hold empty lists for missing values (docs/data_contract.md). Rerun spark_jobs.prepare."
        )
    lengths = int64_numpy(pc.list_value_length(column))
    values = int64_numpy(pc.list_flatten(column))
    if values.size and values.min() < 0:
        raise ValueError(f"{what}: negative index {int(values.min())}; encoded indices are >= 0")
    offsets = np.cumsum(lengths) - lengths
    return Ragged(torch.from_numpy(values), torch.from_numpy(offsets))


@dataclass(frozen=True)
class Catalogue:
    """Per-feature tensors over ``num_rows`` rows (``item_index`` 0 .. max). ``features[name]`` is an
    int64 ``[num_rows]`` tensor or a ``Ragged`` with ``num_rows`` rows; ``item_indices`` int64
    ``[num_items]`` are the rows that are real items (ascending)."""

    specs: tuple[FeatureSpec, ...]
    features: dict[str, Tensor | Ragged]
    item_indices: Tensor

    @property
    def num_rows(self) -> int:
        """``max(item_index) + 1``: the size of the row space, dummy rows 0 and 1 included."""
        return int(self.features[ITEM_ID].shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_indices.numel())

    @property
    def device(self) -> torch.device:
        return self.item_indices.device

    @staticmethod
    def from_arrow(table: pa.Table, specs: list[FeatureSpec]) -> "Catalogue":
        """Build from the ``items/`` table. ``specs`` may hold both sides; only item specs are used."""
        item_specs = side(specs, "item")
        if not any(s.name == ITEM_ID for s in item_specs):
            raise ValueError(
                f"Catalogue.from_arrow: the item specs {[s.name for s in item_specs]} lack "
                f"'{ITEM_ID}'; pass the specs from manifest.json (common.features.specs_from_manifest)"
            )
        missing = [s.column for s in item_specs if s.column not in table.column_names]
        if missing:
            raise ValueError(
                f"Catalogue.from_arrow: the items table ({table.num_rows} rows, columns "
                f"{table.column_names}) lacks feature column(s) {missing}; the manifest and the "
                f"items/ table come from different preparations, rerun spark_jobs.prepare"
            )
        if table.num_rows == 0:
            raise ValueError("Catalogue.from_arrow: the items table has 0 rows; the catalogue is empty")

        id_col = next(s.column for s in item_specs if s.name == ITEM_ID)
        idx_arrow = table.column(id_col)
        if idx_arrow.null_count:
            raise ValueError(f"Catalogue.from_arrow: column {id_col} holds {idx_arrow.null_count} nulls")
        idx = idx_arrow.to_numpy().astype(np.int64)
        if idx.min() < FIRST_INDEX:
            raise ValueError(
                f"Catalogue.from_arrow: {id_col} must start at {FIRST_INDEX} (0 and 1 are reserved), "
                f"got min {idx.min()}"
            )
        order = np.argsort(idx, kind="stable")
        idx_sorted = idx[order]
        if np.any(idx_sorted[1:] == idx_sorted[:-1]):
            dup = int(idx_sorted[1:][idx_sorted[1:] == idx_sorted[:-1]][0])
            raise ValueError(
                f"Catalogue.from_arrow: {id_col} must be unique (one row per item), {dup} repeats"
            )
        num_rows = int(idx_sorted[-1]) + 1
        rows = torch.from_numpy(idx_sorted)
        table = table.take(pa.array(order))

        features: dict[str, Tensor | Ragged] = {}
        for spec in item_specs:
            col = table.column(spec.column)
            what = f"items/{spec.column} (feature {spec.name!r})"
            if spec.multi:
                r = ragged_from_arrow(col, what)
                lengths = torch.zeros(num_rows, dtype=torch.int64)
                lengths[rows] = r.lengths()
                # Rows ascend, so the flat values already lie in row order; gap rows are empty.
                features[spec.name] = Ragged.from_lengths(r.values, lengths)
            else:
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    raise TypeError(f"{what}: the spec says single-valued but the column is {col.type}")
                if col.null_count:
                    raise ValueError(f"{what}: {col.null_count} nulls; missing values must be OOV (1)")
                dense = torch.full((num_rows,), MASK_INDEX, dtype=torch.int64)
                dense[rows] = torch.from_numpy(col.to_numpy().astype(np.int64))
                features[spec.name] = dense
        return Catalogue(tuple(item_specs), features, rows)

    def lookup(self, item_index: Tensor) -> FeatureBatch:
        """Features of items ``item_index`` (int64 ``[B]``) as a ``FeatureBatch`` of ``B`` rows."""
        item_index = torch.as_tensor(item_index, dtype=torch.int64, device=self.device)
        if item_index.numel() and (int(item_index.min()) < 0 or int(item_index.max()) >= self.num_rows):
            raise IndexError(
                f"Catalogue.lookup: item indices span [{int(item_index.min())}, "
                f"{int(item_index.max())}] but the catalogue has rows 0..{self.num_rows - 1}"
            )
        return {
            name: (x.index_select(item_index) if isinstance(x, Ragged) else x[item_index])
            for name, x in self.features.items()
        }

    def sample_uniform(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` item indices drawn uniformly with replacement from all real items, int64 ``[n]``."""
        pos = torch.randint(self.num_items, (n,), generator=generator, device=generator.device)
        return self.item_indices[pos.to(self.device)]

    def to(self, device: torch.device | str) -> "Catalogue":
        return Catalogue(
            self.specs, {k: v.to(device) for k, v in self.features.items()}, self.item_indices.to(device)
        )
