"""Losses of the two-tower model: the main batch softmax, the SSL InfoNCE and the spread-out baseline.

All take L2-normalised embeddings (``Tower`` outputs), so a dot product is a cosine similarity.
Logits are computed in at least float32 even under bf16 autocast: the temperatures (0.05, 0.1) scale
similarities up to 20x and softmax over bf16 logits loses the positive's margin.

Reduction (chosen so that data-parallel training is exact): every loss is the MEAN over the local
rows (queries / anchors) of the per-row loss, weights are multiplied in but not renormalised
(``mean_i w_i * l_i``). With ``W`` workers holding ``B`` rows each, DDP's gradient averaging of the
per-worker means gives exactly the gradient of the mean over all ``W * B`` rows, provided the
global-negative ``gather`` sums the gradients of the gathered copies back into each worker's slice
(``torch.distributed.nn.functional.all_gather`` semantics; see ``common/task.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _logits(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """``a [B, D] @ b [N, D].T / tau``, outside autocast so a bf16 region does not recast it."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return (_at_least_f32(a) @ _at_least_f32(b).T) / tau


def _rows_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_row.mean()
    if weights.shape != per_row.shape:
        raise ValueError(
            f"weights must have one entry per query, shape {tuple(per_row.shape)}, got {tuple(weights.shape)}"
        )
    return (per_row * weights.to(per_row.dtype)).mean()


def _check_pair(rows: Tensor, candidates: Tensor, labels: Tensor, fn: str, rows_name: str) -> None:
    """``rows [B, D]`` and ``candidates [N, D]`` share D; ``labels [B]`` index the candidates."""
    if rows.dim() != 2 or candidates.dim() != 2 or rows.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"{fn}: {rows_name} [B, D] and candidates [N, D] must share D, got "
            f"{tuple(rows.shape)} and {tuple(candidates.shape)}"
        )
    _check_labels(labels, rows.shape[0], candidates.shape[0], fn)


def _check_labels(labels: Tensor, n_queries: int, n_candidates: int, who: str) -> None:
    if labels.shape != (n_queries,):
        raise ValueError(f"{who}: labels must be [{n_queries}] (one per query), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_candidates):
        raise ValueError(
            f"{who}: labels index the candidates and must lie in [0, {n_candidates}), "
            f"got [{int(labels.min())}, {int(labels.max())}]"
        )


def batch_softmax_loss(
    query: Tensor,
    candidates: Tensor,
    labels: Tensor,
    tau: float,
    log_q: Tensor | None = None,
    query_item_ids: Tensor | None = None,
    candidate_item_ids: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Sampled softmax of each query against all candidates (in-batch negatives), scalar.

    ``query [B, D]``, ``candidates [N, D]``, ``labels [B]`` (position of each query's positive among
    the candidates), ``log_q [N]`` (log sampling probability of each candidate), ``query_item_ids
    [B]`` (item id of each query's positive), ``candidate_item_ids [N]``, ``weights [B]``.

    ``logit_ij = q_i . c_j / tau - log_q_j`` for every candidate, the positive included (logQ
    correction, Yi et al. 2019: in-batch candidates are sampled in proportion to popularity, so
    popular items are over-represented as negatives). When both id tensors are given, candidates
    that are the query's positive item but not at the positive's position (duplicates of the same
    item elsewhere in the batch) are removed from the softmax: they are not negatives.
    Per-row loss ``l_i = -log softmax_i[labels_i]``; result ``mean_i(w_i * l_i)``.
    """
    _check_pair(query, candidates, labels, "batch_softmax_loss", "query")
    logits = _logits(query, candidates, tau)
    if log_q is not None:
        if log_q.shape != (candidates.shape[0],):
            raise ValueError(
                f"batch_softmax_loss: log_q must be [N={candidates.shape[0]}], got {tuple(log_q.shape)}"
            )
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)
    if (query_item_ids is None) != (candidate_item_ids is None):
        raise ValueError(
            "batch_softmax_loss: removing accidental hits needs both query_item_ids and "
            "candidate_item_ids (or neither)"
        )
    if query_item_ids is not None and candidate_item_ids is not None:
        same_item = query_item_ids.unsqueeze(1) == candidate_item_ids.unsqueeze(0)
        not_positive = torch.ones_like(same_item)
        not_positive[torch.arange(labels.numel(), device=labels.device), labels] = False
        logits = logits.masked_fill(same_item & not_positive, float("-inf"))
    per_row = F.cross_entropy(logits, labels, reduction="none")
    return _rows_mean(per_row, weights)


def info_nce_loss(anchors: Tensor, candidates: Tensor, labels: Tensor, tau: float) -> Tensor:
    """InfoNCE of the SSL task, scalar: ``mean_i -log softmax_j(a_i . c_j / tau)[labels_i]``.

    ``anchors [B, D]`` (view 1), ``candidates [N, D]`` (view 2), ``labels [B]``: the second view of
    anchor ``i``; every other candidate is a negative (Yao et al. 2021, eq. 3).
    """
    _check_pair(anchors, candidates, labels, "info_nce_loss", "anchors")
    logits = _logits(anchors, candidates, tau)
    return F.cross_entropy(logits, labels)


def spread_out_loss(embeddings: Tensor) -> Tensor:
    """Spread-out regulariser of the ``so`` baseline, scalar: ``mean_{i != j} (e_i . e_j)^2``.

    ``embeddings [B, D]``, unit-norm. This is the second-moment term of the global orthogonal
    regulariser of Zhang et al. 2017 ("Learning Spread-out Local Feature Descriptors"), which pushes
    the embeddings of different items towards orthogonality; the paper's first-moment term and its
    ``max(0, M2 - 1/d)`` hinge are left out (the hinge only stops the push at the value reached by
    uniformly spread points). Returns 0 for fewer than 2 rows.
    """
    b = embeddings.shape[0]
    if b < 2:
        return embeddings.sum() * 0.0
    gram = _logits(embeddings, embeddings, 1.0)
    off_diag = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    return off_diag / (b * (b - 1))
