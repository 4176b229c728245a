"""Train the two-tower model with Ray Train (TorchTrainer, DDP) fed by Ray Data, then evaluate.

    python -m ray_train.train --config conf/default.yaml --set ssl.method=cfm ssl.alpha=0.3
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", "data", "runs", ".git"]}' \\
        -- python -m ray_train.train --config conf/default.yaml \\
           --set paths.prepared=/abs/prepared paths.runs=/abs/runs
    python -m ray_train.train --resume runs/synthetic/<run name>     # driver died: continue

Cluster: with ``RAY_ADDRESS`` set (``ray job submit`` sets it) the driver joins that cluster as
is. Otherwise it starts a local Ray with at least ``ceil(num_workers * cpus_per_worker) + 2``
logical CPUs: Ray Data's read tasks need CPUs that the train workers have not reserved, or the
ingest waits forever.

Run folder ``<paths.runs>/<run name>/`` (layout shared with ``ray_train.evaluate``/``export``):
``config.json`` (resolved config, absolute paths; written first, so ``--resume`` can rebuild the
run), ``history.json`` (one record per epoch), ``model/model.pt`` (``{"model": state_dict,
"epoch": n}``), ``model/features.json``, ``model/mutual_info.json``, ``metrics.json``,
``export/``, ``ray/`` (Ray Train's storage: checkpoints) and ``workers/`` (worker pids). On a
multi-node cluster ``paths.runs`` must be a filesystem every node mounts at the same path (NFS):
checkpoints, history and the final model are written there by workers and the driver.

A fresh run gets a fresh name (``<time>-<ssl.method>-<random>``): Ray Train resumes silently
whenever ``RunConfig(name, storage_path)`` matches an earlier run, so names are never reused by
accident; ``--resume RUN_DIR`` reuses one on purpose (its ``config.json``, plus any ``--set``).

Item catalogue (``train.catalogue``, ``catalogue_plan``): ``replicated`` loads it whole into every
worker; ``streaming`` starts its shard actors (``ray_train/streaming.py``) before the trainer,
denormalises the positives into the train Dataset and hands the workers the service; ``auto``
streams when the replicated catalogue, estimated from the Parquet footers, would exceed
``ray_train.streaming.REPLICATE_MAX_BYTES`` per worker. The shards are stopped when ``fit`` returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from typing import Any, Optional, Sequence

from common.config import Config, ConfigError, apply_overrides, from_dict, load_config
from common.features import specs_from_manifest
from common.manifest import manifest_exists, read_manifest
from ray_train.data import (
    parquet_uncompressed_bytes,
    read_table,
    read_train_dataset,
    should_materialize,
    steps_per_epoch,
    table_uri,
    train_columns,
)
from ray_train.worker import FAILURE_KEY, HISTORY_FILE, STATE_FILE, train_loop_per_worker, write_json

CONFIG_FILE = "config.json"


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the message names the step and the loss part."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the two-tower model on Ray Train, then evaluate it")
    p.add_argument("--config", default="conf/default.yaml", help="YAML config (ignored with --resume)")
    p.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys, e.g. --set ssl.method=cfm ssl.alpha=0.3",
    )
    p.add_argument("--run-name", default=None, help="name of the run folder under paths.runs (default: fresh)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (its config.json is used)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation and export after training")
    return p.parse_args(argv)


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def absolute_paths(cfg: Config) -> Config:
    """Workers and ``ray job submit`` run in other directories: store absolute paths."""
    paths = dataclasses.replace(
        cfg.paths, raw=_abs(cfg.paths.raw), prepared=_abs(cfg.paths.prepared), runs=_abs(cfg.paths.runs)
    )
    return dataclasses.replace(cfg, paths=paths)


def fresh_run_name(cfg: Config) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.ssl.method}-{uuid.uuid4().hex[:6]}"


def resolve_run(args: argparse.Namespace) -> tuple[Config, str, bool]:
    """The config, the run folder and whether this continues an earlier run."""
    if args.resume:
        run_dir = os.path.abspath(args.resume.rstrip("/"))
        path = os.path.join(run_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--resume {args.resume}: no {CONFIG_FILE} there, so it is not a run folder written by "
                f"ray_train.train; pass <paths.runs>/<run name>"
            )
        with open(path) as fh:
            cfg = from_dict(apply_overrides(json.load(fh), args.overrides))
        return cfg, run_dir, True
    cfg = absolute_paths(load_config(args.config, args.overrides))
    name = args.run_name or fresh_run_name(cfg)
    run_dir = os.path.join(cfg.paths.runs, name)
    if os.path.exists(run_dir):
        raise FileExistsError(
            f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it or choose "
            f"another --run-name (Ray would otherwise silently resume its checkpoints)"
        )
    return cfg, run_dir, False


def init_ray(cfg: Config, concurrent_runs: int = 1) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local one with CPUs to spare for Ray Data
    (``concurrent_runs`` runs of ``cfg``'s size at once, for experiments)."""
    import ray

    if ray.is_initialized():
        return
    need = concurrent_runs * math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker)
    if os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(log_to_driver=True)
        print(f"[train] joined the Ray cluster at {ctx.address_info.get('gcs_address')}", flush=True)
    else:
        # address="local": never join another `ray start` cluster found on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need + 2))
        print("[train] started a local Ray instance (set RAY_ADDRESS to use a cluster)", flush=True)


def _epoch_printer():
    from ray.train import UserCallback

    class EpochPrinter(UserCallback):
        """Prints one line per epoch as ranks report (runs in the Ray Train controller; Ray forwards
        its stdout to the driver's console)."""

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if "main" in m:
                print(
                    f"[train] epoch {m['epoch']:>3}  step {m['global_step']:>7}  loss {m['loss']:.4f}  "
                    f"main {m['main']:.4f}  ssl {m['ssl']:.4f}  {m['examples_per_s']:,.0f} ex/s"
                    f"{'  (checkpoint)' if checkpoint is not None else ''}"
                    f"{'  attempt ' + str(m['attempt']) if m['attempt'] > 1 else ''}",
                    flush=True,
                )

    return EpochPrinter()


def train_data_config() -> Any:
    """Ray Train's default split (``streaming_split(world, equal=True)``) with ``preserve_order``:
    blocks reach the seeded ``randomize_block_order`` in file order rather than task-completion
    order, so the seeded shuffles are reproducible (a one-worker run sees the same batches every
    time)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def catalogue_plan(cfg: Config, manifest: dict[str, Any], specs: list) -> tuple[str, int, int]:
    """``(mode, items, replicated bytes per worker)`` for ``train.catalogue``; the size is
    estimated from the Parquet footers of ``items/`` (nothing is read)."""
    from ray_train.streaming import REPLICATE_MAX_BYTES, choose_catalogue_mode, estimate_replicated_bytes

    items, nbytes = estimate_replicated_bytes(table_uri(cfg.paths.prepared, manifest, "items"), specs)
    mode = choose_catalogue_mode(cfg.train.catalogue, nbytes)
    print(
        f"[train] catalogue: {items:,} items, {nbytes / 2**20:,.1f} MiB per worker if replicated "
        f"(auto streams above {REPLICATE_MAX_BYTES / 2**20:,.0f} MiB); train.catalogue="
        f"{cfg.train.catalogue} -> {mode}",
        flush=True,
    )
    return mode, items, nbytes


def train_dataset(cfg: Config, manifest: dict[str, Any], specs: list, catalogue_service: Any = None,
                  item_row_bytes: float = 0.0) -> Any:
    """The train log as a Ray Dataset; materialized in the object store when it is small enough.
    With ``catalogue_service`` (streamed catalogue) every row also carries its clicked item's
    features (about ``item_row_bytes`` more per row)."""
    import ray

    prepared = cfg.paths.prepared
    size = parquet_uncompressed_bytes(table_uri(prepared, manifest, "train"), train_columns(specs))
    if catalogue_service is not None:
        size += int(item_row_bytes * _train_rows(manifest))
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    materialize = should_materialize(size, store)
    need = math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker)
    have = ray.cluster_resources().get("CPU", 0.0)
    if not materialize and have < need + 1:
        # Checked on Ray 2.60: with every CPU reserved by train workers, the streamed log's read
        # tasks never get scheduled and the first epoch waits forever (a materialized log is
        # read before the workers start, so it is not affected).
        print(
            f"[train] WARNING: the cluster has {have:g} CPUs and the {cfg.train.num_workers} train "
            f"workers reserve {need}; the train log is streamed from Parquet, whose read tasks need "
            f"at least one more CPU, or the first epoch waits forever. Lower train.cpus_per_worker "
            f"or train.num_workers, or add CPUs (an autoscaling cluster adds them itself).",
            file=sys.stderr, flush=True,
        )
    print(
        f"[train] train log: {size / 2**20:,.1f} MiB uncompressed, object store {store / 2**30:,.1f} GiB -> "
        f"{'materialized once' if materialize else 'streamed from Parquet every epoch'}",
        flush=True,
    )
    return read_train_dataset(
        prepared, manifest, specs, cfg.train.seed, cfg.train.batch_size, materialize, cfg.train.data_fraction,
        catalogue_service,
    )


def fit(cfg: Config, run_dir: str) -> Any:
    """Run the TorchTrainer; returns the Ray ``Result``. A streamed catalogue's shard actors live
    for the duration of the call."""
    prepared = cfg.paths.prepared
    manifest = read_manifest(prepared)
    specs = specs_from_manifest(manifest)
    mode, items, nbytes = catalogue_plan(cfg, manifest, specs)
    if mode == "replicated":
        return _fit(cfg, run_dir, manifest, specs, None, 0.0)
    from ray_train.streaming import start_service

    service = start_service(
        table_uri(prepared, manifest, "items"), table_uri(prepared, manifest, "item_popularity"), specs, nbytes, items
    )
    try:
        held = service.nbytes()
        print(
            f"[train] streamed catalogue: {len(service.shards)} shard actors, {service.num_items:,} items, "
            f"{held / 2**20:,.1f} MiB in all",
            flush=True,
        )
        return _fit(cfg, run_dir, manifest, specs, service, held / max(service.num_items, 1))
    finally:
        service.shutdown()


def _fit(cfg: Config, run_dir: str, manifest: dict[str, Any], specs: list, service: Any, item_row_bytes: float) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    prepared = cfg.paths.prepared
    dataset = train_dataset(cfg, manifest, specs, service, item_row_bytes)
    # A down-sample's size is known only by counting it (free once materialized).
    num_rows = _train_rows(manifest) if tc.data_fraction == 1.0 else dataset.count()
    steps = steps_per_epoch(num_rows, tc.num_workers, tc.batch_size)
    if steps < 1:
        raise ValueError(
            f"{table_uri(prepared, manifest, 'train')} holds {num_rows} rows (train.data_fraction="
            f"{tc.data_fraction:g}): {tc.num_workers} workers get {num_rows // tc.num_workers} each, less "
            f"than one batch of train.batch_size={tc.batch_size}. Lower train.batch_size or "
            f"train.num_workers, or raise train.data_fraction."
        )
    resources = {"CPU": tc.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "cfg": cfg, "prepared": prepared, "run_dir": run_dir, "steps_per_epoch": steps,
            "catalogue_service": service,
        },
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=os.path.basename(run_dir),
            storage_path=os.path.join(run_dir, "ray"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_epoch_printer()],
        ),
        datasets={"train": dataset},
        dataset_config=train_data_config(),
    )
    print(
        f"[train] {run_dir}: {num_rows:,} train events (data_fraction {tc.data_fraction:g}), "
        f"{tc.num_workers} workers x {tc.batch_size} rows, {steps} steps/epoch, "
        f"{tc.epochs} epochs, ssl.method={cfg.ssl.method}",
        flush=True,
    )
    return trainer.fit()


def _train_rows(manifest: dict[str, Any]) -> int:
    try:
        return int(manifest["counts"]["train"])
    except (KeyError, TypeError):
        raise ValueError(
            "manifest.json has no counts.train; rerun `python -m spark_jobs.prepare` to produce a "
            "complete prepared folder"
        ) from None


def write_run_outputs(cfg: Config, run_dir: str, checkpoint: Any) -> list[dict[str, Any]]:
    """From the final checkpoint: ``model/model.pt``, ``model/features.json``,
    ``model/mutual_info.json``, ``history.json``; returns the history."""
    import torch

    prepared = cfg.paths.prepared
    manifest = read_manifest(prepared)
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
        with open(os.path.join(folder, HISTORY_FILE)) as fh:
            history = json.load(fh)
    os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
    torch.save({"model": state["model"], "epoch": int(state["epoch"])}, os.path.join(run_dir, "model", "model.pt"))
    write_json(os.path.join(run_dir, "model", "features.json"), manifest["features"])
    mi = read_table(table_uri(prepared, manifest, "mutual_info"), ["feature_a", "feature_b", "mi"])
    write_json(os.path.join(run_dir, "model", "mutual_info.json"), mi.to_pylist())
    write_json(os.path.join(run_dir, HISTORY_FILE), history)
    return history


def format_history(history: list[dict[str, Any]]) -> str:
    lines = [f"{'epoch':>5} {'step':>7} {'loss':>9} {'main':>9} {'ssl':>9} {'ex/s':>10} {'attempt':>7}"]
    for h in history:
        lines.append(
            f"{h['epoch']:>5} {h['global_step']:>7} {h['loss']:>9.4f} {h['main']:>9.4f} {h['ssl']:>9.4f} "
            f"{h['examples_per_s']:>10,.0f} {h['attempt']:>7}"
        )
    return "\n".join(lines)


def run(cfg: Config, run_dir: str, resumed: bool = False, evaluate: bool = True, export: bool = True) -> dict[str, Any]:
    """Train (or continue) the run in ``run_dir``, write the run folder, evaluate and (``export``)
    export. Returns ``{"run_dir", "history", "metrics"}`` (metrics None when ``evaluate`` is off)."""
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, CONFIG_FILE), cfg.to_dict())
    if resumed:
        print(f"[train] resuming {run_dir} from its last checkpoint in {os.path.join(run_dir, 'ray')}", flush=True)
    init_ray(cfg)
    t0 = time.time()
    result = fit(cfg, run_dir)
    if result.error is not None:
        raise result.error
    failure = (result.return_value or {}).get(FAILURE_KEY) if isinstance(result.return_value, dict) else None
    if failure:
        parts = [p for p, key in (("main", "main_ranks"), ("ssl", "ssl_ranks")) if failure[key]]
        raise NonFiniteLossError(
            f"non-finite loss at global step {failure['global_step']} (epoch {failure['epoch']}, step "
            f"{failure['step_in_epoch']} of the epoch): bad part(s) {' and '.join(parts)} "
            f"(main={failure['main']}, ssl={failure['ssl']} on rank 0; main bad on ranks "
            f"{failure['main_ranks']}, ssl bad on ranks {failure['ssl_ranks']}). Training stopped; "
            f"lower train.lr (now {failure['lr']:g}) or ssl.alpha, or check the inputs. "
            f"Checkpoints before the failure are in {os.path.join(run_dir, 'ray')}."
        )
    if result.checkpoint is None:
        raise RuntimeError(f"training in {run_dir} finished without a checkpoint; see the worker logs above")
    history = write_run_outputs(cfg, run_dir, result.checkpoint)
    print(format_history(history), flush=True)
    print(f"[train] trained in {time.time() - t0:.1f}s -> {run_dir}", flush=True)
    out: dict[str, Any] = {"run_dir": run_dir, "history": history, "metrics": None}
    if evaluate:
        from ray_train.evaluate import evaluate_run, format_table
        from ray_train.export import export_run

        metrics = evaluate_run(run_dir)
        if export:
            exported = export_run(run_dir)  # also adds "ann" to metrics.json when eval.ann_index
            if "ann" in exported:
                metrics["ann"] = exported["ann"]
        print(format_table(metrics), flush=True)
        print(f"[train] metrics -> {os.path.join(run_dir, 'metrics.json')}", flush=True)
        out["metrics"] = metrics
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        cfg, run_dir, resumed = resolve_run(args)
        if not manifest_exists(cfg.paths.prepared):
            raise FileNotFoundError(
                f"paths.prepared={cfg.paths.prepared} holds no manifest.json: run `python -m "
                f"spark_jobs.prepare` with the same config first. Under `ray job submit` the driver "
                f"runs in an uploaded copy of the working dir (without data/): pass absolute paths, "
                f"--set paths.prepared=/abs/prepared paths.runs=/abs/runs"
            )
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(cfg, run_dir, resumed, evaluate=not args.no_eval)


if __name__ == "__main__":
    main()
