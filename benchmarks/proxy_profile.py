"""Where a proxy evaluation's time goes, and the driver's share of a search.

    python benchmarks/proxy_profile.py --data-root ../shared/data [--device cpu|cuda] [--cache-dir DIR]
        [--task cifar10-resnet20] [--config configs/cifar10.toml] [--repeats 3] [--train masked,pruned]

1. One full proxy of the config's proxy settings on one task, phase by phase (median over
   `--repeats` baselines): model copy, applying the masks (zeroing, or surgery for the pruned
   proxy), BN recalibration, the fine-tune steps, the second recalibration, the validation pass.
2. The driver's work per new candidate, on the same task: the sympy canonical form of a fresh
   formula, making its masks, and a database write of a generation's candidates.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from evoprune.evolve.config import load_config
from evoprune.masks import TaskMasks
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.train import describe_device
from evoprune.workers.proxy import TaskContext


class Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.times.setdefault(name, []).append(time.perf_counter() - t0)


def profile_proxy(args, proxy, masker: TaskMasks) -> None:
    ctx = TaskContext(args.task, proxy, data_root=args.data_root, cache_dir=args.cache_dir, device=args.device)
    names = ["l1", "bn_scale", "fpgm", "taylor", "pfp", "fisher"][: args.repeats + 1]
    for train in args.train.split(","):
        clock = Clock(args.device)
        ctx.cfg = replace(proxy, train=train)
        for i, name in enumerate(names):
            masks = masker(parse(BASELINES[name].expression))
            c = clock if i else Clock(args.device)  # the first run warms up
            with c("total"):
                ctx.run(masks, "full", clock=c)
        total = statistics.median(clock.times.pop("total"))
        print(f"\n| {args.task}, {train} proxy ({proxy.finetune_steps} steps of {proxy.batch_size}, ratio "
              f"{proxy.ratio}) | median s | share |\n|---|---|---|")
        for phase, ts in clock.times.items():
            med = statistics.median(ts)
            print(f"| {phase} | {med:.3f} | {med / total:.0%} |")
        print(f"| **total** | **{total:.3f}** | candidates/hour {3600 / total:.0f} |")


def profile_driver(args, proxy, masker: TaskMasks) -> None:
    from deap import gp

    from evoprune.db import store
    from evoprune.primitives.expr import _canonical
    from evoprune.primitives.pset import Vec, build_pset
    from evoprune.records import CandidateRecord, FitnessRecord, TaskResult

    pset = build_pset()
    import random

    random.seed(0)
    texts = [str(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 4, Vec))) for _ in range(args.formulas)]
    canon, masks = [], []
    for t in texts:
        t0 = time.perf_counter()
        _canonical(t)
        canon.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            masker(parse(t))
        except Exception:
            pass
        masks.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        engine = store.connect(f"sqlite:///{d}/p.db")
        run = store.create_run(engine, {}, 0, "bench")
        rec = FitnessRecord("w_l1", "full", 0.5, True, "", {"t": TaskResult(0.5, 0.4, 0.4, 1.0, "m")}, 1.0, "w")
        rows = [CandidateRecord(t, t, f"h{i}", 3, 2, (), 0, rec) for i, t in enumerate(texts[:32])]
        t0 = time.perf_counter()
        store.record_candidates(engine, run, rows)
        write = time.perf_counter() - t0
    print(f"\n| driver, per new formula ({len(texts)} random formulas) | median ms | mean ms | p95 ms |\n|---|---|---|---|")
    for name, ts in (("sympy canonical form", canon), ("masks (make_masks)", masks)):
        ts = sorted(ts)
        print(f"| {name} | {1000 * statistics.median(ts):.1f} | {1000 * statistics.fmean(ts):.1f} | "
              f"{1000 * ts[int(0.95 * (len(ts) - 1))]:.1f} |")
    print(f"| database write of 32 candidates (one generation) | {1000 * write:.1f} (all 32) | | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--task", default="cifar10-resnet20")
    ap.add_argument("--config", default="configs/cifar10.toml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formulas", type=int, default=200)
    ap.add_argument("--train", default="masked")
    args = ap.parse_args()
    name = describe_device(args.device)
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    proxy = replace(load_config(args.config).proxy, tasks=(args.task,))
    masker = TaskMasks.load(args.task, proxy.allocation, sorted({s for b in BASELINES.values() for s in b.node.stats()}),
                            stat_images=proxy.stat_images, seed=proxy.data_seed, data_root=args.data_root,
                            cache_dir=args.cache_dir, device=args.device)
    profile_proxy(args, proxy, masker)
    profile_driver(args, proxy, masker)


if __name__ == "__main__":
    main()
