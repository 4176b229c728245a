"""Ragged (variable-length) integer rows and the feature batches built from them.

A multi-valued feature of a batch is one flat ``values`` tensor plus ``offsets`` (row starts), the
convention of ``nn.EmbeddingBag`` / ``F.embedding_bag``, so a batch goes to the embedding lookup
without padding or copies. Row ``r`` holds ``values[offsets[r]:offsets[r + 1]]`` (the last row ends
at ``len(values)``); a row may be empty.

A ``FeatureBatch`` maps ``FeatureSpec.name`` to an int64 tensor ``[batch]`` (single-valued
features) or a ``Ragged`` with ``batch`` rows (multi-valued features and ``history``).

Every operation here is vectorised: no Python loop over rows, because batches and the item
catalogue (a ``Ragged`` with one row per item) can be large.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor


class Ragged(NamedTuple):
    """``values``: int64 ``[nnz]``; ``offsets``: int64 ``[batch]``, non-decreasing row starts."""

    values: Tensor
    offsets: Tensor

    @staticmethod
    def from_lengths(values: Tensor, lengths: Tensor) -> "Ragged":
        """Rows of ``lengths[r]`` consecutive values each. ``values [nnz]``, ``lengths [batch]``."""
        values = torch.as_tensor(values, dtype=torch.int64)
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=values.device)
        if lengths.dim() != 1 or values.dim() != 1:
            raise ValueError(
                f"Ragged.from_lengths expects 1-d values and lengths, got shapes "
                f"{tuple(values.shape)} and {tuple(lengths.shape)}"
            )
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"Ragged.from_lengths: negative row length {int(lengths.min())}")
        total = int(lengths.sum())
        if total != values.numel():
            raise ValueError(
                f"Ragged.from_lengths: lengths sum to {total} but {values.numel()} values arrived; "
                f"pass one length per row whose sum equals len(values)"
            )
        offsets = torch.cumsum(lengths, 0) - lengths
        return Ragged(values, offsets)

    @staticmethod
    def from_lists(rows: Sequence[Sequence[int]], device: torch.device | str | None = None) -> "Ragged":
        """Build from Python lists (tests, small inputs); one list per row."""
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        flat = [int(v) for r in rows for v in r]
        values = torch.tensor(flat, dtype=torch.int64)
        out = Ragged.from_lengths(values, lengths)
        return out.to(device) if device is not None else out

    @property
    def num_rows(self) -> int:
        return int(self.offsets.numel())

    def lengths(self) -> Tensor:
        """Number of values in each row, int64 ``[batch]``."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.values.numel()])])
        return ends - self.offsets

    def row_ids(self) -> Tensor:
        """The row of every value, int64 ``[nnz]`` (the inverse of ``offsets``)."""
        return torch.repeat_interleave(
            torch.arange(self.num_rows, device=self.offsets.device), self.lengths()
        )

    def index_select(self, rows: Tensor) -> "Ragged":
        """The rows ``rows`` (int64 ``[k]``, repeats allowed) in that order, as a new ``Ragged``."""
        rows = torch.as_tensor(rows, dtype=torch.int64, device=self.offsets.device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise IndexError(
                f"Ragged.index_select: row indices span [{int(rows.min())}, {int(rows.max())}] but "
                f"the Ragged has {self.num_rows} rows"
            )
        sel_lengths = self.lengths()[rows]
        sel_starts = self.offsets[rows]
        new_offsets = torch.cumsum(sel_lengths, 0) - sel_lengths
        # Each output value's source position = its row's old start + its rank inside the row.
        out_row = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), sel_lengths)
        rank_in_row = torch.arange(out_row.numel(), device=rows.device) - new_offsets[out_row]
        src = sel_starts[out_row] + rank_in_row
        return Ragged(self.values[src], new_offsets)

    def to(self, device: torch.device | str) -> "Ragged":  # type: ignore[override]
        return Ragged(self.values.to(device), self.offsets.to(device))

    def tolist(self) -> list[list[int]]:
        """Python lists per row (tests and debugging)."""
        vals = self.values.tolist()
        starts = self.offsets.tolist()
        ends = starts[1:] + [len(vals)]
        return [vals[s:e] for s, e in zip(starts, ends)]


Feature = Union[Tensor, Ragged]
FeatureBatch = dict[str, Feature]


def concat_rows(a: Ragged, b: Ragged) -> Ragged:
    """The rows of ``a`` followed by the rows of ``b``."""
    return Ragged(
        torch.cat([a.values, b.values]),
        torch.cat([a.offsets, b.offsets + a.values.numel()]),
    )


def concat_batches(a: FeatureBatch, b: FeatureBatch) -> FeatureBatch:
    """Row-wise concatenation of two batches with the same features: ``[Ba] + [Bb] -> [Ba + Bb]``."""
    if set(a) != set(b):
        raise ValueError(
            f"concat_batches: the batches hold different features: {sorted(a)} vs {sorted(b)}"
        )
    out: FeatureBatch = {}
    for name, x in a.items():
        y = b[name]
        if isinstance(x, Ragged) != isinstance(y, Ragged):
            raise TypeError(f"concat_batches: feature {name!r} is ragged in one batch only")
        out[name] = concat_rows(x, y) if isinstance(x, Ragged) else torch.cat([x, y])
    return out


def batch_size(feats: FeatureBatch) -> int:
    """Rows of a batch; every feature must agree."""
    sizes = {name: (x.num_rows if isinstance(x, Ragged) else int(x.shape[0])) for name, x in feats.items()}
    if not sizes:
        raise ValueError("batch_size: empty feature batch")
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise ValueError(f"batch_size: features disagree on the number of rows: {sizes}")
    return distinct.pop()


def select_rows(feats: FeatureBatch, rows: Tensor) -> FeatureBatch:
    """Rows ``rows`` of every feature of a batch."""
    out: FeatureBatch = {}
    for name, x in feats.items():
        out[name] = x.index_select(rows) if isinstance(x, Ragged) else x[rows.to(x.device)]
    return out


def batch_to(feats: FeatureBatch, device: torch.device | str) -> FeatureBatch:
    return {name: x.to(device) for name, x in feats.items()}
