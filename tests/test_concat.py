"""Layers whose channels are a slice of a concatenation (Inception branches, DenseNet layers, a
user's torch.cat) are prunable: their statistics read their slice of the consumer, the FLOPs
count what cutting them saves there, and the masked network computes what surgery leaves (a BN
over the concatenation zeroes the pruned channels too). torchvision's GoogLeNet and DenseNet:
tests/test_prune.py and tests/test_proxy.py."""
from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from evoprune.allocators import kept_share
from evoprune.errors import EvopruneError
from evoprune.export import MetricSource, export
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import evaluate, parse, scores_by_layer
from evoprune.primitives.layers import discover, structure
from evoprune.transfer.surgery import independent_layers, surgery, zero_pruned

from helpers import measured_macs, randomize_bn


def _cbr(cin, cout, k=1):
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU()]


class Branches(nn.Module):
    """A stem; two branches concatenated, the second through a depthwise conv, then normalized
    together (a BN over the concatenation, as in DenseNet) and read by a conv; that conv's and the
    stem's pooled maps (`pool` x `pool`) concatenated and flattened into the classifier. `fused`:
    the branches are one conv of 16 filters (the same function when its weights are theirs)."""

    def __init__(self, fused: bool = False, depthwise: bool = True, pool: int = 1):
        super().__init__()
        self.fused = fused
        self.stem = nn.Sequential(*_cbr(3, 8, 3))
        if fused:
            self.ab = nn.Sequential(*_cbr(8, 16))
        else:
            self.a = nn.Sequential(*_cbr(8, 6))
            self.b = nn.Sequential(*_cbr(8, 10), *([nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.BatchNorm2d(10)]
                                                   if depthwise else []))
        self.norm = nn.BatchNorm2d(16)
        self.post = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU())
        self.pool, self.pool_stem = nn.AdaptiveAvgPool2d(pool), nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(pool * pool * 20, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.ab(x) if self.fused else torch.cat([self.a(x), self.b(x)], 1)
        y = self.post(torch.relu(self.norm(y)))
        return self.fc(torch.cat([self.pool(y), self.pool_stem(x)], dim=1).flatten(1))


def test_the_layers_writing_a_concatenation_are_found_with_their_slices(cifar_batch):
    x, _ = cifar_batch
    torch.manual_seed(0)
    infos = {i.name: i for i in discover(Branches().eval(), x[:2])}
    assert list(infos) == ["stem.0", "a.0", "b.0", "post.0"]  # the depthwise conv follows b.0
    a, b, post, stem = infos["a.0"], infos["b.0"], infos["post.0"], infos["stem.0"]
    assert a.consumers == ["post.0"] and a.reads("post.0") == (0, 16) and a.slice_bns == {"norm": (0, 16)}
    assert b.consumers == ["b.3"] and list(b.followers) == ["b.3"] and b.slice_bns == {"norm": (6, 16)}
    assert post.consumers == ["fc"] and post.reads("fc") == (0, 20)
    assert set(stem.consumers) == {"a.0", "b.0", "fc"} and stem.reads("fc") == (12, 20) and stem.reads("a.0") == (0, 8)
    assert post.concat_of == (16, ("a.0", "b.0"))
    s = structure(Branches().eval(), x[:2])
    assert s.inputs_from["post.0"] == (16, ("a.0", "b.0")) and s.inputs_from["a.0"] == "stem.0"
    assert s.concat_bns == {"norm": (16, (("a.0", 0), ("b.0", 6)))}
    assert independent_layers(Branches().eval(), x[:2], list(s.macs)) == list(s.macs)
    # a 2x2 map flattened: each channel is 4 features of the classifier's input, read as a block
    model = Branches(pool=2).eval()
    infos = {i.name: i for i in discover(model, x[:2])}
    assert infos["post.0"].reads("fc") == (0, 20) and infos["stem.0"].reads("fc") == (12, 20)
    table = collect_stats(model, [(x[:8], torch.zeros(8, dtype=torch.long))], ["w_out_l2"])
    w = model.fc.weight.detach().view(4, 20, 4)
    torch.testing.assert_close(table.values["w_out_l2"]["post.0"], w[:, :12].pow(2).sum((0, 2)).sqrt())


def test_a_slice_gives_the_statistics_of_the_same_filters_in_one_layer(cifar_batch):
    """Two 1x1 branches concatenated are one 1x1 conv of their filters stacked: every statistic of
    a single filter (its weights, BN, activations, gradients, the next layer's weights reading it,
    its PFP sensitivity) is the same either way, and so are those of the layers around them."""
    x, y = cifar_batch
    torch.manual_seed(0)
    split = randomize_bn(Branches(depthwise=False))
    fused = Branches(fused=True).eval()
    fused.load_state_dict({k: v for k, v in split.state_dict().items() if not k.startswith(("a.", "b."))},
                          strict=False)
    with torch.no_grad():
        for i in (0, 1):  # the conv and its BN: the branches' parameters and buffers stacked
            for (name, p), q in zip(fused.ab[i].state_dict().items(), zip(split.a[i].state_dict().values(),
                                                                          split.b[i].state_dict().values())):
                p.copy_(torch.cat(q) if p.dim() else q[0])
    torch.testing.assert_close(split(x), fused(x), rtol=1e-5, atol=1e-5)
    per_filter = ["w_l1", "w_l2", "w_linf", "w_mean", "w_std", "w_out_l2", "gram_diag", "bn_gamma", "bn_beta",
                  "bn_abs_gamma", "bn_mean", "bn_var", "act_mean", "act_var", "act_l1", "act_zero_frac", "act_max",
                  "cls_mean_in", "cls_mean_out", "cls_var_in", "cls_var_out", "taylor_act", "taylor_w", "pfp_sens"]
    ts, tf = collect_stats(split, [(x, y)], per_filter), collect_stats(fused, [(x, y)], per_filter)
    for s in per_filter:
        pairs = [(torch.cat([ts.values[s]["a.0"], ts.values[s]["b.0"]], -1), tf.values[s]["ab.0"])] + \
            [(ts.values[s][n], tf.values[s][n]) for n in ("stem.0", "post.0")]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5, msg=lambda m, s=s: f"{s}: {m}")


def test_the_masked_network_is_the_cut_one_and_the_flops_count_what_surgery_removes(cifar_batch):
    x, _ = cifar_batch
    torch.manual_seed(0)
    model = randomize_bn(Branches())
    s = structure(model, x[:2])
    gen = torch.Generator().manual_seed(1)
    masks = {n: (torch.rand(s.out_channels[n], generator=gen) < 0.5).index_fill(0, torch.tensor([0]), True)
             for n in s.macs}
    cut = surgery(copy.deepcopy(model), masks, x[:2])
    masked = copy.deepcopy(model)
    zero_pruned(masked, s.with_followers(masks), s.all_bn_of)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), cut(x), rtol=1e-5, atol=1e-5)
        own_only = copy.deepcopy(model)  # without the BN over the concatenation the shift leaks through
        zero_pruned(own_only, {**masks, **{f: masks[src] for f, src in s.followers.items()}}, s.all_bn_of)
        assert not torch.allclose(own_only(x), cut(x), rtol=1e-3, atol=1e-3)
    layers = list(s.cost_macs)
    measured = measured_macs(cut, layers, x) / measured_macs(model, layers, x)
    assert kept_share(masks, s.cost_macs, s.inputs_from, layers) == pytest.approx(measured, rel=1e-6)


def test_the_python_export_scores_the_layers_of_a_concatenation_as_the_engine(cifar_batch, tmp_path):
    x, y = cifar_batch
    torch.manual_seed(0)
    model = randomize_bn(Branches())
    expr = "add(pfp_sens, mul(0.1, w_out_l2))"
    path = tmp_path / "concat_metric.py"
    path.write_text(export(MetricSource("c", expr, "test"), "python", max_images=32))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    got = mod.score(model, [(x, y)])
    node = parse(expr)
    table = collect_stats(model, [(x, y)], node.stats(), max_images=32)
    want = scores_by_layer(evaluate(node, table), table)
    assert list(got) == list(want) == ["stem.0", "a.0", "b.0", "post.0"]
    for layer in want:
        assert torch.equal(got[layer], want[layer]), layer


class TwoViews(nn.Module):
    """One conv applied to two views of each image, concatenated on the batch axis (a siamese net)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Sequential(*_cbr(3, 6)), nn.Sequential(*_cbr(3, 6)),
                                  nn.Sequential(*_cbr(6, 8, 3)))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], 0))
        return self.fc((y[:len(x)] + y[len(x):]).mean((2, 3)))


def test_a_concatenation_on_the_batch_axis_is_not_a_slice_and_class_statistics_say_why_they_cannot(cifar_batch):
    x, y = cifar_batch
    model = TwoViews().eval()
    infos = {i.name: i for i in discover(model, x[:2])}
    assert infos["a.0"].consumers == ["c.0"] and infos["a.0"].slices == {}  # the channels are c's own
    table = collect_stats(model, [(x, y)], ["w_out_l2", "act_mean", "taylor_act"])
    assert all(torch.isfinite(v).all() for s in table.values.values() for v in s.values())
    with pytest.raises(EvopruneError, match="c.0 sees 64 inputs for 32 images: class-conditional"):
        collect_stats(model, [(x, y)], ["cls_mean_in"])
