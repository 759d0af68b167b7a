"""Does a FLOPs target remove what it asks? The cost model against Torch-Pruning's counter.

For torchvision networks (random weights, 10 classes, 32x32 images: the structure is what is
measured, not accuracy), the `flops` allocator is asked for a share of fewer MACs with L1
scores; the masks are cut by Torch-Pruning's surgery, and the table gives the share removed of
the layers the cost model counts (prunable layers and the depthwise convs that follow them,
measured by hooks after surgery) and of the whole model (Torch-Pruning's `count_ops_and_params`:
stem, classifier and everything else included).

    python benchmarks/flops_targets.py [--reduction 0.4] [--archs mobilenet_v2,efficientnet_b0,...]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch_pruning as tp
from torchvision.models import get_model

from evoprune.allocators import Allocation, allocate
from evoprune.masks import expander
from evoprune.primitives.layers import structure
from evoprune.transfer.surgery import scope_groups, surgery

CASES = [("mobilenet_v2", "in-block"), ("mobilenet_v2", "coupled"), ("efficientnet_b0", "coupled"),
         ("mobilenet_v3_small", "coupled"), ("resnet18", "in-block"), ("resnet18", "coupled"),
         ("mnasnet0_5", "in-block"), ("regnet_x_400mf", "in-block"), ("regnet_x_400mf", "coupled"),
         ("resnext50_32x4d", "in-block"), ("regnet_y_400mf", "coupled")]


def counted_macs(model, layers: list[str], x) -> int:
    """MACs of the named conv/linear layers for one image, by hooks."""
    mods, total, hooks = dict(model.named_modules()), [0], []
    for n in layers:
        hooks.append(mods[n].register_forward_hook(
            lambda m, i, o: total.__setitem__(0, total[0] + o.numel() // len(x) * m.weight[0].numel())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def one(arch: str, scope: str, reduction: float) -> dict:
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    s = structure(model, x)
    names = list(s.macs)
    groups = scope_groups(model, x, names, scope, s.out_channels)
    mods = dict(model.named_modules())
    scores = {g[0]: sum(mods[n].weight.detach().flatten(1).abs().sum(1) for n in g) for g in groups}
    expand = expander(groups, scores, s)  # grouped convs (RegNet, ResNeXt): aligned positions
    layers = list(s.cost_macs)
    t0 = time.perf_counter()
    masks = allocate(scores, Allocation(kind="flops", flops_reduction=reduction), macs=s.cost_macs,
                     inputs_from=s.inputs_within(groups), expand=expand, layers=layers)
    seconds = time.perf_counter() - t0
    before_counted, (before_all, _) = counted_macs(model, layers, x), tp.utils.count_ops_and_params(model, x[:1])
    surgery(model, masks, x, coupled=scope == "coupled")
    after_counted, (after_all, _) = counted_macs(model, layers, x), tp.utils.count_ops_and_params(model, x[:1])
    return dict(arch=arch, scope=scope, layers=len(masks), followers=len(s.followers),
                counted=1 - after_counted / before_counted, whole=1 - after_all / before_all, seconds=seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduction", type=float, default=0.4)
    ap.add_argument("--archs", default="", help="comma-separated; default: the cases in CASES")
    args = ap.parse_args()
    cases = [(a, sc) for a, sc in CASES if not args.archs or a in args.archs.split(",")]
    print(f"flops allocator, L1 scores, asked for {args.reduction:.0%} fewer MACs; random weights, 32x32 images; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| network | scope | layers masked | depthwise followers | removed, counted layers | removed, whole model "
          "| allocation s |")
    print("|---|---|---|---|---|---|---|")
    for arch, scope in cases:
        r = one(arch, scope, args.reduction)
        print(f"| {r['arch']} | {r['scope']} | {r['layers']} | {r['followers']} | {r['counted']:.1%} | "
              f"{r['whole']:.1%} | {r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
