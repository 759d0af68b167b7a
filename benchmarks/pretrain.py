"""Pretraining: accuracy and wall time per task, and training throughput, as a table.

    python benchmarks/pretrain.py --data-root ../shared/data [--device cuda] [--tasks digits-cnn ...]

Trains each task from scratch (a fresh cache directory) and prints test/val accuracy and
seconds; then times one training epoch of ResNet-20 and VGG-11 on CIFAR-10 (median of 3).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from evoprune.data import iterate, load_dataset
from evoprune.pretrain import new_model, pretrained
from evoprune.tasks import get_task
from evoprune.train import autocast, make_optimizer, pick_device


def epoch_seconds(task_name: str, data_root, device, batch_size: int, repeats: int = 3) -> tuple[float, int]:
    task = get_task(task_name)
    ds = load_dataset(task.dataset, data_root)
    model = new_model(task, ds).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, task.recipe)
    times = []
    for rep in range(repeats + 1):  # the first epoch warms up kernels and allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y in iterate(ds, ds.train, batch_size=batch_size, shuffle=True, augment="crop-flip",
                            seed=rep, device=device):
            with autocast(device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(ds.train)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tasks", nargs="*", default=["digits-cnn", "mnist-cnn", "cifar10-resnet20"])
    ap.add_argument("--throughput", nargs="*", default=["cifar10-resnet20", "cifar10-vgg11"])
    args = ap.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
                                                                      f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    print("| task | epochs | val top-1 | test top-1 | seconds |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for t in args.tasks:
            p = pretrained(get_task(t), data_root=args.data_root, cache_dir=cache, device=str(device))
            m = p.meta
            print(f"| {t} | {m['epochs']} | {m['val_acc']:.2%} | {m['test_acc']:.2%} | {m['seconds']:.1f} |")
    print("\n| model | images/epoch | s/epoch (median of 3) | images/s |\n|---|---|---|---|")
    for t in args.throughput:
        s, n = epoch_seconds(t, args.data_root, device, batch_size=512 if device.type == "cuda" else 128)
        print(f"| {t} | {n} | {s:.3f} | {n / s:.0f} |")


if __name__ == "__main__":
    main()
