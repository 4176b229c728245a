"""ray_train.train / ray_train.worker end to end on a real local Ray cluster (2 workers, tiny model,
data from the real Spark preparation), plus the global-negatives gather on real torch.distributed.

Cluster tests drive the CLI in subprocesses (``RAY_ADDRESS`` = the session cluster), as a user
would, so a killed driver is a real dead driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.ray_train.conftest import ROOT, TINY_MODEL, run_module, start_module

CONFIG = str(ROOT / "conf" / "default.yaml")


# ---------------------------------------------------------------------------------------------
# Global negatives: 2 workers x B == 1 worker x 2B (real gloo process group, no Ray)
# ---------------------------------------------------------------------------------------------

B = 6


def _gather_setup():
    from common.config import load_config
    from common.features import FeatureSpec
    from common.ragged import Ragged
    from common.task import TwoTowerTask

    specs = [
        FeatureSpec("item_id", "item", "id", False, "item_index", 12),
        FeatureSpec("category", "item", "categorical", False, "f_category", 5),
        FeatureSpec("user_id", "user", "id", False, "user_index", 9),
        FeatureSpec("history", "user", "history", True, "history", 12, "item_id"),
    ]
    cfg = load_config(None, [
        "model.embedding_dim=4", "model.tower_layers=[6, 4]", "ssl.method=none",
        "train.global_negatives=true", "train.logq_correction=true", "train.remove_accidental_hits=true",
    ])
    torch.manual_seed(0)
    task = TwoTowerTask(specs, cfg, {})
    g = torch.Generator().manual_seed(1)
    n = 2 * B
    # Few items so that the same item recurs across the two halves (accidental hits across ranks).
    items = torch.randint(2, 8, (n,), generator=g)
    users = {
        "user_id": torch.randint(2, 9, (n,), generator=g),
        "history": Ragged.from_lists([torch.randint(2, 12, (int(k),), generator=g).tolist()
                                      for k in torch.randint(0, 4, (n,), generator=g)]),
    }
    item_feats = {"item_id": items, "category": items % 3 + 2}
    log_q = -torch.rand(n, generator=g) * 3
    return task, users, item_feats, items, log_q


def _rows(feats, rows):
    from common.ragged import select_rows

    return select_rows(feats, rows)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from ray_train.worker import make_gather

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def constant_remote(x):  # remote slices as constants: drops the cross-rank gradient terms
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        return torch.cat(parts)

    try:
        for mode, gather in (("exact", make_gather(world)), ("constant-remote", constant_remote)):
            task, users, item_feats, items, log_q = _gather_setup()
            rows = torch.arange(rank * B, (rank + 1) * B)
            gen = torch.Generator().manual_seed(0)
            out = task(_rows(users, rows), _rows(item_feats, rows), items[rows], log_q[rows], None, gen,
                       gather=gather, rank=rank)
            out["loss"].backward()
            grads = {}
            for name, p in task.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(g, op=dist.ReduceOp.SUM)  # what DDP does: average over ranks
                grads[name] = g / world
            loss = out["main"].detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            if rank == 0:
                torch.save({"grads": grads, "loss": loss / world}, os.path.join(out_dir, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_negatives_two_workers_equal_one_worker_with_twice_the_batch(tmp_path):
    import torch.multiprocessing as mp

    task, users, item_feats, items, log_q = _gather_setup()
    gen = torch.Generator().manual_seed(0)
    out = task(users, item_feats, items, log_q, None, gen)  # one worker, 2B rows, no gather
    out["loss"].backward()
    reference = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in task.named_parameters()}

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for mode in ("exact", "constant-remote"):
        res = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        # The mean of per-rank means over equal halves is the full-batch mean: losses agree either way.
        torch.testing.assert_close(res["loss"], out["main"].detach(), rtol=1e-5, atol=1e-6)
        diffs = {n: float((res["grads"][n] - reference[n]).abs().max()) for n in reference}
        if mode == "exact":
            for n, g in reference.items():
                torch.testing.assert_close(res["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
        else:
            # Without summing gradients back, items lose the pull of the other rank's users.
            assert max(diffs.values()) > 1e-3, diffs


# ---------------------------------------------------------------------------------------------
# Helpers for the cluster tests
# ---------------------------------------------------------------------------------------------


def train_args(prepared: str, runs: Path, *sets: str, run_name: str | None = None, no_eval: bool = False) -> list[str]:
    args = ["--config", CONFIG]
    if run_name:
        args += ["--run-name", run_name]
    if no_eval:
        args.append("--no-eval")
    args += ["--set", *TINY_MODEL, f"paths.prepared={prepared}", f"paths.runs={runs}", *sets]
    return args


def start_train(cluster, args: list[str], log: Path) -> subprocess.Popen:
    return start_module(cluster, "ray_train.train", args, log)


def run_train(cluster, args: list[str], log: Path, timeout: float = 420) -> tuple[int, str]:
    return run_module(cluster, "ray_train.train", args, log, timeout)


def tail(log: Path, n: int = 6000) -> str:
    return log.read_text()[-n:] if log.exists() else "<no log>"


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (its snapshot file), 0 if none yet."""
    snap = run_dir / "ray" / run_dir.name / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return 0
    try:
        body = json.loads(snap.read_text())
    except (json.JSONDecodeError, OSError):
        return 0  # being rewritten
    return len(body.get("checkpoint_results", [])) if isinstance(body, dict) else 0


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if registered_checkpoints(run_dir) > 0:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before its first checkpoint; log:\n{tail(log)}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no checkpoint within {timeout}s; log:\n{tail(log)}")


def read_json(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Cluster tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_two_workers_survive_a_killed_worker_reduce_loss_and_beat_mostpop(prepared_dir, ray_cluster, tmp_path):
    from common.config import from_dict
    from common.manifest import read_manifest

    runs = tmp_path / "runs"
    run_dir = runs / "e2e"
    epochs = 3
    log = tmp_path / "e2e.log"
    proc = start_train(ray_cluster, train_args(
        prepared_dir, runs, "ssl.method=cfm", "ssl.alpha=0.3", "train.num_workers=2", f"train.epochs={epochs}",
        "train.lr=0.01", "train.checkpoint_every_steps=15", "train.max_failures=2", run_name="e2e",
    ), log)
    wait_for_checkpoint(run_dir, proc, log)
    killed = read_json(run_dir / "workers" / "rank1.json")
    assert killed["attempt"] == 1
    os.kill(killed["pid"], signal.SIGKILL)
    try:
        rc = proc.wait(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run did not finish after the worker kill; log:\n{tail(log)}")
    assert rc == 0, tail(log)

    history = read_json(run_dir / "history.json")
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), history
    # The run restarted from a checkpoint: a new worker group (attempt 2) and a recorded resume.
    assert history[-1]["attempt"] == 2, history
    resumed = [h["resumed_from"] for h in history if h["resumed_from"]]
    assert len(resumed) == 1, history
    assert read_json(run_dir / "workers" / "rank1.json")["pid"] != killed["pid"]
    # Every epoch ran its full step count despite the restart (mid-epoch resumes skip done steps).
    manifest = read_manifest(prepared_dir)
    steps = manifest["counts"]["train"] // 2 // 64
    assert history[-1]["global_step"] == epochs * steps

    # Learning: the main loss falls and the model beats MostPop on the time-split eval.
    assert history[-1]["main"] < history[0]["main"] - 0.1, history
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["recall@50"] > metrics["mostpop"]["recall@50"], metrics

    # The run folder follows the contract that evaluation and export read.
    state = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    assert set(state) == {"model", "epoch"} and state["epoch"] == epochs
    assert read_json(run_dir / "model" / "features.json") == manifest["features"]
    mi = read_json(run_dir / "model" / "mutual_info.json")
    assert mi and set(mi[0]) == {"feature_a", "feature_b", "mi"}
    cfg = from_dict(read_json(run_dir / "config.json"))
    assert cfg.ssl.method == "cfm" and cfg.paths.prepared == prepared_dir
    out = tail(log, 200_000)
    assert "[train] joined the Ray cluster at" in out
    assert "[train] epoch   1" in out  # driver-side progress, one line per epoch


@pytest.mark.cluster
def test_streamed_catalogue_trains_two_workers_and_writes_metrics(prepared_dir, ray_cluster, tmp_path):
    """train.catalogue=streaming: no worker holds the catalogue (positives denormalised by Ray Data,
    SSL items from the shard actors), and the run still learns and is evaluated."""
    from common.manifest import read_manifest

    runs = tmp_path / "runs"
    epochs = 3
    rc, out = run_train(ray_cluster, train_args(
        prepared_dir, runs, "ssl.method=cfm", "ssl.alpha=0.3", "train.num_workers=2", f"train.epochs={epochs}",
        "train.lr=0.01", "train.catalogue=streaming", run_name="streamed",
    ), tmp_path / "streamed.log")
    assert rc == 0, out[-6000:]
    assert "train.catalogue=streaming -> streaming" in out
    assert "[train] streamed catalogue: 2 shard actors" in out
    run_dir = runs / "streamed"
    for rank in (0, 1):
        assert read_json(run_dir / "workers" / f"rank{rank}.json")["catalogue"] == "streaming"
    history = read_json(run_dir / "history.json")
    steps = read_manifest(prepared_dir)["counts"]["train"] // 2 // 64
    assert [h["global_step"] for h in history] == [steps * (e + 1) for e in range(epochs)], history
    assert history[0]["ssl"] > 0  # the SSL task ran on streamed items
    assert history[-1]["main"] < history[0]["main"] - 0.1, history
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["recall@50"] > metrics["mostpop"]["recall@50"], metrics


@pytest.fixture(scope="module")
def job_run(prepared_dir, ray_cluster, tmp_path_factory):
    """A one-worker run submitted with `ray job submit` (working dir uploaded, data outside it)."""
    base = tmp_path_factory.mktemp("job")
    runs = base / "runs"
    args = train_args(prepared_dir, runs, "ssl.method=cfm", "train.num_workers=1", "train.epochs=2",
                      "train.seed=5", run_name="job")
    excludes = json.dumps({"excludes": [".venv", "data", "runs", ".git", "dist", "*.egg-info", ".pytest_cache"]})
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
        "--working-dir", str(ROOT), "--runtime-env-json", excludes, "--",
        sys.executable, "-m", "ray_train.train", *args,
    ]
    env = ray_cluster.env()
    env.pop("RAY_ADDRESS")  # the job gets the cluster's address from Ray itself
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, runs / "job", args


@pytest.mark.cluster
def test_ray_job_submit_trains_and_writes_metrics(job_run):
    proc, run_dir, _ = job_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "succeeded" in out
    assert "[train] joined the Ray cluster at" in out  # the job's driver used the cluster as is
    metrics = read_json(run_dir / "metrics.json")
    assert 0.0 <= metrics["recall@50"] <= 1.0 and "mostpop" in metrics
    assert [h["epoch"] for h in read_json(run_dir / "history.json")] == [1, 2]


@pytest.mark.cluster
def test_one_worker_run_is_reproducible(job_run, ray_cluster, tmp_path):
    """The same config on one worker, run again directly: identical losses, epoch by epoch."""
    proc, job_dir, args = job_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    runs = tmp_path / "runs"
    args = [a if not a.startswith("paths.runs=") else f"paths.runs={runs}" for a in args]
    args[args.index("--run-name") + 1] = "again"
    rc, out = run_train(ray_cluster, args + ["--no-eval"], tmp_path / "again.log")
    assert rc == 0, out[-6000:]
    first, second = read_json(job_dir / "history.json"), read_json(runs / "again" / "history.json")
    keys = ("loss", "main", "ssl", "global_step")
    assert [{k: h[k] for k in keys} for h in first] == [{k: h[k] for k in keys} for h in second]
    assert first[0]["ssl"] > 0  # the SSL task (sampling + views) was part of what repeated exactly


@pytest.mark.cluster
def test_resume_continues_a_run_whose_driver_died(prepared_dir, ray_cluster, tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "res"
    epochs = 4
    log = tmp_path / "first.log"
    proc = start_train(ray_cluster, train_args(
        prepared_dir, runs, "ssl.method=none", "train.num_workers=2", f"train.epochs={epochs}", run_name="res",
        no_eval=True,
    ), log)
    wait_for_checkpoint(run_dir, proc, log)
    proc.kill()  # SIGKILL the driver: its controller and workers die with its job
    proc.wait()
    done_before = registered_checkpoints(run_dir)
    assert not (run_dir / "model" / "model.pt").exists(), "the first driver finished before it was killed"

    rc, out = run_train(ray_cluster, ["--resume", str(run_dir), "--no-eval"], tmp_path / "resume.log")
    assert rc == 0, out[-6000:]
    history = read_json(run_dir / "history.json")
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), history
    first_resumed = next(h for h in history if h["resumed_from"])
    # It continued from the last checkpoint, not from scratch: earlier epochs kept attempt 1.
    assert first_resumed["resumed_from"]["epoch"] >= 1 and done_before >= 1
    assert first_resumed["epoch"] == first_resumed["resumed_from"]["epoch"] + 1
    assert all(h["attempt"] == 1 for h in history[: first_resumed["resumed_from"]["epoch"]])
    assert all(h["attempt"] >= 2 for h in history[first_resumed["epoch"] - 1:])
    assert torch.load(run_dir / "model" / "model.pt", weights_only=True)["epoch"] == epochs


@pytest.mark.cluster
def test_diverging_loss_stops_with_the_step_and_part_named(prepared_dir, ray_cluster, tmp_path):
    """lr=1e30: after the first Adam step the weights are ~1e30, activations overflow float32 and
    the main loss becomes NaN at step 2; both ranks agree and the driver reports it, no retries."""
    rc, out = run_train(ray_cluster, train_args(
        prepared_dir, tmp_path / "runs", "ssl.method=none", "train.num_workers=2", "train.epochs=1",
        "train.lr=1.0e+30", "train.max_failures=2", run_name="nan", no_eval=True,
    ), tmp_path / "nan.log")
    assert rc != 0
    assert "NonFiniteLossError: non-finite loss at global step 2 " in out, out[-6000:]
    assert "bad part(s) main " in out
    assert "main bad on ranks [0, 1]" in out
    assert "attempt 2" not in out and "Retrying" not in out
