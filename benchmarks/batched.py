"""Candidates per hour when a worker trains K of them at once (`[proxy] batch_candidates`, issue #13).

    python benchmarks/batched.py [--config configs/cifar10.toml] [--task cifar10-resnet20]
                                 [--ks 1,4,16,64] [--stage full] [--device cuda] [--data-root DIR]
                                 [--cache-dir DIR]

For each K: K baselines' masks (cycled when K exceeds the 15 baselines) scored by one
`run_batch` call (K = 1 also by the single masked and pruned proxies), after a warm-up; seconds
per candidate and candidates per hour, and the largest score difference to the single masked
runs of the same masks (the same function up to float order).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from evoprune.evolve.config import load_config
from evoprune.masks import TaskMasks
from evoprune.primitives.baselines import BASELINES
from evoprune.train import describe_device
from evoprune.workers.batched import run_batch
from evoprune.workers.proxy import TaskContext


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cifar10.toml")
    ap.add_argument("--task", default=None, help="one of the config's tasks (default: its first)")
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--stage", default="full", choices=("screen", "full"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    cfg = load_config(args.config)
    task = args.task or cfg.proxy.tasks[0]
    proxy = replace(cfg.proxy, tasks=(task,), train="masked")
    kw = dict(data_root=args.data_root, cache_dir=args.cache_dir, device=args.device)
    ctx = TaskContext(task, proxy, **kw)
    pruned = TaskContext(task, replace(proxy, train="pruned"), **kw)
    names = list(BASELINES)
    masker = TaskMasks.load(task, proxy.allocation, sorted({s for n in names for s in BASELINES[n].node.stats()}),
                            stat_images=proxy.stat_images, seed=proxy.data_seed, **kw)
    masks = [masker(BASELINES[n].node) for n in names]
    name = describe_device(args.device)
    print(f"device: {name}; torch {torch.__version__}; {task}, {args.stage} proxy ({proxy.finetune_steps} steps of "
          f"{proxy.batch_size}, ratio {proxy.ratio})\n")
    run_batch(ctx, masks[:2], args.stage)  # warm-up
    single = {}
    print("| K | proxy | s per call | s per candidate | candidates/hour | max score diff to single masked |")
    print("|---|---|---|---|---|---|")
    for label, c in (("single masked", ctx), ("single pruned", pruned)):
        _sync(args.device)
        t0 = time.perf_counter()
        recs = [c.run(m, args.stage) for m in masks[:4]]
        _sync(args.device)
        dt = (time.perf_counter() - t0) / 4
        if label == "single masked":
            single = {i: r.fitness_score for i, r in enumerate(recs)}
        diff = max(abs(r.fitness_score - single[i]) for i, r in enumerate(recs))
        print(f"| 1 | {label} | {dt:.3f} | {dt:.3f} | {3600 / dt:,.0f} | {diff:.1e} |")
    for k in [int(x) for x in args.ks.split(",")]:
        chosen = [masks[i % len(masks)] for i in range(k)]
        _sync(args.device)
        t0 = time.perf_counter()
        recs = run_batch(ctx, chosen, args.stage)
        _sync(args.device)
        dt = time.perf_counter() - t0
        diff = max(abs(recs[i].fitness_score - single[i]) for i in range(min(k, 4)))
        print(f"| {k} | batched | {dt:.3f} | {dt / k:.3f} | {3600 * k / dt:,.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
