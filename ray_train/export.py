"""Serving artefacts of a trained run: item embeddings, a standalone user tower, an ANN index.

    python -m ray_train.export --run runs/synthetic/<run name>

Writes under ``<run>/export/``:

* ``item_embeddings/part-00000.parquet``: ``item_id`` string, ``item_index`` int32, ``embedding``
  list<float32> (unit norm), one row per catalogue item, never-clicked items included.
* ``user_tower.pt2`` + ``user_tower.json``: the user tower as a ``torch.export`` program, loadable
  with nothing but torch (``torch.export.load(path).module()``), no project code and no config.
  It takes flat tensors in the order listed in ``user_tower.json``: per single-valued feature one
  int64 ``[batch]`` index tensor, per multi-valued feature (and ``history``) ``values`` int64
  ``[nnz]`` then ``offsets`` int64 ``[batch]`` (row starts), and returns ``[batch, D]`` unit-norm
  embeddings. Indices are the prepared vocabularies' (``<prepared>/vocab/<feature>``; 1 = OOV).
  (``torch.jit`` is deprecated in this torch release, hence ``torch.export``.)
* ``items.faiss``: an HNSW index (inner product, ids = item_index) over the item embeddings, when
  ``eval.ann_index`` is true; its recall against exact search on the eval queries goes to
  ``ann.json`` and into ``metrics.json`` as ``ann``::

      "ann": {"index": "HNSWFlat(M=32, efConstruction=200, efSearch=256, inner_product)",
              "items": 150, "queries": 180,
              "recall_vs_exact@10": 0.998, "recall_vs_exact@50": ..., ...}

  ``recall_vs_exact@K`` = mean over eval queries of |ANN top-K ∩ exact top-K| / min(K, items),
  both without exclusions (it measures the index, not the model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from common.features import FeatureSpec, side
from common.metrics import topk_excluding
from common.ragged import FeatureBatch, Ragged
from common.towers import Tower
from ray_train.evaluate import (
    ANN_FILE,
    METRICS_FILE,
    embed_items,
    embed_users,
    load_inputs,
    write_metrics,
)

EXPORT_DIR = "export"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256


# ---------------------------------------------------------------------------------------------
# Item embeddings
# ---------------------------------------------------------------------------------------------


def item_embedding_table(items: pa.Table, rows: Tensor, emb: Tensor) -> pa.Table:
    """``rows [N]`` with their ``emb [N, D]`` as the export table (item_id from ``items``)."""
    idx = items.column("item_index").to_numpy().astype(np.int64)
    ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    pos = np.full(int(idx.max()) + 1, -1, dtype=np.int64)
    pos[idx] = np.arange(idx.shape[0])
    r = rows.numpy()
    flat = pa.array(emb.numpy().astype(np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (r.shape[0] + 1) * emb.shape[1], emb.shape[1], dtype=np.int32))
    return pa.table(
        {
            "item_id": pa.array(ids[pos[r]].tolist(), type=pa.string()),
            "item_index": pa.array(r.astype(np.int32), type=pa.int32()),
            "embedding": pa.ListArray.from_arrays(offsets, flat, type=pa.list_(pa.float32())),
        }
    )


def _write_folder_atomic(folder: str, write: Any) -> None:
    """``write(tmp_folder)`` then swap it in, so a crash never leaves a half-written folder."""
    parent = os.path.dirname(folder.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(folder)}-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------
# The user tower as a standalone program
# ---------------------------------------------------------------------------------------------


class FlatUserTower(nn.Module):
    """The user tower behind a flat tensor signature (see the module doc) so that it can be
    exported and called without ``Ragged`` or the feature specs."""

    def __init__(self, tower: Tower, specs: list[FeatureSpec]) -> None:
        super().__init__()
        self.tower = tower
        self.layout = [(s.name, s.multi) for s in specs]

    def forward(self, *flat: Tensor) -> Tensor:
        feats: FeatureBatch = {}
        i = 0
        for name, multi in self.layout:
            if multi:
                feats[name] = Ragged(flat[i], flat[i + 1])
                i += 2
            else:
                feats[name] = flat[i]
                i += 1
        return self.tower(feats)


def flatten_user_batch(feats: FeatureBatch, specs: list[FeatureSpec]) -> tuple[Tensor, ...]:
    """A user FeatureBatch in the exported program's argument order."""
    out: list[Tensor] = []
    for s in specs:
        x = feats[s.name]
        out.extend([x.values, x.offsets] if s.multi else [x])
    return tuple(out)


def user_signature(specs: list[FeatureSpec], out_dim: int) -> dict[str, Any]:
    inputs: list[dict[str, Any]] = []
    for s in specs:
        base = {"feature": s.name, "column": s.column, "vocab_size": s.vocab_size, "dtype": "int64"}
        if s.multi:
            inputs.append({**base, "name": f"{s.name}.values", "shape": ["nnz"],
                           "meaning": "indices of every row, concatenated"})
            inputs.append({**base, "name": f"{s.name}.offsets", "shape": ["batch"],
                           "meaning": "row starts into values (EmbeddingBag offsets)"})
        else:
            inputs.append({**base, "name": s.name, "shape": ["batch"], "meaning": "one index per row"})
    return {
        "format": "torch.export",
        "file": "user_tower.pt2",
        "load": "torch.export.load(path).module()",
        "inputs": inputs,
        "output": {"shape": ["batch", out_dim], "dtype": "float32", "unit_norm": True},
        "reserved_indices": {"0": "mask/default", "1": "out of vocabulary or missing"},
    }


def _example_inputs(specs: list[FeatureSpec]) -> tuple[Tensor, ...]:
    # Batch 3 and nnz 3: sizes 0 and 1 would be specialised into the program by torch.export.
    flat: list[Tensor] = []
    for s in specs:
        if s.multi:
            flat.extend([torch.ones(3, dtype=torch.long), torch.tensor([0, 2, 2])])
        else:
            flat.append(torch.ones(3, dtype=torch.long))
    return tuple(flat)


def export_user_tower(tower: Tower, specs: list[FeatureSpec], folder: str) -> str:
    """Write ``user_tower.pt2`` and ``user_tower.json`` to ``folder``; returns the program's path."""
    from torch.export import Dim

    user_specs = side(specs, "user")
    wrapper = FlatUserTower(tower, user_specs).eval()
    batch = Dim("batch")
    dyn: list[dict[int, Any]] = []
    for s in user_specs:
        dyn.extend([{0: Dim.DYNAMIC}, {0: batch}] if s.multi else [{0: batch}])
    with torch.no_grad():
        program = torch.export.export(wrapper, _example_inputs(user_specs), dynamic_shapes={"flat": tuple(dyn)})
    path = os.path.join(folder, "user_tower.pt2")
    torch.export.save(program, path)
    with open(os.path.join(folder, "user_tower.json"), "w") as fh:
        json.dump(user_signature(user_specs, tower.out_dim), fh, indent=2)
    return path


# ---------------------------------------------------------------------------------------------
# ANN index
# ---------------------------------------------------------------------------------------------


def build_hnsw(item_emb: np.ndarray, ids: np.ndarray):
    """HNSW over ``item_emb [N, D]`` (inner product) with ``ids [N]`` (item_index) as labels."""
    import faiss

    base = faiss.IndexHNSWFlat(item_emb.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    base.hnsw.efSearch = HNSW_EF_SEARCH
    index = faiss.IndexIDMap(base)
    index.add_with_ids(np.ascontiguousarray(item_emb, dtype=np.float32), ids.astype(np.int64))
    return index


def ann_recall(ann_ids: np.ndarray, exact_ids: np.ndarray, k: int, num_items: int) -> float:
    """Mean over queries of |ann[:k] ∩ exact[:k]| / min(k, num_items); ``-1`` ids never count."""
    denom = min(k, num_items)
    total = 0.0
    for a, e in zip(ann_ids[:, :k], exact_ids[:, :k]):
        total += len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / denom
    return total / max(1, ann_ids.shape[0])


def ann_report(index: Any, user_emb: Tensor, item_emb: Tensor, rows: Tensor, ks: Sequence[int]) -> dict[str, Any]:
    kmax = max(ks)
    q = np.ascontiguousarray(user_emb.numpy(), dtype=np.float32)
    _, ann_ids = index.search(q, kmax)
    _, exact = topk_excluding(user_emb.double(), item_emb.double(), kmax, candidate_rows=rows)
    report: dict[str, Any] = {
        "index": f"HNSWFlat(M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}, efSearch={HNSW_EF_SEARCH}, inner_product)",
        "items": int(rows.numel()),
        "queries": int(q.shape[0]),
    }
    for k in sorted(ks):
        report[f"recall_vs_exact@{k}"] = ann_recall(ann_ids, exact.numpy(), k, int(rows.numel()))
    return report


# ---------------------------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------------------------


def export_run(run_dir: str) -> dict[str, Any]:
    """Write ``<run_dir>/export/`` (see the module doc); returns a summary with the ANN report."""
    run, items, catalogue, queries = load_inputs(run_dir)
    out = os.path.join(run_dir, EXPORT_DIR)
    os.makedirs(out, exist_ok=True)
    rows = catalogue.item_indices
    item_emb = embed_items(run.task, catalogue, rows)
    table = item_embedding_table(items, rows, item_emb)
    _write_folder_atomic(
        os.path.join(out, "item_embeddings"),
        lambda tmp: pq.write_table(table, os.path.join(tmp, "part-00000.parquet")),
    )
    tower_path = export_user_tower(run.task.user_tower, run.specs, out)
    summary: dict[str, Any] = {
        "item_embeddings": os.path.join(out, "item_embeddings"),
        "items": int(rows.numel()),
        "dim": int(item_emb.shape[1]),
        "user_tower": tower_path,
    }
    if run.cfg.eval.ann_index:
        import faiss

        index = build_hnsw(item_emb.numpy(), rows.numpy())
        faiss.write_index(index, os.path.join(out, "items.faiss"))
        user_emb = embed_users(run.task, queries.features, queries.num_users)
        ann = ann_report(index, user_emb, item_emb, rows, run.cfg.eval.ks)
        with open(os.path.join(run_dir, ANN_FILE), "w") as fh:
            json.dump(ann, fh, indent=2)
        metrics_path = os.path.join(run_dir, METRICS_FILE)
        if os.path.isfile(metrics_path):
            with open(metrics_path) as fh:
                metrics = json.load(fh)
            metrics["ann"] = ann
            write_metrics(run_dir, metrics)
        summary["faiss_index"] = os.path.join(out, "items.faiss")
        summary["ann"] = ann
    else:
        _drop_stale_ann(run_dir)
    return summary


def _drop_stale_ann(run_dir: str) -> None:
    """eval.ann_index is off: an index or report left by an earlier export would be misleading."""
    for rel in (os.path.join(EXPORT_DIR, "items.faiss"), ANN_FILE):
        path = os.path.join(run_dir, rel)
        if os.path.isfile(path):
            os.remove(path)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    if os.path.isfile(metrics_path):
        with open(metrics_path) as fh:
            metrics = json.load(fh)
        if metrics.pop("ann", None) is not None:
            write_metrics(run_dir, metrics)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Export item embeddings, the user tower and an ANN index")
    parser.add_argument("--run", required=True, help="run folder: <paths.runs>/<run name>")
    args = parser.parse_args(argv)
    summary = export_run(args.run)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
