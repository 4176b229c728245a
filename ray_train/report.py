"""The report of an experiment: ``report.md`` and ``plots/*.png`` from its finished trials.

    python -m ray_train.report --experiment runs/experiments/ml-100k

Reads ``<experiment>/experiment.json`` (written by ``ray_train.experiment``) and every trial's
``metrics.json``, ``history.json`` and ``config.json``. Per data fraction:

* **Overall**: Recall/NDCG@{10,50} as mean ± std over seeds (sample std), with the relative change
  of the mean against the baseline; MostPop as a reference row.
* **Head / tail / cold**: Recall@{10,50} per popularity bucket, same format.
* **At a glance**: the relative change of Recall@50 against the baseline, overall and per bucket,
  marked ``*`` where it exceeds the seed noise (``|Δ| > sqrt(s_a² + s_b²)``).
* **Plots**: Recall@50 per popularity decile (one line per method, MostPop dashed) and the main and
  SSL training losses per epoch (mean over seeds).

Trials that have not finished are left out and counted in the report; nothing is filled in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from common.experiment import BASELINE, format_value

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
OVERALL_KEYS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50")
BUCKETS = ("head", "tail", "cold")
BUCKET_KS = ("recall@10", "recall@50")
GLANCE_KEY = "recall@50"


@dataclass
class TrialResult:
    trial: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def arm(self) -> str:
        """Row label: the method plus any grid values (tuned values are reported separately)."""
        grid = self.trial.get("grid_params", {})
        if not grid:
            return self.trial["method"]
        return f"{self.trial['method']} ({', '.join(f'{k}={format_value(v)}' for k, v in sorted(grid.items()))})"


def _read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def load_results(exp_dir: str) -> tuple[dict[str, Any], list[TrialResult], list[dict[str, Any]]]:
    """``(experiment record, finished final trials, unfinished final trials)``."""
    path = os.path.join(exp_dir, "experiment.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: run `python -m ray_train.experiment --config ...` first")
    record = _read_json(path)
    grid_keys = set(record.get("grid", {}))
    done: list[TrialResult] = []
    missing: list[dict[str, Any]] = []
    for t in record["trials"]:
        if t["stage"] != "final":
            continue
        t = {**t, "grid_params": {k: v for k, v in t["params"].items() if k in grid_keys}}
        run_dir = t["run_dir"]
        if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
            missing.append(t)
            continue
        history_path = os.path.join(run_dir, "history.json")
        done.append(TrialResult(
            t,
            _read_json(os.path.join(run_dir, "metrics.json")),
            _read_json(history_path) if os.path.isfile(history_path) else [],
            _read_json(os.path.join(run_dir, "config.json")),
        ))
    return record, done, missing


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def mean_std(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for one value) of the non-missing values, and their count."""
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def relative_change(value: float, base: float) -> float:
    if base == 0 or math.isnan(base) or math.isnan(value):
        return float("nan")
    return (value - base) / base


def _get(metrics: dict[str, Any], key: str, bucket: Optional[str] = None) -> Optional[float]:
    src = metrics if bucket is None else (metrics.get("by_bucket", {}).get(bucket) or {})
    return src.get(key)


def arm_stats(results: Sequence[TrialResult], key: str, bucket: Optional[str] = None) -> dict[str, tuple[float, float, int]]:
    by_arm: dict[str, list[Optional[float]]] = defaultdict(list)
    for r in results:
        by_arm[r.arm].append(_get(r.metrics, key, bucket))
    return {arm: mean_std(v) for arm, v in by_arm.items()}


def mostpop_value(results: Sequence[TrialResult], key: str, bucket: Optional[str] = None) -> Optional[float]:
    """MostPop is deterministic given the split (it ignores the seed): the first trial's value."""
    for r in results:
        if "mostpop" in r.metrics:
            return _get(r.metrics["mostpop"], key, bucket)
    return None


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _cell(mean: float, std: float, n: int, base: Optional[float], is_base: bool) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    text = f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"
    if base is not None and not is_base:
        rel = relative_change(mean, base)
        if not math.isnan(rel):
            text += f" ({rel * 100:+.1f}%)"
    return text


def _arms_in_order(results: Sequence[TrialResult], methods: Sequence[str]) -> list[str]:
    arms = list(dict.fromkeys(r.arm for r in sorted(results, key=lambda r: methods.index(r.trial["method"]))))
    return arms


def _baseline_arm(arms: Sequence[str]) -> Optional[str]:
    return BASELINE if BASELINE in arms else None


def metric_table(results: Sequence[TrialResult], methods: Sequence[str], columns: Sequence[tuple[str, Optional[str]]],
                 header: Sequence[str]) -> str:
    """Rows: arms then MostPop; cells ``mean ± std (rel. change vs baseline)``."""
    arms = _arms_in_order(results, methods)
    base_arm = _baseline_arm(arms)
    stats = [arm_stats(results, key, bucket) for key, bucket in columns]
    lines = ["| method | seeds | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for arm in arms:
        cells = []
        for col in stats:
            mean, std, n = col.get(arm, (float("nan"), float("nan"), 0))
            base = col[base_arm][0] if base_arm in col else None
            cells.append(_cell(mean, std, n, base, arm == base_arm))
        seeds = max(col.get(arm, (0, 0, 0))[2] for col in stats)
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    mp_cells = []
    for (key, bucket), col in zip(columns, stats):
        v = mostpop_value(results, key, bucket)
        base = col[base_arm][0] if base_arm in col else None
        mp_cells.append("–" if v is None else _cell(float(v), 0.0, 1, base, False))
    lines.append("| MostPop | – | " + " | ".join(mp_cells) + " |")
    return "\n".join(lines)


def glance_table(results: Sequence[TrialResult], methods: Sequence[str], key: str = GLANCE_KEY) -> tuple[str, list[dict[str, Any]]]:
    """Relative change of ``key`` vs the baseline, overall and per bucket; ``*`` beyond seed noise."""
    arms = _arms_in_order(results, methods)
    base_arm = _baseline_arm(arms)
    parts = [("overall", None)] + [(b, b) for b in BUCKETS]
    stats = {name: arm_stats(results, key, bucket) for name, bucket in parts}
    lines = ["| method | " + " | ".join(f"{name} {key}" for name, _ in parts) + " |", "|---|" + "---|" * len(parts)]
    rows: list[dict[str, Any]] = []
    if base_arm is None:
        return "(no baseline trials finished: no relative changes)", rows
    for arm in arms:
        if arm == base_arm:
            continue
        cells, row = [], {"arm": arm}
        for name, _ in parts:
            m, s, n = stats[name].get(arm, (float("nan"), float("nan"), 0))
            bm, bs, bn = stats[name][base_arm]
            rel = relative_change(m, bm)
            noise = math.sqrt((s if n > 1 else 0.0) ** 2 + (bs if bn > 1 else 0.0) ** 2)
            beyond = (abs(m - bm) > noise) if n > 1 and bn > 1 else None
            row[name] = (rel, beyond)
            cells.append("–" if math.isnan(rel) else f"{rel * 100:+.1f}%{' *' if beyond else ''}")
        rows.append(row)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def verdict(rows: list[dict[str, Any]], fraction: float, key: str = GLANCE_KEY) -> str:
    """One data-driven sentence per data fraction: which arm helps most on the tail and what it
    costs on the head."""
    if not rows:
        return f"- fraction {fraction:g}: no SSL/baseline comparison available."
    valid = [r for r in rows if not math.isnan(r["tail"][0])]
    if not valid:
        return f"- fraction {fraction:g}: tail {key} is undefined (no tail ground truth)."
    best = max(valid, key=lambda r: r["tail"][0])

    def fmt(part: str) -> str:
        rel, beyond = best[part]
        if math.isnan(rel):
            return f"{part} –"
        if beyond is None:
            return f"{part} {rel * 100:+.1f}% (one seed: noise unknown)"
        return f"{part} {rel * 100:+.1f}%{'' if beyond else ' (within seed noise)'}"

    better = [r["arm"] for r in rows if not math.isnan(r["tail"][0]) and r["tail"][0] > 0 and r["tail"][1]]
    if all(r["tail"][1] is None for r in valid):
        return (f"- fraction {fraction:g}: best tail {key} is **{best['arm']}**: {fmt('tail')}, {fmt('cold')}, "
                f"{fmt('head')}, {fmt('overall')} vs baseline.")
    helped = (f"arms beating the baseline on tail beyond seed noise: {', '.join(better)}" if better
              else "no arm beats the baseline on tail beyond seed noise")
    return (f"- fraction {fraction:g}: best tail {key} is **{best['arm']}**: "
            f"{fmt('tail')}, {fmt('cold')}, {fmt('head')}, {fmt('overall')} vs baseline; {helped}.")


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fraction_tag(fraction: float) -> str:
    return f"f{fraction:g}".replace(".", "_")


def plot_deciles(results: Sequence[TrialResult], methods: Sequence[str], path: str, key: str = GLANCE_KEY) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in _arms_in_order(results, methods):
        curves = [
            [d.get(key) for d in r.metrics.get("by_popularity_decile", [])] for r in results if r.arm == arm
        ]
        curves = [c for c in curves if c]
        if not curves:
            continue
        mean = [mean_std([c[i] for c in curves])[0] for i in range(len(curves[0]))]
        ax.plot(range(len(mean)), mean, marker="o", label=arm)
    mp = next((r.metrics["mostpop"].get("by_popularity_decile") for r in results if "mostpop" in r.metrics), None)
    if mp:
        ax.plot(range(len(mp)), [d.get(key) if d.get(key) is not None else float("nan") for d in mp],
                linestyle="--", color="grey", label="MostPop")
    ax.set_xlabel("item popularity decile (0 = most clicked 10% of the catalogue)")
    ax.set_ylabel(f"{key} within the decile")
    ax.set_title(f"{key} by item popularity decile (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(results: Sequence[TrialResult], methods: Sequence[str], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm in _arms_in_order(results, methods):
        hist = [r.history for r in results if r.arm == arm and r.history]
        if not hist:
            continue
        epochs = min(len(h) for h in hist)
        for ax, part in zip(axes, ("main", "ssl")):
            values = [mean_std([h[i][part] for h in hist])[0] for i in range(epochs)]
            if part == "ssl" and all(v == 0 for v in values):
                continue  # methods without an SSL task
            ax.plot(range(1, epochs + 1), values, marker=".", label=arm)
    axes[0].set_title("main loss (batch softmax, logQ-corrected)")
    axes[1].set_title("SSL loss (InfoNCE over item views; so: spread-out)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _protocol(record: dict[str, Any], results: Sequence[TrialResult]) -> list[str]:
    r0 = results[0]
    c = r0.config
    counts = r0.metrics.get("counts", {})
    buckets = counts.get("by_bucket", {})
    tc, sc, mc = c["train"], c["ssl"], c["model"]
    steps = r0.history[-1]["global_step"] if r0.history else 0
    catalogue = counts.get("items", 0)
    lines = [
        f"- Dataset: `{c['dataset']['kind']}`, prepared folder `{_shown_path(c['paths']['prepared'])}` "
        f"(split `{c['prepare']['split']['kind']}`, eval fraction {c['prepare']['split']['eval_fraction']:g}).",
        f"- Eval: {counts.get('users', '?')} users scored, {counts.get('ground_truth_pairs', '?')} (user, item) pairs, "
        f"full catalogue of {catalogue:,} items ranked by exact dot product, items seen in train excluded.",
        "- Buckets (by full-train click count): " + ", ".join(
            f"{b} {buckets.get(b, {}).get('items', '?')} items / {buckets.get(b, {}).get('pairs', '?')} pairs"
            for b in BUCKETS) + f"; head = top {c['eval']['head_fraction']:.0%} of items, cold = never in train.",
        f"- Model: embedding {mc['embedding_dim']}, tower MLP {mc['tower_layers']}; train: {tc['epochs']} epochs, "
        f"batch {tc['batch_size']}, lr {tc['lr']:g}, tau {tc['tau']:g}, logQ {tc['logq_correction']}, "
        f"{tc['num_workers']} worker(s); SSL batch {sc['batch_size']}, default alpha {sc['alpha']:g}, "
        f"SSL tau {sc['tau']:g}, dropout rate {sc['dropout_rate']:g}.",
        "- Data fraction: `train.data_fraction` keeps a deterministic hash sample of train events (the same events "
        "for every method and seed); logQ, the buckets, MostPop and the seen-item exclusions use the full train split.",
    ]
    if steps and catalogue:
        draws = steps * sc["batch_size"] * tc["num_workers"]
        lines.append(
            f"- SSL catalogue coverage (fraction {r0.trial['data_fraction']:g}): {draws:,} uniform item draws per run over "
            f"{catalogue:,} items; expected share of items never drawn exp(-draws/items) = {math.exp(-draws / catalogue):.2e}, "
            "so never-clicked items do receive SSL gradient."
        )
    return lines


def _shown_path(path: str) -> str:
    """A path under the current directory as a relative one (reports are read in other checkouts)."""
    if "://" in path:
        return path
    real = os.path.realpath(path)
    rel = os.path.relpath(real)
    return path if rel.startswith("..") else rel


def _tuning_section(record: dict[str, Any]) -> list[str]:
    t = record.get("tuning")
    if not t:
        return ["No tuning stage: every method ran with the base config's values."]
    key = t["select_by"]
    lines = [
        f"Hyper-parameters were chosen on a **validation split carved from train** (`{_shown_path(t['prepared'])}`, prepared with "
        f"`prepare.split.holdout=validation`: the eval events are withheld and train is split again by the same rule), "
        f"by mean validation {key} over seeds {t['seeds']}. The eval split was never used for choosing.",
        "",
        f"| method | values | seeds | validation {key} | chosen |",
        "|---|---|---|---|---|",
    ]
    for row in t["rows"]:
        vals = ", ".join(f"{k}={v}" for k, v in sorted(row["params"].items())) or "(defaults)"
        v = row.get(key)
        lines.append(f"| {row['method']} | {vals} | {row['seeds']} | "
                     f"{'–' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'} | "
                     f"{'✓' if row.get('chosen') else ''} |")
    for child, parent in t.get("inherit", {}).items():
        lines += ["", f"{child} reuses the values chosen for {parent}: "
                  f"{', '.join(f'{k}={v}' for k, v in sorted(t['chosen'].get(child, {}).items())) or '(none)'}."]
    untuned = [m for m in record["methods"] if m not in t["chosen"]]
    if untuned:
        lines += ["", f"Not tuned (base config values): {', '.join(untuned)}."]
    return lines


def build_report(exp_dir: str, plots_dir: Optional[str] = None, link_dir: str = PLOTS_DIR) -> str:
    """The report's markdown; plots are written to ``plots_dir`` (default ``<exp_dir>/plots``)
    and linked as ``<link_dir>/<name>.png``."""
    record, results, missing = load_results(exp_dir)
    methods = record["methods"]
    plots = plots_dir or os.path.join(exp_dir, PLOTS_DIR)
    os.makedirs(plots, exist_ok=True)
    out = [
        f"# Experiment `{record['name']}`",
        "",
        f"Produced by `python -m ray_train.experiment --config {record.get('config_file') or '<experiment yaml>'}` "
        f"(report alone: `python -m ray_train.report --experiment {exp_dir}`).",
        "",
        f"{len(results)} finished final trials: methods {', '.join(methods)} × data fractions "
        f"{', '.join(f'{f:g}' for f in record['data_fractions'])} × seeds {record['seeds']}"
        + (f" × grid {record['grid']}" if record.get("grid") else "") + "."
        + (f" **{len(missing)} trials have not finished and are left out**: "
           + ", ".join(t["trial_id"] for t in missing[:10]) + (" …" if len(missing) > 10 else "") if missing else ""),
        "",
    ]
    if not results:
        out.append("No finished trials yet.")
        return "\n".join(out) + "\n"
    out += ["## Protocol", ""] + _protocol(record, results) + [""]
    out += ["## At a glance", "",
            f"Relative change of mean {GLANCE_KEY} against the baseline; `*` marks a difference larger than the "
            "seed noise (|Δ| > sqrt(s_a² + s_b²), sample std over seeds).", ""]
    sections: list[str] = []
    summary: list[str] = []
    for fraction in record["data_fractions"]:
        sub = [r for r in results if r.trial["data_fraction"] == fraction]
        if not sub:
            continue
        tag = _fraction_tag(fraction)
        glance, rows = glance_table(sub, methods)
        summary.append(verdict(rows, fraction))
        deciles_png = f"{link_dir}/deciles_{tag}.png"
        losses_png = f"{link_dir}/losses_{tag}.png"
        plot_deciles(sub, methods, os.path.join(plots, f"deciles_{tag}.png"))
        plot_losses(sub, methods, os.path.join(plots, f"losses_{tag}.png"))
        sections += [
            f"## Training data fraction {fraction:g}", "",
            "### Overall (mean ± std over seeds, change vs baseline)", "",
            metric_table(sub, methods, [(k, None) for k in OVERALL_KEYS], [k.replace("recall", "Recall").replace("ndcg", "NDCG") for k in OVERALL_KEYS]),
            "",
            "### Head, tail and cold items (Recall)", "",
            metric_table(sub, methods, [(k, b) for b in BUCKETS for k in BUCKET_KS],
                         [f"{b} {k.replace('recall', 'R')}" for b in BUCKETS for k in BUCKET_KS]),
            "",
            f"### {GLANCE_KEY} vs baseline", "",
            glance,
            "",
            f"![{GLANCE_KEY} by popularity decile, fraction {fraction:g}]({deciles_png})",
            "",
            f"![training losses, fraction {fraction:g}]({losses_png})",
            "",
        ]
    out += summary + [""] + sections
    out += ["## Hyper-parameter selection", ""] + _tuning_section(record) + [""]
    return "\n".join(out) + "\n"


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_report(exp_dir: str) -> str:
    path = os.path.join(exp_dir, REPORT_FILE)
    _write_text(path, build_report(exp_dir))
    return path


def write_combined(exp_dirs: Sequence[str], out: str, command: str) -> str:
    """Several experiments' reports in one markdown file (e.g. ``docs/results.md``), each one's
    plots in ``<out without .md>/<experiment name>/``; headings move one level down."""
    out_dir = os.path.dirname(os.path.abspath(out))
    asset_root = os.path.splitext(os.path.abspath(out))[0]
    parts = ["# Results", "", f"Produced by `{command}`.", ""]
    for exp_dir in exp_dirs:
        name = load_results(exp_dir)[0]["name"]
        plots = os.path.join(asset_root, name)
        body = build_report(exp_dir, plots, os.path.relpath(plots, out_dir))
        parts += ["#" + line if line.startswith("#") else line for line in body.splitlines()] + [""]
    os.makedirs(out_dir, exist_ok=True)
    _write_text(out, "\n".join(parts))
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description="Write report.md and plots for a finished (or partial) experiment")
    p.add_argument("--experiment", required=True, action="append",
                   help="an experiment's output folder (holds experiment.json); repeat with --out to combine")
    p.add_argument("--out", default=None, help="write one combined markdown file here (e.g. docs/results.md)")
    p.add_argument("--produced-by", default=None,
                   help="the command named at the top of the combined file (default: this report command)")
    args = p.parse_args(argv)
    if args.out:
        command = args.produced_by or (
            "python -m ray_train.report " + " ".join(f"--experiment {e}" for e in args.experiment) + f" --out {args.out}"
        )
        path = write_combined(args.experiment, args.out, command)
    elif len(args.experiment) == 1:
        path = write_report(args.experiment[0])
    else:
        p.error("several --experiment folders need --out FILE")
    print(path)
    return path


if __name__ == "__main__":
    main()
