"""Benchmark: step time of the SSL model (cfm) vs the plain two-tower model, next to their FLOPs.

    python bench/ssl_overhead.py --config conf/default.yaml          # uses paths.prepared
    python bench/ssl_overhead.py --prepared /data/prepared --steps 200 --set train.batch_size=1024

Same batches (the first ``--steps`` full batches of ``train/``, collated in memory), same
initialisation, equal batch sizes (``ssl.batch_size = train.batch_size = B``), one process. A step
is the worker's: ``ray_train.worker.forward_losses`` + backward + Adam. For ``none`` the towers see
B users and B items; for ``cfm`` also 2B augmented items (the two views go through the item tower
as ONE batch of 2B: the script counts item-tower calls per step to show it).

FLOPs per step (forward + backward) come from ``torch.utils.flop_counter.FlopCounterMode``, which
counts matmuls (MLP layers, the B x B and 2B x 2B... logits); embedding gathers and masking are
memory work it does not count. Time: median step time over ``--repeats`` runs of ``--steps`` steps
after a warm-up. Target: (time ratio) / (FLOP ratio) <= 1.15, i.e. SSL costs what its arithmetic
costs, not more.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _inputs import add_common_args, load_inputs  # noqa: I001 (bench/ is on sys.path)

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.task import TwoTowerTask
from ray_train.data import collate_table, epoch_generator, read_table, table_uri, train_columns
from ray_train.worker import forward_losses


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    inputs = load_inputs(args)
    base, specs, catalogue, log_q, mutual_info = inputs.cfg, inputs.specs, inputs.catalogue, inputs.log_q, inputs.mutual_info
    B = base.train.batch_size
    table = read_table(table_uri(inputs.prepared, inputs.manifest, "train"), train_columns(specs))
    steps = min(args.steps, table.num_rows // B)
    if steps < 1:
        p.error(f"train/ has {table.num_rows} rows, less than one batch of {B}")
    batches = [collate_table(table.slice(i * B, B), specs) for i in range(steps)]

    results = {}
    for method in ("none", "cfm"):
        cfg = base.with_overrides([f"ssl.method={method}", f"ssl.batch_size={B}"])
        torch.manual_seed(cfg.train.seed)
        model = TwoTowerTask(specs, cfg, mutual_info)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        calls = []
        hook = model.item_tower.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))

        def step(batch, gen):
            out = forward_losses(model, batch, catalogue, log_q, cfg, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        gen = epoch_generator(cfg.train.seed, 0, 0)
        with FlopCounterMode(display=False) as fc:
            step(batches[0], gen)
        flops = fc.get_total_flops()
        item_calls = list(calls)
        hook.remove()
        for b in batches[: min(10, steps)]:  # warm-up
            step(b, gen)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for b in batches:
                step(b, gen)
            times.append((time.perf_counter() - t0) / steps)
        results[method] = (statistics.median(times), flops, item_calls)

    t0, f0, c0 = results["none"]
    t1, f1, c1 = results["cfm"]
    print(
        f"batch {B} (ssl.batch_size {B}), {steps} steps x {args.repeats} repeats, model "
        f"{base.model.embedding_dim}-d {list(base.model.tower_layers)}, {len(specs)} features, "
        f"torch threads {args.threads}"
    )
    print(f"{'method':<8}{'step ms':>10}{'MFLOP/step':>13}  item-tower batch sizes per step")
    print(f"{'none':<8}{t0 * 1e3:>10.2f}{f0 / 1e6:>13.2f}  {c0}")
    print(f"{'cfm':<8}{t1 * 1e3:>10.2f}{f1 / 1e6:>13.2f}  {c1}")
    time_ratio, flop_ratio = t1 / t0, f1 / f0
    print(
        f"time ratio cfm/none {time_ratio:.3f}   FLOP ratio {flop_ratio:.3f}   "
        f"time/FLOP ratio {time_ratio / flop_ratio:.3f} (target <= 1.15)"
    )
    return {"time_ratio": time_ratio, "flop_ratio": flop_ratio}


if __name__ == "__main__":
    main()
