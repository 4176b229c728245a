"""Experiment grids: which training runs an experiment is made of, and how the tuned values are
chosen. Plain Python (no Ray): ``ray_train.experiment`` runs the trials, ``ray_train.report``
reads them.

An experiment YAML (``conf/experiments/<dataset>.yaml``)::

    name: ml-100k
    base: ../ml-100k.yaml              # the run config every trial starts from (relative to this file)
    output: runs/experiments/ml-100k   # trials/<trial id>/ run folders, report.md, plots
    overrides: {train.epochs: 8, train.num_workers: 1}   # dotted keys, applied to every trial
    methods: [baseline, fd, so, rfm, rfm_no_compl, cfm, cfm_no_dropout]
    data_fractions: [1.0, 0.1]        # train.data_fraction: a hash down-sample of train/
    seeds: [0, 1, 2]                  # train.seed
    grid: {ssl.alpha: [0.1, 1.0]}     # optional axes crossed with everything (dotted keys)
    tuning:                           # optional: chosen on a validation split, never on eval
      prepared: data/ml-100k/prepared-validation   # prepared with prepare.split.holdout=validation
      seeds: [0]
      data_fraction: 1.0
      select_by: recall@50
      space:                          # per method: values tried; the best mean wins
        cfm: {ssl.alpha: [0.1, 0.3, 1.0]}
      inherit: {cfm_no_dropout: cfm}  # ablations reuse their parent's choice
    max_concurrent_trials: 2

Methods are the paper's arms (Yao et al. 2021, Tables 2-5), each a set of config values:
``baseline`` (no SSL), ``fd`` (feature dropout in the main task), ``so`` (spread-out), ``rfm``,
``rfm_no_compl``, ``cfm`` and ``cfm_no_dropout`` (CFM without multi-valued dropout).

Trial ids are stable names built from the trial's values (``cfm-f0.1-s2``,
``cfm-f1-s0-ssl.alpha=0.1``, ``tune-cfm-ssl.alpha=0.3-s0``), so a restarted experiment finds its
finished trials by folder.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from common.config import ConfigError, build

BASELINE = "baseline"
METHODS: dict[str, dict[str, Any]] = {
    "baseline": {"ssl.method": "none"},
    "fd": {"ssl.method": "fd"},
    "so": {"ssl.method": "so"},
    "rfm": {"ssl.method": "rfm", "ssl.multi_value_dropout": True},
    "rfm_no_compl": {"ssl.method": "rfm_no_compl", "ssl.multi_value_dropout": True},
    "cfm": {"ssl.method": "cfm", "ssl.multi_value_dropout": True},
    "cfm_no_dropout": {"ssl.method": "cfm", "ssl.multi_value_dropout": False},
}
# Keys a method owns: a grid or tuning axis may not set them, or the method name would lie.
_METHOD_KEYS = {k for values in METHODS.values() for k in values}
SELECT_METRICS_PREFIXES = ("recall@", "ndcg@")


@dataclass(frozen=True)
class TuningConfig:
    """Hyper-parameter choice on a validation split carved from train (``prepared`` must be a
    folder written with ``prepare.split.holdout: validation``)."""

    prepared: str
    space: Mapping[str, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    data_fraction: float = 1.0
    select_by: str = "recall@50"
    # Ablation arms that take another method's chosen values instead of a search of their own
    # ({cfm_no_dropout: cfm}): the ablation then differs from its parent in one switch only.
    inherit: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for child, parent in self.inherit.items():
            _check_method(child, "tuning.inherit")
            _check_method(parent, "tuning.inherit")
            if child in self.space:
                raise ConfigError(f"tuning.inherit: {child} has a tuning.space of its own; drop one of the two")
            if parent not in self.space:
                raise ConfigError(f"tuning.inherit: {child} inherits from {parent}, which has no tuning.space")
        if not self.seeds:
            raise ConfigError("tuning.seeds must list at least one seed")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ConfigError(f"tuning.data_fraction must be in (0, 1], got {self.data_fraction}")
        if not self.select_by.startswith(SELECT_METRICS_PREFIXES):
            raise ConfigError(f"tuning.select_by must be a recall@K or ndcg@K key, got {self.select_by!r}")
        for method, axes in self.space.items():
            _check_method(method, "tuning.space")
            _check_axes(axes, f"tuning.space.{method}")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    base: str
    output: str
    methods: tuple[str, ...] = tuple(METHODS)
    data_fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    tuning: Optional[TuningConfig] = None
    max_concurrent_trials: int = 1

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods must list at least one method")
        for m in self.methods:
            _check_method(m, "methods")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods lists a method twice: {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must list distinct seeds, got {list(self.seeds)}")
        if not self.data_fractions or any(not 0.0 < f <= 1.0 for f in self.data_fractions):
            raise ConfigError(f"data_fractions must be in (0, 1], got {list(self.data_fractions)}")
        _check_axes(self.grid, "grid")
        bad = sorted(set(self.overrides) & (_METHOD_KEYS | {"train.seed", "train.data_fraction"}))
        if bad:
            raise ConfigError(f"overrides may not set {bad}: methods, seeds and data_fractions set them per trial")
        if self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials must be >= 1")
        if self.tuning is not None:
            extra = sorted((set(self.tuning.space) | set(self.tuning.inherit)) - set(self.methods))
            if extra:
                raise ConfigError(f"tuning.space tunes {extra}, which are not in methods {list(self.methods)}")
            overlap = sorted({k for axes in self.tuning.space.values() for k in axes} & set(self.grid))
            if overlap:
                raise ConfigError(f"{overlap} are both tuned and grid axes; pick one")


def _check_method(method: str, where: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; known methods: {list(METHODS)}")


def _check_axes(axes: Mapping[str, Sequence[Any]], where: str) -> None:
    for key, values in axes.items():
        if key in _METHOD_KEYS or key in ("train.seed", "train.data_fraction"):
            raise ConfigError(f"{where}: {key} is set by methods/seeds/data_fractions, not by an axis")
        if "." not in key:
            raise ConfigError(f"{where}: {key!r} must be a dotted config key such as ssl.alpha")
        if not values:
            raise ConfigError(f"{where}.{key}: list at least one value")


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """``(experiment, base run config as a dict)``; ``base``, ``output`` and ``tuning.prepared``
    are resolved: ``base`` relative to the experiment file, the others relative to the current
    directory (like every ``paths.*`` key)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file {str(p)!r} does not exist; see conf/experiments/")
    with p.open() as fh:
        raw = yaml.safe_load(fh) or {}
    exp = build(ExperimentConfig, raw)
    base_path = (p.parent / exp.base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{p}: base {exp.base!r} resolves to {base_path}, which does not exist")
    with base_path.open() as fh:
        base = yaml.safe_load(fh) or {}
    tuning = exp.tuning
    if tuning is not None:
        tuning = TuningConfig(**{**tuning.__dict__, "prepared": os.path.abspath(tuning.prepared)})
    resolved = ExperimentConfig(**{**exp.__dict__, "base": str(base_path), "output": os.path.abspath(exp.output),
                                   "tuning": tuning})
    return resolved, base


@dataclass(frozen=True)
class Trial:
    """One training run of the experiment. ``values``: every dotted config value the trial sets
    on top of the base config and the experiment's overrides."""

    trial_id: str
    stage: Literal["tune", "final"]
    method: str
    data_fraction: float
    seed: int
    params: Mapping[str, Any]  # grid / tuned values (dotted keys), for grouping in the report
    values: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "stage": self.stage, "method": self.method,
                "data_fraction": self.data_fraction, "seed": self.seed,
                "params": dict(self.params), "values": dict(self.values)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Trial":
        return Trial(d["trial_id"], d["stage"], d["method"], float(d["data_fraction"]), int(d["seed"]),
                     dict(d["params"]), dict(d["values"]))


def format_value(v: Any) -> str:
    """A grid value as trial ids and report rows spell it (floats in ``%g``)."""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _grid_points(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = sorted(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _trial(stage: str, method: str, fraction: float, seed: int, params: Mapping[str, Any],
           prepared: Optional[str] = None) -> Trial:
    values: dict[str, Any] = {**METHODS[method], **params, "train.seed": seed, "train.data_fraction": fraction}
    if prepared is not None:
        values["paths.prepared"] = prepared
    parts = ["tune"] if stage == "tune" else []
    parts.append(method)
    if stage == "final" or fraction != 1.0:
        parts.append(f"f{format_value(fraction)}")
    parts += [f"{k}={format_value(v)}" for k, v in sorted(params.items())]
    parts.append(f"s{seed}")
    return Trial("-".join(parts), stage, method, fraction, seed, dict(params), values)  # type: ignore[arg-type]


def tuning_trials(exp: ExperimentConfig) -> list[Trial]:
    """Every (method, point of its tuning space, tuning seed) on the validation folder."""
    if exp.tuning is None:
        return []
    t = exp.tuning
    return [
        _trial("tune", method, t.data_fraction, seed, point, t.prepared)
        for method in exp.methods if method in t.space
        for point in _grid_points(t.space[method])
        for seed in t.seeds
    ]


def final_trials(exp: ExperimentConfig, chosen: Mapping[str, Mapping[str, Any]]) -> list[Trial]:
    """methods x data_fractions x grid points x seeds; ``chosen[method]`` (tuned values) is
    applied to every trial of that method."""
    return [
        _trial("final", method, fraction, seed, {**chosen.get(method, {}), **point})
        for method in exp.methods
        for fraction in exp.data_fractions
        for point in _grid_points(exp.grid)
        for seed in exp.seeds
    ]


def select_best(trials: Sequence[Trial], metrics: Mapping[str, Mapping[str, Any]], select_by: str
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per method, the tuning point with the highest mean ``select_by`` over its seeds (ties: the
    point listed first). Returns ``(chosen {method: params}, table rows)``; a trial without
    metrics counts as missing and its point is ranked on the seeds that finished."""
    groups: dict[tuple[str, tuple[tuple[str, Any], ...]], list[float]] = {}
    order: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    for t in trials:
        key = (t.method, tuple(sorted(t.params.items())))
        if key not in groups:
            groups[key] = []
            order.append(key)
        value = (metrics.get(t.trial_id) or {}).get(select_by)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            groups[key].append(float(value))
    rows: list[dict[str, Any]] = []
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for method, params in order:
        vals = groups[(method, params)]
        mean = sum(vals) / len(vals) if vals else float("nan")
        rows.append({"method": method, "params": dict(params), "seeds": len(vals), select_by: mean})
        if vals and (method not in best or mean > best[method][0]):
            best[method] = (mean, dict(params))
    chosen = {m: p for m, (_, p) in best.items()}
    for row in rows:
        row["chosen"] = chosen.get(row["method"]) == row["params"]
    return chosen, rows


def inherit_choices(chosen: Mapping[str, Mapping[str, Any]], inherit: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``chosen`` plus, for each ``child: parent`` of ``tuning.inherit``, the parent's values."""
    out = {m: dict(p) for m, p in chosen.items()}
    for child, parent in inherit.items():
        if parent in chosen:
            out[child] = dict(chosen[parent])
    return out
