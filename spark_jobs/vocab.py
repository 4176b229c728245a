"""Vocabularies: raw feature values -> dense indices (``vocab/<feature>/`` in the contract).

Every feature, whatever its raw form, is first normalised to strings:

* ``categorical``: any scalar cast to string and trimmed; null and empty are missing.
* ``multi``: an ``array<...>`` column, or a string split on the feature's ``sep``; each value is
  trimmed, empties are dropped and a row's repeated values count once (first appearance kept).
* ``bucketized``: a number (or a numeric string) cut at the declared boundaries into left-closed
  buckets labelled ``"(-inf,18)"``, ``"[18,25)"``, ``"[65,inf)"``; unparseable and NaN are missing.

``build_vocab`` then gives each value an index from ``FIRST_INDEX`` (2) by count descending,
value ascending, so the same input always yields the same indices whatever its row order or
partitioning. Values under ``min_count`` get no row: encoding maps them to ``OOV_INDEX`` (1).
"""

from __future__ import annotations

import math
import re
from typing import Optional

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common.config import FeatureDecl
from common.features import FIRST_INDEX

VOCAB_COLUMNS = ("value", "index", "count")


def _format_boundary(b: float) -> str:
    # 18.0 -> "18" so that labels read like the YAML that declared them; 2.5 stays "2.5".
    if math.isfinite(b) and float(b).is_integer() and abs(b) < 1e15:
        return str(int(b))
    return repr(float(b))


def bucket_labels(boundaries: tuple[float, ...] | list[float]) -> list[str]:
    """Labels of the ``len(boundaries) + 1`` buckets, lowest first.

    Bucket ``i`` holds ``boundaries[i-1] <= x < boundaries[i]``, the same convention as
    ``numpy.digitize(x, boundaries)`` (which returns ``i``).
    """
    b = [_format_boundary(x) for x in boundaries]
    if not b:
        raise ValueError("bucket_labels needs at least one boundary")
    labels = [f"(-inf,{b[0]})"]
    labels += [f"[{lo},{hi})" for lo, hi in zip(b[:-1], b[1:])]
    labels.append(f"[{b[-1]},inf)")
    return labels


def _column_type(df: DataFrame, name: str) -> T.DataType:
    if name not in df.columns:
        raise ValueError(
            f"feature column {name!r} is missing: the table has columns {df.columns}. Declare only "
            f"features that the source table provides (features.item / features.user in the config)."
        )
    return df.schema[name].dataType


def _clean_string(c: Column) -> Column:
    """Trimmed string, null when empty."""
    t = F.trim(c.cast("string"))
    return F.when(F.length(t) > 0, t)


def value_column(df: DataFrame, name: str, decl: FeatureDecl) -> Column:
    """The normalised value(s) of feature ``name`` for each row of ``df``.

    ``categorical``/``bucketized``: a string column, null when missing.
    ``multi``: an ``array<string>`` column without nulls, empties or repeats (first appearance
    order kept), empty when the row has no value.
    """
    dtype = _column_type(df, name)
    col = F.col(name)
    if decl.type == "categorical":
        if isinstance(dtype, (T.ArrayType, T.MapType, T.StructType)):
            raise ValueError(
                f"categorical feature {name!r} arrived as {dtype.simpleString()}; a categorical "
                f"feature needs one scalar per row. Declare it as 'multi' if it holds lists."
            )
        return _clean_string(col)
    if decl.type == "multi":
        if isinstance(dtype, T.ArrayType):
            parts = col.cast("array<string>")
        elif isinstance(dtype, (T.MapType, T.StructType)):
            raise ValueError(
                f"multi feature {name!r} arrived as {dtype.simpleString()}; expected array<string> "
                f"or a string separated by {decl.sep!r}"
            )
        else:
            # split() takes a Java regex; re.escape output is valid Java regex for any separator.
            parts = F.split(col.cast("string"), re.escape(decl.sep))
        cleaned = F.filter(F.transform(parts, lambda v: F.trim(v)), lambda v: v.isNotNull() & (F.length(v) > 0))
        # A null column (no value at all) is an empty list, not a null list.
        return F.coalesce(F.array_distinct(cleaned), F.array().cast("array<string>"))
    if decl.type == "bucketized":
        if isinstance(dtype, (T.ArrayType, T.MapType, T.StructType)):
            raise ValueError(
                f"bucketized feature {name!r} arrived as {dtype.simpleString()}; expected a number "
                f"or a numeric string"
            )
        # try_cast: under ANSI mode (the Spark 4 default) a plain cast of "abc" fails the job.
        x = F.trim(col.cast("string")).try_cast("double")
        labels = bucket_labels(decl.boundaries)
        expr = F.when(x.isNull() | F.isnan(x), F.lit(None).cast("string"))
        for boundary, label in zip(decl.boundaries, labels[:-1]):
            expr = expr.when(x < F.lit(float(boundary)), F.lit(label))
        return expr.otherwise(F.lit(labels[-1]))
    raise ValueError(f"feature {name!r} has unknown type {decl.type!r}")


def feature_values(df: DataFrame, name: str, decl: FeatureDecl) -> DataFrame:
    """One ``value`` string per (row, distinct value of the row); missing values are dropped."""
    v = value_column(df, name, decl)
    if decl.type == "multi":
        return df.select(F.explode(v).alias("value"))
    return df.select(v.alias("value")).where(F.col("value").isNotNull())


def build_vocab(
    values_df: DataFrame,
    min_count: int,
    keep_all: bool = False,
    universe: Optional[DataFrame] = None,
) -> DataFrame:
    """``[value string, index int32, count long]`` from a column ``value`` of occurrences.

    ``universe`` (a ``value`` column) lists values that exist even when they never occur, with
    count 0: the item id vocabulary counts train events but must index the whole catalogue.
    ``keep_all`` keeps values under ``min_count`` (ids are exempt from the threshold).
    Indices start at 2 and follow count descending, then value ascending.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = (
        values_df.where(F.col("value").isNotNull())
        .groupBy("value")
        .agg(F.count(F.lit(1)).alias("count"))
    )
    if universe is not None:
        known = universe.select(F.col("value").cast("string").alias("value")).where(F.col("value").isNotNull()).distinct()
        counts = known.join(counts, on="value", how="full").select(
            "value", F.coalesce(F.col("count"), F.lit(0)).alias("count")
        )
    if not keep_all:
        counts = counts.where(F.col("count") >= min_count)
    # One window without partitions: a vocabulary holds one row per distinct value, which is
    # small next to the event log, and a total order is what makes the indices deterministic.
    order = Window.orderBy(F.col("count").desc(), F.col("value").asc())
    return counts.select(
        F.col("value").cast("string").alias("value"),
        (F.row_number().over(order) + (FIRST_INDEX - 1)).cast("int").alias("index"),
        F.col("count").cast("long").alias("count"),
    )


def vocab_size(vocab: DataFrame) -> int:
    """Rows the embedding table needs: max index + 1, at least 2 (the reserved 0 and 1). An action."""
    row = vocab.agg(F.max("index").alias("m")).first()
    top = row["m"] if row is not None else None
    return max(int(top) + 1, FIRST_INDEX) if top is not None else FIRST_INDEX
