"""Session-wide fixtures: one SparkSession for the whole test session, tiny and local."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    # Workers must run the same interpreter as the driver (the venv's).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("ssl4rec-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# Tiny synthetic data: big enough for the planted structure to show, small enough for 2 cores.
TINY_OVERRIDES = (
    "dataset.synthetic.num_users=200",
    "dataset.synthetic.num_items=150",
    "dataset.synthetic.num_interactions=4000",
    "dataset.synthetic.num_categories=5",
    "dataset.synthetic.num_partitions=2",
    "spark.shuffle_partitions=4",
    "prepare.history_length=5",
)


def tiny_config(tmp: Path, *extra: str):
    from common.config import load_config

    return load_config(
        ROOT / "conf" / "default.yaml",
        [
            *TINY_OVERRIDES,
            f"paths.raw={tmp / 'raw'}",
            f"paths.prepared={tmp / 'prepared'}",
            f"paths.runs={tmp / 'runs'}",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def prepared_synthetic(spark, tmp_path_factory):
    """One real ``spark_jobs.prepare`` run on tiny synthetic data, shared by the whole session.

    Returns ``(config, prepared_dir)``; treat the folder as read-only."""
    from spark_jobs import prepare

    tmp = tmp_path_factory.mktemp("synthetic")
    cfg = tiny_config(tmp)
    prepare.run(spark, cfg)
    return cfg, cfg.paths.prepared
