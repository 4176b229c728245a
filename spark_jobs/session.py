"""One place that builds the SparkSession from ``cfg.spark``.

Under ``spark-submit`` the master comes from the command line; ``getOrCreate`` then returns the
session spark-submit already configured and ``spark.master`` from the config is not forced on it.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from common.config import SparkConfig


def _launched_by_spark_submit() -> bool:
    # spark-submit exports these to the driver's Python process.
    return "SPARK_SUBMIT_OPTS" in os.environ or "PYSPARK_GATEWAY_PORT" in os.environ


def get_spark(cfg: SparkConfig) -> SparkSession:
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName(cfg.app_name)
    if not _launched_by_spark_submit():
        builder = builder.master(cfg.master).config("spark.driver.memory", cfg.driver_memory)
        if cfg.master.startswith("local"):
            # Python workers (the mutual-information job's Arrow engine) must import numpy and
            # pyarrow: run them with this interpreter, not whatever `python3` is on the PATH.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
