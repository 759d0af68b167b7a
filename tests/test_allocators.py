"""Allocators directly: rounding, at least one filter per layer, ties, the FLOPs target."""
from __future__ import annotations

import math

import pytest
import torch

from evoprune.allocators import (
    Allocation,
    allocate,
    flops,
    global_,
    kept_share,
    uniform,
)
from evoprune.errors import EvopruneError

from helpers import measured_macs


def _scores(*widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand(w, generator=g) for i, w in enumerate(widths)}


@pytest.mark.parametrize("ratio, width, kept", [(0.75, 10, 3), (0.5, 7, 4), (0.5, 8, 4), (0.999, 5, 1),
                                                (0.25, 3, 3), (0.6, 16, 7)])
def test_uniform_keeps_the_ceiling_of_the_share_and_at_least_one(ratio, width, kept):
    m = uniform(_scores(width), ratio)["l0"]
    assert int(m.sum()) == kept == max(1, math.ceil((1 - ratio) * width - 1e-9))


def test_uniform_keeps_the_highest_scores():
    s = {"a": torch.tensor([0.1, 0.9, 0.5, 0.7])}
    assert uniform(s, 0.5)["a"].tolist() == [False, True, False, True]


def test_ties_keep_the_first_filters_every_time():
    s = {"a": torch.ones(6), "b": torch.tensor([2.0, 1.0, 2.0, 1.0, 2.0, 1.0])}
    m = uniform(s, 0.5)
    assert m["a"].tolist() == [True, True, True, False, False, False]
    assert m["b"].tolist() == [True, False, True, False, True, False]
    assert all(torch.equal(m[k], uniform(s, 0.5)[k]) for k in s)  # deterministic
    g = global_({"x": torch.ones(4), "y": torch.ones(4)}, 0.5)
    assert g["x"].tolist() == [True] * 4 and g["y"].tolist() == [True, False, False, False]


def test_global_ranks_across_layers_and_keeps_one_per_layer():
    s = {"big": torch.tensor([5.0, 6.0, 7.0, 8.0]), "small": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    m = global_(s, 0.5)
    assert m["big"].all() and m["small"].tolist() == [False, False, False, True]  # one kept, the best
    total = sum(int(v.sum()) for v in global_(_scores(16, 32, 64), 0.7).values())
    assert total == math.ceil(0.3 * 112)


def test_flops_finds_the_smallest_ratio_that_meets_the_target():
    s = _scores(8, 16, 32)
    macs = {"l0": 1000, "l1": 4000, "l2": 2000}
    inputs = {"l1": "l0", "l2": "l1"}
    for target in (0.3, 0.5, 0.8):
        m = flops(s, target, macs, inputs)
        removed = 1 - kept_share(m, macs, inputs)
        assert removed >= target - 1e-9
        # one filter fewer pruned in the widest layer no longer reaches the target, or the
        # uniform ratio could not be lower: the result is the smallest uniform share that does
        ratio = 1 - int(m["l2"].sum()) / 32
        looser = uniform(s, max(ratio - 1 / 32 - 1e-6, 0.0))
        assert 1 - kept_share(looser, macs, inputs) < target + 0.05


def test_kept_share_counts_the_layer_and_the_one_feeding_it():
    masks = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True, False, False])}
    # a keeps 1/2 of its cost; b keeps 1/2 of its filters and 1/2 of its inputs (from a): 1/4
    assert kept_share(masks, {"a": 100, "b": 300}, {"b": "a"}) == pytest.approx((50 + 75) / 400)


def test_allocation_is_validated():
    for kw, words in [({"kind": "best"}, "allocator must be one of"), ({"ratio": 1.0}, "ratio must be in"),
                      ({"flops_reduction": 0.0}, "flops reduction must be in")]:
        with pytest.raises(EvopruneError, match=words):
            Allocation(**kw)
    s = _scores(4, 4)
    assert allocate(s, Allocation(kind="uniform", ratio=0.5), macs={}, inputs_from={}).keys() == s.keys()


# --------------------------------------------------------------------------- pfp and spectral
def _conv_with_spectrum(sigmas: list[float], out_ch: int, in_ch: int, g: torch.Generator) -> torch.nn.Conv2d:
    """A 3x3 conv whose filters, flattened to [out_ch, in_ch * 9], have singular values `sigmas`."""
    conv = torch.nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    u, _ = torch.linalg.qr(torch.randn(out_ch, out_ch, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_ch * 9, in_ch * 9, generator=g, dtype=torch.float64))
    s = torch.zeros(out_ch, in_ch * 9, dtype=torch.float64)
    s[range(len(sigmas)), range(len(sigmas))] = torch.tensor(sigmas, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_((u @ s @ v.T).reshape(out_ch, in_ch, 3, 3).float())
    return conv


def test_spectral_keeps_the_analytic_ranks_of_a_hand_built_network():
    from evoprune.masks import make_masks, stat_table
    from evoprune.primitives.expr import parse
    from evoprune.primitives.layers import structure

    g = torch.Generator().manual_seed(0)
    spectra = {"0": [10, 1, 0.1, 0.01, 0, 0, 0, 0],  # energy 101.0101: the first holds 99.0%, two 99.99%
               "2": [3, 3, 3, 3, 1, 1, 0, 0, 0, 0, 0, 0],  # 38: 3 hold 71%, 4 hold 94.7%, 5 hold 97.4%
               "4": [1.0] * 16}  # flat: r directions hold r/16
    model = torch.nn.Sequential(_conv_with_spectrum(spectra["0"], 8, 2, g), torch.nn.ReLU(),
                                _conv_with_spectrum(spectra["2"], 12, 8, g), torch.nn.ReLU(),
                                _conv_with_spectrum(spectra["4"], 16, 12, g), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(4, 2, 6, 6, generator=g)

    class Pre:  # what stat_table needs of a pretrained task
        def __init__(self):
            self.model = model
            self.task = type("T", (), {"name": "hand-built"})()
            from evoprune.data import DataSet, TensorSplit
            split = TensorSplit(x, torch.zeros(4, dtype=torch.long))
            self.data = DataSet("hand", 4, (2, 6, 6), (0.0, 0.0), (1.0, 1.0), split, split, split, "test")

    node = parse("w_l1")
    for tau, want in [(0.02, {"0": 1, "2": 6, "4": 16}), (0.04, {"0": 1, "2": 5, "4": 16}),
                      (0.06, {"0": 1, "2": 4, "4": 16}), (1e-3, {"0": 2, "2": 6, "4": 16}),
                      (0.3, {"0": 1, "2": 3, "4": 12}), (0.5, {"0": 1, "2": 3, "4": 8})]:
        alloc = Allocation(kind="spectral", target="tau", tau=tau)
        table = stat_table(Pre(), ["w_l1"], alloc, n_images=4)
        s = structure(model, x[:2])
        masks = make_masks(node, table, alloc, s)
        assert {n: int(m.sum()) for n, m in masks.items()} == want, tau
    # scaled to a global ratio: the ranks keep their proportions and the total is met to the filter
    alloc = Allocation(kind="spectral", ratio=0.5, tau=0.06)
    masks = make_masks(node, stat_table(Pre(), ["w_l1"], alloc, n_images=4), alloc, structure(model, x[:2]))
    assert {n: int(m.sum()) for n, m in masks.items()} == {"0": 1, "2": 4, "4": 13}  # ceil(0.8 r), 18 of 36


def test_spectral_rank_rule():
    from evoprune.allocators import spectral_rank

    sig = torch.tensor([4.0, 2.0, 1.0, 0.0])  # energies 16, 4, 1, 0 of 21
    assert [spectral_rank(sig, t) for t in (0.5, 0.24, 0.2, 0.05, 0.04, 1e-9)] == [1, 1, 2, 2, 3, 3]
    assert spectral_rank(torch.zeros(5), 0.1) == 1


def _pfp_data(widths, scale=None, seed=0):
    from evoprune.allocators import LayerBudgetData

    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": LayerBudgetData(sensitivity=torch.rand(w, generator=g) * (scale or {}).get(f"l{i}", 1.0),
                                     sites=100) for i, w in enumerate(widths)}


def test_pfp_meets_a_ratio_to_the_filter_and_keeps_one_per_layer():
    from evoprune.allocators import budgets

    widths = (16, 32, 64, 8)
    scores = _scores(*widths)
    data = _pfp_data(widths)
    n = sum(widths)
    for ratio in (0.1, 0.3, 0.5, 0.77, 0.9, 0.97):
        counts = budgets(scores, Allocation(kind="pfp", ratio=ratio), data, removed=lambda c: 0.0)
        assert sum(counts.values()) == max(len(widths), math.ceil((1 - ratio) * n - 1e-9)), ratio
        assert all(1 <= counts[k] <= len(scores[k]) for k in counts)
    again = budgets(scores, Allocation(kind="pfp", ratio=0.5), data, removed=lambda c: 0.0)
    assert again == budgets(scores, Allocation(kind="pfp", ratio=0.5), data, removed=lambda c: 0.0)


def test_pfp_ties_are_broken_in_layer_order():
    from evoprune.allocators import LayerBudgetData, budgets

    same = {f"l{i}": LayerBudgetData(sensitivity=torch.ones(10), sites=50) for i in range(3)}
    scores = {k: torch.ones(10) for k in same}
    counts = budgets(scores, Allocation(kind="pfp", ratio=0.5), same, removed=lambda c: 0.0)
    assert sum(counts.values()) == 15 and list(counts.values()) == sorted(counts.values(), reverse=True)
    assert max(counts.values()) - min(counts.values()) <= 1  # equal layers, equal budgets but for one filter


@pytest.mark.parametrize("task", ["digits-cnn", "resnet20"])
def test_pfp_gives_more_filters_to_more_sensitive_layers(task, digits_pretrained, shared_data):
    """On real networks and real images: the budgets meet the target, and a layer whose
    sensitivities are raised gets more of the budget (the others less)."""
    from dataclasses import replace

    from evoprune.allocators import LayerBudgetData, budgets
    from evoprune.data import iterate, load_dataset
    from evoprune.masks import budget_data, stat_table
    from evoprune.models import build_model

    if task == "digits-cnn":
        pre = digits_pretrained
    else:  # ResNet-20 on real CIFAR-10 images (random weights: pretraining it takes 10 minutes here)
        ds = load_dataset("cifar10", shared_data)
        torch.manual_seed(0)
        pre = replace(digits_pretrained, model=build_model("resnet20", 10, 3).eval(), data=ds)
    alloc = Allocation(kind="pfp", ratio=0.6)
    table = stat_table(pre, ["w_l1"], alloc, n_images=64)
    groups = [[n] for n in table.layers]
    data = budget_data(groups, table, alloc)
    scores = {n: table.values["w_l1"][n] for n in table.layers}
    base = budgets(scores, alloc, data, removed=lambda c: 0.0)
    n = sum(table.widths)
    assert sum(base.values()) == math.ceil(0.4 * n)
    for layer in (table.layers[0], table.layers[len(table.layers) // 2]):
        raised = dict(data)
        raised[layer] = LayerBudgetData(sensitivity=data[layer].sensitivity * 10, sites=data[layer].sites)
        more = budgets(scores, alloc, raised, removed=lambda c: 0.0)
        assert sum(more.values()) == sum(base.values())
        assert more[layer] > base[layer] or more[layer] == len(scores[layer]), (layer, base[layer], more[layer])
        assert all(more[k] <= base[k] for k in base if k != layer)
    _ = iterate  # the data stream is the task's own


def test_unreachable_targets_are_refused_in_one_line(digits_pretrained, cache_dir, tmp_path, capsys):
    from helpers import run

    common = ["prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--no-tpp", "--epochs", "0",
              "--cache-dir", str(cache_dir), "--no-record", "--device", "cpu"]
    for extra, words in [(["--allocator", "pfp", "--flops-reduction", "0.5", "--skip", "features.0", "--skip",
                           "features.3", "--skip", "features.7"], "removes at most"),
                         (["--allocator", "spectral", "--ratio", "0.999"], "cannot be met"),
                         (["--allocator", "spectral", "--ratio", "0.5", "--tau", "2"], "tau must be in (0, 1)"),
                         (["--allocator", "pfp"], "exactly one of --ratio")]:
        rc, _, err = run(capsys, *common, *extra, "--out", str(tmp_path / f"o{len(extra)}"))
        assert rc == 2 and words in err and err.count("\n") == 1, err


def test_global_meets_a_flops_target_with_the_smallest_share():
    s = _scores(8, 16, 32)
    macs = {"l0": 1000, "l1": 4000, "l2": 2000}
    inputs = {"l1": "l0", "l2": "l1"}
    m = allocate(s, Allocation(kind="global", target="flops", flops_reduction=0.6), macs=macs, inputs_from=inputs)
    assert 1 - kept_share(m, macs, inputs) >= 0.6
    kept = sum(int(v.sum()) for v in m.values())
    fewer_pruned = global_(s, 1 - (kept + 1) / 56)  # one more filter kept: the target is missed
    assert 1 - kept_share(fewer_pruned, macs, inputs) < 0.6 + 0.05


def test_flops_accounting_follows_channels_through_depthwise_convs():
    """MobileNetV2: cutting an expand conv's filters cuts the depthwise conv after it and the
    project conv's input too. The cost model counts both (it counted neither: `--flops-reduction
    0.5` removed 82% of the MACs), and matches the MACs left after Torch-Pruning's surgery."""
    from torchvision.models import mobilenet_v2

    from evoprune.allocators import kept_share
    from evoprune.primitives.layers import structure
    from evoprune.transfer.surgery import surgery

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    s = structure(model, x)
    expands = [n for n in s.macs if n.endswith(".conv.0.0")]
    assert len(expands) == 16
    for e in expands:
        block = e.removesuffix("conv.0.0")
        assert s.inputs_from[block + "conv.1.0"] == e and s.inputs_from[block + "conv.2"] == e
        assert s.follower_macs[block + "conv.1.0"] > 0 and block + "conv.1.0" not in s.macs
    assert s.inputs_from["features.1.conv.0.0"] == "features.0.0"  # the first block has no expand conv
    gen = torch.Generator().manual_seed(1)
    masks = {e: (torch.rand(s.out_channels[e], generator=gen) < 0.4).index_fill(0, torch.tensor([0]), True)
             for e in expands}
    layers = list(s.cost_macs)
    predicted = kept_share(masks, s.cost_macs, s.inputs_from, layers)
    before = measured_macs(model, layers, x)
    assert before == sum(s.cost_macs.values())
    surgery(model, masks, x)
    after = measured_macs(model, layers, x)
    assert predicted < 0.6 and after / before == pytest.approx(predicted, rel=1e-6)  # float32 means
