"""Session fixtures of the Ray Train tests: the prepared folder of the real Spark pipeline (shared with
the whole suite) and one local Ray cluster (``ray start --head`` with the dashboard on 127.0.0.1,
its own ports and temp dir, token authentication), started once per test session, waited for with
a timeout and always stopped."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Tiny model; every training run in these tests starts from these overrides.
TINY_MODEL = [
    "model.embedding_dim=8",
    "model.tower_layers=[16, 8]",
    "train.batch_size=64",
    "ssl.batch_size=64",
    "eval.ann_index=false",
]

# Logical CPUs of the test cluster: 2 train workers x 1 CPU, plus room for Ray Data's read tasks
# and the split coordinator (with none left, the ingest waits forever).
CLUSTER_CPUS = 4


@pytest.fixture(scope="session")
def prepared_dir(prepared_synthetic) -> str:
    """The session's prepared folder, made once by the real Spark pipeline (``spark_jobs.prepare``
    on tiny synthetic data, ``tests/conftest.py``); read-only."""
    return str(prepared_synthetic[1])


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session, stopped at the end whatever happens."""
    from ray_train.cluster import ClusterStartError, LocalCluster

    cluster = LocalCluster(num_cpus=CLUSTER_CPUS, timeout_s=180)
    try:
        cluster.start()
    except ClusterStartError as exc:
        pytest.fail(f"could not start the local Ray test cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def driver_of(cluster):
    """This process as a Ray driver of ``cluster`` for the duration of the block. The test
    cluster uses token authentication: a driver given an explicit address must be told (env), and
    Ray caches its config at import, so refresh it as Ray's own auto-enable does."""
    import ray
    from ray._raylet import Config as _RayConfig

    old_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    _RayConfig.initialize("")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_mode
        _RayConfig.initialize("")


def start_module(cluster, module: str, args: list[str], log: Path) -> subprocess.Popen:
    """``python -m module args`` as a driver of ``cluster``, output to ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=cluster.env(),
                                stdout=fh, stderr=subprocess.STDOUT)


def run_module(cluster, module: str, args: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """``start_module`` and wait; a run past ``timeout`` is killed and fails the test with its log."""
    import pytest

    proc = start_module(cluster, module, args, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"python -m {module} did not finish in {timeout}s; log tail:\n{log.read_text()[-6000:]}")
    return rc, log.read_text()
