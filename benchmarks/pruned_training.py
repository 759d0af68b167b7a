"""Does training a pruned network cost what its kept FLOPs cost? A training step of each zoo
network at full width, with the pruned filters masked (the masked proxy), and physically cut
(the pruned proxy), against the share of MACs the cut network keeps.

    python benchmarks/pruned_training.py [--ratio 0.6] [--batch 256] [--steps 4] [--device cpu]

Layers whose channels no other layer shares are cut (as the pruned proxy does); tied ones (the
residual stream of an option-A ResNet) stay full width, and the "narrowed" columns also cut
the tied convs to their kept filters and widen their outputs back with zeros (`narrow_tied`,
what the pruned proxy does since): the stream stays full width, the pruned filters' compute
goes. The "+ channels_last" column also runs the narrow convs on large maps in channels_last
(transfer/layout.py, what the pruned proxy does on the CPU). Weights are random: the cost of a
step does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from evoprune.models import build_model
from evoprune.primitives.layers import structure
from evoprune.train import describe_device
from evoprune.transfer.layout import channels_last_convs, conv_inputs, use_channels_last
from evoprune.transfer.prune import count
from evoprune.transfer.surgery import independent_layers, narrow_tied, surgery, zero_pruned

NETS = [("cnn", 1, 8), ("lenet5", 1, 28), ("vgg11", 3, 32), ("resnet20", 3, 32), ("resnet8", 1, 8)]


def step_seconds(model, x, y, steps: int, device) -> float:
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = describe_device(device)
    print(f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; batch {args.batch}, "
          f"ratio {args.ratio} in every layer that can be cut\n")
    print("| network | layers cut / prunable | MACs kept | full step s | pruned step s | time share | "
          "time share / MACs share | narrowed: MACs kept | step s | time share | time share / MACs share | "
          "+ channels_last: convs | step s | time share |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, cin, side in NETS:
        torch.manual_seed(0)
        base = build_model(arch, 10, cin).eval()
        x = torch.randn(args.batch, cin, side, side)
        y = torch.randint(0, 10, (args.batch,))
        s = structure(base, x[:2])
        cut = independent_layers(base, x[:2], list(s.macs))
        every = {n: torch.arange(w) < max(1, round((1 - args.ratio) * w)) for n, w in s.out_channels.items()}
        masks = {n: every[n] for n in cut}
        tied = {n: m for n, m in every.items() if n not in cut}
        pruned = copy.deepcopy(base)
        zero_pruned(pruned, masks, s.bn_of)
        surgery(pruned, masks, x[:2])
        full_macs = count(base, x[:2])[0]
        share = count(pruned, x[:2])[0] / full_macs
        narrowed = copy.deepcopy(pruned)
        zero_pruned(narrowed, tied, s.bn_of)
        narrow_tied(narrowed, tied, s.bn_of)
        n_share = count(narrowed, x[:2])[0] / full_macs
        full_s = step_seconds(copy.deepcopy(base), x.to(device), y.to(device), args.steps, device)
        cut_s = step_seconds(pruned, x.to(device), y.to(device), args.steps, device)
        row = f"| {arch} | {len(cut)} / {len(s.macs)} | {share:.1%} | {full_s:.3f} | {cut_s:.3f} | " \
              f"{cut_s / full_s:.1%} | {cut_s / full_s / share:.2f} |"
        if tied:
            nar_s = step_seconds(narrowed, x.to(device), y.to(device), args.steps, device)
            row += f" {n_share:.1%} | {nar_s:.3f} | {nar_s / full_s:.1%} | {nar_s / full_s / n_share:.2f} |"
        else:
            row += " (nothing tied) | | | |"
            narrowed = pruned
        picked = channels_last_convs(narrowed, conv_inputs(base, x[:2])) if device.type == "cpu" else []
        if picked:
            for n in picked:
                use_channels_last(narrowed.get_submodule(n))
            cl_s = step_seconds(narrowed, x.to(device), y.to(device), args.steps, device)
            row += f" {len(picked)} | {cl_s:.3f} | {cl_s / full_s:.1%} |"
        else:
            row += " none | | |"
        print(row)


if __name__ == "__main__":
    main()
