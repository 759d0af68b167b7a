"""Transfer stage pieces: surgery equals the masked model; TPP drives pruned filters to zero."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from evoprune.allocators import uniform
from evoprune.data import iterate, load_dataset
from evoprune.errors import EvopruneError
from evoprune.models import build_model
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import evaluate, parse, scores_by_layer
from evoprune.primitives.layers import discover
from evoprune.transfer.surgery import Widen, independent_layers, narrow_tied, surgery, zero_pruned
from evoprune.transfer.tpp import TPPConfig, TPPRegularizer


def _masks(model, x, y, names=None, ratio=0.5, expr="div(w_l1, add(act_mean, 0.1))"):
    node = parse(expr)
    table = collect_stats(model, [(x, y)], node.stats(), max_images=len(x))
    scores = scores_by_layer(evaluate(node, table), table)
    masks = uniform(scores, ratio)
    return {n: m for n, m in masks.items() if names is None or n in names}


def _bns(model, x):
    names = {m: n for n, m in model.named_modules()}
    return {i.name: names[i.bn] if i.bn is not None else None for i in discover(model, x[:2])}


@pytest.mark.parametrize("arch", ["resnet20", "vgg11"])
def test_surgery_output_equals_the_masked_model(arch, shared_data):
    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=64))
    torch.manual_seed(0)
    model = build_model(arch, 10, 3).eval()
    names = independent_layers(model, x[:2], [i.name for i in discover(model, x[:2])])
    if arch == "resnet20":  # option-A residual stream: only the convs inside blocks are independent
        assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    masks = _masks(model, x, y, names)
    zero_pruned(model, masks, _bns(model, x))
    with torch.no_grad():
        masked = model(x)
    before = sum(p.numel() for p in model.parameters())
    surgery(model, masks, x[:2])
    with torch.no_grad():
        pruned = model(x)
    assert (pruned - masked).abs().max().item() < 1e-5
    assert sum(p.numel() for p in model.parameters()) < before
    first = dict(model.named_modules())[names[0]]
    assert first.out_channels == int(masks[names[0]].sum())


def test_narrowed_tied_layers_compute_the_masked_model(shared_data):
    """ResNet-20's residual stream (stem and every block's conv2) is tied: surgery cannot cut it,
    narrow_tied computes only the kept filters and widens them back with zeros. Same outputs
    (eval and train mode) and the same loss gradient on a kept weight as the masked model."""
    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=32))
    torch.manual_seed(0)
    masked = build_model("resnet20", 10, 3)
    every = [i.name for i in discover(masked, x[:2])]
    inside = independent_layers(masked, x[:2], every)
    masks = _masks(masked.eval(), x, y, ratio=0.6)
    bns = _bns(masked, x)
    zero_pruned(masked, masks, bns)
    narrowed = copy.deepcopy(masked)
    surgery(narrowed, {n: m for n, m in masks.items() if n in inside}, x[:2])
    tied = {n: m for n, m in masks.items() if n not in inside}
    done = narrow_tied(narrowed, tied, bns)
    assert sorted(done) == sorted(n for n, m in tied.items() if not m.all()) and "conv1" in done
    assert isinstance(narrowed.layer2.get_submodule("1").bn2, Widen)
    assert narrowed.layer2.get_submodule("1").conv2.out_channels == int(masks["layer2.1.conv2"].sum())
    w = narrowed.layer2.get_submodule("1").bn2.eval()  # a block adds into its shortcut, no zeros
    h, other = torch.randn(4, w.inner.num_features, 8, 8), torch.randn(4, w.width, 8, 8)
    assert torch.allclose(w.add_into(h, other), w(h) + other)
    for train in (False, True):
        masked.train(train), narrowed.train(train)
        a, b = masked(x), narrowed(x)
        assert (a - b).abs().max().item() < 1e-4, train
    F.cross_entropy(a, y).backward()
    F.cross_entropy(b, y).backward()
    keep, fed = masks["layer3.2.conv2"], masks["layer3.2.conv1"]  # its input was cut by surgery
    g_masked = masked.layer3.get_submodule("2").conv2.weight.grad[keep][:, fed]
    g_narrow = narrowed.layer3.get_submodule("2").conv2.weight.grad
    assert torch.allclose(g_masked, g_narrow, atol=1e-5)


def test_coupled_layers_are_refused(shared_data):
    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=16))
    model = build_model("resnet20", 10, 3, shortcut="B").eval()
    masks = _masks(model, x, y, ["conv1", "layer1.0.conv2"])
    with pytest.raises(EvopruneError, match="residual coupling"):
        surgery(model, masks, x[:2])
    with pytest.raises(EvopruneError, match="no layers named"):
        surgery(model, {"nope": torch.ones(3, dtype=torch.bool)}, x[:2])


def test_tpp_drives_pruned_filters_and_bn_to_zero(digits_pretrained):
    pre = digits_pretrained
    model = copy.deepcopy(pre.model)
    x, y = next(iterate(pre.data, pre.data.train, batch_size=256, seed=0))
    masks = _masks(model, x, y, expr="w_l1")
    reg = TPPRegularizer(model, masks, _bns(model, x),
                         TPPConfig(reg_step=0.5, update_every=2, reg_ceiling=5.0, lr=0.01))
    p0, b0, k0 = reg.pruned_norms()
    opt = torch.optim.SGD(model.parameters(), lr=reg.cfg.lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(300):
        for xb, yb in iterate(pre.data, pre.data.train, batch_size=64, shuffle=True, seed=step):
            loss = F.cross_entropy(model(xb), yb) + reg.penalty()
            opt.zero_grad()
            loss.backward()
            reg.apply_l2()
            opt.step()
            reg.step()
            break
    p1, b1, k1 = reg.pruned_norms()
    assert reg.phase == "stabilize"
    assert p1 < 1e-3 * p0 and b1 < 1e-3 * max(b0, 1e-6), (p0, p1, b0, b1)
    assert k1 > 0.5 * k0, (k0, k1)  # the kept filters keep their scale


def test_tpp_drives_the_depthwise_channels_after_a_pruned_filter_to_zero():
    """MobileNetV2: the L2 term reaches the depthwise conv (and its BN) that follows a pruned
    expand filter, on the pruned channels only; the Gram term stays on the pruned layers."""
    from torchvision.models import mobilenet_v2

    from evoprune.primitives.layers import structure

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    s = structure(model.eval(), x)
    masks = {"features.2.conv.0.0": torch.arange(96) % 3 != 0}
    follow = {f: (m, s.follower_bn[f]) for f, m in s.with_followers(masks).items() if f in s.followers}
    assert list(follow) == ["features.2.conv.1.0"] and follow["features.2.conv.1.0"][1] == "features.2.conv.1.1"
    reg = TPPRegularizer(model, masks, s.bn_of, TPPConfig(reg_step=0.1, update_every=1), followers=follow)
    reg.iteration = 5
    for p in model.parameters():
        p.data.uniform_(0.5, 1.5)  # no parameter at 0 (a fresh BN's shift is): the L2 term's gradient is p
        p.grad = torch.zeros_like(p)
    reg.apply_l2()
    mods = dict(model.named_modules())
    pruned = ~masks["features.2.conv.0.0"]
    for p in (mods["features.2.conv.1.0"].weight, mods["features.2.conv.1.1"].weight, mods["features.2.conv.1.1"].bias):
        g = p.grad.flatten(1).abs().sum(1) if p.dim() > 1 else p.grad.abs()
        assert (g[pruned] > 0).all() and (g[~pruned] == 0).all()
    assert len(reg.layers) == 1  # the Gram term: the expand conv alone


def test_tpp_drives_the_bias_of_a_pruned_filter_without_bn_to_zero():
    """A conv with a bias and no BN after it (VGG without BN, a squeeze-excitation block): after
    its pruned filters' weights reach 0 the bias is what the channel still outputs, and surgery
    drops it, so the L2 term takes the pruned filters' biases too (kept ones untouched)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    keep = torch.tensor([True, False, True, False, True, True])
    reg = TPPRegularizer(model, {"0": keep}, {"0": None}, TPPConfig(reg_step=0.1, update_every=1))
    reg.iteration = 5
    for p in model.parameters():
        p.data.uniform_(0.5, 1.5)
        p.grad = torch.zeros_like(p)
    reg.apply_l2()
    g = model[0].bias.grad
    assert torch.allclose(g[~keep], 0.5 * model[0].bias.data[~keep]) and (g[keep] == 0).all()
    assert (model[2].bias.grad == 0).all()  # not a pruned layer
    # the report's second norm: with no BN, the pruned filters' bias (what they still output)
    assert reg.pruned_norms()[1] == pytest.approx(model[0].bias.data[~keep].abs().mean().item())


@pytest.mark.parametrize("affine", [True, False])
def test_an_instance_norm_is_masked_with_its_conv_and_the_cut_is_exact(affine, cifar_batch):
    """An InstanceNorm after a conv normalizes each channel alone: a zeroed filter leaves its
    channel 0 after it once its shift is zeroed too (it is the conv's norm), so the cut network is
    the masked one. Before InstanceNorms were norms, the masked channel kept the shift."""
    from torch import nn

    from evoprune.primitives.layers import structure

    x, _ = cifar_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=affine), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.InstanceNorm2d(6, affine=affine), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    if affine:
        with torch.no_grad():
            for m in (model[1], model[4]):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    s = structure(model, x[:2])
    assert s.bn_of == {"0": "1", "3": "4"}
    masks = {"0": torch.arange(8) % 2 == 0, "3": torch.arange(6) < 4}
    masked = copy.deepcopy(model)
    zero_pruned(masked, s.with_followers(masks), s.all_bn_of)
    cut = surgery(copy.deepcopy(masked), masks, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(masked(x), cut(x), rtol=1e-5, atol=1e-6)
    pruned, norm, kept = TPPRegularizer(masked, masks, s.bn_of).pruned_norms()  # a norm without scale and shift
    assert pruned == norm == 0 and kept > 0
