"""Allocators: turn per-layer scores into keep masks (True = keep the filter).

    uniform  every layer loses the same share of its filters (the default)
    global   one ranking over all filters of all layers (scores must be comparable)
    flops    the uniform share that removes at least a target fraction of the FLOPs

Every layer keeps at least one filter. Ties keep the filter that comes first (stable sort),
so equal scores give the same mask on every machine.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from evoprune.errors import EvopruneError

ALLOCATORS = ("uniform", "global", "flops")


def _keep_top(scores: Tensor, keep: int) -> Tensor:
    order = torch.argsort(-scores, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def uniform(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Prune `ratio` of each layer's filters (rounded down: keep ceil((1 - ratio) * C), >= 1)."""
    return {name: _keep_top(s, max(1, math.ceil((1 - ratio) * len(s) - 1e-9))) for name, s in scores.items()}


def global_(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
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


def kept_share(masks: dict[str, Tensor], cost: dict[str, int], inputs_from: dict[str, str],
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
          expand: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
          layers: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The smallest uniform ratio whose masks remove at least `reduction` of the MACs (bisection).
    `expand` maps the masks of `scores`' keys to per-layer masks (channel groups); `layers` are
    the layers whose MACs count (default: the masked ones)."""
    expand = expand or (lambda m: m)

    def at(r: float) -> dict[str, Tensor]:
        return expand(uniform(scores, r))

    lo, hi = 0.0, 0.99
    for _ in range(30):
        mid = (lo + hi) / 2
        if 1 - kept_share(at(mid), macs, inputs_from, layers) >= reduction:
            hi = mid
        else:
            lo = mid
    return at(hi)


def allocate(kind: str, scores: dict[str, Tensor], *, ratio: float = 0.5, flops_reduction: float = 0.5,
             macs: dict[str, int] | None = None, inputs_from: dict[str, str] | None = None) -> dict[str, Tensor]:
    if kind == "uniform":
        return uniform(scores, ratio)
    if kind == "global":
        return global_(scores, ratio)
    if kind == "flops":
        return flops(scores, flops_reduction, macs or {}, inputs_from or {})
    raise EvopruneError(f"unknown allocator {kind!r}; known: {', '.join(ALLOCATORS)}")


def mask_hash(masks: dict[str, Tensor]) -> str:
    """Identical masks on the same task give identical fitness (common random numbers)."""
    h = hashlib.sha256()
    for n in sorted(masks):
        h.update(n.encode())
        h.update(masks[n].numpy().tobytes())
    return h.hexdigest()[:16]


def mask_targets(model, masks: dict[str, Tensor], bn_of: dict[str, str | None]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, keep mask) for everything pruning a filter must zero: the filter, its bias,
    and its BN scale and shift (`bn_of` names each layer's BN module, or None)."""
    modules = dict(model.named_modules())
    out = []
    for name, keep in masks.items():
        layer, bn = modules[name], modules[bn_of[name]] if bn_of.get(name) else None
        for p in (layer.weight, layer.bias, bn.weight if bn is not None else None, bn.bias if bn is not None else None):
            if p is not None:
                out.append((p, keep.to(p.device)))
    return out
