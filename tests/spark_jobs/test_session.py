"""spark_jobs.session in a fresh process, as `python -m spark_jobs.prepare` builds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from common.config import SparkConfig
from spark_jobs.session import get_spark
spark = get_spark(SparkConfig(master="local[1]", shuffle_partitions=1))
worker = spark.sparkContext.parallelize([0], 1).map(lambda _: __import__("sys").executable).collect()[0]
spark.stop()
print("WORKER", worker)
print("DRIVER", sys.executable)
"""


def test_local_python_workers_use_the_driver_interpreter():
    # Without PYSPARK_PYTHON, Spark would start workers with the `python3` on the PATH, which on a
    # fresh machine lacks the venv's numpy and pyarrow (the MI job's Arrow engine needs them).
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("WORKER", "DRIVER")))
    assert lines["WORKER"] == lines["DRIVER"] == sys.executable
