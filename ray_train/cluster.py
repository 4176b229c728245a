"""Start and stop a single-node Ray cluster with ``ray start --head`` (tests, benchmarks, demos).

    with LocalCluster(num_cpus=4) as c:
        env = c.env()           # RAY_ADDRESS for drivers that should join it
        c.dashboard_url         # for `ray job submit --address ...`

Token authentication is on (``RAY_AUTH_MODE=token``, the token in ``~/.ray/auth_token``, generated
if missing); ``env()`` carries the mode to drivers and to ``ray job submit``.

Why not ``ray start`` / ``ray stop`` directly: ``ray stop`` kills every Ray process of the user on
the machine, other people's clusters included, and ``ray.init()`` without an address joins the
latest ``ray start`` cluster of the default temp dir. So the cluster here runs in the foreground
(``--block``) in its own process group, with its own temp dir and free ports; stopping it sends
SIGTERM to that one process (which shuts down its GCS, raylet and workers) and, if anything is
left after a grace period, SIGKILL to its process group only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ClusterStartError(RuntimeError):
    pass


def _auth_headers() -> dict[str, str]:
    """Ray >= 2.5x enables token authentication for new clusters when a token exists
    (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); the dashboard
    then answers 401 without it. The ``ray`` CLI finds the token the same way."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        try:
            with open(path) as fh:
                token = fh.read().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


class LocalCluster:
    """A ``ray start --head --block`` process on 127.0.0.1 with the dashboard (``ray job submit``
    needs it). ``num_cpus`` should exceed the train workers' CPUs so Ray Data's tasks can run."""

    def __init__(self, num_cpus: int = 4, object_store_mb: int = 300, timeout_s: float = 120.0) -> None:
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.timeout_s = timeout_s
        self.port = free_port()
        self.dashboard_port = free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # short: unix socket paths are <108 chars
        self.log_path = os.path.join(self.temp_dir, "ray_start.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment for a driver (or ``ray job submit``) that joins this cluster. A driver
        given an explicit address never turns token authentication on by itself, so say so."""
        env = dict(os.environ)
        env["RAY_ADDRESS"] = self.address
        env["RAY_AUTH_MODE"] = "token"
        return env

    def start(self) -> "LocalCluster":
        ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        cmd = [
            ray_bin, "start", "--head", "--block",
            "--port", str(self.port),
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
        ]
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["RAY_AUTH_MODE"] = "token"
        if not _auth_headers():
            # Ray's own behaviour for a new local cluster: a random token in ~/.ray/auth_token.
            subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the dashboard answers and lists one alive node (the raylet registered)."""
        deadline = time.time() + self.timeout_s
        last = "no answer yet"
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterStartError(
                    f"`ray start --head` exited with code {self.proc.returncode}; its log "
                    f"{self.log_path}:\n{self._log_tail()}"
                )
            try:
                req = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary", headers=_auth_headers())
                with urllib.request.urlopen(req, timeout=5) as r:
                    body = json.loads(r.read().decode())
                nodes = body.get("data", {}).get("summary", [])
                if any(n.get("raylet", {}).get("state") == "ALIVE" for n in nodes):
                    return
                last = f"dashboard up, {len(nodes)} node(s), none alive yet"
            except Exception as exc:  # not up yet
                last = repr(exc)
            time.sleep(1.0)
        raise ClusterStartError(
            f"the local Ray cluster (GCS {self.address}, dashboard {self.dashboard_url}) did not come up "
            f"within {self.timeout_s:.0f}s (last check: {last}). Log {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path) as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return "<no log>"

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the ``ray start --block`` process (it stops its node), then SIGKILL its process
        group if anything survives the grace period."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the launcher's pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
