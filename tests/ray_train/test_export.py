"""Export of a real run folder: item embeddings, the standalone user tower, the FAISS index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.features import side
from common.ragged import Ragged
from ray_train.evaluate import evaluate_run, load_inputs
from ray_train.export import HNSW_EF_SEARCH, export_run, flatten_user_batch
from tests.ray_train.test_evaluate import make_run_dir


@pytest.fixture(scope="module")
def exported(prepared_synthetic, tmp_path_factory):
    cfg, _ = prepared_synthetic
    run_dir = str(tmp_path_factory.mktemp("export_run") / "r")
    task = make_run_dir(cfg, run_dir, steps=5, seed=1)
    evaluate_run(run_dir)
    summary = export_run(run_dir)
    return cfg, run_dir, task, summary


def test_item_embeddings_equal_the_item_tower(exported):
    cfg, run_dir, task, summary = exported
    table = pq.read_table(os.path.join(run_dir, "export", "item_embeddings"))
    assert table.schema.field("item_id").type == pa.string()
    assert table.schema.field("item_index").type == pa.int32()
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    items = pq.read_table(os.path.join(cfg.paths.prepared, "items")).to_pandas()
    assert table.num_rows == len(items) == summary["items"]
    got = table.to_pandas().sort_values("item_index")
    want_ids = dict(zip(items["item_index"], items["item_id"]))
    assert [want_ids[i] for i in got["item_index"]] == got["item_id"].tolist()
    _, _, catalogue, _ = load_inputs(run_dir)
    with torch.no_grad():
        want = task.item_embeddings(catalogue.lookup(torch.tensor(got["item_index"].tolist()))).numpy()
    emb = np.stack(got["embedding"].to_numpy())
    assert emb.shape == (len(items), summary["dim"])
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def _user_inputs(run_dir):
    """Three user batches in the exported signature: the eval queries, one user, and rows with an
    empty history and OOV features."""
    run, _, _, queries = load_inputs(run_dir)
    specs = side(run.specs, "user")
    one = {k: (v.index_select(torch.tensor([0])) if isinstance(v, Ragged) else v[:1]) for k, v in queries.features.items()}
    odd = {s.name: (Ragged.from_lists([[], [1, 1], []]) if s.multi else torch.tensor([1, 1, 0])) for s in specs}
    return run, specs, [queries.features, one, odd]


def test_user_tower_runs_from_torch_alone(exported, tmp_path):
    _, run_dir, task, _ = exported
    run, specs, batches = _user_inputs(run_dir)
    flat = [list(flatten_user_batch(b, specs)) for b in batches]
    torch.save(flat, tmp_path / "inputs.pt")
    sig = json.load(open(os.path.join(run_dir, "export", "user_tower.json")))
    assert len(sig["inputs"]) == len(flat[0])
    assert [i["name"] for i in sig["inputs"]] == [
        n for s in specs for n in ((f"{s.name}.values", f"{s.name}.offsets") if s.multi else (s.name,))
    ]
    # A fresh interpreter, no project module imported: only torch and the two files.
    script = (
        "import sys, torch\n"
        f"m = torch.export.load({os.path.join(run_dir, 'export', 'user_tower.pt2')!r}).module()\n"
        f"ins = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "outs = [m(*x) for x in ins]\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('common', 'ray_train', 'spark_jobs', 'ray'))\n"
        "assert not bad, bad\n"
        f"torch.save(outs, {str(tmp_path / 'outputs.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    outs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for b, got in zip(batches, outs):
            want = task.user_embeddings(b)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_faiss_recall_equals_brute_force_overlap(exported):
    import faiss

    cfg, run_dir, task, summary = exported
    index = faiss.read_index(os.path.join(run_dir, "export", "items.faiss"))
    assert index.ntotal == summary["items"]
    assert faiss.downcast_index(index.index).hnsw.efSearch == HNSW_EF_SEARCH
    _, _, catalogue, queries = load_inputs(run_dir)
    with torch.no_grad():
        users = task.user_embeddings(queries.features).numpy().astype(np.float32)
        items = task.item_embeddings(catalogue.lookup(catalogue.item_indices)).numpy()
    rows = catalogue.item_indices.numpy()
    exact_scores = users.astype(np.float64) @ items.astype(np.float64).T
    ann = summary["ann"]
    assert ann["queries"] == users.shape[0] and ann["items"] == rows.size
    for k in cfg.eval.ks:
        order = np.lexsort((np.broadcast_to(rows, exact_scores.shape), -exact_scores), axis=1)[:, :k]
        exact = rows[order]
        _, got = index.search(users, k)
        overlap = np.mean([len(set(a) & set(e)) / min(k, rows.size) for a, e in zip(got, exact)])
        assert 0.0 <= ann[f"recall_vs_exact@{k}"] <= 1.0
        assert ann[f"recall_vs_exact@{k}"] == pytest.approx(overlap, abs=1e-12)
    # The exact top-1 of every query is an item id the index knows.
    assert set(index.search(users, 1)[1].ravel().tolist()) <= set(rows.tolist())


def test_ann_is_merged_into_metrics_and_kept_by_reevaluation(exported):
    _, run_dir, _, summary = exported
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["ann"] == summary["ann"]
    again = evaluate_run(run_dir)
    assert again["ann"] == summary["ann"]
    assert set(again) == {k for k in metrics}


def test_ann_off_writes_no_index_and_drops_a_stale_one(exported, tmp_path):
    _, run_dir, _, _ = exported
    copy_dir = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy_dir)
    cfg_path = os.path.join(copy_dir, "config.json")
    raw = json.load(open(cfg_path))
    raw["eval"]["ann_index"] = False
    json.dump(raw, open(cfg_path, "w"))
    summary = export_run(copy_dir)
    assert "ann" not in summary
    assert not os.path.exists(os.path.join(copy_dir, "export", "items.faiss"))
    assert "ann" not in json.load(open(os.path.join(copy_dir, "metrics.json")))
    assert os.path.isfile(os.path.join(copy_dir, "export", "user_tower.pt2"))
