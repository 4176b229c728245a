"""ray_train.experiment end to end: a 2-trial grid on generated data through Ray Tune x Ray Train on
the session's local Ray cluster, its report, and resume (finished trials are not rerun)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from common.experiment import METHODS, final_trials, inherit_choices, load_experiment, tuning_trials
from tests.ray_train.conftest import ROOT, TINY_MODEL, run_module


def test_shipped_experiment_configs_load_and_build_valid_trial_configs():
    from ray_train.experiment import trial_config

    for name in ("ml-100k", "ml-latest-small"):
        exp, base = load_experiment(ROOT / "conf" / "experiments" / f"{name}.yaml")
        assert set(exp.methods) == set(METHODS) and len(exp.seeds) >= 3 and 0.1 in exp.data_fractions
        assert exp.tuning is not None and exp.tuning.prepared.endswith("prepared-validation")
        chosen = inherit_choices({m: {k: v[0] for k, v in axes.items()} for m, axes in exp.tuning.space.items()},
                                 exp.tuning.inherit)
        for t in tuning_trials(exp) + final_trials(exp, chosen):
            cfg = trial_config(base, exp, t)
            assert cfg.train.seed == t.seed and cfg.train.data_fraction == t.data_fraction
            if t.stage == "tune":
                assert cfg.paths.prepared == exp.tuning.prepared


def test_tuning_refuses_a_folder_whose_eval_is_the_eval_split(prepared_dir):
    from common.config import load_config
    from ray_train.experiment import check_prepared

    cfg = load_config(ROOT / "conf" / "default.yaml", [f"paths.prepared={prepared_dir}"])
    check_prepared(cfg, "eval", "final grid")
    with pytest.raises(ValueError, match="never chosen on the eval split"):
        check_prepared(cfg, "validation", "tuning")
    missing = load_config(ROOT / "conf" / "default.yaml", [f"paths.prepared={prepared_dir}-nope"])
    with pytest.raises(FileNotFoundError, match="prepare.split.holdout=validation"):
        check_prepared(missing, "validation", "tuning")


def _run_experiment(cluster, config: Path, log: Path, timeout: float = 600) -> str:
    rc, text = run_module(cluster, "ray_train.experiment", ["--config", str(config)], log, timeout)
    assert rc == 0, f"ray_train.experiment failed (exit {rc}); log tail:\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def experiment(prepared_dir, ray_cluster, tmp_path_factory):
    """Baseline and CFM, data fraction 0.5, one seed: two trials, run concurrently."""
    tmp = tmp_path_factory.mktemp("experiment")
    base = yaml.safe_load((ROOT / "conf" / "default.yaml").read_text())
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY_MODEL)}
    overrides.update({"paths.prepared": prepared_dir, "train.num_workers": 1, "train.epochs": 2})
    config = tmp / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "base": "base.yaml", "output": str(tmp / "out"), "overrides": overrides,
        "methods": ["baseline", "cfm"], "data_fractions": [0.5], "seeds": [0], "max_concurrent_trials": 2,
    }))
    log = _run_experiment(ray_cluster, config, tmp / "first.log")
    return config, tmp / "out", log


@pytest.mark.cluster
def test_two_trial_experiment_writes_every_table_and_plot(experiment, prepared_dir):
    _, out, log = experiment
    assert "final: 2 trials, 0 already finished, 2 to run" in log
    record = json.loads((out / "experiment.json").read_text())
    assert [t["trial_id"] for t in record["trials"]] == ["baseline-f0.5-s0", "cfm-f0.5-s0"]
    report = (out / "report.md").read_text()
    for heading in ("## Protocol", "## At a glance", "## Training data fraction 0.5",
                    "### Overall (mean ± std over seeds, change vs baseline)",
                    "### Head, tail and cold items (Recall)", "### recall@50 vs baseline",
                    "## Hyper-parameter selection"):
        assert heading in report, heading
    assert "| MostPop |" in report and "| baseline | 1 |" in report and "| cfm | 1 |" in report
    for png in ("plots/deciles_f0_5.png", "plots/losses_f0_5.png"):
        assert f"]({png})" in report and (out / png).stat().st_size > 1000
    # The report's numbers are the trials' numbers.
    cfm = json.loads((out / "trials" / "cfm-f0.5-s0" / "metrics.json").read_text())
    base = json.loads((out / "trials" / "baseline-f0.5-s0" / "metrics.json").read_text())
    rel = (cfm["recall@50"] - base["recall@50"]) / base["recall@50"] * 100
    assert f"| cfm | 1 | {cfm['recall@10']:.4f}" in report and f"{cfm['recall@50']:.4f} ({rel:+.1f}%)" in report
    assert len(cfm["by_popularity_decile"]) == 10
    # data_fraction 0.5 trained on exactly the hash-sampled half of train/.
    from ray_train.data import sample_unit, steps_per_epoch

    t = pq.read_table(Path(prepared_dir) / "train", columns=["user_index", "item_index", "timestamp"])
    kept = int((sample_unit(*(t.column(c).to_numpy().astype(np.int64) for c in t.column_names)) < 0.5).sum())
    history = json.loads((out / "trials" / "cfm-f0.5-s0" / "history.json").read_text())
    cfg = json.loads((out / "trials" / "cfm-f0.5-s0" / "config.json").read_text())
    assert 0.4 * t.num_rows < kept < 0.6 * t.num_rows
    assert history[0]["steps"] == steps_per_epoch(kept, 1, cfg["train"]["batch_size"])
    assert cfg["train"]["data_fraction"] == 0.5 and cfg["ssl"]["method"] == "cfm"


@pytest.mark.cluster
def test_rerun_skips_finished_trials(experiment, ray_cluster, tmp_path):
    config, out, _ = experiment
    metrics = out / "trials" / "cfm-f0.5-s0" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    log = _run_experiment(ray_cluster, config, tmp_path / "again.log", timeout=300)
    assert "final: 2 trials, 2 already finished, 0 to run" in log
    assert metrics.stat().st_mtime_ns == before
    assert "| cfm | 1 |" in (out / "report.md").read_text()
