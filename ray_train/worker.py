"""The training loop every Ray Train worker runs (``train_loop_per_worker``).

This is the only module that calls worker-side Ray APIs (``ray.train.get_context``,
``get_dataset_shard``, ``get_checkpoint``, ``report``, ``ray.train.torch.prepare_model``). It reads
top to bottom: inputs, model, resume, then the epoch loop.

Per step (``B = train.batch_size`` rows of this rank's shard of ``train/``):

1. user features + history from the batch; the clicked item's features from the catalogue
   (``Catalogue.lookup``); the clicked item's ``log_q`` (``stats/item_popularity``);
2. for the contrastive SSL methods, ``ssl.batch_size`` items drawn uniformly from the whole
   catalogue (``Catalogue.sample_uniform``) with this rank's generator;
3. ``loss = L_main + ssl.alpha * L_ssl`` from ``common.task.TwoTowerTask``; backward; Adam step.

That is the replicated catalogue (``train.catalogue: replicated``, loaded whole by every worker).
With the streamed one (``streaming``, ``ray_train/streaming.py``; config key ``catalogue_service``
set by the driver) the worker never holds the catalogue: step 1's item features and ``log_q``
arrive in the batch (denormalised by Ray Data), and step 2's items come from a
``UniformItemStream`` over the shard actors, drawn with a second generator seeded per
(seed, epoch, rank) (``sampling_generator``); the view masks keep ``epoch_generator``.

Distributed details:

* DDP averages gradients over ranks; every loss is a per-rank mean (``common.losses``), so the
  update equals that of one worker on the union of the batches.
* ``train.global_negatives``: the main softmax's candidates are all ranks' positives, via
  ``make_gather`` (``torch.distributed.nn.functional.all_gather``: its backward returns to each
  rank the SUM over ranks of the gradient w.r.t. its slice). With DDP's averaging this makes
  2 workers x B exactly the gradient of 1 worker x 2B (``tests/ray_train/test_train.py`` checks it).
  The SSL loss's in-batch negatives stay per rank.
* Non-finite loss: every rank checks its ``main`` and ``ssl`` parts each step; the ranks agree
  with one all-reduce of a ``[world, 2]`` flag, so all stop at the same step (none is left in a
  collective) and return a failure record; the driver raises ``NonFiniteLossError`` naming the
  global step, the part and the ranks. The run is not retried: replaying from a checkpoint would
  reproduce the same divergence.
* Equal step counts: Ray Train's ``streaming_split(equal=True)`` gives every rank the same number
  of rows and ``iter_train_batches`` keeps full batches only, so every rank runs
  ``steps_per_epoch`` steps and calls ``ray.train.report`` (a barrier) as often as the others; a
  rank that sees a different count stops with an error rather than hang the others.

Seeds: python/numpy/torch from ``train.seed + rank``; model initialisation from ``train.seed`` (DDP
broadcasts rank 0's weights anyway); the SSL generator and the local shuffle buffer from
(seed, epoch, rank). A one-worker run is reproducible: same config, same losses.

Checkpoints (``train.checkpoint_every_epochs``, and every ``train.checkpoint_every_steps`` global
steps when > 0, and always after the last epoch): rank 0 writes ``state.pt`` (model, optimizer,
epoch, step, attempt) and ``history.json``; every rank writes ``generator_rank<r>.pt`` (its SSL
generator state); Ray merges the ranks' folders into one checkpoint under the run's ``ray/``
folder. On start, ``ray.train.get_checkpoint()`` (set after a worker failure, or when the driver
reruns a run with ``--resume``) restores all of it; a mid-epoch checkpoint resumes by consuming
and skipping the epoch's first ``step`` batches (the block order of the re-executed dataset may
differ from the interrupted one, so the skipped rows are not exactly the ones already trained on).

Files in the run folder (local disk or a shared filesystem that every node mounts at the same path):
``history.json`` (rank 0, after every epoch, for live progress) and ``workers/rank<r>.json``
(pid, attempt: lets the fault-tolerance test kill a worker).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from common.catalogue import Catalogue
from common.config import Config
from common.features import specs_from_manifest
from common.manifest import read_manifest
from common.ragged import FeatureBatch
from common.task import TwoTowerTask
from ray_train.data import (
    TrainBatch,
    epoch_generator,
    iter_train_batches,
    load_catalogue,
    load_log_q,
    load_mutual_info,
    sampling_generator,
    shuffle_seed,
)

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
FAILURE_KEY = "nonfinite"


@dataclass
class TrainState:
    """Where training stands: ``epoch`` epochs completed, ``step_in_epoch`` steps into the next
    one, ``global_step`` steps in all; ``attempt`` counts starts of the worker group (1 = fresh,
    +1 per resume from a checkpoint); ``history`` one record per completed epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    attempt: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_gather(world_size: int) -> Callable[[Tensor], Tensor]:
    """``gather(x [B, ...]) -> [world * B, ...]`` in rank order. Differentiable tensors go through
    ``torch.distributed.nn.functional.all_gather``, whose backward sums, over ranks, the gradient
    each rank computed for this rank's slice (reduce-scatter); ids and log_q need no gradient and
    use a plain all_gather."""
    import torch.distributed.nn.functional as dist_fn

    def gather(x: Tensor) -> Tensor:
        x = x.contiguous()
        if x.requires_grad:
            return torch.cat(dist_fn.all_gather(x), dim=0)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    return gather


def forward_losses(
    model: torch.nn.Module,
    batch: TrainBatch,
    catalogue: Optional[Catalogue],
    log_q_table: Optional[Tensor],
    cfg: Config,
    generator: torch.Generator,
    gather: Optional[Callable[[Tensor], Tensor]] = None,
    rank: int = 0,
    ssl_items: Optional[FeatureBatch] = None,
) -> dict[str, Tensor]:
    """One step's losses ``{"loss", "main", "ssl"}``.

    Replicated catalogue (``batch.item`` is None): the clicked items' features and ``log_q`` from
    ``catalogue`` / ``log_q_table``, plus (contrastive SSL methods) ``ssl.batch_size`` items drawn
    uniformly from the whole catalogue with ``generator``. Streamed catalogue: the clicked items'
    features and ``log_q`` come with the batch and the SSL items are ``ssl_items`` (drawn by a
    ``UniformItemStream``); ``catalogue`` and ``log_q_table`` are unused (None)."""
    if batch.item is not None:
        pos_feats = batch.item
        log_q = batch.log_q if cfg.train.logq_correction else None
    else:
        assert catalogue is not None and log_q_table is not None, "replicated path needs the catalogue"
        pos_feats = catalogue.lookup(batch.item_index)
        log_q = log_q_table[batch.item_index] if cfg.train.logq_correction else None
    ssl_feats = None
    if cfg.ssl.uses_contrastive_task:
        if ssl_items is not None:
            ssl_feats = ssl_items
        else:
            assert catalogue is not None, "the streamed catalogue passes its SSL items as ssl_items"
            ssl_feats = catalogue.lookup(catalogue.sample_uniform(cfg.ssl.batch_size, generator))
    return model(batch.user, pos_feats, batch.item_index, log_q, ssl_feats, generator, gather, rank)


def check_finite(parts: dict[str, Tensor], rank: int, world: int) -> Optional[dict[str, Any]]:
    """None when every rank's ``main`` and ``ssl`` losses are finite; else, on every rank, which
    ranks had which part non-finite. One all-reduce of a ``[world, 2]`` flag when ``world > 1``."""
    flags = torch.zeros(world, 2, dtype=torch.float32)
    flags[rank, 0] = float(not torch.isfinite(parts["main"].detach()).item())
    flags[rank, 1] = float(not torch.isfinite(parts["ssl"].detach()).item())
    if world > 1:
        backend_device = parts["main"].device if dist.get_backend() == "nccl" else torch.device("cpu")
        flags = flags.to(backend_device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        flags = flags.cpu()
    if not flags.any():
        return None
    bad_main = [r for r in range(world) if flags[r, 0] > 0]
    bad_ssl = [r for r in range(world) if flags[r, 1] > 0]
    return {"main_ranks": bad_main, "ssl_ranks": bad_ssl}


def _save_checkpoint(
    task: TwoTowerTask,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    generator: torch.Generator,
    rank: int,
    folder: str,
) -> None:
    if rank == 0:
        torch.save(
            {
                "model": task.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": state.epoch,
                "step_in_epoch": state.step_in_epoch,
                "global_step": state.global_step,
                "attempt": state.attempt,
            },
            os.path.join(folder, STATE_FILE),
        )
        with open(os.path.join(folder, HISTORY_FILE), "w") as fh:
            json.dump(state.history, fh, indent=1)
    torch.save({"generator": generator.get_state()}, os.path.join(folder, f"generator_rank{rank}.pt"))


def _report(
    metrics: dict[str, Any],
    with_checkpoint: bool,
    task: TwoTowerTask,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    generator: torch.Generator,
    rank: int,
) -> None:
    """``ray.train.report`` from every rank (it is a barrier); with a checkpoint every rank writes
    its files into a fresh folder and Ray merges them."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ssl4rec-ckpt-") as tmp:
        _save_checkpoint(task, optimizer, state, generator, rank, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(
    checkpoint: Any, task: TwoTowerTask, rank: int
) -> tuple[TrainState, Optional[dict], Optional[Tensor]]:
    """Load model weights into ``task``; return the state, optimizer state and this rank's
    generator state from a checkpoint."""
    with checkpoint.as_directory() as folder:
        blob = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
        with open(os.path.join(folder, HISTORY_FILE)) as fh:
            history = json.load(fh)
        gen_path = os.path.join(folder, f"generator_rank{rank}.pt")
        gen_state = torch.load(gen_path, weights_only=False)["generator"] if os.path.exists(gen_path) else None
    task.load_state_dict(blob["model"])
    state = TrainState(
        epoch=int(blob["epoch"]),
        step_in_epoch=int(blob["step_in_epoch"]),
        global_step=int(blob["global_step"]),
        attempt=int(blob["attempt"]) + 1,
        history=history,
    )
    return state, blob["optimizer"], gen_state


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def _mean_over_ranks(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / world
    return t.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Ray Train entry point. ``config``: ``cfg`` (the typed ``Config``), ``prepared`` and
    ``run_dir`` (absolute), ``steps_per_epoch`` (per rank), ``catalogue_service`` (a
    ``ray_train.streaming.CatalogueService``: the streamed catalogue; None: replicated).
    Returns (rank 0) ``None`` after a normal run, or ``{"nonfinite": {...}}`` when a loss went
    non-finite."""
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    prepared: str = config["prepared"]
    run_dir: str = config["run_dir"]
    steps: int = int(config["steps_per_epoch"])
    service = config["catalogue_service"]  # None: the replicated catalogue
    streaming = service is not None
    tc = cfg.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(tc.seed + rank)

    # ---- inputs: the catalogue, log_q by item_index, mutual information -------------------
    manifest = read_manifest(prepared)
    specs = specs_from_manifest(manifest)
    catalogue: Optional[Catalogue] = None
    log_q_table: Optional[Tensor] = None
    if not streaming:  # replicated: the whole catalogue in this worker
        catalogue = load_catalogue(prepared, manifest, specs)
        log_q_table = load_log_q(prepared, manifest, catalogue).to(device)
        catalogue = catalogue.to(device)
    mutual_info = load_mutual_info(prepared, manifest)

    # ---- model: identical initialisation on every rank ---------------------------------------
    torch.manual_seed(tc.seed)
    task = TwoTowerTask(specs, cfg, mutual_info)

    # ---- resume from the latest checkpoint (worker restart or driver --resume) ---------------
    state, opt_state, gen_state = TrainState(), None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, opt_state, gen_state = _restore(checkpoint, task, rank)
    resumed_from = {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch} if checkpoint else None
    write_json(
        os.path.join(run_dir, "workers", f"rank{rank}.json"),
        {"pid": os.getpid(), "rank": rank, "attempt": state.attempt, "resumed_from": resumed_from,
         "catalogue": "streaming" if streaming else "replicated"},
    )

    model = ray.train.torch.prepare_model(task)  # to device; DDP when world > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    gather = make_gather(world) if tc.global_negatives and world > 1 else None
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if tc.bf16 and device.type == "cuda"
        else nullcontext()
    )
    shard = ray.train.get_dataset_shard("train")
    last_epoch = tc.epochs - 1

    for epoch in range(state.epoch, tc.epochs):
        generator = epoch_generator(tc.seed, epoch, rank)
        skip = state.step_in_epoch
        if skip and gen_state is not None:
            generator.set_state(gen_state)
        ssl_stream = None
        if streaming and cfg.ssl.uses_contrastive_task:
            from ray_train.streaming import UniformItemStream

            ssl_stream = UniformItemStream(
                service, specs, cfg.ssl.batch_size, sampling_generator(tc.seed, epoch, rank), start_batch=skip
            )
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, main, ssl
        trained = 0
        seen = 0
        t0 = time.perf_counter()
        batches = iter_train_batches(
            shard, specs, tc.batch_size, shuffle_seed(tc.seed, epoch, rank), positives=streaming
        )
        for batch in batches:
            seen += 1
            if seen <= skip:
                continue  # already trained on before the restart (mid-epoch checkpoint)
            ssl_items = None
            if ssl_stream is not None:
                ssl_items = {k: v.to(device) for k, v in next(ssl_stream).items()}
            with autocast:
                out = forward_losses(
                    model, batch.to(device), catalogue, log_q_table, cfg, generator, gather, rank, ssl_items
                )
            bad = check_finite(out, rank, world)
            if bad is not None:
                return {
                    FAILURE_KEY: {
                        **bad,
                        "global_step": state.global_step + 1,
                        "epoch": epoch + 1,
                        "step_in_epoch": seen,
                        "main": float(out["main"].detach()),
                        "ssl": float(out["ssl"].detach()),
                        "lr": tc.lr,
                    }
                }
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()

            sums += torch.tensor([float(out[k].detach()) for k in ("loss", "main", "ssl")], dtype=torch.float64)
            trained += 1
            state.global_step += 1
            state.step_in_epoch = seen
            if tc.checkpoint_every_steps and state.global_step % tc.checkpoint_every_steps == 0 and seen < steps:
                _report(
                    {"epoch": state.epoch, "global_step": state.global_step, "step_in_epoch": seen},
                    True, task, optimizer, state, generator, rank,
                )
        elapsed = time.perf_counter() - t0
        if seen != steps:
            raise RuntimeError(
                f"rank {rank} got {seen} full batches of {tc.batch_size} in epoch {epoch + 1}, expected "
                f"{steps} (manifest counts.train // {world} workers // batch size); the manifest and "
                f"train/ disagree or the shard is uneven. Rerun spark_jobs.prepare."
            )

        loss, main, ssl = _mean_over_ranks((sums / max(trained, 1)).tolist(), world)
        state.epoch = epoch + 1
        state.step_in_epoch = 0
        record = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            "steps": trained,
            "loss": loss,
            "main": main,
            "ssl": ssl,
            "examples_per_s": world * trained * tc.batch_size / max(elapsed, 1e-9),
            "epoch_s": elapsed,
            "attempt": state.attempt,
            "resumed_from": resumed_from if epoch == (resumed_from or {}).get("epoch", -1) else None,
        }
        state.history.append(record)
        if rank == 0:
            write_json(os.path.join(run_dir, HISTORY_FILE), state.history)
        with_ckpt = state.epoch % tc.checkpoint_every_epochs == 0 or epoch == last_epoch
        _report(record, with_ckpt, task, optimizer, state, generator, rank)
    return None

