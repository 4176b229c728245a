"""Validation: split the raw inputs into usable rows and quarantined rows, dropping nothing.

Every raw row ends up in exactly one place: ``validated/<table>`` or ``quarantine/<table>`` with a
``reason``. ``validation_report`` counts both and refuses a table whose counts do not add up.

Rules (a row gets the first reason that applies, in this order):

* interactions: ``null_user_id``, ``null_item_id`` (null or empty after trimming), ``bad_time``
  (see ``parse_time``), ``unknown_item`` (the item is not in the validated catalogue).
  Interactions whose user has no row in the users table are kept: they get out-of-vocabulary user
  features later. The report counts them as ``users_without_features``.
* items: ``null_item_id``, ``duplicate_item``; users: ``null_user_id``, ``duplicate_user``. Of rows
  sharing an id, the first by sorted content (every column cast to string, in column order, nulls
  first) is kept, so the choice does not depend on file order or partitioning.

Ids are trimmed in the validated tables (whitespace around an id is a CSV artefact, and ``" 7"``
must join with ``"7"``); quarantined rows keep the raw text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common.config import Config
from spark_jobs.cli import run_job
from spark_jobs.io import delete_path, path_exists, prepared_path, write_table_atomic
from spark_jobs.sources import RawInputs, load_sources

REASONS: dict[str, tuple[str, ...]] = {
    "interactions": ("null_user_id", "null_item_id", "bad_time", "unknown_item"),
    "items": ("null_item_id", "duplicate_item"),
    "users": ("null_user_id", "duplicate_user"),
}

# Internal column names; the ``__v_`` prefix keeps them clear of any raw feature column.
_ID = "__v_id"
_ROW = "__v_row"
_REASON = "reason"


@dataclass(frozen=True)
class Validated:
    interactions: DataFrame  # user_id string, item_id string, timestamp long (epoch seconds)
    items: DataFrame  # item_id + raw feature cols, ids non-null, non-empty, unique
    users: Optional[DataFrame]
    quarantine: dict[str, DataFrame]  # table name -> raw columns cast to string + `reason`


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------


def _blank(c: Column) -> Column:
    return c.isNull() | (F.trim(c) == F.lit(""))


def parse_time(c: Column, dtype: T.DataType) -> Column:
    """Epoch seconds (long) of a raw time column, or null when it does not parse.

    Accepted: integer columns; floating/decimal columns holding whole numbers; strings that are
    whole numbers (``"1260759144"``, ``"1.26e9"``), all as epoch seconds; timestamp and date
    columns; other strings through Spark's ``try_to_timestamp`` (ISO-8601-like, e.g.
    ``2020-01-02``, ``2020-01-02 03:04:05``, ``2020-01-02T03:04:05Z``; no zone = session zone).
    Fractional numbers are rejected rather than truncated: they usually mean a unit mistake.
    """
    if isinstance(dtype, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        return c.cast("long")
    if isinstance(dtype, (T.FloatType, T.DoubleType, T.DecimalType)):
        return _whole_number(c.cast("double"))
    if isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
        return F.unix_seconds(c.cast("timestamp"))
    if isinstance(dtype, T.StringType):
        s = F.trim(c)
        as_number = s.try_cast("double")
        return F.when(as_number.isNotNull(), _whole_number(as_number)).otherwise(
            F.unix_seconds(F.try_to_timestamp(s))
        )
    # Booleans, arrays, binary...: no reading of these is a time.
    return F.lit(None).cast("long")


def _whole_number(d: Column) -> Column:
    # try_cast: NaN, infinities and values beyond the long range become null instead of failing.
    as_long = d.try_cast("long")
    return F.when(as_long.cast("double") == d, as_long)


def _row_order(columns: list[str]) -> list[Column]:
    return [F.col(f"`{c}`").cast("string").asc_nulls_first() for c in columns]


def tag_entities(df: DataFrame, id_col: str, null_reason: str, duplicate_reason: str) -> DataFrame:
    """Every row of an item/user table, plus ``__v_id`` (trimmed id) and ``reason`` (null = keep)."""
    columns = df.columns
    tagged = df.withColumn(_ID, F.trim(F.col(id_col)))
    first = Window.partitionBy(_ID).orderBy(*_row_order(columns))
    tagged = tagged.withColumn(_ROW, F.row_number().over(first))
    reason = (
        F.when(_blank(F.col(id_col)), F.lit(null_reason))
        .when(F.col(_ROW) > 1, F.lit(duplicate_reason))
        .otherwise(F.lit(None).cast("string"))
    )
    return tagged.withColumn(_REASON, reason).drop(_ROW)


def tag_interactions(interactions: DataFrame, kept_items: DataFrame) -> DataFrame:
    """Every raw interaction plus ``__v_user``, ``__v_id`` (item), ``__v_ts`` and ``reason``."""
    time_type = interactions.schema["time"].dataType
    known = kept_items.select(F.col("item_id").alias("__v_known"))
    tagged = (
        interactions.withColumn("__v_user", F.trim("user_id"))
        .withColumn(_ID, F.trim("item_id"))
        .withColumn("__v_ts", parse_time(F.col("time"), time_type))
        # Left join on unique catalogue ids: each interaction row stays exactly one row.
        .join(known, on=F.col(_ID) == F.col("__v_known"), how="left")
    )
    reason = (
        F.when(_blank(F.col("user_id")), F.lit("null_user_id"))
        .when(_blank(F.col("item_id")), F.lit("null_item_id"))
        .when(F.col("__v_ts").isNull(), F.lit("bad_time"))
        .when(F.col("__v_known").isNull(), F.lit("unknown_item"))
        .otherwise(F.lit(None).cast("string"))
    )
    return tagged.withColumn(_REASON, reason).drop("__v_known")


def _kept_entities(tagged: DataFrame, raw_columns: list[str], id_col: str) -> DataFrame:
    rest = [F.col(f"`{c}`") for c in raw_columns if c != id_col]
    return tagged.where(F.col(_REASON).isNull()).select(F.col(_ID).alias(id_col), *rest)


def _quarantined(tagged: DataFrame, raw_columns: list[str]) -> DataFrame:
    cols = [F.col(f"`{c}`").cast("string").alias(c) for c in raw_columns]
    return tagged.where(F.col(_REASON).isNotNull()).select(*cols, _REASON)


def _split(raw: RawInputs) -> tuple[dict[str, DataFrame], Validated]:
    """The tagged tables (every raw row, with a reason or null) and the Validated view of them."""
    tagged: dict[str, DataFrame] = {
        "items": tag_entities(raw.items, "item_id", "null_item_id", "duplicate_item")
    }
    if raw.users is not None:
        tagged["users"] = tag_entities(raw.users, "user_id", "null_user_id", "duplicate_user")
    items = _kept_entities(tagged["items"], raw.items.columns, "item_id")
    tagged["interactions"] = tag_interactions(raw.interactions, items)
    return tagged, _validated_from_tagged(raw, tagged)


def _validated_from_tagged(raw: RawInputs, tagged: dict[str, DataFrame]) -> Validated:
    inter = tagged["interactions"].where(F.col(_REASON).isNull()).select(
        F.col("__v_user").alias("user_id"), F.col(_ID).alias("item_id"), F.col("__v_ts").alias("timestamp")
    )
    users = None
    if raw.users is not None:
        users = _kept_entities(tagged["users"], raw.users.columns, "user_id")
    quarantine = {
        "interactions": _quarantined(tagged["interactions"], raw.interactions.columns),
        "items": _quarantined(tagged["items"], raw.items.columns),
    }
    if raw.users is not None:
        quarantine["users"] = _quarantined(tagged["users"], raw.users.columns)
    return Validated(
        interactions=inter,
        items=_kept_entities(tagged["items"], raw.items.columns, "item_id"),
        users=users,
        quarantine=quarantine,
    )


def validate(raw: RawInputs) -> Validated:
    """Split every raw table into kept rows and quarantined rows (lazy; nothing runs here)."""
    for name, df, needed in (
        ("interactions", raw.interactions, ("user_id", "item_id", "time")),
        ("items", raw.items, ("item_id",)),
        ("users", raw.users, ("user_id",)),
    ):
        if df is not None:
            missing = [c for c in needed if c not in df.columns]
            if missing:
                raise ValueError(
                    f"raw {name} table from {raw.origin.get(name, '?')} lacks standard column(s) "
                    f"{missing} (has {df.columns}); load it with spark_jobs.sources.load_sources"
                )
    return _split(raw)[1]


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def _tables(raw: RawInputs, validated: Validated) -> dict[str, tuple[DataFrame, DataFrame]]:
    out = {"interactions": (raw.interactions, validated.interactions), "items": (raw.items, validated.items)}
    if raw.users is not None:
        if validated.users is None:
            raise ValueError("raw inputs have a users table but the validated inputs do not")
        out["users"] = (raw.users, validated.users)
    return out


def validation_report(raw: RawInputs, validated: Validated) -> dict[str, Any]:
    """``{table: {"input": n, "kept": n, "quarantined": {reason: n}}}`` (runs Spark counts).

    Interactions also get ``users_without_features``: kept interaction rows whose user has no row
    in the validated users table (all of them when there is no users table).
    Raises when ``input != kept + sum(quarantined)`` for any table.
    """
    report: dict[str, Any] = {}
    for name, (raw_df, kept_df) in _tables(raw, validated).items():
        n_in = raw_df.count()
        n_kept = kept_df.count()
        by_reason = {r: 0 for r in REASONS[name]}
        for row in validated.quarantine[name].groupBy(_REASON).count().collect():
            by_reason[row[_REASON]] = int(row["count"])
        n_quarantined = sum(by_reason.values())
        if n_in != n_kept + n_quarantined:
            raise RuntimeError(
                f"validation lost rows of {name} ({raw.origin.get(name, '?')}): {n_in} read, "
                f"{n_kept} kept + {n_quarantined} quarantined {by_reason}; this is a bug in "
                f"spark_jobs.validate, please report it with the input"
            )
        report[name] = {"input": n_in, "kept": n_kept, "quarantined": by_reason}
    if validated.users is None:
        without = report["interactions"]["kept"]
    else:
        without = validated.interactions.join(
            validated.users.select("user_id"), on="user_id", how="left_anti"
        ).count()
    report["interactions"]["users_without_features"] = int(without)
    return report


# ---------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------


def write_validated(spark: SparkSession, raw: RawInputs, root: str) -> Validated:
    """Validate ``raw`` and write ``validated/<table>`` and ``quarantine/<table>`` under ``root``
    atomically; return a ``Validated`` that reads the written tables back (so later steps do not
    recompute validation). Stale users tables from an earlier run are removed when there is no
    users table now."""
    tagged, validated = _split(raw)
    # Each tagged table feeds two writes (kept and quarantined); compute it once.
    for df in tagged.values():
        df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        outputs: dict[str, DataFrame] = {
            "validated/interactions": validated.interactions,
            "validated/items": validated.items,
        }
        if validated.users is not None:
            outputs["validated/users"] = validated.users
        for name, q in validated.quarantine.items():
            outputs[f"quarantine/{name}"] = q
        for rel, df in outputs.items():
            write_table_atomic(df, prepared_path(root, rel))
    finally:
        for df in tagged.values():
            df.unpersist()
    if raw.users is None:
        for rel in ("validated/users", "quarantine/users"):
            if path_exists(spark, prepared_path(root, rel)):
                delete_path(spark, prepared_path(root, rel))

    def read(rel: str) -> DataFrame:
        return spark.read.parquet(prepared_path(root, rel))

    return Validated(
        interactions=read("validated/interactions"),
        items=read("validated/items"),
        users=read("validated/users") if raw.users is not None else None,
        quarantine={name: read(f"quarantine/{name}") for name in validated.quarantine},
    )


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """load_sources -> validate -> write under ``paths.prepared`` -> ``{"validate": report}``."""
    raw = load_sources(spark, cfg)
    written = write_validated(spark, raw, cfg.paths.prepared)
    return {"validate": validation_report(raw, written)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run_job(
        "Validate raw inputs: write validated/<table> and quarantine/<table> under paths.prepared "
        "and the 'validate' section of manifest.json.",
        run,
        argv,
    )


if __name__ == "__main__":
    main()
