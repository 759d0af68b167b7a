"""Search throughput: proxy evaluations per hour, and what the caches and racing save.

    python benchmarks/search.py --data-root ../shared/data [--device cpu|cuda] [--cache-dir DIR]
                                [--skip-digits] [--skip-cifar] [--cifar-candidates 8]

1. The default digits search (8 generations x 32), racing on and off: proxy runs, seconds,
   evaluations per hour, cache hits (same formula / same masks), full fine-tunes racing avoided.
2. The CIFAR-10 ResNet-20 proxy of configs/cifar10.toml (18 fine-tune steps of 256, about one
   epoch of the subset): seconds per candidate for the screen and the full proxy over the seeded
   baselines, and the resulting candidate evaluations per hour on this device.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from evoprune.evolve.config import Config, load_config
from evoprune.evolve.service import run_search
from evoprune.masks import TaskMasks
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.train import describe_device
from evoprune.workers.proxy import Job, TaskContext, evaluate_job


def digits(args):
    print("| digits search (8 x 32) | seconds | proxy runs | full fine-tunes | runs/hour | individuals/hour "
          "| same-formula hits | same-mask hits | screened only | best fitness |\n|---|---|---|---|---|---|---|---|---|---|")
    for screen in (True, False):
        cfg = Config()
        cfg = replace(cfg, proxy=replace(cfg.proxy, screen=screen),
                      run=replace(cfg.run, device=args.device, cache_dir=args.cache_dir or "",
                                  data_root=args.data_root))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            res = run_search(cfg, db_url=f"sqlite:///{d}/bench.db")
            dt = time.perf_counter() - t0
        k = res.counters
        individuals = cfg.search.population * (cfg.search.generations + 1)
        best = max(h.best for h in res.history)
        print(f"| racing {'on' if screen else 'off'} | {dt:.1f} | {k['evaluations']} | {k['full']} | "
              f"{k['evaluations'] / dt * 3600:.0f} | {individuals / dt * 3600:.0f} | {k['canonical_hits']} | "
              f"{k['mask_hits']} | {k['screened_only']} | {best:.4f} |")


def cifar(args):
    cfg = load_config("configs/cifar10.toml")
    proxy = replace(cfg.proxy, tasks=("cifar10-resnet20",))
    ctx = TaskContext("cifar10-resnet20", proxy, data_root=args.data_root, cache_dir=args.cache_dir,
                      device=args.device)
    names = list(BASELINES)[: args.cifar_candidates]
    masker = TaskMasks.load("cifar10-resnet20", proxy.allocation, sorted({s for n in names for s in
                                                                          BASELINES[n].node.stats()}),
                            stat_images=proxy.stat_images, seed=proxy.data_seed, data_root=args.data_root,
                            cache_dir=args.cache_dir, device=args.device)

    def job(name: str, stage: str) -> Job:  # the masks are the driver's work, not the proxy's: made outside the timing
        return Job(name, BASELINES[name].expression, stage, {"cifar10-resnet20": masker(parse(BASELINES[name].expression))})

    evaluate_job({"cifar10-resnet20": ctx}, job("l1", "full"))  # warm-up
    rows = {}
    for stage in ("screen", "full"):
        times, accs = [], []
        for n in names:
            j = job(n, stage)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rec = evaluate_job({"cifar10-resnet20": ctx}, j)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            accs.append(rec.fitness)
        rows[stage] = (statistics.median(times), min(times), max(times), statistics.fmean(accs))
    print(f"\n| CIFAR-10 ResNet-20 proxy ({len(names)} baselines, ratio {proxy.ratio}, {proxy.finetune_steps} steps "
          f"of {proxy.batch_size}) | median s | min s | max s | candidates/hour | mean fitness |\n|---|---|---|---|---|---|")
    for stage, (med, lo, hi, acc) in rows.items():
        print(f"| {stage} | {med:.3f} | {lo:.3f} | {hi:.3f} | {3600 / med:.0f} | {acc:.4f} |")
    share = proxy.promote
    mixed = rows["screen"][0] + share * rows["full"][0]
    print(f"| racing (screen all, full for {share:.0%}) | {mixed:.3f} | | | {3600 / mixed:.0f} | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--cifar-candidates", type=int, default=8)
    args = ap.parse_args()
    name = describe_device(args.device)
    print(f"device: {name}; torch {torch.__version__}\n")
    if not args.skip_digits:
        digits(args)
    if not args.skip_cifar:
        cifar(args)


if __name__ == "__main__":
    main()
