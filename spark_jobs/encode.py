"""Split, vocabularies and the encoded tables: ``vocab/<feature>/``, ``items/``, ``train/``, ``eval/``.

    python -m spark_jobs.encode --config conf/ml-100k.yaml

reads ``validated/*`` under ``paths.prepared`` (written by ``spark_jobs.validate``) and writes the
tables of docs/data_contract.md next to them. Vocabularies come from train events and side tables
only, never from eval events:

* ``item_id``: every catalogue item, counted by train events (0 for never-clicked items, which
  still get their own index: cold items are what the SSL task is for);
* ``user_id``: users with train events, ``prepare.vocab_min_count`` applies (eval-only users -> 1);
* item features: catalogue rows; user features: users-table rows; ``vocab_min_count`` applies.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from common.config import Config, FeatureDecl
from common.features import FIRST_INDEX, HISTORY, ITEM_ID, OOV_INDEX, USER_ID, FeatureSpec, feature_column
from spark_jobs.io import path_exists, prepared_path, write_table_atomic
from spark_jobs.split import EVAL, TRAIN, add_history, split_log
from spark_jobs.vocab import build_vocab, feature_values, value_column

EMPTY_INT_ARRAY = "array<int>"


def _check_feature_names(cfg: Config) -> None:
    both = sorted(set(cfg.features.item) & set(cfg.features.user))
    if both:
        raise ValueError(
            f"feature name(s) {both} are declared under both features.item and features.user; "
            f"vocabularies and feature specs are keyed by name, so rename one side "
            f"(e.g. item_{both[0]} / user_{both[0]})."
        )


def _encode_features(df: DataFrame, key: str, decls: Mapping[str, FeatureDecl], vocabs: Mapping[str, DataFrame]) -> DataFrame:
    """``key`` plus one encoded ``f_<name>`` column per declared feature; ``key`` must be unique.

    Single-valued: int32, missing or unseen -> OOV. Multi-valued: array<int32> in the row's order of
    first appearance, unseen values -> OOV (once), empty when the row has no value.
    """
    staged = df.select(key, *[value_column(df, name, decl).alias(f"_v_{name}") for name, decl in decls.items()])
    out = staged
    for name, decl in decls.items():
        if name not in vocabs:
            raise ValueError(f"no vocabulary for feature {name!r}; build_vocabs() makes one per declared feature")
        col, raw = feature_column(name), f"_v_{name}"
        vocab = vocabs[name].select(F.col("value").alias(raw), F.col("index").alias(col))
        if decl.type != "multi":
            out = out.join(vocab, on=raw, how="left").withColumn(
                col, F.coalesce(F.col(col), F.lit(OOV_INDEX)).cast("int")
            )
        else:
            exploded = staged.select(key, F.posexplode(raw).alias("_pos", raw))
            mapped = (
                exploded.join(vocab, on=raw, how="left")
                .groupBy(key)
                # Sorting structs by their first field restores the row's value order.
                .agg(F.array_sort(F.collect_list(F.struct("_pos", F.coalesce(F.col(col), F.lit(OOV_INDEX)).alias("_i")))).alias("_s"))
                .select(key, F.array_distinct(F.transform("_s", lambda s: s["_i"])).cast(EMPTY_INT_ARRAY).alias(col))
            )
            out = out.join(mapped, on=key, how="left").withColumn(
                col, F.coalesce(F.col(col), F.array().cast(EMPTY_INT_ARRAY))
            )
        out = out.drop(raw)
    return out.select(key, *[feature_column(n) for n in decls])


def _id_lookup(vocab: DataFrame, key: str, column: str) -> DataFrame:
    return vocab.select(F.col("value").alias(key), F.col("index").alias(column))


def build_vocabs(
    log: DataFrame, items: DataFrame, users: Optional[DataFrame], cfg: Config
) -> dict[str, DataFrame]:
    """Every vocabulary by feature name, from the split log (``split`` column) and side tables."""
    _check_feature_names(cfg)
    min_count = cfg.prepare.vocab_min_count
    train = log.where(F.col("split") == TRAIN)
    vocabs = {
        ITEM_ID: build_vocab(
            train.select(F.col("item_id").alias("value")),
            min_count=1,
            keep_all=True,
            universe=items.select(F.col("item_id").alias("value")),
        ),
        USER_ID: build_vocab(train.select(F.col("user_id").alias("value")), min_count=min_count),
    }
    for name, decl in cfg.features.item.items():
        vocabs[name] = build_vocab(feature_values(items, name, decl), min_count=min_count)
    if cfg.features.user and users is None:
        raise ValueError(
            f"features.user declares {sorted(cfg.features.user)} but there is no users table "
            f"(validated/users); configure dataset.users or set features.user to {{}}"
        )
    for name, decl in cfg.features.user.items():
        vocabs[name] = build_vocab(feature_values(users, name, decl), min_count=min_count)
    return vocabs


def encode_items(items: DataFrame, vocabs: Mapping[str, DataFrame], cfg: Config) -> DataFrame:
    """The ``items/`` table: ``item_index``, ``item_id``, ``f_<name>`` per item feature, one row per
    catalogue item (never-clicked ones included)."""
    feats = _encode_features(items.withColumn("item_id", F.col("item_id").cast("string")), "item_id", cfg.features.item, vocabs)
    out = feats.join(_id_lookup(vocabs[ITEM_ID], "item_id", "_idx"), on="item_id", how="left")
    return out.select(
        F.coalesce(F.col("_idx"), F.lit(OOV_INDEX)).cast("int").alias("item_index"),
        "item_id",
        *[feature_column(n) for n in cfg.features.item],
    )


def encode_users(users: DataFrame, vocabs: Mapping[str, DataFrame], cfg: Config) -> DataFrame:
    """``user_id``, ``user_index`` (OOV for users without train events), ``f_<name>`` per user feature."""
    feats = _encode_features(users.withColumn("user_id", F.col("user_id").cast("string")), "user_id", cfg.features.user, vocabs)
    out = feats.join(_id_lookup(vocabs[USER_ID], "user_id", "_idx"), on="user_id", how="left")
    return out.select(
        "user_id",
        F.coalesce(F.col("_idx"), F.lit(OOV_INDEX)).cast("int").alias("user_index"),
        *[feature_column(n) for n in cfg.features.user],
    )


def event_columns(cfg: Config) -> list[str]:
    """Columns of ``train/`` and ``eval/``, in order."""
    return [
        "user_id",
        "item_id",
        "item_index",
        "timestamp",
        "user_index",
        *[feature_column(n) for n in cfg.features.user],
        "history",
        "cold",
    ]


def encode_log(
    log: DataFrame,
    items_encoded: DataFrame,
    users_encoded: Optional[DataFrame],
    vocabs: Mapping[str, DataFrame],
    cfg: Config,
) -> DataFrame:
    """The split log (``user_id, item_id, timestamp, split``) encoded: ``event_columns(cfg)`` + ``split``.

    Events whose item is not in ``items_encoded`` are dropped (validation already quarantines
    them as ``unknown_item``; ``run`` checks that none were lost). Users missing from the users
    table get OOV for single-valued features and an empty list for multi-valued ones.
    """
    out = log.join(items_encoded.select("item_id", "item_index"), on="item_id", how="inner")
    out = out.join(_id_lookup(vocabs[USER_ID], "user_id", "_uidx"), on="user_id", how="left").withColumn(
        "user_index", F.coalesce(F.col("_uidx"), F.lit(OOV_INDEX)).cast("int")
    ).drop("_uidx")
    user_cols = [feature_column(n) for n in cfg.features.user]
    if user_cols:
        if users_encoded is None:
            raise ValueError(
                f"features.user declares {sorted(cfg.features.user)} but no encoded users table was given"
            )
        out = out.join(users_encoded.select("user_id", *user_cols), on="user_id", how="left")
        for name, decl in cfg.features.user.items():
            col = feature_column(name)
            missing = F.array().cast(EMPTY_INT_ARRAY) if decl.type == "multi" else F.lit(OOV_INDEX).cast("int")
            out = out.withColumn(col, F.coalesce(F.col(col), missing))
    out = add_history(out, cfg.prepare.history_length)
    train_items = (
        log.where(F.col("split") == TRAIN).select("item_id").distinct().withColumn("_in_train", F.lit(True))
    )
    out = out.join(train_items, on="item_id", how="left").withColumn(
        "cold", (F.col("split") == EVAL) & F.col("_in_train").isNull()
    )
    return out.select(
        F.col("user_id").cast("string"),
        F.col("item_id").cast("string"),
        F.col("item_index").cast("int"),
        F.col("timestamp").cast("long"),
        "user_index",
        *user_cols,
        F.col("history").cast(EMPTY_INT_ARRAY),
        F.col("cold").cast("boolean"),
        "split",
    )


def encode_interactions(
    log: DataFrame,
    items_encoded: DataFrame,
    users_encoded: Optional[DataFrame],
    vocabs: Mapping[str, DataFrame],
    cfg: Config,
) -> tuple[DataFrame, DataFrame]:
    """``(train, eval)`` tables of the contract from the split log; see ``encode_log``."""
    encoded = encode_log(log, items_encoded, users_encoded, vocabs, cfg)
    return split_encoded(encoded)


def split_encoded(encoded: DataFrame) -> tuple[DataFrame, DataFrame]:
    train = encoded.where(F.col("split") == TRAIN).drop("split")
    evaluation = encoded.where(F.col("split") == EVAL).drop("split")
    return train, evaluation


def feature_specs(cfg: Config, vocab_sizes: Mapping[str, int]) -> list[FeatureSpec]:
    """Item id, item features, user id, user features, history (which shares the item id table)."""
    missing = [n for n in (ITEM_ID, USER_ID, *cfg.features.item, *cfg.features.user) if n not in vocab_sizes]
    if missing:
        raise ValueError(f"feature_specs: no vocab size for {missing}; got sizes for {sorted(vocab_sizes)}")

    def size(name: str) -> int:
        return max(int(vocab_sizes[name]), 2)

    def declared(name: str, decl: FeatureDecl, side: str) -> FeatureSpec:
        return FeatureSpec(name, side, decl.type, decl.type == "multi", feature_column(name), size(name))

    return [
        FeatureSpec(ITEM_ID, "item", "id", False, feature_column(ITEM_ID), size(ITEM_ID)),
        *[declared(n, d, "item") for n, d in cfg.features.item.items()],
        FeatureSpec(USER_ID, "user", "id", False, feature_column(USER_ID), size(USER_ID)),
        *[declared(n, d, "user") for n, d in cfg.features.user.items()],
        FeatureSpec(HISTORY, "user", "history", True, feature_column(HISTORY), size(ITEM_ID), shares_embedding_with=ITEM_ID),
    ]


def _read_validated(spark: SparkSession, prepared: str, table: str, required: bool) -> Optional[DataFrame]:
    path = prepared_path(prepared, "validated", table)
    if not path_exists(spark, path):
        if required:
            raise FileNotFoundError(
                f"{path} does not exist: encode reads the validated tables. Run "
                f"`python -m spark_jobs.validate --config <config>` (or spark_jobs.prepare) first, "
                f"with the same paths.prepared."
            )
        return None
    return spark.read.parquet(path)


def run(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Read ``validated/*``, write ``vocab/<feature>/``, ``items/``, ``train/``, ``eval/``; return
    the manifest sections ``split``, ``vocab``, ``features``, ``tables``, ``counts``."""
    _check_feature_names(cfg)
    prepared = cfg.paths.prepared
    split_cfg = cfg.prepare.split
    interactions = _read_validated(spark, prepared, "interactions", True).select("user_id", "item_id", "timestamp")
    items = _read_validated(spark, prepared, "items", True)
    users = _read_validated(spark, prepared, "users", False)

    cached: list[DataFrame] = []
    try:
        interactions = interactions.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(interactions)
        log, boundary, withheld_rows = split_log(interactions, split_cfg)
        log = log.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(log)

        tables: dict[str, str] = {}
        vocabs: dict[str, DataFrame] = {}
        vocab_section: dict[str, dict[str, int]] = {}
        for name, vocab in build_vocabs(log, items, users, cfg).items():
            rel = f"vocab/{name}"
            write_table_atomic(vocab, prepared_path(prepared, rel))
            # Reading back the small written table is cheaper than recomputing its lineage.
            vocabs[name] = spark.read.parquet(prepared_path(prepared, rel))
            tables[rel] = rel
            stats = vocabs[name].agg(F.count(F.lit(1)).alias("values"), F.max("index").alias("top")).first()
            vocab_section[name] = {
                # max index + 1, at least the two reserved rows (vocab.vocab_size, in one pass).
                "size": max(int(stats["top"] or 0) + 1, FIRST_INDEX),
                "values": int(stats["values"]),
                "min_count": 1 if name == ITEM_ID else cfg.prepare.vocab_min_count,
            }

        write_table_atomic(encode_items(items, vocabs, cfg), prepared_path(prepared, "items"))
        items_encoded = spark.read.parquet(prepared_path(prepared, "items"))
        tables["items"] = "items"
        users_encoded = encode_users(users, vocabs, cfg) if users is not None else None

        encoded = encode_log(log, items_encoded, users_encoded, vocabs, cfg).persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(encoded)
        per_split = {
            r["split"]: r
            for r in encoded.groupBy("split")
            .agg(
                F.count(F.lit(1)).alias("rows"),
                F.countDistinct("user_id").alias("users"),
                F.sum(F.col("cold").cast("long")).alias("cold_rows"),
                F.countDistinct(F.when(F.col("cold"), F.col("item_id"))).alias("cold_items"),
            )
            .collect()
        }
        train_rows = int(per_split[TRAIN]["rows"]) if TRAIN in per_split else 0
        eval_rows = int(per_split[EVAL]["rows"]) if EVAL in per_split else 0
        input_rows = interactions.count()
        if train_rows + eval_rows + withheld_rows != input_rows:
            raise ValueError(
                f"{input_rows - train_rows - eval_rows} of {input_rows} events in validated/interactions "
                f"reference items missing from validated/items; validation should have quarantined them "
                f"as unknown_item. Rerun spark_jobs.validate on the same inputs."
            )
        if train_rows == 0:
            raise ValueError(
                f"the {split_cfg.kind} split put all {input_rows} events in eval (boundary {boundary}); "
                f"lower prepare.split.eval_fraction or check that timestamps are not all equal."
            )
        if eval_rows == 0:
            raise ValueError(
                f"the {split_cfg.kind} split left eval empty ({input_rows} events); every user has at "
                f"most prepare.split.leave_last_n={split_cfg.leave_last_n} events. Lower leave_last_n "
                f"or use prepare.split.kind: time."
            )
        users_row = encoded.agg(
            F.countDistinct("user_id").alias("users"),
            F.countDistinct(F.when((F.col("split") == EVAL) & (F.col("user_index") == OOV_INDEX), F.col("user_id"))).alias("eval_oov_users"),
        ).first()

        train, evaluation = split_encoded(encoded)
        write_table_atomic(train, prepared_path(prepared, "train"))
        write_table_atomic(evaluation, prepared_path(prepared, "eval"))
        tables["train"] = "train"
        tables["eval"] = "eval"

        sizes = {name: sec["size"] for name, sec in vocab_section.items()}
        split_section: dict[str, Any] = {
            "kind": split_cfg.kind,
            "holdout": split_cfg.holdout,
            "boundary": boundary,
            "eval_fraction": split_cfg.eval_fraction if split_cfg.kind == "time" else None,
            "leave_last_n": split_cfg.leave_last_n if split_cfg.kind == "leave_last" else None,
            "history_length": cfg.prepare.history_length,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "withheld_eval_rows": withheld_rows,
            "train_users": int(per_split[TRAIN]["users"]),
            "eval_users": int(per_split[EVAL]["users"]),
            "eval_users_oov": int(users_row["eval_oov_users"]),
            "cold_eval_rows": int(per_split[EVAL]["cold_rows"] or 0),
            "cold_eval_items": int(per_split[EVAL]["cold_items"]),
        }
        return {
            "split": split_section,
            "vocab": vocab_section,
            "features": [s.to_json() for s in feature_specs(cfg, sizes)],
            "tables": tables,
            "counts": {
                "items": items_encoded.count(),
                "train": train_rows,
                "eval": eval_rows,
                "users": int(users_row["users"]),
            },
        }
    finally:
        for df in reversed(cached):
            df.unpersist()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from spark_jobs.cli import run_job

    return run_job("Split the validated log, build vocabularies and write the encoded tables", run, argv)


if __name__ == "__main__":
    main()
