"""Train/eval split of the event log and the leakage-free user history feature.

Split kinds (``prepare.split``):

* ``time``: one global boundary ``B``, the timestamp at the ``1 - eval_fraction`` quantile of
  the events; events with ``timestamp >= B`` are eval. ``B`` is exact: with the ``n`` event
  timestamps sorted ascending, ``B = t[k]`` with ``k = floor((1 - eval_fraction) * n)`` (exact
  rational arithmetic on the configured fraction, ``k`` capped at ``n - 1``). Events that share
  ``B``'s second all go to eval, so eval may hold slightly more than ``eval_fraction``.
* ``leave_last``: each user's last ``leave_last_n`` events, ordered by ``(timestamp, item_id)``,
  are eval. A user with ``leave_last_n`` events or fewer stays entirely in train, so that every
  eval user has at least one train event.

Holdout (``prepare.split.holdout``): ``eval`` keeps the split as is. ``validation`` drops the eval
events (``withhold_eval``) and splits the remaining train events again by the same rule
(``split_log``), so ``eval/`` then holds a validation split carved from train: hyper-parameters are
chosen there without ever reading the eval split. The withheld events are counted in the
manifest (``split.withheld_eval_rows``), not quarantined: they are valid, just not this run's.

History: the item indices of the user's last ``history_length`` events strictly before the
event (oldest first), over the whole log. Events of one user that share a second have no true
order: none sees the others, and when they enter a later event's history they do so in
ascending ``item_index`` order.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from common.config import SplitConfig

TRAIN = "train"
EVAL = "eval"


def boundary_rank(n: int, eval_fraction: float) -> int:
    """0-based rank ``k`` of the boundary among ``n`` sorted timestamps.

    ``Fraction(repr(f))`` reads the fraction as the decimal the config wrote (0.1, not
    0.1000000000000000055...), so ``(1 - 0.1) * 30`` is exactly 27, never 26.999....
    """
    if n < 1:
        raise ValueError("boundary_rank needs at least one event")
    k = math.floor((1 - Fraction(repr(float(eval_fraction)))) * n)
    return min(max(k, 0), n - 1)


def time_boundary(interactions: DataFrame, split_cfg: SplitConfig) -> Optional[int]:
    """The time split's boundary (an action); ``None`` for ``leave_last``.

    Exact, not approximate: counts per distinct timestamp, then a running sum over timestamps in
    order. The ordered window sees one row per distinct second, not one per event.
    """
    if split_cfg.kind != "time":
        return None
    per_ts = interactions.where(F.col("timestamp").isNotNull()).groupBy("timestamp").agg(F.count(F.lit(1)).alias("n"))
    total = per_ts.agg(F.sum("n").alias("n")).first()["n"]
    if not total:
        raise ValueError(
            "validated/interactions holds no events: nothing to split. Check the interaction "
            "source path and the validate report (quarantine/interactions) for dropped rows."
        )
    k = boundary_rank(int(total), split_cfg.eval_fraction)
    running = Window.orderBy("timestamp").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    row = (
        per_ts.withColumn("upto", F.sum("n").over(running))
        # t[k] is the first timestamp whose running count exceeds k.
        .where(F.col("upto") > k)
        .agg(F.min("timestamp").alias("b"))
        .first()
    )
    return int(row["b"])


def assign_split(interactions: DataFrame, split_cfg: SplitConfig, boundary: Optional[int]) -> DataFrame:
    """``interactions`` plus ``split`` string, ``'train'`` or ``'eval'``."""
    if split_cfg.kind == "time":
        if boundary is None:
            raise ValueError("a time split needs the boundary from time_boundary(); got None")
        is_eval = F.col("timestamp") >= F.lit(int(boundary))
        return interactions.withColumn("split", F.when(is_eval, F.lit(EVAL)).otherwise(F.lit(TRAIN)))
    if split_cfg.kind == "leave_last":
        n = split_cfg.leave_last_n
        latest_first = Window.partitionBy("user_id").orderBy(F.col("timestamp").desc(), F.col("item_id").desc())
        per_user = Window.partitionBy("user_id")
        is_eval = (F.row_number().over(latest_first) <= n) & (F.count(F.lit(1)).over(per_user) > n)
        return interactions.withColumn("split", F.when(is_eval, F.lit(EVAL)).otherwise(F.lit(TRAIN)))
    raise ValueError(f"unknown prepare.split.kind {split_cfg.kind!r}; expected 'time' or 'leave_last'")


def withhold_eval(log: DataFrame) -> DataFrame:
    """The train events of a split log, without the ``split`` column (the input of a second split)."""
    return log.where(F.col("split") == TRAIN).drop("split")


def split_log(interactions: DataFrame, split_cfg: SplitConfig) -> tuple[DataFrame, Optional[int], int]:
    """``(log with split column, boundary, withheld eval rows)`` per ``split_cfg.holdout``: the
    eval/train split, or (``validation``) the split of the train part. Computes the boundaries
    (actions); the returned log is lazy."""
    boundary = time_boundary(interactions, split_cfg)
    log = assign_split(interactions, split_cfg, boundary)
    if split_cfg.holdout == "eval":
        return log, boundary, 0
    if split_cfg.holdout != "validation":
        raise ValueError(f"unknown prepare.split.holdout {split_cfg.holdout!r}; expected 'eval' or 'validation'")
    withheld = log.where(F.col("split") == EVAL).count()
    inner = withhold_eval(log)
    inner_boundary = time_boundary(inner, split_cfg)
    return assign_split(inner, split_cfg, inner_boundary), inner_boundary, int(withheld)


def _last_n(arr: Column, n: int) -> Column:
    # slice(arr, -n, n) returns [] when the array is shorter than n, hence the explicit start.
    return F.slice(arr, F.greatest(F.size(arr) - F.lit(n - 1), F.lit(1)), F.lit(n))


def add_history(interactions: DataFrame, history_length: int) -> DataFrame:
    """``interactions`` (``user_id``, ``timestamp``, ``item_index``) plus ``history`` array<int32>.

    Cost is linear in the log: events are grouped per (user, second), each group keeps its last
    ``history_length`` items, and a bounded window collects at most ``history_length`` previous
    groups per group (each group holds at least one event, so that many groups always cover the
    last ``history_length`` events). No per-row list over the user's whole past.
    """
    if history_length < 0:
        raise ValueError(f"history_length must be >= 0, got {history_length}")
    if history_length == 0:
        return interactions.withColumn("history", F.array().cast("array<int>"))
    n = history_length
    groups = interactions.groupBy("user_id", "timestamp").agg(
        _last_n(F.array_sort(F.collect_list(F.col("item_index").cast("int"))), n).alias("_items")
    )
    previous = Window.partitionBy("user_id").orderBy("timestamp").rowsBetween(-n, -1)
    histories = groups.select(
        "user_id",
        "timestamp",
        _last_n(F.flatten(F.collect_list("_items").over(previous)), n).alias("history"),
    )
    out = interactions.join(histories, on=["user_id", "timestamp"], how="left")
    return out.select(
        *interactions.columns,
        F.coalesce(F.col("history"), F.array().cast("array<int>")).alias("history"),
    )
