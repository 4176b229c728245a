"""What the training benchmarks share: the common command-line options and the inputs a Ray Train
worker loads (``ray_train.worker``: manifest, feature specs, catalogue, ``log_q``, mutual
information), read from a prepared folder."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch import Tensor  # noqa: E402

from common.catalogue import Catalogue  # noqa: E402
from common.config import Config, load_config  # noqa: E402
from common.features import FeatureSpec, specs_from_manifest  # noqa: E402
from common.manifest import read_manifest  # noqa: E402
from ray_train.data import load_catalogue, load_log_q, load_mutual_info  # noqa: E402


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "conf" / "default.yaml"))
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--prepared", default=None, help="prepared folder (default: paths.prepared of the config)")


@dataclass
class WorkerInputs:
    cfg: Config
    prepared: str  # absolute
    manifest: dict[str, Any]
    specs: list[FeatureSpec]
    catalogue: Catalogue
    log_q: Tensor
    mutual_info: dict[frozenset[str], float]


def load_inputs(args: argparse.Namespace) -> WorkerInputs:
    """The config of ``--config``/``--set`` and what a worker loads from ``--prepared`` (default:
    the config's ``paths.prepared``)."""
    cfg = load_config(args.config, args.overrides)
    prepared = os.path.abspath(args.prepared or cfg.paths.prepared)
    manifest = read_manifest(prepared)
    specs = specs_from_manifest(manifest)
    catalogue = load_catalogue(prepared, manifest, specs)
    return WorkerInputs(cfg, prepared, manifest, specs, catalogue, load_log_q(prepared, manifest, catalogue),
                        load_mutual_info(prepared, manifest))
