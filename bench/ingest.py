"""Benchmark: training throughput fed by Ray Data vs fed from tensors already in memory.

    python bench/ingest.py --config conf/default.yaml            # uses paths.prepared
    python bench/ingest.py --prepared /data/prepared --epochs 4 --set train.batch_size=512

One process, one model, one training loop (``ray_train.worker.forward_losses`` + backward + Adam,
exactly the per-step body of the Ray Train worker), three feeds of the same train log:

1. ``memory``: every batch collated to torch beforehand (``ray_train.data.collate_table`` over
   the whole log read with pyarrow, rows shuffled once), the loop only indexes a Python list (in
   a new order each epoch): the upper bound;
2. ``ray-data``: what the trainer does: ``read_train_dataset`` (materialized when small, see
   ``should_materialize``), ``streaming_split(1, equal=True)`` (what Ray Train's DataConfig does
   for one worker) and ``iter_train_batches`` (local shuffle buffer, Arrow -> Ragged collate in
   Ray Data's prefetch thread);
3. ``ray-data streaming``: the same, never materialized (every epoch reads Parquet again), as a
   large log would run.

Memory and Ray Data runs alternate ``--repeats`` times (the model re-initialised identically for
each run) and the ratio is the median of the per-repeat ratios, so that changes in machine load
hit both feeds alike; the streaming feed runs once. Each run is ``--epochs`` epochs over the same
number of full batches; the first epoch is a warm-up (allocator, Ray worker processes) and not
timed; throughput = examples / seconds over the other epochs, the per-epoch start-up (the wait for
the first batch) included. Materializing, when the trainer would, happens once before all runs
and is reported apart. ``torch`` uses ``--threads`` threads (default 1: what a Ray Train worker
with ``train.cpus_per_worker: 1`` gets), leaving the other cores to Ray Data.
Target: ray-data / memory >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _inputs import WorkerInputs, add_common_args, load_inputs  # noqa: I001 (bench/ is on sys.path)

import numpy as np
import pyarrow as pa
import torch

from common.task import TwoTowerTask
from ray_train.data import (
    collate_table,
    epoch_generator,
    iter_train_batches,
    parquet_uncompressed_bytes,
    read_table,
    read_train_dataset,
    should_materialize,
    shuffle_seed,
    table_uri,
    train_columns,
)
from ray_train.worker import forward_losses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=4, help="epochs per feed, the first one untimed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a 1-CPU Ray Train worker gets 1)")
    p.add_argument("--repeats", type=int, default=3, help="alternating memory / Ray Data runs")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    return args


class Loop:
    """The worker's per-step body on one model; ``run(batches)`` trains on an iterable of batches."""

    def __init__(self, inputs: WorkerInputs) -> None:
        self.cfg = inputs.cfg
        self.manifest = inputs.manifest
        self.specs = inputs.specs
        self.catalogue = inputs.catalogue
        self.log_q = inputs.log_q
        self.mutual_info = inputs.mutual_info

    def fresh(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        self.model = TwoTowerTask(self.specs, self.cfg, self.mutual_info)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.train.lr)

    def epoch(self, batches, epoch: int) -> tuple[int, float]:
        gen = epoch_generator(self.cfg.train.seed, epoch, 0)
        t0 = time.perf_counter()
        n = 0
        for batch in batches:
            out = forward_losses(self.model, batch, self.catalogue, self.log_q, self.cfg, gen)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
            n += batch.num_rows
        return n, time.perf_counter() - t0


def timed(loop: Loop, make_batches, epochs: int) -> tuple[float, float, int]:
    """(examples/s over epochs 2.., first-epoch seconds, examples per epoch)."""
    loop.fresh()
    n0, first = loop.epoch(make_batches(0), 0)
    total_n, total_s = 0, 0.0
    for e in range(1, epochs):
        n, s = loop.epoch(make_batches(e), e)
        if n != n0:
            raise RuntimeError(f"epoch {e} trained {n} examples, epoch 0 trained {n0}; the feeds must match")
        total_n += n
        total_s += s
    return total_n / total_s, first, n0


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    inputs = load_inputs(args)
    cfg, prepared = inputs.cfg, inputs.prepared
    torch.set_num_threads(args.threads)
    import ray

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    loop = Loop(inputs)
    B = cfg.train.batch_size
    cols = train_columns(loop.specs)
    uri = table_uri(prepared, loop.manifest, "train")

    # 1. memory: the whole log collated up front, the same number of full batches per epoch.
    table = read_table(uri, cols)
    steps = table.num_rows // B
    # Rows shuffled once, as the Ray Data feed shuffles them (Spark writes the log clustered by
    # user, and batch composition changes the step's cost: accidental hits, history lengths).
    perm = np.random.default_rng(cfg.train.seed).permutation(table.num_rows)
    table = table.take(pa.array(perm))
    mem_batches = [collate_table(table.slice(i * B, B), loop.specs) for i in range(steps)]

    def memory_feed(epoch: int):
        order = torch.randperm(steps, generator=torch.Generator().manual_seed(epoch)).tolist()
        return (mem_batches[i] for i in order)

    setup_s: dict[bool, float] = {}

    def ray_feed(materialize: bool):
        t0 = time.perf_counter()
        ds = read_train_dataset(prepared, loop.manifest, loop.specs, cfg.train.seed, B, materialize)
        setup_s[materialize] = time.perf_counter() - t0  # the one-off read when materialized
        (shard,) = ds.streaming_split(1, equal=True)
        return lambda epoch: iter_train_batches(shard, loop.specs, B, shuffle_seed(cfg.train.seed, epoch, 0))

    size = parquet_uncompressed_bytes(uri, cols)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    auto = should_materialize(size, store)
    # Memory and Ray Data alternate, so that a change in machine load hits both alike; the ratio
    # is the median over repeats of (ray-data / memory) within one repeat.
    runs: dict[str, list[tuple[float, float, int]]] = {"memory": [], "ray-data": []}
    ray_batches = ray_feed(auto)
    for _ in range(args.repeats):
        runs["memory"].append(timed(loop, memory_feed, args.epochs))
        runs["ray-data"].append(timed(loop, ray_batches, args.epochs))
    if auto:
        runs["ray-data streaming"] = [timed(loop, ray_feed(False), args.epochs)]
    ray.shutdown()

    print(
        f"train log {table.num_rows:,} rows ({size / 2**20:.1f} MiB uncompressed; "
        f"{'materialized' if auto else 'streamed'} by the trainer), batch {B}, {steps} steps/epoch, "
        f"ssl.method={cfg.ssl.method}, model {cfg.model.embedding_dim}-d {list(cfg.model.tower_layers)}, "
        f"torch threads {args.threads}, {args.epochs} epochs per run (first untimed), {args.repeats} repeats"
    )
    mem = [r[0] for r in runs["memory"]]
    print(f"{'feed':<20}{'examples/s':>12}{'ratio':>8}{'first epoch s':>15}   (medians)")
    out = {}
    for name, rs in runs.items():
        eps = statistics.median(r[0] for r in rs)
        ratio = statistics.median(r[0] / m for r, m in zip(rs, mem)) if name != "ray-data streaming" \
            else eps / statistics.median(mem)
        first = statistics.median(r[1] for r in rs)
        print(f"{name:<20}{eps:>12,.0f}{ratio:>8.3f}{first:>15.2f}")
        out[name] = ratio
    if auto:
        print(f"materializing the log took {setup_s[True]:.2f}s once, before the first epoch (not in the figures)")
    return out


if __name__ == "__main__":
    main()
