"""``spark_jobs.validate``: every bad-input class lands in quarantine with its exact reason, the
counts add up (checked against pandas), duplicates resolve deterministically, and every accepted
time form parses to the epoch seconds Python's datetime computes."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import date, datetime, timezone
from decimal import Decimal

import pandas as pd
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common.config import from_dict
from spark_jobs.sources import RawInputs
from spark_jobs.validate import REASONS, Validated, main, parse_time, run, validate, validation_report

ORIGIN = {"interactions": "test", "items": "test", "users": "test"}

ITEM_SCHEMA = "item_id string, color string, price double"
USER_SCHEMA = "user_id string, region string"
INTER_SCHEMA = "user_id string, item_id string, time string"

ITEMS = [
    ("i1", "red", 1.0),
    ("i2", "blue", 2.0),
    (None, "green", 3.0),  # null_item_id
    ("  ", "green", 3.0),  # null_item_id (empty after trim)
    ("i3", "b", 5.0),  # duplicate_item: ("i3", "a", ...) sorts first
    ("i3", "a", 7.0),
    ("i3", "a", 7.0),  # an exact copy is still a duplicate
    (" i4 ", "grey", 4.0),  # kept, id trimmed to "i4"
]
USERS = [("u1", "r1"), ("u1", "r0"), (None, "r2"), ("", "r3"), ("u2", "r4")]
# (user_id, item_id, time, expected reason or None when kept)
INTERACTIONS = [
    (None, "i1", "100", "null_user_id"),
    ("  ", "i1", "100", "null_user_id"),
    (None, None, "abc", "null_user_id"),  # the first reason in order wins
    ("u1", None, "100", "null_item_id"),
    ("u1", "", "abc", "null_item_id"),
    ("u1", "i1", "abc", "bad_time"),
    ("u1", "i1", None, "bad_time"),
    ("u1", "zzz", "abc", "bad_time"),  # bad_time comes before unknown_item
    ("u1", "zzz", "100", "unknown_item"),
    ("u1", "i4", "100", None),  # matches the trimmed catalogue id
    ("u1", "i3", "2020-01-02", None),
    ("u2", "i2", "200", None),
    ("u9", "i1", "300", None),  # user without a users row: kept
    ("u8", "i1", "300", None),  # ditto
]


def make_raw(spark, items=ITEMS, users=USERS, interactions=INTERACTIONS) -> RawInputs:
    return RawInputs(
        interactions=spark.createDataFrame([r[:3] for r in interactions], INTER_SCHEMA),
        items=spark.createDataFrame(items, ITEM_SCHEMA),
        users=spark.createDataFrame(users, USER_SCHEMA) if users is not None else None,
        origin=ORIGIN,
    )


def as_tuples(df) -> list[tuple]:
    return sorted((tuple(r) for r in df.collect()), key=repr)


@pytest.fixture(scope="module")
def validated(spark):
    raw = make_raw(spark)
    return raw, validate(raw)


def test_interaction_reasons(validated):
    _, v = validated
    expected_q = [(u, i, t, reason) for u, i, t, reason in INTERACTIONS if reason]
    assert as_tuples(v.quarantine["interactions"]) == sorted(expected_q, key=repr)
    assert v.quarantine["interactions"].columns == ["user_id", "item_id", "time", "reason"]
    assert dict(v.interactions.dtypes) == {"user_id": "string", "item_id": "string", "timestamp": "bigint"}
    kept = as_tuples(v.interactions)
    jan2 = int(datetime(2020, 1, 2, tzinfo=timezone.utc).timestamp())
    assert kept == sorted(
        [("u1", "i4", 100), ("u1", "i3", jan2), ("u2", "i2", 200), ("u9", "i1", 300), ("u8", "i1", 300)], key=repr
    )


def test_item_and_user_reasons(validated):
    _, v = validated
    assert as_tuples(v.items) == sorted(
        [("i1", "red", 1.0), ("i2", "blue", 2.0), ("i3", "a", 7.0), ("i4", "grey", 4.0)], key=repr
    )
    assert as_tuples(v.quarantine["items"]) == sorted(
        [
            (None, "green", "3.0", "null_item_id"),
            ("  ", "green", "3.0", "null_item_id"),
            ("i3", "b", "5.0", "duplicate_item"),
            ("i3", "a", "7.0", "duplicate_item"),
        ],
        key=repr,
    )
    assert as_tuples(v.users) == [("u1", "r0"), ("u2", "r4")]
    assert as_tuples(v.quarantine["users"]) == sorted(
        [("u1", "r1", "duplicate_user"), (None, "r2", "null_user_id"), ("", "r3", "null_user_id")], key=repr
    )


def test_report_counts_match_pandas(validated):
    raw, v = validated
    report = validation_report(raw, v)
    inter = pd.DataFrame(INTERACTIONS, columns=["user_id", "item_id", "time", "reason"])
    expected_inter_q = {r: int((inter["reason"] == r).sum()) for r in REASONS["interactions"]}
    kept_inter = inter[inter["reason"].isna()]
    assert report["interactions"] == {
        "input": len(inter),
        "kept": len(kept_inter),
        "quarantined": expected_inter_q,
        "users_without_features": int((~kept_inter["user_id"].isin(["u1", "u2"])).sum()),
    }
    assert report["items"] == {"input": 8, "kept": 4, "quarantined": {"null_item_id": 2, "duplicate_item": 2}}
    assert report["users"] == {"input": 5, "kept": 2, "quarantined": {"null_user_id": 2, "duplicate_user": 1}}
    for table in report.values():
        assert table["input"] == table["kept"] + sum(table["quarantined"].values())


def test_report_refuses_counts_that_do_not_add_up(validated):
    raw, v = validated
    lossy = Validated(
        interactions=v.interactions.where("user_id != 'u9'"),  # one kept row lost
        items=v.items,
        users=v.users,
        quarantine=v.quarantine,
    )
    with pytest.raises(RuntimeError, match=r"lost rows of interactions.*14 read, 4 kept \+ 9 quarantined"):
        validation_report(raw, lossy)


def test_no_users_table(spark):
    raw = make_raw(spark, users=None)
    v = validate(raw)
    assert v.users is None and set(v.quarantine) == {"interactions", "items"}
    report = validation_report(raw, v)
    assert set(report) == {"interactions", "items"}
    assert report["interactions"]["users_without_features"] == report["interactions"]["kept"] == 5


def _first_by_sorted_content(rows: list[tuple]) -> tuple:
    """Reference for the duplicate rule: compare rows column by column as strings, nulls first."""

    def key(row):
        return [(0, "") if x is None else (1, str(x)) for x in row]

    return min(rows, key=key)


def test_duplicate_resolution_is_deterministic(spark):
    import random

    # Several duplicate groups, drawn over several seeds; each must keep the reference row
    # whatever the input order and partitioning.
    rows = [("single", "x", 1.0)]
    for seed in range(4):
        rng = random.Random(seed)
        rows += [(f"dup{seed}", rng.choice(["a", "b", None]), rng.choice([2.0, 9.0, 10.0, None])) for _ in range(6)]
    expected = {
        item: _first_by_sorted_content([r for r in rows if r[0] == item]) for item in {r[0] for r in rows}
    }
    for order in range(2):
        shuffled = rows[:]
        random.Random(100 + order).shuffle(shuffled)
        df = spark.createDataFrame(shuffled, ITEM_SCHEMA).repartition(2 * order + 1)
        raw = RawInputs(
            interactions=spark.createDataFrame([("u", "single", "1")], INTER_SCHEMA), items=df, users=None, origin=ORIGIN
        )
        v = validate(raw)
        assert {r["item_id"]: tuple(r) for r in v.items.collect()} == expected
        assert Counter(r["reason"] for r in v.quarantine["items"].collect()) == {"duplicate_item": 4 * 5}


def test_time_forms(spark):
    utc = timezone.utc

    def epoch(*args):
        return int(datetime(*args, tzinfo=utc).timestamp())

    cases = {
        # dtype: [(value, expected epoch seconds or None for bad_time)]
        T.LongType(): [(1_600_000_000, 1_600_000_000), (None, None)],
        T.IntegerType(): [(1_500_000_000, 1_500_000_000)],
        T.DoubleType(): [(1.6e9, 1_600_000_000), (1.5, None), (math.nan, None), (1e30, None)],
        T.DecimalType(12, 2): [(Decimal("1600000000.00"), 1_600_000_000), (Decimal("12.50"), None)],
        T.TimestampType(): [(datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc), epoch(2020, 1, 2, 3, 4, 5))],
        T.DateType(): [(date(2020, 1, 2), epoch(2020, 1, 2))],
        T.StringType(): [
            (" 1600000000 ", 1_600_000_000),
            ("1.6e9", 1_600_000_000),
            ("2020-01-02T03:04:05Z", epoch(2020, 1, 2, 3, 4, 5)),
            ("2020-01-02T03:04:05+02:00", epoch(2020, 1, 2, 1, 4, 5)),
            ("2020-01-02 03:04:05", epoch(2020, 1, 2, 3, 4, 5)),  # no zone: session zone (UTC)
            ("2020-01-02", epoch(2020, 1, 2)),
            ("1.5", None),
            ("abc", None),
            ("", None),
            ("2020-13-45", None),
            ("99999999999999999999999", None),
            (None, None),
        ],
        T.BooleanType(): [(True, None)],
    }
    # One column per dtype, padded with nulls (null is bad_time in every type): one Spark job.
    columns = list(cases.items())
    height = max(len(v) for _, v in columns)
    schema = T.StructType([T.StructField(f"c{n}", dtype) for n, (dtype, _) in enumerate(columns)])
    rows = [tuple(v[k][0] if k < len(v) else None for _, v in columns) for k in range(height)]
    df = spark.createDataFrame(rows, schema)
    parsed = df.select(*[parse_time(F.col(f"c{n}"), dtype).alias(f"c{n}") for n, (dtype, _) in enumerate(columns)])
    assert dict(parsed.dtypes) == {f"c{n}": "bigint" for n in range(len(columns))}
    got = parsed.collect()
    for n, (dtype, values) in enumerate(columns):
        for k in range(height):
            expected = values[k][1] if k < len(values) else None
            assert got[k][f"c{n}"] == expected, (dtype, values[k][0] if k < len(values) else None)

    # Through validate: a timestamp-typed column; unparseable rows are quarantined as bad_time.
    inter_schema = "user_id string, item_id string, time timestamp"
    inter = spark.createDataFrame(
        [("u1", "i1", datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc)), ("u2", "i1", None)], inter_schema
    )
    v = validate(RawInputs(inter, spark.createDataFrame([("i1", "c", 1.0)], ITEM_SCHEMA), None, ORIGIN))
    assert as_tuples(v.interactions) == [("u1", "i1", epoch(2020, 1, 2, 3, 4, 5))]
    assert as_tuples(v.quarantine["interactions"]) == [("u2", "i1", None, "bad_time")]


def test_run_and_main_write_tables_and_manifest(spark, tmp_path):
    (tmp_path / "inter.csv").write_text(
        "user,item,ts\nu1,i1,100\nu2,i2,abc\n,i1,5\nu1,i9,7\nu3,i1,2020-01-01\n"
    )
    (tmp_path / "items.csv").write_text("id,color\ni1,red\ni2,blue\ni2,azure\n,none\n")
    (tmp_path / "users.csv").write_text("id,region\nu1,north\nu1,south\n")
    prepared = tmp_path / "prepared"
    overrides = [
        "dataset.kind=tables",
        f"dataset.interactions.path={tmp_path / 'inter.csv'}",
        "dataset.interactions.format=csv",
        "dataset.interactions.user=user",
        "dataset.interactions.item=item",
        "dataset.interactions.time=ts",
        f"dataset.items.path={tmp_path / 'items.csv'}",
        "dataset.items.format=csv",
        f"dataset.users.path={tmp_path / 'users.csv'}",
        "dataset.users.format=csv",
        "features.item.color=categorical",
        "features.user.region=categorical",
        f"paths.prepared={prepared}",
    ]
    (tmp_path / "empty.yaml").write_text("{}\n")
    sections = main(["--config", str(tmp_path / "empty.yaml"), "--set", *overrides])
    report = sections["validate"]
    assert report["interactions"] == {
        "input": 5,
        "kept": 2,
        "quarantined": {"null_user_id": 1, "null_item_id": 0, "bad_time": 1, "unknown_item": 1},
        "users_without_features": 1,
    }
    assert report["items"]["quarantined"] == {"null_item_id": 1, "duplicate_item": 1}
    assert report["users"] == {"input": 2, "kept": 1, "quarantined": {"null_user_id": 0, "duplicate_user": 1}}
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["validate"] == report
    items = spark.read.parquet(str(prepared / "validated" / "items"))
    assert as_tuples(items) == [("i1", "red"), ("i2", "azure")]
    q = spark.read.parquet(str(prepared / "quarantine" / "interactions"))
    assert as_tuples(q.select("reason")) == [("bad_time",), ("null_user_id",), ("unknown_item",)]
    assert (prepared / "validated" / "users").is_dir() and (prepared / "quarantine" / "users").is_dir()

    # Rerun without a users table: the stale users tables go, the report has no users section.
    cfg = from_dict({}).with_overrides([o for o in overrides if "users" not in o and "features.user" not in o])
    report2 = run(spark, cfg)["validate"]
    assert set(report2) == {"interactions", "items"}
    assert not (prepared / "validated" / "users").exists() and not (prepared / "quarantine" / "users").exists()
    assert [p.name for p in (prepared / "validated").iterdir() if p.name.startswith(".")] == []
