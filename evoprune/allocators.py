"""Allocators: how many filters each layer keeps, given one score per filter (True = keep).

    uniform  every layer loses the same share of its filters (the default)
    global   one ranking over all filters of all layers (scores must be comparable)
    flops    the smallest uniform share that removes at least a target fraction of the MACs

Every layer keeps at least one filter. Ties keep the filter that comes first (stable sort),
so equal scores give the same mask on every machine. Used by the search's driver and by the
transfer stage alike, through `evoprune.masks.make_masks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from evoprune.errors import EvopruneError

ALLOCATORS = ("uniform", "global", "flops")

Masks = dict[str, Tensor]  # layer name -> BoolTensor[C_out], True = keep


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """Which allocator, and its target."""

    kind: str = "uniform"  # uniform | global | flops
    ratio: float = 0.5  # share of filters pruned (uniform: per layer; global: overall)
    flops_reduction: float = 0.5  # flops: share of the prunable layers' MACs removed

    def __post_init__(self):
        if self.kind not in ALLOCATORS:
            raise EvopruneError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {self.kind!r}")
        if not 0 < self.ratio < 1:
            raise EvopruneError("ratio must be in (0, 1)")
        if not 0 < self.flops_reduction < 1:
            raise EvopruneError("flops reduction must be in (0, 1)")


def _keep_top(scores: Tensor, keep: int) -> Tensor:
    order = torch.argsort(-scores, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def uniform(scores: dict[str, Tensor], ratio: float) -> Masks:
    """Prune `ratio` of each layer's filters (rounded down: keep ceil((1 - ratio) * C), >= 1)."""
    return {name: _keep_top(s, max(1, math.ceil((1 - ratio) * len(s) - 1e-9))) for name, s in scores.items()}


def global_(scores: dict[str, Tensor], ratio: float) -> Masks:
    """Prune the `ratio` lowest-scoring filters of the whole model; each layer keeps >= 1."""
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    keep = _keep_top(flat, max(len(names), math.ceil((1 - ratio) * len(flat) - 1e-9)))
    masks, i = {}, 0
    for n in names:
        m = keep[i: i + len(scores[n])].clone()
        if not m.any():
            m[int(torch.argmax(scores[n]))] = True
        masks[n] = m
        i += len(scores[n])
    return masks


def kept_share(masks: Masks, cost: dict[str, int], inputs_from: dict[str, str],
               layers: Iterable[str] | None = None) -> float:
    """Share of the layers' cost (MACs or parameters) left: a layer's cost scales with its kept
    filters and with the kept filters of the layer feeding it (when exactly one does).
    `layers`: the layers to count (default: the masked ones; pass every layer to see what a
    mask also saves in the layers that consume its channels)."""
    names = list(masks if layers is None else layers)
    left = 0.0
    for n in names:
        share = masks[n].float().mean().item() if n in masks else 1.0
        src = inputs_from.get(n)
        if src in masks:
            share *= masks[src].float().mean().item()
        left += cost[n] * share
    return left / max(sum(cost[n] for n in names), 1)


def flops(scores: dict[str, Tensor], reduction: float, macs: dict[str, int], inputs_from: dict[str, str],
          expand: Callable[[Masks], Masks] | None = None, layers: Iterable[str] | None = None) -> Masks:
    """The smallest uniform ratio whose masks remove at least `reduction` of the MACs (bisection).
    `expand` maps the masks of `scores`' keys to per-layer masks (channel groups); `layers` are
    the layers whose MACs count (default: the masked ones)."""
    expand = expand or (lambda m: m)

    def at(r: float) -> Masks:
        return expand(uniform(scores, r))

    lo, hi = 0.0, 0.99
    for _ in range(30):
        mid = (lo + hi) / 2
        if 1 - kept_share(at(mid), macs, inputs_from, layers) >= reduction:
            hi = mid
        else:
            lo = mid
    return at(hi)


def allocate(scores: dict[str, Tensor], allocation: Allocation, *, macs: dict[str, int],
             inputs_from: dict[str, str], expand: Callable[[Masks], Masks] | None = None,
             layers: Iterable[str] | None = None) -> Masks:
    """Per-layer keep masks for `scores` (one tensor per layer, or per channel group whose
    members `expand` lists); `layers`: the layers whose MACs a FLOPs target counts."""
    expand = expand or (lambda m: m)
    if allocation.kind == "uniform":
        return expand(uniform(scores, allocation.ratio))
    if allocation.kind == "global":
        return expand(global_(scores, allocation.ratio))
    return flops(scores, allocation.flops_reduction, macs, inputs_from, expand=expand, layers=layers)
