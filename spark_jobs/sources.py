"""Raw inputs in one standard shape, whatever the dataset kind.

``load_sources`` turns a dataset (user tables, a MovieLens release or the synthetic generator)
into ``RawInputs``: an ``interactions`` table (``user_id``, ``item_id``, ``time`` as read), an
``items`` table (``item_id`` plus one raw column per declared item feature, named as the feature)
and an optional ``users`` table. Nothing is parsed or filtered here beyond renaming, id casting and
deriving the MovieLens feature columns: ``spark_jobs.validate`` decides which rows are usable and
quarantines the others, so every row is accounted for in one place.

MovieLens files are checked against pinned sha256 sums: the loaders parse one exact release and a
different release would silently change the benchmark numbers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import pyarrow.fs as pafs
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common.config import Config, EntitySource, FeatureDecl, InteractionsSource, TableFormat
from common.manifest import join
from spark_jobs.io import path_exists, qualify, read_table


@dataclass(frozen=True)
class RawInputs:
    interactions: DataFrame  # user_id string, item_id string, time (as read)
    items: DataFrame  # item_id string + one raw column per declared item feature
    users: Optional[DataFrame]  # user_id string + raw user feature columns, or None
    origin: dict[str, str]  # table name -> where it came from (file path / "synthetic")


# ---------------------------------------------------------------------------------------------
# MovieLens releases: files, pinned checksums, archives
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MovieLensRelease:
    name: str
    url: str
    # Folder inside the GroupLens zip that holds the files.
    archive_folder: str
    sha256: Mapping[str, str]


MOVIELENS = {
    "movielens-100k": MovieLensRelease(
        name="MovieLens 100K",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        archive_folder="ml-100k",
        sha256={
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
            "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
        },
    ),
    "movielens-latest-small": MovieLensRelease(
        name="MovieLens latest-small (2016 release)",
        url="https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
        archive_folder="ml-latest-small",
        sha256={
            "ratings.csv": "b4239649fbf90ebf405c56c3ae1d929d9e7c86fc1a3a80cbef1c884df593ef73",
            "movies.csv": "43d1736d3c688eb5b7856473c36d86a1c345676cab256c91720c1f6984d263b5",
            "tags.csv": "ba8789ec2e7894bcb29a1762b2f9fb34bad7f288be6b4d8388e86af2138d430e",
        },
    ),
}

# Features each built-in loader can derive; declaring anything else is an error that lists these.
OFFERED_FEATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "movielens-100k": {
        "item": ("genres", "year", "title_tokens"),
        "user": ("age", "gender", "occupation", "zip_prefix"),
    },
    "movielens-latest-small": {
        "item": ("genres", "year", "title_tokens", "tags"),
        "user": (),
    },
    "synthetic": {
        "item": ("category", "subcategory", "brand", "color", "price", "tags"),
        "user": ("region", "age"),
    },
}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_sources(spark: SparkSession, cfg: Config) -> RawInputs:
    """Read the configured dataset into the standard raw shape (lazy except for emptiness checks)."""
    kind = cfg.dataset.kind
    if kind == "tables":
        raw = _load_tables(spark, cfg)
    elif kind == "movielens-100k":
        raw = _load_movielens_100k(spark, cfg)
    elif kind == "movielens-latest-small":
        raw = _load_movielens_latest_small(spark, cfg)
    elif kind == "synthetic":
        raw = _load_synthetic(spark, cfg)
    else:  # the config's Literal type makes this unreachable; kept for a clear message
        raise ValueError(f"unknown dataset.kind {kind!r}")
    for name, df in (("interactions", raw.interactions), ("items", raw.items), ("users", raw.users)):
        if df is not None and df.isEmpty():
            raise ValueError(
                f"the {name} table read from {raw.origin[name]} has 0 rows; an empty {name} table "
                f"cannot be prepared. Check the path and format in the config (dataset.{name})."
            )
    return raw


# ---------------------------------------------------------------------------------------------
# dataset.kind: tables
# ---------------------------------------------------------------------------------------------


def _col(name: str) -> Column:
    # Backticks so that column names holding dots or spaces are taken literally.
    return F.col("`" + name.replace("`", "``") + "`")


def _read_user_table(spark: SparkSession, src: TableFormat, key: str) -> DataFrame:
    if not src.path:
        raise ValueError(f"{key}.path is empty; set it to the table's location")
    if not path_exists(spark, src.path):
        raise FileNotFoundError(
            f"input table {src.path!r} (config key {key}.path) does not exist; "
            f"fix the path, e.g. --set {key}.path=/data/{key.rsplit('.', 1)[-1]}.parquet"
        )
    return read_table(spark, src.path, src.format, src.sep, src.header)


def _require_columns(df: DataFrame, path: str, wanted: Sequence[tuple[str, str]]) -> None:
    """``wanted`` holds (column, config key that names it); all missing ones are reported at once."""
    have = df.columns
    missing = [(c, k) for c, k in wanted if c not in have]
    if missing:
        lines = "; ".join(f"column {c!r} (from config key {k})" for c, k in missing)
        raise ValueError(
            f"{path}: missing {lines}. Columns present: {have}. Either rename the column in the "
            f"file or point the config key at an existing column (for features, rename the "
            f"feature to the column's name)."
        )


def _load_tables(spark: SparkSession, cfg: Config) -> RawInputs:
    ds = cfg.dataset
    inter_src: InteractionsSource = ds.interactions
    inter = _read_user_table(spark, inter_src, "dataset.interactions")
    _require_columns(
        inter,
        inter_src.path,
        [
            (inter_src.user, "dataset.interactions.user"),
            (inter_src.item, "dataset.interactions.item"),
            (inter_src.time, "dataset.interactions.time"),
        ],
    )
    interactions = inter.select(
        _col(inter_src.user).cast("string").alias("user_id"),
        _col(inter_src.item).cast("string").alias("item_id"),
        _col(inter_src.time).alias("time"),
    )
    items = _entity_table(spark, ds.items, "dataset.items", "item_id", cfg.features.item, "item")
    origin = {"interactions": inter_src.path, "items": ds.items.path}
    users = None
    if ds.users is not None:
        users = _entity_table(spark, ds.users, "dataset.users", "user_id", cfg.features.user, "user")
        origin["users"] = ds.users.path
    elif cfg.features.user:
        raise ValueError(
            f"features.user declares {sorted(cfg.features.user)} but dataset.users is not set, so "
            f"there is no table to read them from; add a dataset.users section (path, format, id) "
            f"or remove features.user"
        )
    return RawInputs(interactions=interactions, items=items, users=users, origin=origin)


def _entity_table(
    spark: SparkSession,
    src: EntitySource,
    key: str,
    id_name: str,
    features: Mapping[str, FeatureDecl],
    side: str,
) -> DataFrame:
    df = _read_user_table(spark, src, key)
    wanted = [(src.id, f"{key}.id")] + [(f, f"features.{side}.{f}") for f in features]
    _require_columns(df, src.path, wanted)
    # Multi-valued features stay raw (list column or delimited string): encoding splits them.
    return df.select(_col(src.id).cast("string").alias(id_name), *[_col(f).alias(f) for f in features])


# ---------------------------------------------------------------------------------------------
# Built-in loaders: shared helpers
# ---------------------------------------------------------------------------------------------


def _select_declared(
    df: DataFrame, id_name: str, declared: Mapping[str, FeatureDecl], kind: str, side: str
) -> DataFrame:
    offered = OFFERED_FEATURES[kind][side]
    unknown = [f for f in declared if f not in offered]
    if unknown:
        raise ValueError(
            f"features.{side} declares {unknown}, which dataset.kind {kind!r} does not offer. "
            f"It offers {side} features {list(offered) or 'none'}; remove or rename the others "
            f"(or use dataset.kind: tables with your own columns)."
        )
    return df.select(id_name, *declared)


def _no_user_features(cfg: Config, kind: str) -> None:
    if cfg.features.user:
        raise ValueError(
            f"features.user declares {sorted(cfg.features.user)}, but dataset.kind {kind!r} has no "
            f"users table and offers no user features; set features.user to {{}}"
        )


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def ensure_movielens_files(
    raw_dir: str, kind: str, download: bool, release: Optional[MovieLensRelease] = None
) -> dict[str, str]:
    """Make sure ``raw_dir`` holds the release's files with the pinned checksums.

    Downloads the GroupLens archive first when files are missing and ``download`` is true.
    ``release`` defaults to ``MOVIELENS[kind]``. Returns file name -> URI for Spark to read.
    """
    release = release or MOVIELENS[kind]
    uri = qualify(raw_dir)
    fs, base = pafs.FileSystem.from_uri(uri)
    names = list(release.sha256)
    missing = [n for n in names if fs.get_file_info(f"{base}/{n}").type != pafs.FileType.File]
    if missing and download:
        try:
            download_movielens(release.url, raw_dir, release)
        except Exception as exc:  # any network / archive failure: report it with both fixes
            raise FileNotFoundError(
                _missing_message(raw_dir, release, missing, kind, f"Downloading {release.url} failed: {exc!r}.")
            ) from exc
        missing = [n for n in names if fs.get_file_info(f"{base}/{n}").type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(_missing_message(raw_dir, release, missing, kind, ""))
    for name, expected in release.sha256.items():
        got = _sha256(fs, f"{base}/{name}")
        if got != expected:
            raise ValueError(
                f"{join(uri, name)}: sha256 {got} does not match the pinned {expected} of "
                f"{release.name}. A different MovieLens release (or a modified file) was probably "
                f"supplied; the {kind} loader parses exactly that release. Use the original files "
                f"from {release.url}, or load another release with dataset.kind: tables."
            )
    return {n: join(uri, n) for n in names}


def _missing_message(raw_dir: str, release: MovieLensRelease, missing: list[str], kind: str, why: str) -> str:
    return (
        f"{release.name}: looked in {qualify(raw_dir)!r} (paths.raw) for {list(release.sha256)} "
        f"and did not find {missing}. {why} Fix one of: point paths.raw at the folder holding the "
        f"files (--set paths.raw=/path/to/{release.archive_folder}); or let the loader fetch them "
        f"(--set dataset.download=true, needs network access to files.grouplens.org); or download "
        f"{release.url} by hand on a connected machine and unzip it into paths.raw."
    )


def download_movielens(url: str, raw_dir: str, release: MovieLensRelease) -> None:
    """Fetch the GroupLens zip and extract the release's files flat into ``raw_dir`` (local only).

    Checksums are verified afterwards by ``ensure_movielens_files``, for downloaded and local
    files alike.
    """
    if "://" in raw_dir and not raw_dir.startswith("file://"):
        raise ValueError(
            f"downloads go to a local folder; paths.raw is {raw_dir!r}. Download on a local disk "
            f"and copy the files there, or point paths.raw at a local folder."
        )
    target = raw_dir[len("file://"):] if raw_dir.startswith("file://") else raw_dir
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix="._download-") as tmp:
        archive = os.path.join(tmp, "archive.zip")
        with urllib.request.urlopen(url, timeout=120) as resp, open(archive, "wb") as out:
            shutil.copyfileobj(resp, out)
        with zipfile.ZipFile(archive) as zf:
            members = {os.path.basename(m): m for m in zf.namelist() if not m.endswith("/")}
            absent = [n for n in release.sha256 if n not in members]
            if absent:
                raise ValueError(f"archive from {url} lacks {absent}; it holds {sorted(members)}")
            for name in release.sha256:
                # Extract to a temporary name, then rename: an interrupted download leaves no
                # truncated file that a later run would mistake for the real one.
                part = os.path.join(tmp, name)
                with zf.open(members[name]) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(part, os.path.join(target, name))


def _title_tokens(title: Column) -> Column:
    """Lower-cased runs of letters/digits of the title, trailing "(YYYY)" removed: array<string>."""
    bare = F.regexp_replace(F.trim(title), r"\s*\(\d{4}\)$", "")
    words = F.split(F.lower(bare), r"[^\p{L}\p{N}]+")
    return F.filter(words, lambda w: w != F.lit(""))


def _year_from_title(title: Column) -> Column:
    year = F.regexp_extract(F.trim(title), r"\((\d{4})\)$", 1)
    return F.when(year != F.lit(""), year)


# ---------------------------------------------------------------------------------------------
# movielens-100k
# ---------------------------------------------------------------------------------------------


def _read_genre_names(uri: str) -> list[str]:
    """u.genre lists ``name|index``; the genre flags of u.item come in that index order."""
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as fh:
        text = fh.read().decode("latin-1")
    pairs = []
    for line in text.splitlines():
        if line.strip():
            name, _, idx = line.rpartition("|")
            pairs.append((int(idx), name))
    return [name for _, name in sorted(pairs)]


def _read_ratings(spark: SparkSession, path: str, options: dict[str, str], names: tuple[str, str, str, str]) -> DataFrame:
    """A MovieLens ratings file (user, item, rating, epoch seconds) as ``user_id, item_id, time``;
    ``names`` are the file's column names in that order."""
    user, item, rating, time = names
    schema = T.StructType(
        [
            T.StructField(user, T.StringType()),
            T.StructField(item, T.StringType()),
            T.StructField(rating, T.DoubleType()),
            T.StructField(time, T.LongType()),
        ]
    )
    return spark.read.options(**options).schema(schema).csv(path).select(
        F.col(user).alias("user_id"), F.col(item).alias("item_id"), F.col(time).alias("time")
    )


def _load_movielens_100k(spark: SparkSession, cfg: Config) -> RawInputs:
    kind = "movielens-100k"
    files = ensure_movielens_files(cfg.paths.raw, kind, cfg.dataset.download)
    pipe = {"sep": "|", "header": "false", "quote": "", "encoding": "ISO-8859-1"}

    interactions = _read_ratings(spark, files["u.data"], {"sep": "\t", "header": "false"},
                                 ("user_id", "item_id", "rating", "time"))

    genres = _read_genre_names(files["u.genre"])
    item_fields = ["item_id", "title", "release_date", "video_release_date", "imdb_url"]
    item_fields += [f"g{i}" for i in range(len(genres))]
    item_schema = T.StructType([T.StructField(n, T.StringType()) for n in item_fields])
    raw_items = spark.read.options(**pipe).schema(item_schema).csv(files["u.item"])
    derived = {
        "genres": F.array_compact(
            F.array(*[F.when(F.col(f"g{i}") == "1", F.lit(g)) for i, g in enumerate(genres)])
        ),
        "year": F.when(
            F.regexp_extract("release_date", r"(\d{4})$", 1) != "",
            F.regexp_extract("release_date", r"(\d{4})$", 1),
        ),
        "title_tokens": _title_tokens(F.col("title")),
    }
    items = raw_items.select("item_id", *[derived[f].alias(f) for f in cfg.features.item if f in derived])
    items = _select_declared(items, "item_id", cfg.features.item, kind, "item")

    user_schema = T.StructType(
        [T.StructField(n, T.StringType()) for n in ("user_id", "age", "gender", "occupation", "zip")]
    )
    raw_users = spark.read.options(**pipe).schema(user_schema).csv(files["u.user"])
    user_derived = {
        "age": F.col("age").try_cast("int"),
        "gender": F.col("gender"),
        "occupation": F.col("occupation"),
        "zip_prefix": F.substring("zip", 1, 1),
    }
    users = raw_users.select(
        "user_id", *[user_derived[f].alias(f) for f in cfg.features.user if f in user_derived]
    )
    users = _select_declared(users, "user_id", cfg.features.user, kind, "user")
    return RawInputs(
        interactions=interactions,
        items=items,
        users=users,
        origin={"interactions": files["u.data"], "items": files["u.item"], "users": files["u.user"]},
    )


# ---------------------------------------------------------------------------------------------
# movielens-latest-small
# ---------------------------------------------------------------------------------------------


def _load_movielens_latest_small(spark: SparkSession, cfg: Config) -> RawInputs:
    kind = "movielens-latest-small"
    _no_user_features(cfg, kind)
    files = ensure_movielens_files(cfg.paths.raw, kind, cfg.dataset.download)
    # RFC 4180 quoting: titles and tags hold commas and doubled quotes.
    csv = {"header": "true", "quote": '"', "escape": '"', "encoding": "UTF-8"}

    interactions = _read_ratings(spark, files["ratings.csv"], csv, ("userId", "movieId", "rating", "timestamp"))

    movie_schema = T.StructType([T.StructField(n, T.StringType()) for n in ("movieId", "title", "genres")])
    movies = spark.read.options(**csv).schema(movie_schema).csv(files["movies.csv"])
    derived = {
        "genres": F.when(
            F.col("genres").isNull() | (F.trim("genres") == "(no genres listed)"),
            F.array().cast("array<string>"),
        ).otherwise(F.split(F.col("genres"), r"\|")),
        "year": _year_from_title(F.col("title")),
        "title_tokens": _title_tokens(F.col("title")),
    }
    items = movies.select(
        F.col("movieId").alias("item_id"),
        *[derived[f].alias(f) for f in cfg.features.item if f in derived],
    )
    if "tags" in cfg.features.item:
        tag_schema = T.StructType(
            [T.StructField(n, T.StringType()) for n in ("userId", "movieId", "tag", "timestamp")]
        )
        tags = (
            spark.read.options(**csv).schema(tag_schema).csv(files["tags.csv"])
            .select(F.col("movieId").alias("item_id"), F.lower(F.trim("tag")).alias("tag"))
            .where(F.col("tag").isNotNull() & (F.col("tag") != ""))
            .groupBy("item_id")
            .agg(F.array_sort(F.collect_set("tag")).alias("tags"))
        )
        items = items.join(tags, on="item_id", how="left").withColumn(
            "tags", F.coalesce(F.col("tags"), F.array().cast("array<string>"))
        )
    items = _select_declared(items, "item_id", cfg.features.item, kind, "item")
    return RawInputs(
        interactions=interactions,
        items=items,
        users=None,
        origin={"interactions": files["ratings.csv"], "items": files["movies.csv"]},
    )


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def _load_synthetic(spark: SparkSession, cfg: Config) -> RawInputs:
    from spark_jobs.synthetic import generate

    gen = generate(spark, cfg.dataset.synthetic)
    items = _select_declared(gen.items, "item_id", cfg.features.item, "synthetic", "item")
    users = _select_declared(gen.users, "user_id", cfg.features.user, "synthetic", "user")
    return RawInputs(
        interactions=gen.interactions,
        items=items,
        users=users,
        origin={"interactions": "synthetic", "items": "synthetic", "users": "synthetic"},
    )
