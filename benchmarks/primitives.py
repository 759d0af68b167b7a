"""Primitive set speed: collecting statistics, evaluating expressions.

    python benchmarks/primitives.py [--data-root ../shared/data] [--device cpu|cuda] [--repeats 3]

1. Time to collect statistics for CIFAR ResNet-20 on a 256-image batch of real CIFAR-10
   images, by cost class and all together (median of --repeats; weights are a fresh init:
   the cost does not depend on their values).
2. Time to evaluate 1000 random expressions (DEAP ramped half-and-half, depth 1-6) on that
   cached StatTable: parse + evaluate + validity check (target < 1 ms per expression), and
   separately sympy canonicalization (used once per new candidate).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from deap import gp

from evoprune.data import iterate, load_dataset
from evoprune.models import build_model
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import canonical, check_scores, evaluate, parse
from evoprune.primitives.pset import Vec, build_pset
from evoprune.primitives.stats import STATS, Cost
from evoprune.train import describe_device


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), (max(times) - min(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--expressions", type=int, default=1000)
    args = ap.parse_args()
    dev = torch.device(args.device)
    ds = load_dataset("cifar10", args.data_root)
    x, y = next(iterate(ds, ds.train, batch_size=256, shuffle=True, seed=0, device=dev))
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3).to(dev)
    name = describe_device(dev)
    print(f"device: {name}; torch {torch.__version__}\n")
    print("| statistics (ResNet-20, 256 CIFAR-10 images) | count | median s | spread s |\n|---|---|---|---|")
    groups = {c.name.lower(): [s for s, v in STATS.items() if v.cost == c] for c in Cost}
    groups["pfp only"] = ["pfp_sens"]
    groups["all"] = list(STATS)
    collect_stats(model, [(x, y)], max_images=256, device=dev)  # warm-up: allocator, kernels
    table = None
    for label, names in groups.items():
        table, med, spread = timed(lambda: collect_stats(model, [(x, y)], names, max_images=256, device=dev),
                                   args.repeats)
        print(f"| {label} | {len(names)} | {med:.3f} | {spread:.3f} |")

    pset = build_pset()
    random.seed(0)
    texts = [str(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 6, type_=Vec))) for _ in range(args.expressions)]
    sizes = [parse(t).size for t in texts]
    evaluate(parse(texts[0]), table)  # padding of every statistic is cached on first use

    def run_all():
        per = []
        for t in texts:
            t0 = time.perf_counter()
            node = parse(t)
            check_scores(evaluate(node, table), table)
            per.append(time.perf_counter() - t0)
        return per

    per, _, _ = timed(run_all, 1)
    per_ms = sorted(p * 1e3 for p in per)
    t0 = time.perf_counter()
    for t in texts[:200]:
        canonical(parse(t))
    canon_ms = (time.perf_counter() - t0) / 200 * 1e3
    print(f"\n| {args.expressions} random expressions (size median {statistics.median(sizes):.0f}, max {max(sizes)}) "
          f"| ms per expression |\n|---|---|")
    print(f"| parse + evaluate + check, median | {statistics.median(per_ms):.3f} |")
    print(f"| parse + evaluate + check, mean | {statistics.mean(per_ms):.3f} |")
    print(f"| parse + evaluate + check, 95th percentile | {per_ms[int(0.95 * len(per_ms))]:.3f} |")
    print(f"| sympy canonical form (first 200, uncached) | {canon_ms:.1f} |")


if __name__ == "__main__":
    main()
