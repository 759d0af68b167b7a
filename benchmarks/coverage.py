"""What of each torchvision classifier can be cut, and is each cut its masked self?

For every network (random weights with BN statistics that are not the identity, 10 classes, 32x32
images; 64 for AlexNet, 80 for Inception-v3): its conv and linear layers, the prunable ones
(`primitives.layers.structure`), how many each scope prunes and their share of the prunable MACs,
and, with half of each pruned layer's filters removed by L1 (`make_masks`, uniform), the largest
difference between the cut network's outputs and the masked one's, relative to the outputs'
size (`evoprune prune` refuses a cut over 1e-4), or why the cut is refused.

    python benchmarks/coverage.py [--archs resnet18,regnet_x_400mf,...]
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import torch
from torchvision.models import get_model

from evoprune.allocators import Allocation
from evoprune.errors import EvopruneError
from evoprune.masks import make_masks
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import parse
from evoprune.primitives.layers import structure
from evoprune.transfer.surgery import scope_groups, surgery, zero_pruned

ARCHS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf",
         "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5",
         "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "googlenet", "inception_v3", "convnext_tiny",
         "vgg11_bn", "alexnet")
SIDE = {"alexnet": 64, "inception_v3": 80}
KW = dict.fromkeys(("googlenet", "inception_v3"), {"aux_logits": False, "init_weights": True})


def cut_difference(model, s, table, groups, x, coupled: bool) -> str:
    """The largest |cut - masked| relative to max(1, the largest output), or the refusal."""
    try:
        masks = make_masks(parse("w_l1"), table, Allocation(kind="uniform", ratio=0.5), s, groups)
        masked = copy.deepcopy(model)
        zero_pruned(masked, s.with_followers(masks), s.all_bn_of)
        cut = surgery(copy.deepcopy(masked), masks, x[:2], coupled=coupled)
        with torch.no_grad():
            a, b = masked(x), cut(x)
        return f"{(a - b).abs().max().item() / max(1.0, a.abs().max().item()):.0e}"
    except EvopruneError as e:
        return f"refused: {str(e)[:60]}"


def one(arch: str) -> str:
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10, **KW.get(arch, {})).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    side = SIDE.get(arch, 32)
    x, y = torch.randn(8, 3, side, side), torch.randint(0, 10, (8,))
    weighted = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    try:
        s = structure(model, x[:2])
        table = collect_stats(model, [(x, y)], ["w_l1"])
        names = list(s.macs)
        inside, coupled = (scope_groups(model, x[:2], names, sc, s.out_channels) for sc in ("in-block", "coupled"))
    except EvopruneError as e:
        return f"| {arch} | {weighted} | | | | refused: {str(e)[:60]} | |"
    share = sum(s.macs[g[0]] for g in inside) / sum(s.macs.values())
    n_coupled = sum(len(g) for g in coupled)
    diffs = [cut_difference(model, s, table, groups, x, c) for groups, c in ((inside, False), (coupled, True))]
    return f"| {arch} | {weighted} | {len(s.macs)} | {len(inside)} ({share:.0%}) | {n_coupled} | {' | '.join(diffs)} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"{platform.machine()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; random weights, "
          "half of each pruned layer's filters by L1\n")
    print("| network | conv + linear layers | prunable | in-block (share of prunable MACs) | coupled | "
          "cut vs masked, in-block | coupled |\n|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        print(one(arch), flush=True)


if __name__ == "__main__":
    main()
