"""Run the whole preparation: raw logs -> training-ready Parquet + ``manifest.json``.

    python -m spark_jobs.prepare --config conf/ml-100k.yaml --set paths.raw=/data/ml-100k
    spark-submit --master spark://host:7077 --py-files dist/common.zip \\
        spark_jobs/prepare.py --config conf/ml-100k.yaml

Steps, each also runnable on its own (``python -m spark_jobs.<step>``):
validate -> encode (split, vocabularies, encoded tables, history) -> popularity -> mutual_info.

Atomicity: everything is built in a hidden staging folder next to ``paths.prepared``; only when
every table and the manifest are written does the staging folder replace the old output. A crash
leaves the previous output untouched (plus a ``._staging-*`` folder that the next run ignores).
The jobs are deterministic, so a rerun with the same config produces the same tables.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (spark-submit spark_jobs/prepare.py): the script's folder must not shadow
    # top-level modules, and the package must import from the --py-files zip or the repo root.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path.pop(0)
    sys.path.append(os.path.dirname(_here))

import dataclasses
import platform
import time
import uuid
from typing import Any, Optional, Sequence

from pyspark.sql import SparkSession

from common.config import Config
from common.manifest import MANIFEST_VERSION, write_manifest
from spark_jobs import encode, mutual_info, popularity, validate
from spark_jobs.io import delete_path, path_exists, qualify, rename_path

STEPS = (
    ("validate", validate.run),
    ("encode", encode.run),
    ("popularity", popularity.run),
    ("mutual_info", mutual_info.run),
)


def library_versions() -> dict[str, str]:
    import pyarrow
    import pyspark

    return {
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "pyarrow": pyarrow.__version__,
    }


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Build the prepared folder for ``cfg``; returns the manifest written."""
    final = qualify(cfg.paths.prepared).rstrip("/")
    parent, _, name = final.rpartition("/")
    run_id = uuid.uuid4().hex
    staging = f"{parent}/._staging-{name}-{run_id}"
    staged_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, prepared=staging))

    started = time.time()
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "run_id": run_id,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "versions": library_versions(),
        # What actually ran the job (spark-submit's --master wins over spark.master).
        "spark_master": spark.sparkContext.master,
    }
    timings: dict[str, float] = {}
    try:
        for step, job in STEPS:
            t0 = time.time()
            manifest.update(job(spark, staged_cfg))
            timings[step] = round(time.time() - t0, 3)
            print(f"[prepare] {step} done in {timings[step]:.1f}s", flush=True)
        manifest["tables"] = {
            **manifest.get("tables", {}),
            "item_popularity": "stats/item_popularity",
            "mutual_info": "stats/mutual_info",
        }
        manifest["timings_s"] = timings
        manifest["created_unix"] = round(started, 3)
        write_manifest(staging, manifest)
    except BaseException:
        delete_path(spark, staging)
        raise

    old = f"{parent}/._old-{name}-{run_id}"
    if path_exists(spark, final):
        rename_path(spark, final, old)
    rename_path(spark, staging, final)
    delete_path(spark, old)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from spark_jobs.cli import parse_args
    from spark_jobs.session import get_spark

    cfg = parse_args("Prepare raw logs into training-ready Parquet tables and manifest.json", argv)
    spark = get_spark(cfg.spark)
    manifest = run(spark, cfg)
    print(summary(manifest, cfg.paths.prepared))
    return manifest


def summary(manifest: dict[str, Any], where: str) -> str:
    lines = [f"prepared -> {where}"]
    for table, rep in manifest.get("validate", {}).items():
        if isinstance(rep, dict) and "input" in rep:
            q = sum(rep.get("quarantined", {}).values())
            lines.append(f"  {table:<13} input {rep['input']:>10,}  kept {rep['kept']:>10,}  quarantined {q:>8,}")
    for table, n in manifest.get("counts", {}).items():
        lines.append(f"  {table:<13} rows {n:>11,}" if isinstance(n, int) else f"  {table}: {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
