"""Full-catalogue evaluation of a real run folder against brute-force numpy / pandas references.

The run folder is built here, not by ``ray_train.train``: a ``TwoTowerTask`` trained for a few
in-process steps on the real Spark-prepared tiny synthetic data (``prepared_synthetic``), saved in
the run-folder layout of the training contract.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from common.catalogue import Catalogue
from common.config import Config
from common.features import side, specs_from_manifest
from common.manifest import read_manifest
from common.ragged import Ragged
from common.task import TwoTowerTask
from ray_train.data import collate_table, load_catalogue, load_log_q, load_mutual_info, read_table, table_uri, train_columns
from ray_train.evaluate import compute, evaluate_run, format_table, main


# ---------------------------------------------------------------------------------------------
# A run folder, written the way ray_train.train writes one
# ---------------------------------------------------------------------------------------------


def make_run_dir(cfg: Config, run_dir: str, steps: int = 10, seed: int = 0) -> TwoTowerTask:
    """Train ``steps`` in-process Adam steps on the prepared train log, write the run folder."""
    prepared = cfg.paths.prepared
    manifest = read_manifest(prepared)
    specs = specs_from_manifest(manifest)
    mi = load_mutual_info(prepared, manifest)
    torch.manual_seed(seed)
    task = TwoTowerTask(specs, cfg, mi)
    catalogue = load_catalogue(prepared, manifest, specs)
    log_q = load_log_q(prepared, manifest, catalogue)
    train = read_table(table_uri(prepared, manifest, "train"), train_columns(specs))
    opt = torch.optim.Adam(task.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(train.num_rows, (128,), generator=g)
        b = collate_table(train.take(pa.array(rows.numpy())), specs)
        out = task(b.user, catalogue.lookup(b.item_index), b.item_index, log_q[b.item_index], None, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    task.eval()
    os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as fh:
        json.dump(cfg.to_dict(), fh)
    with open(os.path.join(run_dir, "model", "features.json"), "w") as fh:
        json.dump(manifest["features"], fh)
    mi_rows = read_table(table_uri(prepared, manifest, "mutual_info"), ["feature_a", "feature_b", "mi"]).to_pylist()
    with open(os.path.join(run_dir, "model", "mutual_info.json"), "w") as fh:
        json.dump(mi_rows, fh)
    torch.save({"model": task.state_dict(), "epoch": 1}, os.path.join(run_dir, "model", "model.pt"))
    return task


@pytest.fixture(scope="module")
def run(prepared_synthetic, tmp_path_factory):
    cfg, _ = prepared_synthetic
    run_dir = str(tmp_path_factory.mktemp("run") / "r")
    task = make_run_dir(cfg, run_dir)
    metrics = evaluate_run(run_dir)
    return cfg, run_dir, task, metrics


# ---------------------------------------------------------------------------------------------
# Independent references (pandas, numpy, Python loops)
# ---------------------------------------------------------------------------------------------


def _frames(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    p = cfg.paths.prepared
    return (pd.read_parquet(os.path.join(p, "train")), pd.read_parquet(os.path.join(p, "eval")),
            pd.read_parquet(os.path.join(p, "items")))


def reference_setup(cfg: Config) -> dict[str, Any]:
    """Users, queries' first eval rows, ground truth and train sets with pandas."""
    train, ev, items = _frames(cfg)
    seen = train.groupby("user_id")["item_index"].apply(lambda s: set(s.tolist())).to_dict()
    ev = ev.sort_values(["user_id", "timestamp", "item_index"])
    users, truth, first_rows = [], [], []
    for uid, grp in ev.groupby("user_id", sort=True):
        g = set(grp["item_index"].tolist()) - seen.get(uid, set())
        if g:
            users.append(uid)
            truth.append(g)
            first_rows.append(grp.iloc[0])
    counts = train["item_index"].value_counts().to_dict()
    real = sorted(items["item_index"].tolist())
    return {"users": users, "truth": truth, "first": pd.DataFrame(first_rows), "seen": seen,
            "counts": {r: counts.get(r, 0) for r in real}, "real": real, "items": items}


def reference_ranking(scores: dict[int, float], excluded: set, k: int) -> list[int]:
    cand = sorted(((-s, r) for r, s in scores.items() if r not in excluded))
    return [r for _, r in cand[:k]]


def reference_metrics(rankings: list[list[int]], truth: list[set], ks: list[int]) -> dict[str, float]:
    out = {}
    for k in ks:
        rec, nd = [], []
        for top, g in zip(rankings, truth):
            top = top[:k]
            hits = [i for i, r in enumerate(top) if r in g]
            rec.append(len(hits) / len(g))
            dcg = sum(1 / math.log2(i + 2) for i in hits)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(len(g), k)))
            nd.append(dcg / idcg)
        out[f"recall@{k}"] = float(np.mean(rec))
        out[f"ndcg@{k}"] = float(np.mean(nd))
    return out


def reference_buckets(counts: dict[int, int], frac: float) -> dict[int, str]:
    order = sorted(counts, key=lambda r: (-counts[r], r))
    n_head = math.ceil(frac * len(order))
    return {r: ("cold" if counts[r] == 0 else "head" if i < n_head else "tail") for i, r in enumerate(order)}


def reference_bucket_recall(rankings, truth, buckets, ks) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ("head", "tail", "cold"):
        out[name] = {}
        for k in ks:
            vals = []
            for top, g in zip(rankings, truth):
                gb = {r for r in g if buckets[r] == name}
                if gb:
                    vals.append(len(gb & set(top[:k])) / len(gb))
            out[name][f"recall@{k}"] = float(np.mean(vals)) if vals else None
    return out


def reference_user_batch(first: pd.DataFrame, specs) -> dict[str, Any]:
    feats: dict[str, Any] = {}
    for s in side(specs, "user"):
        col = first[s.column].tolist()
        feats[s.name] = Ragged.from_lists([list(v) for v in col]) if s.multi else torch.tensor(col, dtype=torch.long)
    return feats


def _assert_close_tree(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _assert_close_tree(got[k], want[k], f"{path}.{k}")
    elif want is None:
        assert got is None, f"{path}: {got} should be null"
    else:
        assert got == pytest.approx(want, abs=1e-9), path


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_metrics_file_has_exactly_the_documented_keys(run):
    cfg, run_dir, _, metrics = run
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        on_disk = json.load(fh, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert on_disk == metrics
    ks = cfg.eval.ks
    metric_keys = {f"{m}@{k}" for k in ks for m in ("recall", "ndcg")}
    assert set(metrics) == metric_keys | {"by_bucket", "by_popularity_decile", "mostpop", "counts"}  # no "ann" yet
    assert set(metrics["mostpop"]) == metric_keys | {"by_bucket", "by_popularity_decile"}
    for deciles in (metrics["by_popularity_decile"], metrics["mostpop"]["by_popularity_decile"]):
        # Ten groups that partition the real catalogue, most clicked first.
        assert [d["group"] for d in deciles] == list(range(10))
        assert sum(d["items"] for d in deciles) == metrics["counts"]["items"]
        assert all(a["min_count"] >= b["max_count"] for a, b in zip(deciles, deciles[1:]))
        assert all({f"recall@{k}" for k in ks} <= set(d) for d in deciles)
        assert all(d[f"recall@{k}"] is None or 0.0 <= d[f"recall@{k}"] <= 1.0 for d in deciles for k in ks)
    for block in (metrics["by_bucket"], metrics["mostpop"]["by_bucket"]):
        assert set(block) == {"head", "tail", "cold"}
        assert all(set(v) == {f"recall@{k}" for k in ks} for v in block.values())
    for k in ks:
        for m in ("recall", "ndcg"):
            assert 0.0 <= metrics[f"{m}@{k}"] <= 1.0
    # Recall can only grow with K.
    recalls = [metrics[f"recall@{k}"] for k in sorted(ks)]
    assert recalls == sorted(recalls)


def test_model_metrics_match_brute_force(run):
    cfg, _, task, metrics = run
    ref = reference_setup(cfg)
    specs = task.specs
    scorer = copy.deepcopy(task).double().eval()
    items_tbl = pa.Table.from_pandas(ref["items"], preserve_index=False)
    catalogue = Catalogue.from_arrow(items_tbl, specs)
    real = torch.tensor(ref["real"])
    with torch.no_grad():
        item_emb = scorer.item_embeddings(catalogue.lookup(real)).numpy()
        user_emb = scorer.user_embeddings(reference_user_batch(ref["first"], specs)).numpy()
    scores = user_emb @ item_emb.T
    ks = sorted(cfg.eval.ks)
    rankings = [
        reference_ranking(dict(zip(ref["real"], scores[u].tolist())), ref["seen"].get(uid, set()), max(ks))
        for u, uid in enumerate(ref["users"])
    ]
    want = reference_metrics(rankings, ref["truth"], ks)
    for key, val in want.items():
        assert metrics[key] == pytest.approx(val, abs=1e-9), key
    buckets = reference_buckets(ref["counts"], cfg.eval.head_fraction)
    _assert_close_tree(metrics["by_bucket"], reference_bucket_recall(rankings, ref["truth"], buckets, ks))
    # The trained model beats MostPop on this planted-preference data (a sanity check that the
    # model's embeddings, not a constant, drive the ranking).
    assert metrics[f"recall@{ks[0]}"] > metrics["mostpop"][f"recall@{ks[0]}"]


def test_mostpop_matches_pandas(run):
    cfg, _, _, metrics = run
    ref = reference_setup(cfg)
    ks = sorted(cfg.eval.ks)
    counts = ref["counts"]  # from train/ itself, not stats/item_popularity
    pop_scores = {r: float(c) for r, c in counts.items()}
    rankings = [reference_ranking(pop_scores, ref["seen"].get(uid, set()), max(ks)) for uid in ref["users"]]
    want = reference_metrics(rankings, ref["truth"], ks)
    for key, val in want.items():
        assert metrics["mostpop"][key] == pytest.approx(val, abs=1e-9), key
    buckets = reference_buckets(counts, cfg.eval.head_fraction)
    _assert_close_tree(metrics["mostpop"]["by_bucket"], reference_bucket_recall(rankings, ref["truth"], buckets, ks))


def test_counts_match_pandas(run):
    cfg, _, _, metrics = run
    ref = reference_setup(cfg)
    _, ev, items = _frames(cfg)
    c = metrics["counts"]
    assert c["users"] == len(ref["users"])
    assert c["items"] == len(items)
    assert c["ground_truth_pairs"] == sum(len(g) for g in ref["truth"])
    assert c["eval_users"] == ev["user_id"].nunique()
    pairs = ev[["user_id", "item_index"]].drop_duplicates()
    assert c["eval_pairs"] == len(pairs)
    seen = sum(r in ref["seen"].get(u, set()) for u, r in zip(pairs["user_id"], pairs["item_index"]))
    assert c["eval_pairs_seen_in_train"] == seen
    buckets = reference_buckets(ref["counts"], cfg.eval.head_fraction)
    for name in ("head", "tail", "cold"):
        assert c["by_bucket"][name]["items"] == sum(b == name for b in buckets.values())
        assert c["by_bucket"][name]["pairs"] == sum(sum(buckets[r] == name for r in g) for g in ref["truth"])
        assert c["by_bucket"][name]["users"] == sum(any(buckets[r] == name for r in g) for g in ref["truth"])
    assert c["shards"] == 1


def test_sharded_ray_path_equals_local(run):
    import ray

    _, run_dir, _, _ = run
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sharded, s_state = compute(run_dir, num_shards=3, batch_size=16)
    finally:
        ray.shutdown()
    local, l_state = compute(run_dir, num_shards=1, batch_size=16)
    assert sharded["counts"].pop("shards") == 3
    assert local["counts"].pop("shards") == 1
    assert torch.equal(s_state.model_top[1], l_state.model_top[1])
    torch.testing.assert_close(s_state.model_top[0], l_state.model_top[0], rtol=0, atol=1e-12)
    assert sharded == local
    # Every top-K row is a real item that the user did not see in train.
    rows = l_state.model_top[1].numpy()
    real = set(l_state.catalogue.item_indices.tolist())
    ptr, ex = l_state.queries.exclude
    for u in range(rows.shape[0]):
        assert set(rows[u].tolist()) <= real
        assert not set(rows[u].tolist()) & set(ex[ptr[u]:ptr[u + 1]].tolist())


def test_cli_prints_table_and_writes_file(run, capsys):
    _, run_dir, _, metrics = run
    os.remove(os.path.join(run_dir, "metrics.json"))
    out = main(["--run", run_dir])
    printed = capsys.readouterr().out
    assert out == metrics
    assert "mostpop" in printed and "head recall@10" in printed
    assert f"{metrics['recall@10']:.4f}" in printed and f"{metrics['mostpop']['recall@10']:.4f}" in printed
    assert printed.startswith(format_table(metrics))
    assert os.path.isfile(os.path.join(run_dir, "metrics.json"))


def test_missing_model_is_a_clear_error(run, tmp_path):
    _, run_dir, _, _ = run
    broken = tmp_path / "broken"
    (broken / "model").mkdir(parents=True)
    for rel in ("config.json", "model/features.json"):
        (broken / rel).write_text(open(os.path.join(run_dir, rel)).read())
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        evaluate_run(str(broken))


def test_build_queries_by_hand():
    from common.features import FeatureSpec
    from ray_train.evaluate import build_queries

    specs = [
        FeatureSpec("item_id", "item", "id", False, "item_index", 20),
        FeatureSpec("user_id", "user", "id", False, "user_index", 5),
        FeatureSpec("history", "user", "history", True, "history", 20, shares_embedding_with="item_id"),
    ]
    train = pa.table({"user_id": ["a", "a", "b", "c", "z"], "item_index": [2, 3, 4, 5, 6]})
    hist = pa.list_(pa.int32())
    eval_ = pa.table({
        "user_id": ["a", "a", "a", "b", "b", "c"],
        "item_index": pa.array([7, 3, 6, 9, 8, 5], pa.int32()),
        "timestamp": [30, 10, 10, 50, 40, 5],
        "user_index": pa.array([2, 2, 2, 3, 3, 4], pa.int32()),
        "history": pa.array([[2, 3, 6], [2], [2], [4, 8], [4], [5]], hist),
    })
    q = build_queries(train, eval_, specs)
    # c's only eval item (5) is in its train set: c is not scored. a: first event is t=10; items 3
    # and 6 tie on time, the lower item_index (3) is the query row; ground truth {6, 7} (3 seen).
    # b: first event t=40 (item 8); ground truth {8, 9}.
    assert q.user_ids.tolist() == ["a", "b"]
    assert q.features["user_id"].tolist() == [2, 3]
    assert q.features["history"].tolist() == [[2], [4]]
    ptr, rows = q.truth
    assert [rows[ptr[u]:ptr[u + 1]].tolist() for u in range(2)] == [[6, 7], [8, 9]]
    ptr, rows = q.exclude
    assert [rows[ptr[u]:ptr[u + 1]].tolist() for u in range(2)] == [[2, 3], [4]]
    assert (q.eval_users, q.eval_pairs, q.eval_pairs_seen_in_train) == (3, 6, 2)
