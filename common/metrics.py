"""Retrieval metrics over a whole item catalogue: exact top-K with exclusions, recall, NDCG,
popularity buckets. Pure torch/numpy so that the driver, a Ray task or a notebook can use it.

Conventions
-----------
* Items are identified by their **catalogue row** (= ``item_index``; rows 0 and 1 are reserved).
* A *per-user set of rows* (ground truth, exclusions) may be given as

  - a ``common.ragged.Ragged``-like object (``.values`` and ``.offsets``, offsets = row starts,
    one per user: the EmbeddingBag convention),
  - a CSR-like object (``.indptr`` [U+1] and ``.indices``, e.g. ``scipy.sparse.csr_matrix``),
  - or a plain sequence of per-user sequences (``[[3, 5], [], [7]]``).

* Top-K lists are ``rows [U, K]`` int64, best first; ``-1`` marks an empty slot (fewer than K
  candidates left after exclusions). Rows within one user's list are unique.

Definitions (G = the user's ground-truth set, deduplicated; T_K = the first K rows of the list)
-------------------------------------------------------------------------------------------
* ``recall@K = |T_K ∩ G| / |G|``.
* ``NDCG@K = DCG@K / IDCG@K`` with binary gains: ``DCG@K = sum_{i < K, T_K[i] in G} 1 / log2(i + 2)``
  (i is the 0-based position) and ``IDCG@K = sum_{i < min(|G|, K)} 1 / log2(i + 2)``.
* Both are averaged over users with ``|G| >= 1``; users without ground truth are skipped, and a
  metric over zero users is ``nan``.
* Buckets (``item_buckets``): rank the real catalogue items by train count descending, ties by
  row ascending. ``head`` = the first ``ceil(head_fraction * n_items)`` of them that have count > 0,
  ``tail`` = every other item with count > 0, ``cold`` = count 0. The recall of a bucket uses each
  user's ground truth restricted to that bucket (users with none there are skipped) while the
  top-K list still comes from the whole catalogue.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

HEAD, TAIL, COLD = 0, 1, 2
BUCKET_NAMES = ("head", "tail", "cold")

# Elements of one [users, items] score block; bounds peak memory at ~128 MiB in float32.
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 25


# ---------------------------------------------------------------------------------------------
# Per-user row sets
# ---------------------------------------------------------------------------------------------


def to_csr(sets: Any, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a per-user set of rows to numpy CSR: ``(indptr int64 [U+1], indices int64 [nnz])``."""
    if hasattr(sets, "indptr") and hasattr(sets, "indices"):
        indptr = np.asarray(sets.indptr, dtype=np.int64)
        indices = np.asarray(sets.indices, dtype=np.int64)
    elif hasattr(sets, "values") and hasattr(sets, "offsets"):
        values = _as_numpy(sets.values).astype(np.int64, copy=False)
        offsets = _as_numpy(sets.offsets).astype(np.int64, copy=False)
        indptr = np.concatenate([offsets, np.asarray([values.shape[0]], dtype=np.int64)])
        indices = values
    else:
        lists = list(sets)
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = (
            np.concatenate([np.asarray(list(x), dtype=np.int64) for x in lists])
            if lists and indptr[-1] > 0
            else np.zeros(0, dtype=np.int64)
        )
    if indptr.shape[0] != num_users + 1:
        raise ValueError(
            f"per-user row sets describe {indptr.shape[0] - 1} users but the embeddings/top-K lists "
            f"have {num_users}; build them from the same user order"
        )
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.shape[0]:
        raise ValueError(
            f"malformed per-user row sets: offsets must start at 0, never decrease and end at the "
            f"number of values ({indices.shape[0]}); got offsets starting {indptr[:5].tolist()}"
        )
    return indptr, indices


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _user_of(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))


# ---------------------------------------------------------------------------------------------
# Exact top-K
# ---------------------------------------------------------------------------------------------


def topk_excluding(
    user_emb: Tensor,
    item_emb: Tensor,
    k: int,
    exclude: Any = None,
    candidate_rows: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` catalogue rows per user by dot product, excluded rows removed.

    ``user_emb [U, D]``; ``item_emb [N, D]`` where row j embeds catalogue row ``candidate_rows[j]``
    (default ``arange(N)``; a shard of the catalogue passes its own rows). ``exclude``: per-user
    catalogue rows to drop (see module doc); rows outside ``candidate_rows`` are ignored, so every
    shard can receive the same exclusions. Users are scored ``chunk_size`` at a time (default:
    blocks of ~2^25 scores) so memory stays bounded for large catalogues.

    Returns ``scores [U, k]`` (dtype of the embeddings) and ``rows [U, k]`` int64, ordered by score
    descending and, for equal scores, by row ascending, so the result does not depend on how the
    catalogue was split. Slots with no candidate left hold score ``-inf`` and row ``-1``.
    """
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"expected user_emb [U, D] and item_emb [N, D] with the same D, got "
            f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_users, num_items = user_emb.shape[0], item_emb.shape[0]
    if candidate_rows is None:
        candidate_rows = torch.arange(num_items, dtype=torch.long)
    candidate_rows = candidate_rows.to(torch.long).cpu()
    if candidate_rows.shape != (num_items,):
        raise ValueError(f"candidate_rows must have shape [{num_items}], got {tuple(candidate_rows.shape)}")
    # Tie-breaking by row relies on columns being in ascending row order.
    if num_items > 1 and not bool((candidate_rows[1:] > candidate_rows[:-1]).all()):
        order = torch.argsort(candidate_rows)
        candidate_rows, item_emb = candidate_rows[order], item_emb[order]
        if num_items > 1 and not bool((candidate_rows[1:] > candidate_rows[:-1]).all()):
            raise ValueError("candidate_rows must be unique")

    ex_ptr: Optional[np.ndarray] = None
    if exclude is not None:
        ex_ptr, ex_rows = to_csr(exclude, num_users)
        # Column of each excluded row in this shard, -1 where the row is not a candidate here.
        max_row = int(max(ex_rows.max(initial=-1), int(candidate_rows.max()) if num_items else -1))
        col_of = np.full(max_row + 2, -1, dtype=np.int64)
        col_of[candidate_rows.numpy()] = np.arange(num_items)
        safe = np.where((ex_rows >= 0) & (ex_rows <= max_row), ex_rows, max_row + 1)
        ex_cols = col_of[safe]

    dtype = torch.promote_types(user_emb.dtype, item_emb.dtype)
    out_scores = torch.full((num_users, k), float("-inf"), dtype=dtype)
    out_rows = torch.full((num_users, k), -1, dtype=torch.long)
    kk = min(k, num_items)
    if kk == 0 or num_users == 0:
        return out_scores, out_rows
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_MAX_BLOCK_ELEMENTS // max(num_items, 1))
    item_t = item_emb.to(dtype).t()
    for start in range(0, num_users, chunk_size):
        stop = min(num_users, start + chunk_size)
        scores = user_emb[start:stop].to(dtype) @ item_t  # [c, N]
        if ex_ptr is not None:
            lo, hi = ex_ptr[start], ex_ptr[stop]
            cols = ex_cols[lo:hi]
            users = _user_of(ex_ptr[start : stop + 1])
            keep = cols >= 0
            scores[torch.from_numpy(users[keep]), torch.from_numpy(cols[keep])] = float("-inf")
        s, c = _topk_ties_by_column(scores, kk)
        out_scores[start:stop, :kk] = s
        out_rows[start:stop, :kk] = torch.where(torch.isneginf(s), -1, candidate_rows[c])
    return out_scores, out_rows


def _topk_ties_by_column(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``scores [c, N]``, ties resolved towards the lower column.

    ``torch.topk`` picks arbitrarily among ties at the k-th value; here every column strictly
    above the k-th value is kept and the remaining slots go to the leftmost tied columns.
    """
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    need = k - above.sum(dim=1, keepdim=True)
    tied = scores == kth
    chosen = above | (tied & (tied.cumsum(dim=1) <= need))
    cols = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending columns
    picked = scores.gather(1, cols)
    order = picked.argsort(dim=1, descending=True, stable=True)
    return picked.gather(1, order), cols.gather(1, order)


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], k: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Merge per-shard top-K lists ``[(scores [U, k_i], rows [U, k_i]), ...]`` into one ``[U, k]``.

    Same order as ``topk_excluding`` (score descending, row ascending), so sharding then merging
    gives exactly the single-shard result. ``k`` defaults to the first part's width.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one (scores, rows) part")
    k = parts[0][0].shape[1] if k is None else k
    scores = torch.cat([p[0] for p in parts], dim=1)
    rows = torch.cat([p[1] for p in parts], dim=1)
    by_row = rows.argsort(dim=1, stable=True)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    scores, rows = scores.gather(1, by_score), rows.gather(1, by_score)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        rows = torch.cat([rows, rows.new_full((rows.shape[0], pad), -1)], dim=1)
    return scores, torch.where(torch.isneginf(scores), -1, rows)


# ---------------------------------------------------------------------------------------------
# Recall and NDCG
# ---------------------------------------------------------------------------------------------


def hit_matrix(top_rows: Any, truth: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``hits bool [U, k]`` (slot i of user u is in u's ground truth) and ``sizes int64 [U]``
    (|G| per user after de-duplication). Vectorised through (user, row) keys."""
    top = _as_numpy(top_rows).astype(np.int64, copy=False)
    if top.ndim != 2:
        raise ValueError(f"top_rows must be [users, K], got shape {top.shape}")
    if k > top.shape[1]:
        raise ValueError(f"asked for @{k} but the top-K lists only hold {top.shape[1]} entries")
    top = top[:, :k]
    num_users = top.shape[0]
    indptr, rows = to_csr(truth, num_users)
    span = int(max(rows.max(initial=0), top.max(initial=0))) + 2
    keys = np.unique(_user_of(indptr) * span + rows)
    sizes = np.bincount(keys // span, minlength=num_users).astype(np.int64)
    query = np.arange(num_users, dtype=np.int64)[:, None] * span + top
    hits = np.isin(query, keys) & (top >= 0)
    return hits, sizes


def _ideal_dcg(sizes: np.ndarray, k: int) -> np.ndarray:
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    cum = np.concatenate([[0.0], np.cumsum(discounts)])
    return cum[np.minimum(sizes, k)]


def retrieval_metrics(top_rows: Any, truth: Any, ks: Sequence[int]) -> dict[str, float]:
    """``{"recall@K": ..., "ndcg@K": ...}`` for every K in ``ks`` (definitions in the module doc)."""
    kmax = max(ks)
    hits, sizes = hit_matrix(top_rows, truth, kmax)
    users = sizes > 0
    out: dict[str, float] = {}
    discounts = 1.0 / np.log2(np.arange(kmax) + 2.0)
    for k in ks:
        h = hits[users, :k]
        n = sizes[users]
        if n.size == 0:
            out[f"recall@{k}"] = math.nan
            out[f"ndcg@{k}"] = math.nan
            continue
        out[f"recall@{k}"] = float(np.mean(h.sum(axis=1) / n))
        out[f"ndcg@{k}"] = float(np.mean((h * discounts[:k]).sum(axis=1) / _ideal_dcg(n, k)))
    return out


def recall_at_k(top_rows: Any, truth: Any, k: int) -> float:
    return retrieval_metrics(top_rows, truth, [k])[f"recall@{k}"]


def ndcg_at_k(top_rows: Any, truth: Any, k: int) -> float:
    return retrieval_metrics(top_rows, truth, [k])[f"ndcg@{k}"]


# ---------------------------------------------------------------------------------------------
# Popularity buckets
# ---------------------------------------------------------------------------------------------


def popularity_order(counts: Any, real_rows: Any) -> np.ndarray:
    """``real_rows`` sorted by train count descending, ties by row ascending."""
    counts = _as_numpy(counts).astype(np.int64, copy=False)
    rows = np.sort(_as_numpy(real_rows).astype(np.int64, copy=False))
    return rows[np.argsort(-counts[rows], kind="stable")]


def item_buckets(counts: Any, head_fraction: float, real_rows: Any) -> np.ndarray:
    """Bucket code per catalogue row (``int8 [len(counts)]``): HEAD, TAIL, COLD, or -1 for rows
    that are not real items (the reserved rows 0 and 1). ``counts[row]`` = train events of the row."""
    if not 0.0 < head_fraction < 1.0:
        raise ValueError(f"head_fraction must be in (0, 1), got {head_fraction}")
    counts = _as_numpy(counts).astype(np.int64, copy=False)
    order = popularity_order(counts, real_rows)
    codes = np.full(counts.shape[0], -1, dtype=np.int8)
    n_head = math.ceil(head_fraction * order.shape[0])
    clicked = counts[order] > 0
    codes[order] = np.where(clicked, TAIL, COLD)
    head = order[:n_head][clicked[:n_head]]
    codes[head] = HEAD
    return codes


def restrict_truth(truth: Any, num_users: int, keep_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ground truth restricted to rows with ``keep_row[row]`` true, as numpy CSR."""
    indptr, rows = to_csr(truth, num_users)
    mask = keep_row[rows]
    users = _user_of(indptr)[mask]
    new_ptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=num_users))]).astype(np.int64)
    return new_ptr, rows[mask]


class _CSR:
    def __init__(self, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.indptr, self.indices = indptr, indices


def bucket_recall(
    top_rows: Any, truth: Any, buckets: np.ndarray, ks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """``{"head": {"recall@K": ...}, "tail": ..., "cold": ...}``: per bucket, recall over users with
    at least one ground-truth item in the bucket, hits counted among that bucket's items only."""
    num_users = _as_numpy(top_rows).shape[0]
    out: dict[str, dict[str, float]] = {}
    for code, name in enumerate(BUCKET_NAMES):
        sub = _CSR(*restrict_truth(truth, num_users, buckets == code))
        m = retrieval_metrics(top_rows, sub, ks)
        out[name] = {f"recall@{k}": m[f"recall@{k}"] for k in ks}
    return out


def bucket_counts(truth: Any, num_users: int, buckets: np.ndarray) -> dict[str, dict[str, int]]:
    """Ground-truth (user, item) pairs and users with >= 1 such pair, per bucket."""
    indptr, rows = to_csr(truth, num_users)
    span = int(rows.max(initial=0)) + 1
    keys = np.unique(_user_of(indptr) * span + rows)
    users, rows = keys // span, keys % span
    out: dict[str, dict[str, int]] = {}
    for code, name in enumerate(BUCKET_NAMES):
        m = buckets[rows] == code
        out[name] = {"pairs": int(m.sum()), "users": int(np.unique(users[m]).shape[0])}
    return out


def popularity_deciles(
    top_rows: Any, truth: Any, counts: Any, real_rows: Any, k: int, num_groups: int = 10
) -> list[dict[str, Any]]:
    """Recall@k by item popularity group: real items ranked by train count (descending, ties by
    row) and cut into ``num_groups`` near-equal groups (group 0 = most popular). Per group: items,
    count range, users with ground truth in the group and their recall restricted to the group."""
    counts = _as_numpy(counts).astype(np.int64, copy=False)
    order = popularity_order(counts, real_rows)
    group_of = np.full(counts.shape[0], -1, dtype=np.int64)
    num_users = _as_numpy(top_rows).shape[0]
    out: list[dict[str, Any]] = []
    for g, members in enumerate(np.array_split(order, num_groups)):
        group_of[members] = g
    for g, members in enumerate(np.array_split(order, num_groups)):
        ptr, rows = restrict_truth(truth, num_users, group_of == g)
        users = int((np.diff(ptr) > 0).sum())
        out.append(
            {
                "group": g,
                "items": int(members.shape[0]),
                "min_count": int(counts[members].min()) if members.size else 0,
                "max_count": int(counts[members].max()) if members.size else 0,
                "users": users,
                f"recall@{k}": recall_at_k(top_rows, _CSR(ptr, rows), k),
            }
        )
    return out
