"""The transfer stage on CIFAR-10 ResNet-20: L1 with and without TPP, and the best other baseline,
at per-layer ratios 0.5 / 0.7 / 0.9 of the convs inside blocks (as TPP's ResNet-56 table).

    python benchmarks/transfer.py --data-root ../shared/data [--device cuda] [--cache-dir DIR]
        [--task cifar10-resnet20] [--ratios 0.5 0.7 0.9] [--epochs 120] [--select-epochs 5]
        [--reg-step 1e-3] [--update-every 5] [--stabilize-iters 1000] [--json results.json]

1. Selection: every baseline but L1 is pruned (no TPP) and retrained for --select-epochs at
   each ratio; the best by *validation* accuracy is "the best baseline" at that ratio.
2. Comparison: L1 and the selected baseline, each without and with TPP, retrained for the
   same --epochs (TPP's CIFAR schedule: lr 0.01, x0.1 at 50% and 75%); test top-1.

TPP's paper ramps reg by 1e-4 every 10 iterations (100k iterations on full CIFAR-10); the
4654-image subset has 36 iterations per epoch, so the default here ramps 10x faster per
iteration (1e-3 every 5: 5000 iterations, then 1000 at the ceiling). Printed as Markdown.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from evoprune.pretrain import pretrained
from evoprune.primitives.baselines import BASELINES
from evoprune.tasks import RETRAIN, get_task
from evoprune.transfer.prune import PruneConfig, prune
from evoprune.transfer.tpp import TPPConfig


def run(args, ratio: float, metric: str, expression: str, tpp: bool, epochs: int) -> dict:
    cfg = PruneConfig(task=args.task, metric=metric, expression=expression, ratio=ratio,
                      tpp=TPPConfig(reg_step=args.reg_step, update_every=args.update_every,
                                    stabilize_iters=args.stabilize_iters) if tpp else None,
                      retrain=replace(RETRAIN, epochs=epochs))
    with tempfile.TemporaryDirectory() as d:
        return prune(cfg, out=Path(d) / "out", data_root=args.data_root, cache_dir=args.cache_dir,
                     device=args.device, record=False, show_progress=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--task", default="cifar10-resnet20")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--select-epochs", type=int, default=5)
    ap.add_argument("--reg-step", type=float, default=1e-3)
    ap.add_argument("--update-every", type=int, default=5)
    ap.add_argument("--stabilize-iters", type=int, default=1000)
    ap.add_argument("--json", default=None, help="also write every report here")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else platform.processor()
    print(f"# transfer benchmark: {args.task}, {dev}, torch {torch.__version__}\n")
    reports = []
    pre = pretrained(get_task(args.task), data_root=args.data_root, cache_dir=args.cache_dir, device=args.device)
    print(f"pretrained {args.task}: test {pre.meta['test_acc']:.2%}, val {pre.meta['val_acc']:.2%} "
          f"({'cached' if pre.cached else 'trained now'})\n")

    print("## selection (no TPP, %d retraining epochs, validation top-1)\n" % args.select_epochs)
    print("| ratio | " + " | ".join(b for b in BASELINES if b != "l1") + " |")
    print("|---|" + "---|" * (len(BASELINES) - 1))
    best = {}
    for r in args.ratios:
        vals = {}
        for name, b in BASELINES.items():
            if name == "l1":
                continue
            rep = run(args, r, f"baseline:{name}", b.expression, False, args.select_epochs)
            vals[name] = rep["val_acc"]
        best[r] = max(vals, key=vals.get)
        print(f"| {r} | " + " | ".join(f"{v:.2%}" for v in vals.values()) + " |", flush=True)
    print()

    print(f"## comparison ({args.epochs} retraining epochs, test top-1)\n")
    print("| ratio | metric | TPP | MACs speedup | params kept | test after surgery | test retrained "
          "| TPP s | retrain s |\n|---|---|---|---|---|---|---|---|---|")
    for r in args.ratios:
        for name in ("l1", best[r]):
            for tpp in (False, True):
                rep = run(args, r, f"baseline:{name}", BASELINES[name].expression, tpp, args.epochs)
                reports.append(rep)
                acc = rep["test_acc"]
                print(f"| {r} | {name} | {'yes' if tpp else 'no'} | {rep['speedup']:.2f}x | {rep['params_kept']:.1%} "
                      f"| {acc['pruned']:.2%} | **{acc['retrained']:.2%}** | {rep['seconds']['tpp']:.1f} "
                      f"| {rep['seconds']['retrain']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
