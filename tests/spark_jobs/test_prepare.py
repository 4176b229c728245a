"""The whole preparation on tiny synthetic data: completeness, atomicity, idempotence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from common.features import specs_from_manifest
from common.manifest import read_manifest
from spark_jobs import prepare
from tests.conftest import tiny_config

TABLES = ("items", "train", "eval", "stats/item_popularity", "stats/mutual_info", "validated/interactions")


def _read(path: str) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_manifest_is_complete(prepared_synthetic):
    cfg, prepared = prepared_synthetic
    m = read_manifest(prepared)
    for key in ("run_id", "config_hash", "config", "versions", "validate", "split", "vocab", "features",
                "popularity", "mutual_info", "counts"):
        assert key in m, f"manifest lacks {key}"
    assert m["config_hash"] == cfg.hash()
    for table in TABLES:
        assert os.path.isdir(os.path.join(prepared, table)), table
    # Row counts in the manifest are the rows on disk.
    assert m["counts"]["train"] == len(_read(os.path.join(prepared, "train")))
    assert m["counts"]["eval"] == len(_read(os.path.join(prepared, "eval")))
    assert m["counts"]["items"] == len(_read(os.path.join(prepared, "items"))) == 150
    # input = kept + quarantined for every table.
    for table, rep in m["validate"].items():
        if isinstance(rep, dict) and "input" in rep:
            assert rep["input"] == rep["kept"] + sum(rep["quarantined"].values()), table
    # The synthetic "new" items are clicked only at the end of the log: cold items in eval.
    assert m["split"]["cold_eval_rows"] > 0 and m["split"]["cold_eval_items"] > 0
    specs = {s.name: s for s in specs_from_manifest(m)}
    assert {"item_id", "user_id", "history", "category", "tags", "price", "region", "age"} <= set(specs)
    for name, spec in specs.items():
        if spec.source in ("categorical", "bucketized", "multi", "id"):
            assert spec.vocab_size == m["vocab"][name]["size"] or spec.vocab_size >= 2
    assert not any(p.name.startswith("._") for p in Path(prepared).parent.iterdir()), "staging left behind"


def test_rerun_is_idempotent_and_failure_keeps_old_output(spark, tmp_path):
    cfg = tiny_config(tmp_path)
    first = prepare.run(spark, cfg)
    snapshot = {t: _read(os.path.join(cfg.paths.prepared, t)) for t in ("items", "train", "eval", "stats/mutual_info")}

    second = prepare.run(spark, cfg)
    assert second["run_id"] != first["run_id"]
    for table, before in snapshot.items():
        after = _read(os.path.join(cfg.paths.prepared, table))
        cols = sorted(before.columns)
        key = [c for c in ("user_id", "item_id", "timestamp", "feature_a", "feature_b") if c in cols]
        pd.testing.assert_frame_equal(
            before[cols].sort_values(key).reset_index(drop=True).astype(str),
            after[cols].sort_values(key).reset_index(drop=True).astype(str),
        )

    # A run that fails half way (the items table of a `tables` dataset is empty) must leave the
    # previous output and manifest untouched and no staging folder behind.
    empty_items = tmp_path / "empty_items.csv"
    empty_items.write_text("id,category\n")
    interactions = tmp_path / "inter.csv"
    interactions.write_text("u,i,t\n1,2,3\n")
    bad = tiny_config(
        tmp_path,
        "dataset.kind=tables",
        f"dataset.interactions={{path: {interactions}, format: csv, user: u, item: i, time: t}}",
        f"dataset.items={{path: {empty_items}, format: csv, id: id}}",
        "features.item={category: categorical}",
        "features.user={}",
    )
    with pytest.raises(Exception, match="(?i)empty"):
        prepare.run(spark, bad)
    assert read_manifest(cfg.paths.prepared)["run_id"] == second["run_id"]
    assert not any(p.name.startswith("._") for p in Path(cfg.paths.prepared).parent.iterdir())
    assert json.loads((Path(cfg.paths.prepared) / "manifest.json").read_text())["counts"]["items"] == 150
