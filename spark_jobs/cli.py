"""The command line every job shares: ``--config FILE`` and ``--set key=value ...``.

``python -m spark_jobs.<job> --config conf/ml-100k.yaml --set paths.raw=/data/ml-100k`` runs one
step on ``local[*]`` (or ``spark.master``); under ``spark-submit`` the same entry point uses the
cluster spark-submit connected to.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional, Sequence

from pyspark.sql import SparkSession

from common.config import Config, load_config
from common.manifest import merge_sections
from spark_jobs.session import get_spark


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="conf/default.yaml", help="YAML config (default: conf/default.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set paths.raw=/data/ml-100k prepare.vocab_min_count=2",
    )
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_job(
    description: str,
    run: Callable[[SparkSession, Config], dict[str, Any]],
    argv: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Parse arguments, run one job, merge the manifest sections it returns and print them.

    ``run(spark, cfg)`` reads its inputs, writes its tables atomically under ``paths.prepared``
    and returns ``{section_name: content}`` for ``manifest.json``.
    """
    cfg = parse_args(description, argv)
    spark = get_spark(cfg.spark)
    sections = run(spark, cfg)
    merge_sections(cfg.paths.prepared, sections)
    json.dump(sections, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return sections
