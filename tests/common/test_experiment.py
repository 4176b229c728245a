"""Experiment grids: trial expansion, strict config, tuning choice (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, apply_values, build, from_dict, load_config
from common.experiment import (
    METHODS,
    ExperimentConfig,
    Trial,
    final_trials,
    inherit_choices,
    load_experiment,
    select_best,
    tuning_trials,
)

ROOT = Path(__file__).resolve().parents[2]


def _exp(**kw) -> ExperimentConfig:
    raw = {"name": "t", "base": "b.yaml", "output": "out", **kw}
    return build(ExperimentConfig, raw)


def test_final_grid_is_the_full_cross_product_with_stable_unique_ids():
    exp = _exp(methods=["baseline", "cfm", "cfm_no_dropout"], data_fractions=[1.0, 0.1], seeds=[0, 1, 2],
               grid={"ssl.tau": [0.1, 0.2]})
    trials = final_trials(exp, {})
    assert len(trials) == 3 * 2 * 3 * 2
    assert len({t.trial_id for t in trials}) == len(trials)
    assert {(t.method, t.data_fraction, t.seed, t.params["ssl.tau"]) for t in trials} == {
        (m, f, s, tau) for m in exp.methods for f in (1.0, 0.1) for s in (0, 1, 2) for tau in (0.1, 0.2)
    }
    again = final_trials(exp, {})
    assert [t.trial_id for t in again] == [t.trial_id for t in trials]
    t = next(t for t in trials if t.method == "cfm_no_dropout" and t.data_fraction == 0.1 and t.seed == 2)
    assert t.trial_id == "cfm_no_dropout-f0.1-ssl.tau=0.2-s2" or t.trial_id == "cfm_no_dropout-f0.1-ssl.tau=0.1-s2"
    assert t.values["ssl.method"] == "cfm" and t.values["ssl.multi_value_dropout"] is False
    assert t.values["train.seed"] == 2 and t.values["train.data_fraction"] == 0.1


def test_every_method_maps_to_a_valid_run_config():
    base = load_config(ROOT / "conf" / "default.yaml").to_dict()
    for method, values in METHODS.items():
        cfg = from_dict(apply_values(base, values))
        assert cfg.ssl.method == values["ssl.method"], method
    assert from_dict(apply_values(base, METHODS["baseline"])).ssl.method == "none"
    assert from_dict(apply_values(base, METHODS["cfm_no_dropout"])).ssl.multi_value_dropout is False


def test_tuning_trials_use_the_validation_folder_and_chosen_values_reach_the_final_grid():
    exp = _exp(methods=["baseline", "rfm", "cfm"], seeds=[0, 1],
               tuning={"prepared": "/data/valid", "seeds": [5, 6],
                       "space": {"cfm": {"ssl.alpha": [0.1, 1.0]}, "rfm": {"ssl.alpha": [0.3]}}})
    tune = tuning_trials(exp)
    assert len(tune) == (2 + 1) * 2
    assert all(t.stage == "tune" and t.values["paths.prepared"] == "/data/valid" for t in tune)
    assert {t.seed for t in tune} == {5, 6}
    final = final_trials(exp, {"cfm": {"ssl.alpha": 1.0}})
    assert all("paths.prepared" not in t.values for t in final)
    assert {t.values.get("ssl.alpha") for t in final if t.method == "cfm"} == {1.0}
    assert all("ssl.alpha" not in t.values for t in final if t.method != "cfm")


def test_select_best_takes_the_highest_mean_over_seeds_and_skips_missing():
    exp = _exp(methods=["cfm"], tuning={"prepared": "/v", "seeds": [0, 1], "space": {"cfm": {"ssl.alpha": [0.1, 1.0]}}})
    tune = tuning_trials(exp)
    by = {(t.params["ssl.alpha"], t.seed): t.trial_id for t in tune}
    metrics = {
        by[(0.1, 0)]: {"recall@50": 0.30}, by[(0.1, 1)]: {"recall@50": 0.10},   # mean 0.20
        by[(1.0, 0)]: {"recall@50": 0.25},                                      # seed 1 missing: mean 0.25
    }
    chosen, rows = select_best(tune, metrics, "recall@50")
    assert chosen == {"cfm": {"ssl.alpha": 1.0}}
    row = {r["params"]["ssl.alpha"]: r for r in rows}
    assert row[0.1]["seeds"] == 2 and math.isclose(row[0.1]["recall@50"], 0.20)
    assert row[1.0]["seeds"] == 1 and row[1.0]["chosen"] and not row[0.1]["chosen"]
    assert inherit_choices(chosen, {"cfm_no_dropout": "cfm"}) == {"cfm": {"ssl.alpha": 1.0}, "cfm_no_dropout": {"ssl.alpha": 1.0}}


def test_trial_round_trips_through_json():
    t = final_trials(_exp(methods=["so"], seeds=[3]), {"so": {"ssl.alpha": 0.5}})[0]
    assert Trial.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("kw,match", [
    ({"methods": ["cfm", "bogus"]}, "unknown method 'bogus'"),
    ({"methods": ["cfm", "cfm"]}, "twice"),
    ({"seeds": [1, 1]}, "distinct seeds"),
    ({"data_fractions": [0.0]}, r"data_fractions must be in \(0, 1\]"),
    ({"grid": {"ssl.method": ["rfm"]}}, "set by methods"),
    ({"grid": {"alpha": [1]}}, "dotted config key"),
    ({"overrides": {"train.seed": 3}}, "overrides may not set"),
    ({"tuning": {"prepared": "/v", "space": {"rfm": {"ssl.alpha": [1]}}}, "methods": ["cfm"]}, "not in methods"),
    ({"tuning": {"prepared": "/v", "select_by": "loss"}}, "select_by"),
    ({"tuning": {"prepared": "/v", "space": {"cfm": {"ssl.alpha": [1]}}, "inherit": {"rfm": "cfm"}}, "methods": ["cfm"]},
     "not in methods"),
    ({"tuning": {"prepared": "/v", "inherit": {"rfm": "cfm"}}, "methods": ["cfm", "rfm"]}, "no tuning.space"),
    ({"colour": "red"}, "unknown config key"),
])
def test_bad_experiment_configs_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        _exp(**kw)


def test_load_experiment_resolves_base_relative_to_the_file(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "base.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    (tmp_path / "conf" / "exp.yaml").write_text(yaml.safe_dump({"name": "x", "base": "base.yaml", "output": "o"}))
    exp, base = load_experiment(tmp_path / "conf" / "exp.yaml")
    assert Path(exp.base) == tmp_path / "conf" / "base.yaml" and base == {"train": {"epochs": 2}}
    (tmp_path / "conf" / "bad.yaml").write_text(yaml.safe_dump({"name": "x", "base": "nope.yaml", "output": "o"}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "conf" / "bad.yaml")
