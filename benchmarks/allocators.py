"""Allocators at equal FLOPs: test top-1 after TPP, surgery and retraining, mean +- std over seeds.

    python benchmarks/allocators.py --data-root ../shared/data [--device cuda] [--cache-dir DIR]
        [--task cifar10-resnet20] [--targets 0.5,0.75] [--seeds 3] [--epochs 8]
        [--metrics baseline:l1,expr:...] [--results runs/allocators.jsonl]

For each FLOPs reduction target, metric and allocator (uniform at a FLOPs target is the
`flops` allocator; `global` takes the smallest share of its ranking that reaches the target;
`pfp` and `spectral` solve their budgets for it), `evoprune prune` runs with TPP (a schedule
sized for the 4654-image CIFAR subset, set below) and the given retraining epochs, once per
seed (the seed orders the TPP and retraining data). Every finished run is appended to the
results file, so a killed benchmark continues where it stopped; the table is printed from it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evoprune.train import describe_device
from evoprune.transfer.prune import prune, prune_config

ALLOCATORS = ("uniform", "global", "pfp", "spectral")
# TPP for the 4654-image subset: lr x sum(reg) = 0.01 x 150, as the digits recipe (tasks.toml)
TPP = {"reg_step": 0.01, "update_every": 1, "stabilize_iters": 100, "lr": 0.01}


def run_one(args, metric: str, allocator: str, target: float, seed: int, workdir: Path) -> dict:
    cfg = prune_config(task=args.task, metric=metric, flops_reduction=target,
                       allocator="flops" if allocator == "uniform" else allocator, tpp=dict(TPP),
                       retrain={"epochs": args.epochs, "seed": seed}, db=None)
    t0 = time.perf_counter()
    rep = prune(cfg, out=workdir / f"{allocator}-{target}-{seed}-{len(list(workdir.iterdir()))}", data_root=args.data_root,
                cache_dir=args.cache_dir, device=args.device, record=False, show_progress=False)
    return {"metric": metric, "allocator": allocator, "target": target, "seed": seed,
            "test": rep["test_acc"]["retrained"], "pruned": rep["test_acc"]["pruned"],
            "pretrained": rep["test_acc"]["pretrained"], "macs_kept": rep["macs_kept"],
            "layers": rep["layers"], "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    out = ["| FLOPs removed (target) | metric | allocator | MACs kept | test top-1 mean +- std | seeds | "
           "after surgery |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["target"], r["metric"], r["allocator"]) for r in rows},
                  key=lambda k: (k[0], k[1], ALLOCATORS.index(k[2])))
    for target, metric, alloc in keys:
        rs = [r for r in rows if (r["target"], r["metric"], r["allocator"]) == (target, metric, alloc)]
        accs = [r["test"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        out.append(f"| {target:.0%} | {metric} | {alloc} | {statistics.fmean(r['macs_kept'] for r in rs):.1%} | "
                   f"{statistics.fmean(accs):.2%} +- {sd:.2%} | {len(rs)} | "
                   f"{statistics.fmean(r['pruned'] for r in rs):.2%} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--task", default="cifar10-resnet20")
    ap.add_argument("--targets", default="0.5,0.75")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--metrics", default="baseline:l1")
    ap.add_argument("--allocators", default=",".join(ALLOCATORS))
    ap.add_argument("--results", default="runs/allocators.jsonl")
    args = ap.parse_args()
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["metric"], r["allocator"], r["target"], r["seed"]) for r in rows}
    name = describe_device(args.device)
    print(f"device: {name}; torch {torch.__version__}; task {args.task}; TPP {TPP}; {args.epochs} epochs\n",
          flush=True)
    with tempfile.TemporaryDirectory() as d:
        for target in [float(t) for t in args.targets.split(",")]:
            for metric in args.metrics.split(","):
                for alloc in args.allocators.split(","):
                    for seed in range(args.seeds):
                        if (metric, alloc, target, seed) in done:
                            continue
                        row = run_one(args, metric, alloc, target, seed, Path(d))
                        rows.append(row)
                        with results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{target} {metric} {alloc} seed {seed}: test {row['test']:.2%} "
                              f"(MACs kept {row['macs_kept']:.1%}, {row['seconds']:.0f} s)", flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
