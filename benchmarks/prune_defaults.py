"""`evoprune prune` with a task's default schedule, timed as a user runs it.

    python benchmarks/prune_defaults.py [--task digits-cnn] [--ratio 0.5] [--repeats 3]

Runs `evoprune prune --task T --metric baseline:l1 --ratio R` in a fresh process (no flag
but --out, --cache-dir and --no-record), once with an empty pretraining cache (pretraining
included) and `--repeats` times with it warm; prints wall time and the test accuracies
before pruning, after TPP, after surgery and after retraining, and how close TPP drove the
pruned filters to zero.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def once(args, cache: Path, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evoprune", "prune", "--task", args.task, "--metric", "baseline:l1",
                    "--ratio", str(args.ratio), "--out", str(out), "--cache-dir", str(cache), "--no-record",
                    "--device", "cpu"], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads((out / "report.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits-cnn")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "cache"
        for i in range(args.repeats + 1):
            seconds, rep = once(args, cache, Path(d) / f"out{i}")
            rows.append(("cold (pretraining included)" if i == 0 else f"warm {i}", seconds, rep))
    rep = rows[-1][2]
    print(f"`evoprune prune --task {args.task} --metric baseline:l1 --ratio {args.ratio}`: {rep['schedule']}\n")
    print("| run | wall s | TPP s | retrain s | test before | after TPP | after surgery | retrained | "
          "pruned / kept filter L2 after TPP | MACs speedup |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, seconds, r in rows:
        a, n = r["test_acc"], r["tpp_norms"]
        print(f"| {name} | {seconds:.1f} | {r['seconds']['tpp']:.1f} | {r['seconds']['retrain']:.1f} | "
              f"{a['pretrained']:.2%} | {a.get('after_tpp', float('nan')):.2%} | {a['pruned']:.2%} | "
              f"{a['retrained']:.2%} | {n['pruned'] / n['kept']:.1e} | {r['speedup']:.2f}x |")
    warm = [s for name, s, _ in rows[1:]]
    print(f"\nwarm: median {statistics.median(warm):.1f} s (min {min(warm):.1f}, max {max(warm):.1f}) over {len(warm)}")


if __name__ == "__main__":
    main()
