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
