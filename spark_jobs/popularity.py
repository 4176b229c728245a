"""Item sampling probabilities for the logQ correction of the in-batch softmax.

    python -m spark_jobs.popularity --config conf/ml-100k.yaml

reads ``train/`` and ``items/`` under ``paths.prepared`` and writes ``stats/item_popularity/``:
one row per catalogue item with its train event count, ``probability = count / total`` (items
never clicked in train get ``prepare.popularity_floor_events / total`` so that ``log_q`` stays
finite), ``log_q = ln(probability)`` and ``batch_probability = 1 - (1 - p)^B``, the chance that
the item appears at least once in a batch of ``B = train.batch_size`` sampled events.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from common.config import Config
from spark_jobs.io import path_exists, prepared_path, write_table_atomic

TABLE = "stats/item_popularity"


def item_popularity(train: DataFrame, items_encoded: DataFrame, batch_size: int, floor_events: float) -> DataFrame:
    """``[item_id, item_index, count, probability, log_q, batch_probability]``, one row per
    catalogue item of ``items_encoded``; ``train`` needs ``item_id``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 < floor_events <= 1.0:
        raise ValueError(f"floor_events must be in (0, 1], got {floor_events}")
    counts = train.groupBy("item_id").agg(F.count(F.lit(1)).alias("_n"))
    total = F.broadcast(train.agg(F.count(F.lit(1)).cast("double").alias("_total")))
    p = (
        items_encoded.select("item_id", "item_index")
        .join(counts, on="item_id", how="left")
        .withColumn("count", F.coalesce(F.col("_n"), F.lit(0)).cast("long"))
        .crossJoin(total)
        .withColumn(
            "probability",
            F.when(F.col("count") > 0, F.col("count") / F.col("_total")).otherwise(F.lit(float(floor_events)) / F.col("_total")),
        )
    )
    prob = F.col("probability")
    # 1 - (1 - p)^B as -expm1(B * log1p(-p)): no cancellation for small p. log1p(-1) is null in
    # Spark, so p = 1 (one item holds every event) is handled on its own.
    batch = F.when(prob >= 1.0, F.lit(1.0)).otherwise(-F.expm1(F.lit(float(batch_size)) * F.log1p(-prob)))
    return p.select(
        F.col("item_id").cast("string"),
        F.col("item_index").cast("int"),
        "count",
        prob.cast("double").alias("probability"),
        F.log(prob).cast("double").alias("log_q"),
        batch.cast("double").alias("batch_probability"),
    )


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Write ``stats/item_popularity/``; return the ``popularity`` manifest section."""
    prepared = cfg.paths.prepared
    for table in ("train", "items"):
        if not path_exists(spark, prepared_path(prepared, table)):
            raise FileNotFoundError(
                f"{prepared_path(prepared, table)} does not exist: popularity reads the encoded tables. "
                f"Run `python -m spark_jobs.encode --config <config>` (or spark_jobs.prepare) first."
            )
    train = spark.read.parquet(prepared_path(prepared, "train"))
    items = spark.read.parquet(prepared_path(prepared, "items"))
    total = train.count()
    if total == 0:
        raise ValueError(
            f"{prepared_path(prepared, 'train')} is empty: no train events to estimate item popularity "
            f"from. Check the split report in manifest.json."
        )
    out_path = prepared_path(prepared, TABLE)
    write_table_atomic(
        item_popularity(train, items, cfg.train.batch_size, cfg.prepare.popularity_floor_events), out_path
    )
    written = spark.read.parquet(out_path)
    summary = written.agg(
        F.count(F.lit(1)).alias("items"),
        F.sum(F.when(F.col("count") == 0, 1).otherwise(0)).alias("zero"),
        F.sum("count").alias("events"),
        F.max("probability").alias("max_p"),
        F.sum("probability").alias("sum_p"),
    ).first()
    return {
        "popularity": {
            "table": TABLE,
            "total_train_events": int(total),
            "floor_events": cfg.prepare.popularity_floor_events,
            "floor_probability": cfg.prepare.popularity_floor_events / total,
            "batch_size": cfg.train.batch_size,
            "items": int(summary["items"]),
            "items_with_zero_count": int(summary["zero"] or 0),
            # Below total only if train holds items missing from items/ (it should not).
            "counted_events": int(summary["events"] or 0),
            "max_probability": float(summary["max_p"]),
            # Above 1 by the floor mass of the never-clicked items.
            "probability_sum": float(summary["sum_p"]),
        }
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from spark_jobs.cli import run_job

    return run_job("Item popularity and logQ sampling probabilities from the train events", run, argv)


if __name__ == "__main__":
    main()
