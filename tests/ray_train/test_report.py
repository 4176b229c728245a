"""ray_train.report on hand-written trial folders: the numbers in the tables are hand-computed."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import load_config
from ray_train.report import build_report, mean_std, write_report

ROOT = Path(__file__).resolve().parents[2]


def _metrics(r50: float, tail50: float, head50: float = 0.5, cold50: float = 0.1) -> dict:
    deciles = [{"group": g, "items": 10, "users": 5, "recall@10": 0.1, "recall@50": r50 / (g + 1)} for g in range(10)]
    bucket = lambda v: {"recall@10": v / 2, "recall@50": v}  # noqa: E731
    return {
        "recall@10": r50 / 2, "recall@50": r50, "ndcg@10": r50 / 4, "ndcg@50": r50 / 3,
        "by_bucket": {"head": bucket(head50), "tail": bucket(tail50), "cold": bucket(cold50)},
        "by_popularity_decile": deciles,
        "mostpop": {"recall@10": 0.05, "recall@50": 0.2, "ndcg@10": 0.01, "ndcg@50": 0.02,
                    "by_bucket": {"head": bucket(0.6), "tail": bucket(0.0), "cold": bucket(0.0)},
                    "by_popularity_decile": deciles},
        "counts": {"users": 10, "items": 100, "ground_truth_pairs": 30,
                   "by_bucket": {b: {"items": 10, "pairs": 10, "users": 5} for b in ("head", "tail", "cold")}},
    }


def _experiment(tmp: Path, values: dict) -> Path:
    cfg = load_config(ROOT / "conf" / "default.yaml").to_dict()
    trials = []
    for (method, seed), (r50, tail50) in values.items():
        run = tmp / "trials" / f"{method}-f1-s{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics(r50, tail50)))
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "history.json").write_text(json.dumps([
            {"epoch": e, "global_step": 10 * e, "main": 5.0 - e, "ssl": 0.0 if method == "baseline" else 3.0 - e / 2}
            for e in (1, 2, 3)]))
        trials.append({"trial_id": run.name, "stage": "final", "method": method, "data_fraction": 1.0, "seed": seed,
                       "params": {}, "values": {}, "run_dir": str(run)})
    trials.append({"trial_id": "cfm-f1-s9", "stage": "final", "method": "cfm", "data_fraction": 1.0, "seed": 9,
                   "params": {}, "values": {}, "run_dir": str(tmp / "trials" / "never-ran")})
    (tmp / "experiment.json").write_text(json.dumps({
        "name": "hand", "config_file": "conf/experiments/hand.yaml", "methods": ["baseline", "cfm"],
        "data_fractions": [1.0], "seeds": [0, 1], "grid": {}, "tuning": None, "trials": trials}))
    return tmp


def test_mean_std_is_the_sample_std_and_skips_missing():
    assert mean_std([0.1, 0.3]) == (0.2, mean_std([0.1, 0.3])[1], 2)
    assert abs(mean_std([0.1, 0.3])[1] - 0.1414213562) < 1e-9  # sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert mean_std([0.5, None])[:3] == (0.5, 0.0, 1)
    assert mean_std([None])[2] == 0


def test_report_tables_hold_hand_computed_means_stds_and_changes(tmp_path):
    exp = _experiment(tmp_path, {
        ("baseline", 0): (0.20, 0.10), ("baseline", 1): (0.22, 0.12),   # R@50 mean 0.21; tail mean 0.11
        ("cfm", 0): (0.21, 0.20), ("cfm", 1): (0.25, 0.22),             # R@50 mean 0.23; tail mean 0.21
    })
    path = write_report(str(exp))
    text = Path(path).read_text()
    # Overall: baseline 0.21 ± 0.0141; cfm 0.23 ± 0.0283, +9.5% vs 0.21.
    assert "| baseline | 2 | 0.1050 ± 0.0071 | 0.2100 ± 0.0141 |" in text
    assert "| cfm | 2 | 0.1150 ± 0.0141 (+9.5%) | 0.2300 ± 0.0283 (+9.5%) |" in text
    # MostPop R@50 0.2 is -4.8% vs 0.21.
    assert "| MostPop | – | 0.0500 (-52.4%) | 0.2000 (-4.8%) |" in text
    # Tail: cfm 0.21 vs 0.11: +90.9%, |0.10| > sqrt(0.0141^2 + 0.0141^2) = 0.02 -> beyond noise (*).
    assert "| cfm | +9.5% | +0.0% | +90.9% * | +0.0% |" in text
    assert "best tail recall@50 is **cfm**: tail +90.9%," in text
    assert "arms beating the baseline on tail beyond seed noise: cfm" in text
    # The unfinished trial is counted, not filled in.
    assert "**1 trials have not finished and are left out**: cfm-f1-s9" in text
    assert (exp / "plots" / "deciles_f1.png").stat().st_size > 1000
    assert (exp / "plots" / "losses_f1.png").stat().st_size > 1000


def test_report_says_when_ssl_does_not_help(tmp_path):
    exp = _experiment(tmp_path, {
        ("baseline", 0): (0.20, 0.10), ("baseline", 1): (0.22, 0.12),
        ("cfm", 0): (0.19, 0.09), ("cfm", 1): (0.23, 0.12),
    })
    text = build_report(str(exp))
    assert "no arm beats the baseline on tail beyond seed noise" in text
    assert "(within seed noise)" in text


def test_combined_results_file_links_its_own_plots(tmp_path):
    from ray_train.report import main

    exp = _experiment(tmp_path / "a", {("baseline", 0): (0.2, 0.1), ("cfm", 0): (0.3, 0.2)})
    out = tmp_path / "docs" / "results.md"
    main(["--experiment", str(exp), "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Results") and "## Experiment `hand`" in text and "### Protocol" in text
    assert "](results/hand/deciles_f1.png)" in text
    assert (tmp_path / "docs" / "results" / "hand" / "deciles_f1.png").is_file()
