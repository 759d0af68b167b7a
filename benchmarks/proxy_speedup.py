"""How much faster is the pruned-network proxy than the masked one, with a confidence interval?
Both proxies score the same candidates' masks in one process, interleaved (each round runs every
candidate once per proxy, the proxy that goes first alternating), so the machine's drift from
minute to minute falls on both alike; the speedup is the geometric mean of the per-candidate
ratios masked seconds / pruned seconds, with its 95% CI (Student's t on the log ratios).

    python benchmarks/proxy_speedup.py --data-root ../shared/data [--cache-dir DIR] [--rounds 2]
        [--candidates 6] [--stage full] [--threads N] [--device cpu] [--task T [--tasks-file F]]

The CIFAR-10 ResNet-20 proxy of configs/cifar10.toml (prune 60%, 18 steps of 256; `--task`: the
same proxy on another task), masks from the first `--candidates` baseline metrics that can rank
its filters, made outside the timing (they are the driver's work).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace

import torch

from evoprune.evolve.config import load_config
from evoprune.masks import TaskMasks, UnusableMetric
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.train import describe_device
from evoprune.uncertainty import estimate
from evoprune.workers.proxy import TaskContext

TASK = "cifar10-resnet20"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--config", default="configs/cifar10.toml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--stage", default="full", choices=["screen", "full"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--task", default=TASK, help="the task whose proxy is timed")
    ap.add_argument("--tasks-file", default=None, help="a TOML file of extra tasks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    proxy = replace(load_config(args.config).proxy, tasks=(args.task,))
    print(f"device: {describe_device(args.device)}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; {args.task}, {args.stage} proxy ({proxy.finetune_steps} steps of "
          f"{proxy.batch_size}, ratio {proxy.ratio})")
    stats = sorted({s for b in BASELINES.values() for s in b.node.stats()})
    masker = TaskMasks.load(args.task, proxy.allocation, stats,
                            stat_images=proxy.stat_images, seed=proxy.data_seed, data_root=args.data_root,
                            cache_dir=args.cache_dir, tasks_file=args.tasks_file, device=args.device)
    masks = {}
    for n, b in BASELINES.items():  # the first that can rank this model's filters (untrained: BN scales are 1)
        if len(masks) < args.candidates:
            try:
                masks[n] = masker(parse(b.expression))
            except UnusableMetric:
                continue
    names = list(masks)
    kinds = ("masked", "pruned")
    ctx = {k: TaskContext(args.task, replace(proxy, train=k), data_root=args.data_root, cache_dir=args.cache_dir,
                          tasks_file=args.tasks_file, device=args.device) for k in kinds}

    def timed(kind: str, name: str) -> tuple[float, float]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = ctx[kind].run(masks[name], args.stage)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, r.score if r.score is not None else r.accuracy

    for k in kinds:
        timed(k, names[0])  # warm-up
    secs = {k: [] for k in kinds}
    diffs = []
    for r in range(args.rounds):
        for i, n in enumerate(names):
            order = kinds if (r + i) % 2 == 0 else kinds[::-1]
            got = {k: timed(k, n) for k in order}
            for k in kinds:
                secs[k].append(got[k][0])
            diffs.append(abs(got["masked"][1] - got["pruned"][1]))
    logs = estimate([math.log(a / b) for a, b in zip(secs["masked"], secs["pruned"])])
    print("\n| proxy | runs | median s | min s | max s | candidates/hour (median) |\n|---|---|---|---|---|---|")
    for k in kinds:
        med = statistics.median(secs[k])
        print(f"| {k} | {len(secs[k])} | {med:.3f} | {min(secs[k]):.3f} | {max(secs[k]):.3f} | {3600 / med:,.0f} |")
    print(f"\nspeedup of the pruned proxy (masked s / pruned s, geometric mean over {logs.n} paired runs): "
          f"**{math.exp(logs.mean):.2f}x** (95% CI {math.exp(logs.low):.2f} to {math.exp(logs.high):.2f}); "
          f"largest score difference between the two on the same masks: {max(diffs):.1e}")


if __name__ == "__main__":
    main()
