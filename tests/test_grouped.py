"""Grouped convs that are not depthwise (ResNeXt, RegNet) are pruned in aligned positions: a
grouped conv's filters, and the channels of a layer it reads, keep the same positions in each of
its groups, so its groups stay equal and surgery removes exactly what the masked network zeroes.
torchvision's RegNetX through `evoprune prune` and the proxy: tests/test_prune.py and
tests/test_proxy.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from evoprune.allocators import Allocation, kept_share
from evoprune.errors import EvopruneError
from evoprune.masks import make_masks
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import parse
from evoprune.primitives.layers import structure
from evoprune.transfer.surgery import independent_layers, surgery, zero_pruned

from helpers import measured_macs, randomize_bn


class Bottleneck(nn.Module):
    """ResNeXt's block: a 1x1 conv, a 3x3 conv in `groups` groups, a 1x1 conv, and the shortcut."""

    def __init__(self, width: int, inner: int, groups: int):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(width, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(inner), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(inner, width, 1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return torch.relu(x + self.c(self.b(self.a(x))))


class TinyResNeXt(nn.Module):
    """A stem, two bottlenecks (4 groups of 4 channels, then 2 groups of 6), a classifier; and a
    grouped conv whose output two pools read and a dense conv reads in turn."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Bottleneck(16, 16, 4), Bottleneck(16, 12, 2))
        self.head = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 8, 1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def _aligned(mask: torch.Tensor, period: int) -> bool:
    parts = mask.reshape(period, -1)
    return bool((parts == parts[0]).all())


def test_grouped_convs_and_the_layers_they_read_are_prunable_in_aligned_positions(cifar_batch):
    x, _ = cifar_batch
    model = TinyResNeXt().eval()
    s = structure(model, x[:2])
    assert s.periods == {"blocks.0.a.0": 4, "blocks.0.b.0": 4, "blocks.1.a.0": 2, "blocks.1.b.0": 2, "head.0": 4,
                         # the residual stream's writers: head.0 reads it in 4 groups
                         "stem.0": 4, "blocks.0.c.0": 4, "blocks.1.c.0": 4}
    inside = independent_layers(model, x[:2], list(s.macs))
    assert inside == ["blocks.0.a.0", "blocks.0.b.0", "blocks.1.a.0", "blocks.1.b.0", "head.0", "head.3"]


@pytest.mark.parametrize("allocation", [Allocation(kind="uniform", ratio=0.6), Allocation(kind="global", ratio=0.5),
                                        Allocation(kind="flops", flops_reduction=0.4),
                                        Allocation(kind="pfp", ratio=0.5), Allocation(kind="spectral", ratio=0.5)])
@pytest.mark.parametrize("scope", ["in-block", "coupled"])
def test_the_masked_network_is_the_cut_one_and_the_flops_count_what_surgery_removes(cifar_batch, allocation, scope):
    """Every allocator's masks keep aligned positions; surgery cuts them, the grouped convs keep
    their groups (fewer channels in each), and the cut network computes what the masked one does
    with no statistics re-estimated; the MACs the allocators predict are the cut network's."""
    x, y = cifar_batch
    torch.manual_seed(0)
    model = randomize_bn(TinyResNeXt())
    s = structure(model, x[:2])
    names = list(s.macs)
    groups = [[n] for n in independent_layers(model, x[:2], names)] if scope == "in-block" else \
        [["stem.0", "blocks.0.c.0", "blocks.1.c.0"], *[[n] for n in independent_layers(model, x[:2], names)]]
    table = collect_stats(model, [(x, y)], ["w_l1", "pfp_sens"], spectra=True)
    masks = make_masks(parse("w_l1"), table, allocation, s, groups)
    assert set(masks) == {n for g in groups for n in g}
    for n, m in masks.items():
        assert _aligned(m, s.periods.get(n, 1)) and m.any(), n
    assert any(not m.all() for n, m in masks.items() if n in s.periods)
    cut = surgery(copy.deepcopy(model), masks, x[:2], coupled=scope == "coupled")
    before = dict(model.named_modules())
    for name, feeder in {"blocks.0.b.0": "blocks.0.a.0", "blocks.1.b.0": "blocks.1.a.0", "head.0": "stem.0"}.items():
        conv = cut.get_submodule(name)
        assert conv.groups == before[name].groups
        assert conv.in_channels == (int(masks[feeder].sum()) if feeder in masks else before[name].in_channels)
        assert conv.out_channels == int(masks[name].sum())
    masked = copy.deepcopy(model)
    zero_pruned(masked, s.with_followers(masks), s.all_bn_of)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), cut(x), rtol=1e-5, atol=1e-5)
    layers = list(s.cost_macs)
    measured = measured_macs(cut, layers, x) / measured_macs(model, layers, x)
    predicted = kept_share(masks, s.cost_macs, s.inputs_within(groups), layers)
    assert predicted == pytest.approx(measured, rel=1e-6)
    if allocation.target == "flops":
        assert 1 - predicted >= allocation.flops_reduction


def test_a_mask_that_would_make_a_grouped_conv_s_groups_unequal_is_refused(cifar_batch):
    x, _ = cifar_batch
    model = TinyResNeXt().eval()
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 5]] = False  # position 0 of group 0, position 1 of group 1
    with pytest.raises(EvopruneError, match="the mask of blocks.0.a.0 must keep the same positions in each of the 4 "
                                            "groups of the grouped conv blocks.0.b.0"):
        surgery(copy.deepcopy(model), {"blocks.0.a.0": keep}, x[:2])
    cut = surgery(copy.deepcopy(model), {"blocks.0.a.0": torch.arange(16) % 4 != 1}, x[:2])  # aligned
    assert cut.blocks[0].b[0].in_channels == 12 and cut.blocks[0].b[0].groups == 4
    with pytest.raises(EvopruneError, match="the mask of blocks.0.b.0 must keep .* 4 groups of the grouped conv "
                                            "blocks.0.b.0"):
        surgery(copy.deepcopy(model), {"blocks.0.b.0": torch.arange(16) != 3}, x[:2])


def test_a_group_norm_is_its_layer_s_norm_and_its_groups_set_the_period(cifar_batch):
    """A GroupNorm after a conv is masked with it (its scale and shift zeroed: the pruned channel
    is 0 after it, as in the cut network) and its groups make the conv's mask aligned, so the cut
    GroupNorm keeps equal groups; a GroupNorm over a concatenation cannot (refused by surgery)."""
    from user_nets import gn_resnet, group_norm_over_branches

    x, y = cifar_batch
    torch.manual_seed(0)
    model = gn_resnet(4).eval()
    s = structure(model, x[:2])
    assert s.bn_of["blocks.0.conv1"] == "blocks.0.gn1" and s.periods["blocks.0.conv1"] == 4
    table = collect_stats(model, [(x, y)], ["w_l1"])
    masks = make_masks(parse("w_l1"), table, Allocation(kind="uniform", ratio=0.5), s, [["blocks.0.conv1"]])
    keep = masks["blocks.0.conv1"]
    assert _aligned(keep, 4) and int(keep.sum()) == 8
    zero_pruned(model, s.with_followers(masks), s.all_bn_of)
    seen = {}
    hook = model.blocks[0].gn1.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert seen["out"][:, ~keep].abs().max() == 0 and seen["out"][:, keep].abs().max() > 0
    cut = surgery(copy.deepcopy(model), masks, x[:2])
    assert (cut.blocks[0].gn1.num_groups, cut.blocks[0].gn1.num_channels) == (4, 8)
    branches = group_norm_over_branches(4).eval()
    with pytest.raises(EvopruneError, match="the GroupNorm gn reads the channels of a with others"):
        surgery(branches, {"a": torch.arange(8) % 2 == 0}, x[:2])
