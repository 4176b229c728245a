"""Reading inputs and writing outputs; the only module (with the jobs' ``main``) that does I/O.

Atomic writes: a table is written to a hidden sibling folder and renamed into place with the
Hadoop FileSystem API, so it works on local disk, HDFS and object stores that Hadoop supports.
A crashed job leaves at most a ``._tmp-*`` folder behind, never a half-written table under the
real name. ``spark_jobs.prepare`` goes further and builds the whole prepared folder in a staging
folder that replaces the old one only when every table and the manifest are written.
"""

from __future__ import annotations

import uuid
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from common.manifest import join


def _hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    jpath = jvm.org.apache.hadoop.fs.Path(path)
    return jpath.getFileSystem(conf), jpath


def qualify(path: str) -> str:
    """Absolute local path, or the URI unchanged."""
    import os

    return path if "://" in path else os.path.abspath(path)


_qualify = qualify


def path_exists(spark: SparkSession, path: str) -> bool:
    fs, jpath = _hadoop_fs(spark, _qualify(path))
    return bool(fs.exists(jpath))


def delete_path(spark: SparkSession, path: str) -> None:
    fs, jpath = _hadoop_fs(spark, _qualify(path))
    if fs.exists(jpath):
        fs.delete(jpath, True)


def rename_path(spark: SparkSession, src: str, dst: str) -> None:
    fs, jsrc = _hadoop_fs(spark, _qualify(src))
    _, jdst = _hadoop_fs(spark, _qualify(dst))
    parent = jdst.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    if not fs.rename(jsrc, jdst):
        raise OSError(f"could not rename {src} to {dst}")


def write_table_atomic(df: DataFrame, path: str) -> None:
    """Write ``df`` as Parquet at ``path``, replacing any previous table only once complete."""
    spark = df.sparkSession
    path = _qualify(path).rstrip("/")
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/._tmp-{name}-{uuid.uuid4().hex}"
    old = f"{parent}/._old-{name}-{uuid.uuid4().hex}"
    df.write.mode("overwrite").parquet(tmp)
    if path_exists(spark, path):
        rename_path(spark, path, old)
    rename_path(spark, tmp, path)
    delete_path(spark, old)


def read_table(spark: SparkSession, path: str, fmt: str = "parquet", sep: str = ",", header: bool = True) -> DataFrame:
    """Read a user table; a missing path is an error that names it and the config key to fix."""
    if not path_exists(spark, path):
        raise FileNotFoundError(f"input table {path!r} does not exist; check the path in the config")
    if fmt == "parquet":
        return spark.read.parquet(_qualify(path))
    if fmt == "csv":
        # Everything as strings: validation decides what parses, nothing is coerced silently.
        return spark.read.option("header", str(header).lower()).option("sep", sep).csv(_qualify(path))
    raise ValueError(f"unsupported table format {fmt!r}; expected 'parquet' or 'csv'")


def prepared_path(prepared: str, *parts: str) -> str:
    return join(_qualify(prepared), *parts)
