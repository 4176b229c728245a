"""``spark-submit`` of the unchanged entry point against a real standalone master and worker.

The master and worker are started on loopback with ``spark-class`` (the pip package ships no
``sbin/start-master.sh``), waited for through the master's JSON endpoint, and always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.manifest import read_manifest
from tests.conftest import ROOT, TINY_OVERRIDES

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return _find_spark_home()


def _wait_for_worker(ui_port: int, proc_logs: list[Path], timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as r:
                state = json.loads(r.read().decode())
            if state.get("aliveworkers", 0) >= 1:
                return
            last = state
        except OSError as exc:
            last = exc
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in proc_logs if p.exists())
    raise TimeoutError(f"Spark standalone worker did not register within {timeout}s (last: {last})\n{logs}")


@pytest.fixture
def standalone_cluster(tmp_path):
    home = _spark_home()
    spark_class = os.path.join(home, "bin", "spark-class")
    port, ui, wui = _free_port(), _free_port(), _free_port()
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", SPARK_HOME=home, PYSPARK_PYTHON=sys.executable)
    logs = [tmp_path / "master.log", tmp_path / "worker.log"]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master",
             "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)],
            stdout=logs[0].open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
             "--host", "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", str(wui),
             "--work-dir", str(tmp_path / "work")],
            stdout=logs[1].open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for_worker(ui, logs)
        yield f"spark://127.0.0.1:{port}", env
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def test_spark_submit_prepare_on_standalone_cluster(standalone_cluster, tmp_path):
    master, env = standalone_cluster
    subprocess.run(["make", "-s", "zip", f"PYTHON={sys.executable}"], cwd=ROOT, check=True)
    prepared = tmp_path / "prepared"
    submit = os.path.join(_spark_home(), "bin", "spark-submit")
    cmd = [
        submit, "--master", master, "--py-files", str(ROOT / "dist" / "common.zip"),
        "--conf", "spark.executor.memory=768m", "--conf", "spark.ui.enabled=false",
        str(ROOT / "spark_jobs" / "prepare.py"), "--config", str(ROOT / "conf" / "default.yaml"),
        "--set", *TINY_OVERRIDES, f"paths.prepared={prepared}", f"paths.raw={tmp_path / 'raw'}",
    ]
    # Run from outside the repo so that only the --py-files zip can provide the packages.
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, f"spark-submit failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    m = read_manifest(str(prepared))
    assert m["counts"]["items"] == 150
    assert m["counts"]["train"] > 0 and m["counts"]["eval"] > 0
    # The job really ran on the standalone master: spark-submit's --master won over the config's.
    assert m["config"]["spark"]["master"] == "local[*]"
    assert m["spark_master"] == master
