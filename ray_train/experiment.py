"""Run an experiment grid on Ray Tune (each trial one Ray Train run), then write its report.

    python -m ray_train.experiment --config conf/experiments/ml-latest-small.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", "data", "runs", ".git"]}' \\
        -- python -m ray_train.experiment --config conf/experiments/ml-100k.yaml \\
           --set-output /abs/runs/experiments/ml-100k
    python -m ray_train.experiment --config ... --report-only      # rewrite report.md only

Stages (``common/experiment.py`` defines the grid):

1. **Tuning** (when the experiment has ``tuning``): each method's ``tuning.space`` on a prepared
   folder whose ``eval/`` is a validation split carved from train (``prepare.split.holdout:
   validation``; the manifest is checked). The point with the best mean ``tuning.select_by``
   over the tuning seeds is chosen per method. The eval split is never read in this stage.
2. **Final grid**: methods x data fractions x grid points x seeds on ``paths.prepared`` of the
   base config (a ``holdout: eval`` folder), each method with its chosen values.

Every trial is a ``ray_train.train.run`` (TorchTrainer) inside a Ray Tune function trainable,
so trials run in parallel up to ``max_concurrent_trials`` when the cluster has room; all of them
read the same prepared Parquet (preprocessing is shared). A trial's run folder is
``<output>/trials/<trial id>``.

Resume: a trial whose folder holds ``metrics.json`` is finished and is not run again; a trial
with a folder but no metrics continues from its last checkpoint (Ray Train resumes the same
``RunConfig`` name). So rerunning the same command after a crash or Ctrl-C runs only what is
missing. Each invocation is a fresh Tune experiment under ``<output>/tune/``; finished-ness is read
from the trial folders, not from Tune's state, so it survives a changed grid: added seeds or
methods run, existing ones are kept.

Outputs in ``<output>``: ``experiment.json`` (the trials, the tuning table, the chosen values),
``report.md`` and ``plots/*.png`` (``ray_train.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Mapping, Optional, Sequence

from common.config import Config, ConfigError, apply_values, from_dict
from common.experiment import (
    ExperimentConfig,
    Trial,
    final_trials,
    inherit_choices,
    load_experiment,
    select_best,
    tuning_trials,
)
from common.manifest import manifest_exists, read_manifest
from ray_train.evaluate import METRICS_FILE
from ray_train.train import CONFIG_FILE, absolute_paths, init_ray
from ray_train.worker import write_json

EXPERIMENT_FILE = "experiment.json"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
# Logical CPU reserved by a trial's own process (the Ray Train driver); see run_trials.
TRIAL_DRIVER_CPU = 0.01


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run an experiment grid (Ray Tune x Ray Train) and write its report")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. conf/experiments/ml-100k.yaml")
    p.add_argument("--set-output", default=None, metavar="DIR", help="override the experiment's output folder")
    p.add_argument("--report-only", action="store_true", help="do not train; rewrite the report from finished trials")
    return p.parse_args(argv)


def trial_config(base: Mapping[str, Any], exp: ExperimentConfig, trial: Trial) -> Config:
    """The resolved run config of one trial: base, then the experiment's overrides, then the
    trial's values (method, seed, data fraction, grid/tuned values)."""
    raw = apply_values(apply_values(base, exp.overrides), trial.values)
    try:
        return absolute_paths(from_dict(raw))
    except ConfigError as exc:
        raise ConfigError(f"trial {trial.trial_id}: {exc}") from None


def trial_dir(exp: ExperimentConfig, trial: Trial) -> str:
    return os.path.join(exp.output, TRIALS_DIR, trial.trial_id)


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, METRICS_FILE))


def read_metrics(run_dir: str) -> Optional[dict[str, Any]]:
    if not is_finished(run_dir):
        return None
    with open(os.path.join(run_dir, METRICS_FILE)) as fh:
        return json.load(fh)


def check_prepared(cfg: Config, holdout: str, what: str) -> None:
    """The prepared folder exists and its eval/ is the split this stage may read."""
    prepared = cfg.paths.prepared
    if not manifest_exists(prepared):
        flag = " --set prepare.split.holdout=validation" if holdout == "validation" else ""
        raise FileNotFoundError(
            f"{what}: {prepared} holds no manifest.json. Prepare it first: python -m spark_jobs.prepare "
            f"--config <the base config> --set paths.prepared={prepared}{flag}"
        )
    found = read_manifest(prepared).get("split", {}).get("holdout", "eval")
    if found != holdout:
        raise ValueError(
            f"{what}: {prepared} was prepared with prepare.split.holdout={found}, but this stage needs "
            f"{holdout}" + (" (hyper-parameters are never chosen on the eval split)" if holdout == "validation" else "")
        )


def _trial_fn(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one Ray Train run (its driver; the TorchTrainer starts the
    workers), then the final metrics to Tune."""
    from ray import tune

    from ray_train.train import run

    run_dir = config["trial"]["run_dir"]
    with open(os.path.join(run_dir, TRIAL_FILE)) as fh:
        cfg = from_dict(json.load(fh)["config"])
    resumed = os.path.isfile(os.path.join(run_dir, CONFIG_FILE))
    out = run(cfg, run_dir, resumed=resumed, evaluate=True, export=False)
    metrics = out["metrics"] or {}
    tune.report({k: v for k, v in metrics.items() if k.startswith(("recall@", "ndcg@")) and v is not None})


def run_trials(exp: ExperimentConfig, base: Mapping[str, Any], trials: Sequence[Trial], stage: str) -> dict[str, dict[str, Any]]:
    """Run the unfinished ``trials`` on Ray Tune; returns ``{trial_id: metrics}`` of all of them.
    Raises when a trial failed (after the others ran; finished trials stay finished)."""
    from ray import tune

    pending = [t for t in trials if not is_finished(trial_dir(exp, t))]
    print(
        f"[experiment] {stage}: {len(trials)} trials, {len(trials) - len(pending)} already finished, "
        f"{len(pending)} to run (max {exp.max_concurrent_trials} at once)",
        flush=True,
    )
    if pending:
        specs = []
        for t in pending:
            # The config travels as a file: Tune would print a param space that held it.
            write_json(os.path.join(trial_dir(exp, t), TRIAL_FILE),
                       {"trial": t.to_dict(), "config": trial_config(base, exp, t).to_dict()})
            specs.append({"trial_id": t.trial_id, "run_dir": trial_dir(exp, t)})
        # The trial process only drives its TorchTrainer, whose workers reserve their own CPUs:
        # a trial that also held a whole CPU would starve Ray Data's read tasks on a small
        # machine (Tune refuses an empty request, hence a token share).
        trainable = tune.with_resources(_trial_fn, {"CPU": TRIAL_DRIVER_CPU})
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=exp.max_concurrent_trials,
                                        trial_name_creator=lambda t: t.config["trial"]["trial_id"],
                                        trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
            run_config=tune.RunConfig(
                name=f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=os.path.join(exp.output, "tune"),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
        grid = tuner.fit()
        failed = [
            (r.config["trial"]["trial_id"] if r.config else "?", r.error) for r in grid if r.error is not None
        ]
        if failed:
            lines = "\n".join(f"  {tid}: {type(err).__name__}: {err}" for tid, err in failed)
            raise RuntimeError(
                f"{len(failed)} of {len(pending)} {stage} trials failed (the others are finished and are "
                f"kept; rerun the same command to retry only the failed ones):\n{lines}"
            )
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        m = read_metrics(trial_dir(exp, t))
        if m is None:
            raise RuntimeError(f"trial {t.trial_id} reported success but {trial_dir(exp, t)} has no {METRICS_FILE}")
        out[t.trial_id] = m
    return out


def run_experiment(exp: ExperimentConfig, base: Mapping[str, Any], config_path: str = "",
                   report_only: bool = False) -> dict[str, Any]:
    """Both stages, ``experiment.json`` and the report; returns the experiment record."""
    from ray_train.report import write_report

    os.makedirs(exp.output, exist_ok=True)
    tune_list = tuning_trials(exp)
    chosen: dict[str, dict[str, Any]] = {}
    tuning_rows: list[dict[str, Any]] = []
    if tune_list:
        check_prepared(trial_config(base, exp, tune_list[0]), "validation", "tuning")
    probe = trial_config(base, exp, final_trials(exp, {})[0])
    check_prepared(probe, "eval", "final grid")

    if not report_only:
        init_ray(probe, concurrent_runs=exp.max_concurrent_trials)
    if tune_list:
        metrics = ({t.trial_id: read_metrics(trial_dir(exp, t)) or {} for t in tune_list} if report_only
                   else run_trials(exp, base, tune_list, "tuning"))
        chosen, tuning_rows = select_best(tune_list, metrics, exp.tuning.select_by)  # type: ignore[union-attr]
        chosen = inherit_choices(chosen, exp.tuning.inherit)  # type: ignore[union-attr]
        print(f"[experiment] chosen on the validation split: {json.dumps(chosen)}", flush=True)
    final = final_trials(exp, chosen)
    if not report_only:
        run_trials(exp, base, final, "final")
    record = {
        "name": exp.name,
        "config_file": config_path,
        "base": exp.base,
        "output": exp.output,
        "methods": list(exp.methods),
        "data_fractions": list(exp.data_fractions),
        "seeds": list(exp.seeds),
        "grid": {k: list(v) for k, v in exp.grid.items()},
        "overrides": dict(exp.overrides),
        "tuning": None if exp.tuning is None else {
            "prepared": exp.tuning.prepared, "select_by": exp.tuning.select_by, "seeds": list(exp.tuning.seeds),
            "data_fraction": exp.tuning.data_fraction,
            "space": {m: {k: list(v) for k, v in axes.items()} for m, axes in exp.tuning.space.items()},
            "inherit": dict(exp.tuning.inherit),
            "rows": tuning_rows, "chosen": chosen,
        },
        "trials": [{**t.to_dict(), "run_dir": trial_dir(exp, t)} for t in tune_list + final],
    }
    write_json(os.path.join(exp.output, EXPERIMENT_FILE), record)
    report = write_report(exp.output)
    print(f"[experiment] report -> {report}", flush=True)
    return record


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        exp, base = load_experiment(args.config)
        if args.set_output:
            exp = ExperimentConfig(**{**exp.__dict__, "output": os.path.abspath(args.set_output)})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_experiment(exp, base, args.config, report_only=args.report_only)


if __name__ == "__main__":
    main()
