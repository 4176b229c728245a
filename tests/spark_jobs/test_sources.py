"""``spark_jobs.sources``: user tables, the MovieLens loaders (on the real files), checksums,
downloads (through a local ``file://`` archive, never the network) and the errors users see."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import from_dict
from spark_jobs.sources import (
    MOVIELENS,
    MovieLensRelease,
    download_movielens,
    ensure_movielens_files,
    load_sources,
)

DATASETS = Path("/work/shared/datasets")
ML100K = DATASETS / "ml-100k"
MLSMALL = DATASETS / "ml-latest-small"


def tables_cfg(inter: dict, items: dict, users: dict | None, item_feats: dict, user_feats: dict):
    ds = {"kind": "tables", "interactions": inter, "items": items}
    if users is not None:
        ds["users"] = users
    return from_dict({"dataset": ds, "features": {"item": item_feats, "user": user_feats}})


# ---------------------------------------------------------------------------------------------
# dataset.kind: tables
# ---------------------------------------------------------------------------------------------


def test_tables_from_csv_with_custom_names(spark, tmp_path):
    (tmp_path / "clicks.csv").write_text("who;what;when;extra\n10;a;1600000000;x\n11;b;2020-01-02;y\n")
    (tmp_path / "cat.csv").write_text("sku;genres;color;unused\na;x|y;red;1\nb;;blue;2\n")
    (tmp_path / "people.csv").write_text("person;region\n10;north\n")
    cfg = tables_cfg(
        {"path": str(tmp_path / "clicks.csv"), "format": "csv", "sep": ";", "user": "who", "item": "what", "time": "when"},
        {"path": str(tmp_path / "cat.csv"), "format": "csv", "sep": ";", "id": "sku"},
        {"path": str(tmp_path / "people.csv"), "format": "csv", "sep": ";", "id": "person"},
        {"genres": "multi", "color": "categorical"},
        {"region": "categorical"},
    )
    raw = load_sources(spark, cfg)
    assert raw.interactions.columns == ["user_id", "item_id", "time"]
    assert raw.items.columns == ["item_id", "genres", "color"]  # undeclared columns dropped
    assert raw.users.columns == ["user_id", "region"]
    rows = sorted(tuple(r) for r in raw.interactions.collect())
    assert rows == [("10", "a", "1600000000"), ("11", "b", "2020-01-02")]  # time kept as read
    items = {r["item_id"]: (r["genres"], r["color"]) for r in raw.items.collect()}
    assert items == {"a": ("x|y", "red"), "b": (None, "blue")}  # multi kept raw, split later
    assert raw.origin["items"] == str(tmp_path / "cat.csv")


def test_tables_from_parquet_cast_ids_and_keep_lists(spark, tmp_path):
    pq.write_table(
        pa.table({"u": pa.array([1, 2], pa.int32()), "i": pa.array([100, 200], pa.int64()), "t": [5, 6]}),
        tmp_path / "inter.parquet",
    )
    pq.write_table(
        pa.table({"id": pa.array([100, 200], pa.int64()), "tags": [["a", "b"], []], "price": [1.5, 2.0]}),
        tmp_path / "items.parquet",
    )
    cfg = tables_cfg(
        {"path": str(tmp_path / "inter.parquet"), "user": "u", "item": "i", "time": "t"},
        {"path": str(tmp_path / "items.parquet")},
        None,
        {"tags": "multi", "price": {"type": "bucketized", "boundaries": [1, 2]}},
        {},
    )
    raw = load_sources(spark, cfg)
    assert raw.users is None
    assert dict(raw.interactions.dtypes) == {"user_id": "string", "item_id": "string", "time": "bigint"}
    assert sorted(tuple(r) for r in raw.interactions.collect()) == [("1", "100", 5), ("2", "200", 6)]
    items = {r["item_id"]: (list(r["tags"]), r["price"]) for r in raw.items.collect()}
    assert items == {"100": (["a", "b"], 1.5), "200": ([], 2.0)}


def test_missing_column_names_file_column_key_and_present_columns(spark, tmp_path):
    path = tmp_path / "inter.csv"
    path.write_text("user,item,ts\n1,2,3\n")
    (tmp_path / "items.csv").write_text("id,color\n2,red\n")
    cfg = tables_cfg(
        {"path": str(path), "format": "csv", "user": "uid", "item": "item", "time": "ts"},
        {"path": str(tmp_path / "items.csv"), "format": "csv"},
        None,
        {},
        {},
    )
    with pytest.raises(ValueError) as err:
        load_sources(spark, cfg)
    msg = str(err.value)
    assert str(path) in msg and "'uid'" in msg and "dataset.interactions.user" in msg
    assert "['user', 'item', 'ts']" in msg

    # A declared feature that the item table lacks names the feature key.
    cfg = tables_cfg(
        {"path": str(path), "format": "csv", "user": "user", "item": "item", "time": "ts"},
        {"path": str(tmp_path / "items.csv"), "format": "csv"},
        None,
        {"brand": "categorical"},
        {},
    )
    with pytest.raises(ValueError, match=r"items\.csv.*'brand'.*features\.item\.brand.*\['id', 'color'\]"):
        load_sources(spark, cfg)


def test_missing_file_names_path_and_key(spark, tmp_path):
    (tmp_path / "items.csv").write_text("id\n1\n")
    missing = tmp_path / "nope.parquet"
    cfg = tables_cfg({"path": str(missing)}, {"path": str(tmp_path / "items.csv"), "format": "csv"}, None, {}, {})
    with pytest.raises(FileNotFoundError) as err:
        load_sources(spark, cfg)
    assert str(missing) in str(err.value) and "dataset.interactions.path" in str(err.value)


def test_empty_table_is_an_error_naming_it(spark, tmp_path):
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    (tmp_path / "items.csv").write_text("id,color\n")  # header only
    cfg = tables_cfg(
        {"path": str(tmp_path / "inter.csv"), "format": "csv"},
        {"path": str(tmp_path / "items.csv"), "format": "csv"},
        None,
        {"color": "categorical"},
        {},
    )
    with pytest.raises(ValueError, match=r"items table read from .*items\.csv has 0 rows"):
        load_sources(spark, cfg)


def test_user_features_without_users_table_is_an_error(spark, tmp_path):
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    (tmp_path / "items.csv").write_text("id\n2\n")
    cfg = tables_cfg(
        {"path": str(tmp_path / "inter.csv"), "format": "csv"},
        {"path": str(tmp_path / "items.csv"), "format": "csv"},
        None,
        {},
        {"age": "categorical"},
    )
    with pytest.raises(ValueError, match="dataset.users is not set"):
        load_sources(spark, cfg)


# ---------------------------------------------------------------------------------------------
# MovieLens 100K, checked against an independent pandas parse of the same files
# ---------------------------------------------------------------------------------------------


def ml100k_cfg(raw: str | Path = ML100K, **extra):
    return from_dict(
        {
            "dataset": {"kind": "movielens-100k", **extra},
            "paths": {"raw": str(raw)},
            "features": {
                "item": {"genres": "multi", "year": "categorical", "title_tokens": "multi"},
                "user": {"age": "categorical", "gender": "categorical", "occupation": "categorical", "zip_prefix": "categorical"},
            },
        }
    )


@pytest.fixture(scope="module")
def ml100k(spark):
    raw = load_sources(spark, ml100k_cfg())
    return raw, raw.items.toPandas().set_index("item_id"), raw.users.toPandas().set_index("user_id")


def test_ml100k_counts_and_known_values(ml100k):
    raw, items, users = ml100k
    assert raw.interactions.count() == 100_000
    assert len(items) == 1682 and len(users) == 943
    assert dict(raw.interactions.dtypes) == {"user_id": "string", "item_id": "string", "time": "bigint"}
    first = raw.interactions.where("user_id = '196' and item_id = '242'").collect()
    assert [r["time"] for r in first] == [881250949]
    toy = items.loc["1"]
    assert list(toy["genres"]) == ["Animation", "Children's", "Comedy"]
    assert toy["year"] == "1995" and list(toy["title_tokens"]) == ["toy", "story"]
    assert pd.isna(items.loc["267", "year"])  # "unknown" has no release date
    assert list(items.loc["543", "title_tokens"]) == ["misérables", "les"]  # latin-1 decoded
    assert users.loc["1"].to_dict() == {"age": 24, "gender": "M", "occupation": "technician", "zip_prefix": "8"}


def test_ml100k_genres_match_pandas_parse(ml100k):
    _, items, _ = ml100k
    genre_names = [line.split("|")[0] for line in (ML100K / "u.genre").read_text().splitlines() if line.strip()]
    ref = pd.read_csv(ML100K / "u.item", sep="|", header=None, encoding="latin-1", dtype=str)
    expected = {
        row[0]: [g for g, flag in zip(genre_names, row[5:24]) if flag == "1"] for row in ref.itertuples(index=False)
    }
    got = {k: list(v) for k, v in items["genres"].items()}
    assert got == expected
    years = {row[0]: (row[2][-4:] if isinstance(row[2], str) else None) for row in ref.itertuples(index=False)}
    assert {k: (None if pd.isna(v) else v) for k, v in items["year"].items()} == years


def test_builtin_loader_rejects_undeclared_feature(spark):
    cfg = from_dict(
        {
            "dataset": {"kind": "movielens-100k"},
            "paths": {"raw": str(ML100K)},
            "features": {"item": {"director": "categorical"}, "user": {}},
        }
    )
    with pytest.raises(ValueError, match=r"\['director'\].*offers item features \['genres', 'year', 'title_tokens'\]"):
        load_sources(spark, cfg)


# ---------------------------------------------------------------------------------------------
# MovieLens latest-small
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlsmall(spark):
    cfg = from_dict(
        {
            "dataset": {"kind": "movielens-latest-small"},
            "paths": {"raw": str(MLSMALL)},
            "features": {
                "item": {"genres": "multi", "year": "categorical", "title_tokens": "multi", "tags": "multi"},
                "user": {},
            },
        }
    )
    raw = load_sources(spark, cfg)
    return raw, raw.items.toPandas().set_index("item_id")


def test_mlsmall_counts_and_never_rated_movies(mlsmall):
    raw, items = mlsmall
    assert raw.users is None
    assert raw.interactions.count() == 100_004
    assert len(items) == 9125 and items.index.is_unique
    rated = {r["item_id"] for r in raw.interactions.select("item_id").distinct().collect()}
    never_rated = set(items.index) - rated
    assert len(never_rated) == 59 and rated <= set(items.index)


def test_mlsmall_parsed_values(mlsmall):
    _, items = mlsmall
    assert list(items.loc["1", "genres"]) == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert items.loc["1", "year"] == "1995" and list(items.loc["1", "title_tokens"]) == ["toy", "story"]
    assert list(items.loc["83829", "genres"]) == []  # "(no genres listed)"
    assert pd.isna(items.loc["108548", "year"])  # "Big Bang Theory, The (2007-)"
    assert items.loc["89045", "year"] == "1986"  # "Rocky VI (1986) " has a trailing space
    assert list(items.loc["51372", "title_tokens"]) == ["great", "performances", "cats"]  # doubled quotes
    assert list(items.loc["11", "title_tokens"]) == ["american", "president", "the"]


def test_mlsmall_tags_match_pandas_parse(mlsmall):
    _, items = mlsmall
    tags = pd.read_csv(MLSMALL / "tags.csv", dtype=str, keep_default_na=False)
    tags["t"] = tags["tag"].str.strip().str.lower()
    tags = tags[tags["t"] != ""]
    expected = tags.groupby("movieId")["t"].apply(lambda s: sorted(set(s))).to_dict()
    got = {k: list(v) for k, v in items["tags"].items()}
    assert {k: v for k, v in got.items() if v} == expected
    assert sum(1 for v in got.values() if not v) == len(items) - len(expected)  # empty, not null


def test_mlsmall_rejects_user_features(spark):
    cfg = from_dict(
        {
            "dataset": {"kind": "movielens-latest-small"},
            "paths": {"raw": str(MLSMALL)},
            "features": {"item": {}, "user": {"age": "categorical"}},
        }
    )
    with pytest.raises(ValueError, match="no users table"):
        load_sources(spark, cfg)


# ---------------------------------------------------------------------------------------------
# Checksums, missing files, downloads
# ---------------------------------------------------------------------------------------------


def test_checksum_mismatch_names_file_and_both_sums(spark, tmp_path):
    for name in MOVIELENS["movielens-100k"].sha256:
        shutil.copy(ML100K / name, tmp_path / name)
    os.chmod(tmp_path / "u.user", 0o644)
    with open(tmp_path / "u.user", "a") as fh:
        fh.write("944|30|F|writer|12345\n")
    with pytest.raises(ValueError) as err:
        load_sources(spark, ml100k_cfg(tmp_path))
    msg = str(err.value)
    assert "u.user" in msg and MOVIELENS["movielens-100k"].sha256["u.user"] in msg
    got = re.search(r"sha256 ([0-9a-f]{64})", msg).group(1)
    assert got != MOVIELENS["movielens-100k"].sha256["u.user"]
    assert "different MovieLens release" in msg


def test_missing_files_without_download_says_where_what_and_how(spark, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_sources(spark, ml100k_cfg(tmp_path, download=False))
    msg = str(err.value)
    assert str(tmp_path) in msg
    for name in ("u.data", "u.item", "u.user", "u.genre"):
        assert name in msg
    assert "--set paths.raw=" in msg and "--set dataset.download=true" in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in msg


def _zip_of(folder: Path, names, archive: Path, prefix: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for name in names:
            zf.write(folder / name, f"{prefix}/{name}")


def test_download_extracts_archive_and_verifies(spark, tmp_path):
    release = MOVIELENS["movielens-100k"]
    archive = tmp_path / "ml-100k.zip"
    _zip_of(ML100K, list(release.sha256) + ["README"], archive, "ml-100k")
    local = MovieLensRelease(release.name, archive.as_uri(), release.archive_folder, release.sha256)
    target = tmp_path / "raw"
    files = ensure_movielens_files(str(target), "movielens-100k", download=True, release=local)
    assert sorted(os.listdir(target)) == sorted(release.sha256)  # only the needed files, flat
    assert set(files) == set(release.sha256)
    assert (target / "u.data").read_bytes() == (ML100K / "u.data").read_bytes()


def test_failed_download_reports_cause_and_fixes(tmp_path):
    release = MOVIELENS["movielens-100k"]
    gone = MovieLensRelease(release.name, (tmp_path / "absent.zip").as_uri(), "ml-100k", release.sha256)
    with pytest.raises(FileNotFoundError) as err:
        ensure_movielens_files(str(tmp_path / "raw"), "movielens-100k", download=True, release=gone)
    msg = str(err.value)
    assert "Downloading" in msg and "failed" in msg and "--set paths.raw=" in msg

    # An archive that lacks a needed file is refused by name.
    archive = tmp_path / "partial.zip"
    _zip_of(ML100K, ["u.data"], archive, "ml-100k")
    with pytest.raises(ValueError, match=r"lacks \['u.item', 'u.user', 'u.genre'\]"):
        download_movielens(archive.as_uri(), str(tmp_path / "raw2"), release)
