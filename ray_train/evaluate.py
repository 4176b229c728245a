"""Full-catalogue evaluation of a trained run: exact top-K over every item, model vs MostPop.

    python -m ray_train.evaluate --run runs/synthetic/<run name> [--shards N]

Protocol (one query per eval user):

* **Query**: the user's state at their first eval event (earliest timestamp, then lowest
  item_index): user features and the ``history`` column of that event, which by construction
  (docs/data_contract.md) holds only events strictly before it, never a later eval item.
* **Ground truth**: the set of items of the user's eval events, minus items the user already has
  in train (those are excluded from retrieval, so they could never be hit; they are counted in
  ``counts.eval_pairs_seen_in_train``). Users left with no ground truth are not scored.
* **Exclusions**: every item the user has in train is removed from the ranking.
* **Retrieval**: exact dot product between the user embedding and every real catalogue item
  (never-clicked items included). Both towers run in float64 here: float32 results move by ~1e-7
  with thread count and batch shape, enough to swap near-tied items between the in-process and
  the sharded path; in float64 they agree. Ties go to the lower item_index.
* **MostPop**: every user gets the catalogue ranked by train count (ties: lower item_index), with
  the same exclusions and the same ground truth.

Large catalogues: with ``num_shards > 1`` (or automatically above ``SHARD_ITEMS`` items) the
catalogue rows are cut into contiguous shards; one Ray task per shard embeds its rows with the item
tower and returns a local top-K per user; ``common.metrics.merge_topk`` merges them into exactly the
single-process result.

``metrics.json`` (written to the run folder; metric definitions in ``common/metrics.py``)::

    {
      "recall@10": 0.21, "ndcg@10": 0.12, ... one pair per K in eval.ks,
      "by_bucket": {"head": {"recall@10": ...}, "tail": {...}, "cold": {...}},
      "by_popularity_decile": [{"group": 0, "items": 168, "min_count": 57, "max_count": 485,
                                "users": 150, "recall@10": ..., "recall@50": ..., ...}, ... 10 groups],
      "mostpop":   {"recall@10": ..., "ndcg@10": ..., ..., "by_bucket": {...}, "by_popularity_decile": [...]},
      "counts":    {"users": 114,                  # scored queries (eval users with >= 1 new item)
                    "items": 150,                  # real catalogue items ranked
                    "ground_truth_pairs": 168,     # (user, new eval item) pairs scored
                    "eval_users": 166, "eval_pairs": 357,  # distinct users / (user, item) pairs in eval/
                    "eval_pairs_seen_in_train": 189,       # dropped from the ground truth
                    "by_bucket": {"head": {"items": 15, "pairs": 46, "users": 43}, "tail": ..., "cold": ...},
                    "shards": 1},
      "ann":       {...}            # only once ray_train.export has run (see ray_train/export.py)
    }

A metric over zero users (e.g. cold recall when no eval item is cold) is ``null``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from common.augment import mutual_info_from_records
from common.catalogue import Catalogue
from common.config import Config, from_dict
from common.features import FeatureSpec, side
from common.manifest import read_manifest
from common.metrics import (
    BUCKET_NAMES,
    bucket_counts,
    bucket_recall,
    item_buckets,
    merge_topk,
    popularity_deciles,
    retrieval_metrics,
    topk_excluding,
)
from common.ragged import FeatureBatch
from common.task import TwoTowerTask
from ray_train.data import arrow_to_long, arrow_to_ragged, read_table, table_uri

METRICS_FILE = "metrics.json"
ANN_FILE = "export/ann.json"
# Above this many catalogue items, evaluate_run shards the catalogue across Ray tasks by default.
SHARD_ITEMS = 1_000_000
# Items per item-tower forward pass. Shards hold whole batches, so every item is embedded in the
# same batch whatever the number of shards.
EMBED_BATCH = 8192


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    run_dir: str
    cfg: Config
    specs: list[FeatureSpec]
    mutual_info: dict[frozenset[str], float]
    task: TwoTowerTask  # eval mode, CPU
    prepared: str
    manifest: dict[str, Any]


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: {os.path.dirname(path) or '.'} is not a complete run folder. "
            f"Train first (python -m ray_train.train ...) or pass --run <paths.runs>/<run name>."
        )
    with open(path) as fh:
        return json.load(fh)


def build_task(specs: list[FeatureSpec], cfg: Config, mutual_info: dict[frozenset[str], float],
               state: dict[str, Tensor]) -> TwoTowerTask:
    task = TwoTowerTask(specs, cfg, mutual_info)
    task.load_state_dict(state)
    task.eval()
    return task


def load_run(run_dir: str) -> LoadedRun:
    """Config, feature specs, mutual information and the trained model of a run folder."""
    cfg = from_dict(_read_json(os.path.join(run_dir, "config.json")))
    specs = [FeatureSpec.from_json(d) for d in _read_json(os.path.join(run_dir, "model", "features.json"))]
    mi_path = os.path.join(run_dir, "model", "mutual_info.json")
    mutual_info = mutual_info_from_records(_read_json(mi_path)) if os.path.isfile(mi_path) else {}
    ckpt_path = os.path.join(run_dir, "model", "model.pt")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path} is missing: the run in {run_dir} has no trained model")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise ValueError(f"{ckpt_path} holds keys {sorted(ckpt)}; expected {{'model': state_dict, 'epoch': n}}")
    task = build_task(specs, cfg, mutual_info, ckpt["model"])
    prepared = cfg.paths.prepared
    return LoadedRun(run_dir, cfg, specs, mutual_info, task, prepared, read_manifest(prepared))


def read_prepared_table(prepared: str, manifest: dict[str, Any], name: str,
                        columns: Optional[list[str]] = None) -> pa.Table:
    """A table of the prepared folder (``ray_train.data.DEFAULT_TABLES`` names), via the manifest."""
    return read_table(table_uri(prepared, manifest, name), columns)


# ---------------------------------------------------------------------------------------------
# Queries, ground truth, exclusions
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalQueries:
    """One query per scored eval user (sorted by user_id).

    ``features``: user-side FeatureBatch ``[U]``; ``truth`` and ``exclude``: numpy CSR
    ``(indptr [U+1], item rows)`` of new eval items and of train items."""

    user_ids: np.ndarray
    features: FeatureBatch
    truth: tuple[np.ndarray, np.ndarray]
    exclude: tuple[np.ndarray, np.ndarray]
    eval_users: int
    eval_pairs: int
    eval_pairs_seen_in_train: int

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])


class CSR:
    """Minimal CSR holder accepted by ``common.metrics`` (``.indptr``, ``.indices``)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.indptr, self.indices = indptr, indices


def _pairs_to_csr(users: np.ndarray, rows: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (user, row) pairs -> CSR with rows ascending within each user."""
    span = int(rows.max(initial=0)) + 1
    keys = np.unique(users.astype(np.int64) * span + rows.astype(np.int64))
    u, r = keys // span, keys % span
    indptr = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=num_users))]).astype(np.int64)
    return indptr, r


def user_batch(table: pa.Table, specs: list[FeatureSpec]) -> FeatureBatch:
    """The user-side FeatureBatch of an event table (one row per query)."""
    out: FeatureBatch = {}
    for spec in side(specs, "user"):
        if spec.column not in table.column_names:
            raise ValueError(
                f"the eval table lacks column {spec.column!r} of user feature {spec.name!r} "
                f"(it has {table.column_names}); the run's features.json and the prepared folder "
                f"come from different preparations"
            )
        col, what = table.column(spec.column), f"eval/{spec.column}"
        out[spec.name] = arrow_to_ragged(col, what) if spec.multi else arrow_to_long(col, what)
    return out


def build_queries(train: pa.Table, eval_: pa.Table, specs: list[FeatureSpec]) -> EvalQueries:
    """Queries, ground truth and exclusions from the ``train/`` and ``eval/`` tables."""
    if eval_.num_rows == 0:
        raise ValueError("the eval table has 0 rows: nothing to evaluate; check prepare.split")
    ev = eval_.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("item_index", "ascending")])
    ev_users = ev.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    user_ids, first = np.unique(ev_users, return_index=True)
    index = pd.Index(user_ids)
    ev_pos = index.get_indexer(ev_users)
    ev_rows = ev.column("item_index").to_numpy().astype(np.int64)

    tr_users = train.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    tr_pos = index.get_indexer(tr_users)
    known = tr_pos >= 0
    tr_pos, tr_rows = tr_pos[known], train.column("item_index").to_numpy().astype(np.int64)[known]

    num = user_ids.shape[0]
    ex_ptr, ex_rows = _pairs_to_csr(tr_pos, tr_rows, num)
    span = int(max(ev_rows.max(initial=0), tr_rows.max(initial=0))) + 1
    ev_keys = np.unique(ev_pos * span + ev_rows)
    seen = np.isin(ev_keys, tr_pos * span + tr_rows)
    new_keys = ev_keys[~seen]
    t_users, t_rows = new_keys // span, new_keys % span

    # Only users with at least one new eval item are scored.
    keep_users = np.unique(t_users)
    if keep_users.size == 0:
        raise ValueError(
            f"none of the {num} eval users has an eval item they did not already click in train "
            f"({ev_keys.shape[0]} eval (user, item) pairs, all seen in train): nothing to retrieve. "
            f"Use a later split boundary (prepare.split) or a log with new items per user."
        )
    remap = np.full(num, -1, dtype=np.int64)
    remap[keep_users] = np.arange(keep_users.shape[0])
    truth = _pairs_to_csr(remap[t_users], t_rows, keep_users.shape[0])
    ex_users = np.repeat(np.arange(num), np.diff(ex_ptr))
    ex_keep = remap[ex_users] >= 0
    exclude = _pairs_to_csr(remap[ex_users[ex_keep]], ex_rows[ex_keep], keep_users.shape[0])

    query_rows = ev.take(pa.array(first[keep_users]))
    return EvalQueries(
        user_ids=user_ids[keep_users],
        features=user_batch(query_rows, specs),
        truth=truth,
        exclude=exclude,
        eval_users=int(num),
        eval_pairs=int(ev_keys.shape[0]),
        eval_pairs_seen_in_train=int(seen.sum()),
    )


def item_counts(popularity: pa.Table, num_rows: int) -> np.ndarray:
    """Train events per catalogue row, int64 ``[num_rows]`` (0 for rows the table lacks)."""
    counts = np.zeros(num_rows, dtype=np.int64)
    idx = popularity.column("item_index").to_numpy().astype(np.int64)
    ok = (idx >= 0) & (idx < num_rows)
    counts[idx[ok]] = popularity.column("count").to_numpy().astype(np.int64)[ok]
    return counts


# ---------------------------------------------------------------------------------------------
# Embedding and top-K
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_items(task: TwoTowerTask, catalogue: Catalogue, rows: Tensor, batch_size: int = EMBED_BATCH) -> Tensor:
    """Item-tower embeddings of catalogue ``rows`` ``[n]`` -> ``[n, D]`` (the model's dtype), in batches."""
    task.eval()
    parts = [task.item_embeddings(catalogue.lookup(rows[i : i + batch_size])) for i in range(0, rows.numel(), batch_size)]
    if not parts:
        return torch.zeros(0, task.item_tower.out_dim, dtype=next(task.parameters()).dtype)
    return torch.cat(parts)


@torch.no_grad()
def embed_users(task: TwoTowerTask, feats: FeatureBatch, num_users: int, batch_size: int = EMBED_BATCH) -> Tensor:
    """User-tower embeddings of a query batch ``[U]`` -> ``[U, D]`` (the model's dtype), in batches."""
    from common.ragged import select_rows

    task.eval()
    parts = []
    for i in range(0, num_users, batch_size):
        rows = torch.arange(i, min(num_users, i + batch_size))
        parts.append(task.user_embeddings(select_rows(feats, rows)))
    return torch.cat(parts)


def shard_bounds(num_items: int, num_shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of the item list made of whole embedding batches."""
    batches = max(1, math.ceil(num_items / batch_size))
    num_shards = max(1, min(num_shards, batches))
    per = math.ceil(batches / num_shards)
    return [(b * batch_size, min(num_items, (b + per) * batch_size)) for b in range(0, batches, per)]


def _shard_topk(state: dict[str, Tensor], cfg: Config, specs: list[FeatureSpec],
                mutual_info: dict[frozenset[str], float], items: pa.Table, user_emb: Tensor,
                exclude: tuple[np.ndarray, np.ndarray], k: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """One shard (a Ray task): rebuild the model, embed this shard's items, local top-k per user."""
    task = build_task(specs, cfg, mutual_info, state).double()
    catalogue = Catalogue.from_arrow(items, specs)
    return local_topk(task, catalogue, user_emb, exclude, k, batch_size)


def distributed_topk(run: LoadedRun, items: pa.Table, user_emb: Tensor, exclude: tuple[np.ndarray, np.ndarray],
                     k: int, num_shards: int, batch_size: int = EMBED_BATCH) -> tuple[Tensor, Tensor]:
    """Top-k over the catalogue sharded across Ray tasks, merged on the driver.

    Uses the Ray cluster this process is connected to, or starts (and stops) a local one. The
    model weights, user embeddings and exclusions go through the object store once; each task
    gets only its slice of the ``items/`` table, so no shared filesystem is needed."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        items = items.sort_by("item_index")
        remote = ray.remote(num_cpus=1)(_shard_topk)
        state, cfg, specs, mi, users, excl = (
            ray.put(x) for x in (run.task.state_dict(), run.cfg, run.specs, run.mutual_info, user_emb, exclude)
        )
        futures = [
            remote.remote(state, cfg, specs, mi, items.slice(a, b - a), users, excl, k, batch_size)
            for a, b in shard_bounds(items.num_rows, num_shards, batch_size)
        ]
        return merge_topk(ray.get(futures), k)
    finally:
        if started_here:
            ray.shutdown()


def local_topk(task: TwoTowerTask, catalogue: Catalogue, user_emb: Tensor, exclude: tuple[np.ndarray, np.ndarray],
               k: int, batch_size: int = EMBED_BATCH) -> tuple[Tensor, Tensor]:
    """Top-k over every real item of ``catalogue`` in this process."""
    rows = catalogue.item_indices
    emb = embed_items(task, catalogue, rows, batch_size)
    return topk_excluding(user_emb.double(), emb.double(), k, exclude=CSR(*exclude), candidate_rows=rows)


def mostpop_topk(counts: np.ndarray, rows: Tensor, num_users: int, exclude: tuple[np.ndarray, np.ndarray],
                 k: int) -> tuple[Tensor, Tensor]:
    """Every user gets the catalogue by train count (ties: lower row), minus their exclusions."""
    item = torch.from_numpy(counts[rows.numpy()].astype(np.float64)).unsqueeze(1)
    return topk_excluding(torch.ones(num_users, 1, dtype=torch.float64), item, k,
                          exclude=CSR(*exclude), candidate_rows=rows)


# ---------------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """NaN (a metric over zero users) -> None, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def score_lists(top_rows: Tensor, truth: tuple[np.ndarray, np.ndarray], buckets: np.ndarray,
                ks: Sequence[int], counts: np.ndarray, real_rows: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = dict(retrieval_metrics(top_rows, CSR(*truth), ks))
    out["by_bucket"] = bucket_recall(top_rows, CSR(*truth), buckets, ks)
    out["by_popularity_decile"] = decile_recall(top_rows, truth, counts, real_rows, ks)
    return out


def decile_recall(top_rows: Tensor, truth: tuple[np.ndarray, np.ndarray], counts: np.ndarray,
                  real_rows: np.ndarray, ks: Sequence[int]) -> list[dict[str, Any]]:
    """Recall@K per popularity decile of the catalogue (group 0 = the most-clicked 10% of items),
    every K in one record per decile; see ``common.metrics.popularity_deciles``."""
    merged: list[dict[str, Any]] = []
    for k in ks:
        for i, rec in enumerate(popularity_deciles(top_rows, CSR(*truth), counts, real_rows, k)):
            if len(merged) <= i:
                merged.append(rec)
            else:
                merged[i][f"recall@{k}"] = rec[f"recall@{k}"]
    return merged


@dataclass
class EvalState:
    """Everything evaluation computed, for export and reports."""

    run: LoadedRun
    catalogue: Catalogue
    items: pa.Table
    queries: EvalQueries
    counts: np.ndarray
    buckets: np.ndarray
    user_emb: Tensor
    model_top: tuple[Tensor, Tensor]
    mostpop_top: tuple[Tensor, Tensor]
    num_shards: int


def load_inputs(run_dir: str) -> tuple[LoadedRun, pa.Table, Catalogue, EvalQueries]:
    """The run, the ``items/`` table, its Catalogue and the eval queries."""
    run = load_run(run_dir)
    items = read_prepared_table(run.prepared, run.manifest, "items")
    catalogue = Catalogue.from_arrow(items, run.specs)
    user_cols = ["user_id", "item_index", "timestamp"] + [s.column for s in side(run.specs, "user")]
    train = read_prepared_table(run.prepared, run.manifest, "train", ["user_id", "item_index"])
    eval_ = read_prepared_table(run.prepared, run.manifest, "eval", list(dict.fromkeys(user_cols)))
    return run, items, catalogue, build_queries(train, eval_, run.specs)


def compute(run_dir: str, num_shards: Optional[int] = None, batch_size: int = EMBED_BATCH) -> tuple[dict[str, Any], EvalState]:
    """Evaluate without writing: ``(metrics, state)``."""
    run, items, catalogue, queries = load_inputs(run_dir)
    cfg = run.cfg
    ks = sorted(set(cfg.eval.ks))
    kmax = ks[-1]
    popularity = read_prepared_table(run.prepared, run.manifest, "item_popularity", ["item_index", "count"])
    counts = item_counts(popularity, catalogue.num_rows)
    buckets = item_buckets(counts, cfg.eval.head_fraction, catalogue.item_indices.numpy())

    # float64 scoring model: float32 results depend on thread count and batch shapes (~1e-7),
    # enough to swap near-tied items between the in-process and the sharded path.
    scorer = copy.deepcopy(run.task).double()
    user_emb = embed_users(scorer, queries.features, queries.num_users, batch_size)
    if num_shards is None:
        num_shards = math.ceil(catalogue.num_items / SHARD_ITEMS)
    if num_shards > 1:
        # A catalogue smaller than num_shards batches gets smaller batches rather than fewer shards.
        batch_size = min(batch_size, math.ceil(catalogue.num_items / num_shards))
        model_top = distributed_topk(run, items, user_emb, queries.exclude, kmax, num_shards, batch_size)
        num_shards = len(shard_bounds(catalogue.num_items, num_shards, batch_size))
    else:
        model_top = local_topk(scorer, catalogue, user_emb, queries.exclude, kmax, batch_size)
    mostpop_top = mostpop_topk(counts, catalogue.item_indices, queries.num_users, queries.exclude, kmax)

    real_rows = catalogue.item_indices.numpy()
    metrics: dict[str, Any] = score_lists(model_top[1], queries.truth, buckets, ks, counts, real_rows)
    metrics["mostpop"] = score_lists(mostpop_top[1], queries.truth, buckets, ks, counts, real_rows)
    per_bucket = bucket_counts(CSR(*queries.truth), queries.num_users, buckets)
    metrics["counts"] = {
        "users": queries.num_users,
        "items": catalogue.num_items,
        "ground_truth_pairs": int(queries.truth[1].shape[0]),
        "eval_users": queries.eval_users,
        "eval_pairs": queries.eval_pairs,
        "eval_pairs_seen_in_train": queries.eval_pairs_seen_in_train,
        "by_bucket": {name: {"items": int((buckets == code).sum()), **per_bucket[name]}
                      for code, name in enumerate(BUCKET_NAMES)},
        "shards": num_shards,
    }
    ann_path = os.path.join(run_dir, ANN_FILE)
    if os.path.isfile(ann_path):
        with open(ann_path) as fh:
            metrics["ann"] = json.load(fh)
    state = EvalState(run, catalogue, items, queries, counts, buckets, user_emb, model_top, mostpop_top, num_shards)
    return _clean(metrics), state


def write_metrics(run_dir: str, metrics: dict[str, Any]) -> str:
    path = os.path.join(run_dir, METRICS_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(metrics, fh, indent=2, sort_keys=False, allow_nan=False)
    os.replace(tmp, path)
    return path


def evaluate_run(run_dir: str, num_shards: Optional[int] = None, batch_size: int = EMBED_BATCH) -> dict[str, Any]:
    """Evaluate the trained model of ``run_dir`` and write ``<run_dir>/metrics.json``; returns it.

    ``num_shards``: ``None`` = one shard per ``SHARD_ITEMS`` catalogue items (1 = in-process);
    ``> 1`` = that many Ray tasks (capped at the number of ``batch_size`` item batches)."""
    metrics, _ = compute(run_dir, num_shards, batch_size)
    write_metrics(run_dir, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    return "   -   " if x is None else f"{x:.4f}"


def format_table(metrics: dict[str, Any]) -> str:
    """Model vs MostPop side by side, one metric per line."""
    keys = [k for k in metrics if "@" in k]
    lines = [f"{'metric':<20}{'model':>10}{'mostpop':>10}"]
    for key in keys:
        lines.append(f"{key:<20}{_fmt(metrics[key]):>10}{_fmt(metrics['mostpop'][key]):>10}")
    for bucket, vals in metrics["by_bucket"].items():
        for key, val in vals.items():
            lines.append(f"{bucket + ' ' + key:<20}{_fmt(val):>10}{_fmt(metrics['mostpop']['by_bucket'][bucket][key]):>10}")
    c = metrics["counts"]
    lines.append(
        f"users {c['users']:,}  items {c['items']:,}  ground-truth pairs {c['ground_truth_pairs']:,}  "
        + "  ".join(f"{b} {v['items']:,} items/{v['pairs']:,} pairs" for b, v in c["by_bucket"].items())
    )
    if "ann" in metrics:
        ann = metrics["ann"]
        lines.append("ann " + ann.get("index", "?") + "  " +
                     "  ".join(f"{k} {v:.4f}" for k, v in ann.items() if k.startswith("recall_vs_exact")))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Full-catalogue evaluation of a trained run (model vs MostPop)")
    parser.add_argument("--run", required=True, help="run folder: <paths.runs>/<run name>")
    parser.add_argument("--shards", type=int, default=None,
                        help=f"catalogue shards over Ray tasks (default: 1 per {SHARD_ITEMS:,} items)")
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    metrics = evaluate_run(args.run, args.shards)
    print(format_table(metrics))
    print(f"wrote {os.path.join(args.run, METRICS_FILE)}")
    return metrics


if __name__ == "__main__":
    main()
