"""Print the metrics of several runs side by side.

    python -m ray_train.compare runs/synthetic/demo-none runs/synthetic/demo-cfm

Columns: each run (named by its folder and ``ssl.method``) and the MostPop baseline of the first
run (the same split for all runs of one prepared folder). Rows: recall and NDCG at every K, then
recall per popularity bucket (head, tail, cold).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence


def _load(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {run_dir} is not an evaluated run. Train it with "
            f"`python -m ray_train.train` or evaluate it with `python -m ray_train.evaluate --run {run_dir}`"
        )
    with open(path) as fh:
        metrics = json.load(fh)
    with open(os.path.join(run_dir, "config.json")) as fh:
        config = json.load(fh)
    return metrics, config


def _fmt(x: Optional[float]) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def rows(metrics: dict[str, Any]) -> dict[str, Optional[float]]:
    """Flatten one metrics.json (or its ``mostpop`` part) into ``{row label: value}``."""
    out: dict[str, Optional[float]] = {}
    for key, value in metrics.items():
        if key.startswith(("recall@", "ndcg@")):
            out[key] = value
    for bucket in ("head", "tail", "cold"):
        for key, value in metrics.get("by_bucket", {}).get(bucket, {}).items():
            out[f"{bucket} {key}"] = value
    return out


def table(run_dirs: Sequence[str]) -> str:
    loaded = [_load(d) for d in run_dirs]
    columns = [f"{os.path.basename(d.rstrip('/'))} ({c['ssl']['method']})" for d, (_, c) in zip(run_dirs, loaded)]
    columns.append("MostPop")
    values = [rows(m) for m, _ in loaded] + [rows(loaded[0][0].get("mostpop", {}))]
    labels = list(dict.fromkeys(k for v in values for k in v))
    width = max(len(c) for c in columns) + 2
    lines = ["metric".ljust(18) + "".join(c.rjust(width) for c in columns)]
    for label in labels:
        lines.append(label.ljust(18) + "".join(_fmt(v.get(label)).rjust(width) for v in values))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description="Print several runs' metrics.json side by side")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.json and config.json)")
    out = table(p.parse_args(argv).runs)
    print(out)
    return out


if __name__ == "__main__":
    main()
