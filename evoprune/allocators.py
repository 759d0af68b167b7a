"""Allocators: how many filters each layer keeps (its budget), then which ones (the metric's top
scores). True = keep.

    uniform   every layer loses the same share of its filters (the default)
    global    one ranking over all filters of all layers (scores must be comparable); for a FLOPs
              target, the smallest share of that ranking that reaches it
    flops     the smallest uniform share that removes at least a target fraction of the MACs
    pfp       PFP's sensitivity-based budgets (Liebenwein et al., ICLR 2020): each layer's sample
              size from one shared error bound eps, solved for the global target
    spectral  each layer keeps the rank that holds 1 - tau of its filters' spectral energy
              (rank-adaptive spectral pruning, Zangrando et al. 2023), or those ranks scaled
              to a global target

A target is a filter ratio (`ratio`: the share of filters pruned, per layer for uniform,
overall for the others), a FLOPs reduction (`flops_reduction`: the share of the prunable
layers' MACs removed) or, for spectral, the tolerance alone (`target = "tau"`). Every layer
keeps at least one filter; a ratio target is met to the filter (pfp, spectral, global: the
total kept is ceil((1 - ratio) * N), one more per layer that had to keep its last filter);
a FLOPs target is met or exceeded by the least it can be, and `make_masks` refuses one the
layers cannot reach. Ties keep the filter (or layer) that comes first, so the same scores give
the same masks on every machine. A grouped conv's layers are rounded to aligned positions
afterwards (`evoprune.masks.aligned`). The formulas, with the papers' notation: docs/allocators.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from evoprune.errors import EvopruneError
from evoprune.primitives.layers import InputsFrom

ALLOCATORS = ("uniform", "global", "flops", "pfp", "spectral")
TARGETS = ("ratio", "flops", "tau")
PFP_DELTA = 1e-16  # PFP's failure probability delta in the sample complexity's log term
PFP_C = 3.0  # PFP's constant C (>= 3 in the paper's theorem)
PFP_K = 3.0  # the constant K of the sample complexity m = K (6 + 2 eps) S_tilde / eps^2

Masks = dict[str, Tensor]  # layer name -> BoolTensor[C_out], True = keep


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """Which allocator, and its target."""

    kind: str = "uniform"  # uniform | global | flops | pfp | spectral
    ratio: float = 0.5  # share of filters pruned (uniform: per layer; the others: overall)
    flops_reduction: float = 0.5  # share of the prunable layers' MACs removed (target "flops")
    target: str = ""  # ratio | flops | tau (spectral: each layer's rank at tau); "": flops for the
    #                   flops allocator, ratio for the others
    tau: float = 0.01  # spectral: share of the spectral energy a layer may lose

    def __post_init__(self):
        if self.kind not in ALLOCATORS:
            raise EvopruneError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {self.kind!r}")
        if not self.target:
            object.__setattr__(self, "target", "flops" if self.kind == "flops" else "ratio")
        if self.target not in TARGETS:
            raise EvopruneError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        allowed = {"uniform": ("ratio",), "global": ("ratio", "flops"), "flops": ("flops",),
                   "pfp": ("ratio", "flops"), "spectral": TARGETS}[self.kind]
        if self.target not in allowed:
            raise EvopruneError(f"allocator {self.kind} takes a {' or '.join(allowed)} target, not {self.target}")
        if not 0 < self.ratio < 1:
            raise EvopruneError("ratio must be in (0, 1)")
        if not 0 < self.flops_reduction < 1:
            raise EvopruneError("flops reduction must be in (0, 1)")
        if not 0 < self.tau < 1:
            raise EvopruneError("tau must be in (0, 1)")

    @property
    def needs(self) -> tuple[str, ...]:
        """What the allocator reads besides the metric's scores: statistics, and layer data."""
        return {"pfp": ("pfp_sens",), "spectral": ("spectra",)}.get(self.kind, ())


@dataclass(frozen=True)
class LayerBudgetData:
    """What the sensitivity- and spectrum-based allocators read of one layer (or channel group)."""

    sensitivity: Tensor | None = None  # PFP sensitivity of each output channel [C]
    sites: int = 1  # PFP's eta: (output positions + 1) x kernel size of the layer that reads the channels
    spectrum: Tensor | None = None  # singular values of the filters [C_out, fan_in], descending


# --------------------------------------------------------------------------- ranking within a layer
def keep_top(scores: Tensor, keep: int) -> Tensor:
    order = torch.argsort(-scores, stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def from_counts(scores: dict[str, Tensor], counts: dict[str, int]) -> Masks:
    """Each layer keeps its `counts` best filters by score."""
    return {n: keep_top(s, counts[n]) for n, s in scores.items()}


def uniform(scores: dict[str, Tensor], ratio: float) -> Masks:
    """Prune `ratio` of each layer's filters (rounded down: keep ceil((1 - ratio) * C), >= 1)."""
    return {name: keep_top(s, _keep_of(len(s), ratio)) for name, s in scores.items()}


def _keep_of(width: int, ratio: float) -> int:
    return max(1, math.ceil((1 - ratio) * width - 1e-9))


def global_(scores: dict[str, Tensor], ratio: float) -> Masks:
    """Prune the `ratio` lowest-scoring filters of the whole model; each layer keeps >= 1."""
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    keep = keep_top(flat, max(len(names), _keep_of(len(flat), ratio)))
    masks, i = {}, 0
    for n in names:
        m = keep[i: i + len(scores[n])].clone()
        if not m.any():
            m[int(torch.argmax(scores[n]))] = True
        masks[n] = m
        i += len(scores[n])
    return masks


# --------------------------------------------------------------------------- costs
def kept_share(masks: Masks, cost: dict[str, int], inputs_from: InputsFrom,
               layers: Iterable[str] | None = None) -> float:
    """Share of the layers' cost (MACs or parameters) left: a layer's cost scales with its kept
    filters and with the kept filters of the layer feeding it (when exactly one does), or of the
    layers whose channels its input concatenates (`Structure.inputs_from`).
    `layers`: the layers to count (default: the masked ones; pass every layer to see what a
    mask also saves in the layers that consume its channels)."""
    names = list(masks if layers is None else layers)
    left = 0.0
    for n in names:
        share = masks[n].float().mean().item() if n in masks else 1.0
        src = inputs_from.get(n)
        if isinstance(src, tuple):
            channels, parts = src
            share *= 1 - sum(int((~masks[p]).sum()) for p in parts if p in masks) / channels
        elif src in masks:
            share *= masks[src].float().mean().item()
        left += cost[n] * share
    return left / max(sum(cost[n] for n in names), 1)


def flops(scores: dict[str, Tensor], reduction: float, macs: dict[str, int], inputs_from: InputsFrom,
          expand: Callable[[Masks], Masks] | None = None, layers: Iterable[str] | None = None,
          by: Callable[[dict[str, Tensor], float], Masks] | None = None) -> Masks:
    """The smallest ratio whose masks remove at least `reduction` of the MACs (bisection), the
    ratio applied by `by` (uniform by default; global for the global allocator's FLOPs target).
    `expand` maps the masks of `scores`' keys to per-layer masks (channel groups); `layers` are
    the layers whose MACs count (default: the masked ones)."""
    expand, by = expand or (lambda m: m), by or uniform

    def at(r: float) -> Masks:
        return expand(by(scores, r))

    lo, hi = 0.0, 0.99
    for _ in range(30):
        mid = (lo + hi) / 2
        if 1 - kept_share(at(mid), macs, inputs_from, layers) >= reduction:
            hi = mid
        else:
            lo = mid
    return at(hi)


# --------------------------------------------------------------------------- budgets from a parameter
Counts = dict[str, int]


def _clamped(values: dict[str, float], widths: dict[str, int]) -> Counts:
    return {n: int(min(max(math.ceil(v - 1e-9), 1), widths[n])) for n, v in values.items()}


def _to_total(counts_at: Callable[[float], Counts], lo: float, hi: float, total: int,
              widths: dict[str, int]) -> Counts:
    """Counts with exactly `total` filters kept, where `counts_at(x)` keeps fewer filters as x
    grows: bisection on x (in log space), then the few filters between the two sides are added
    one at a time, in layer order (and, if even the smallest x keeps too few, the rest go
    round-robin to the layers with room, in layer order)."""
    many, few = counts_at(lo), counts_at(hi)
    if sum(few.values()) >= total:
        return few
    for _ in range(200):
        if sum(many.values()) <= total:
            break
        mid = math.sqrt(lo * hi)
        c = counts_at(mid)
        if sum(c.values()) >= total:
            lo, many = mid, c
        else:
            hi, few = mid, c
        if sum(many.values()) == total or hi / lo < 1 + 1e-12:
            break
    out = dict(few)
    for n in out:
        while sum(out.values()) < total and out[n] < many[n]:
            out[n] += 1
    while sum(out.values()) < total and any(out[n] < widths[n] for n in out):
        for n in out:
            if sum(out.values()) < total and out[n] < widths[n]:
                out[n] += 1
    return out


def _to_flops(counts_at: Callable[[float], Counts], lo: float, hi: float, removed: Callable[[Counts], float],
              target: float) -> Counts:
    """The counts that remove at least `target` of the MACs while keeping the most: bisection on
    x, where counts_at(x) keeps fewer filters as x grows."""
    if removed(counts_at(hi)) < target:
        return counts_at(hi)  # out of reach; make_masks says by how much
    if removed(counts_at(lo)) >= target:
        return counts_at(lo)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if removed(counts_at(mid)) >= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-12:
            break
    return counts_at(hi)


def pfp_counts(data: dict[str, LayerBudgetData], widths: dict[str, int], eps: float) -> Counts:
    """PFP's channels kept per layer at error eps (Liebenwein et al. 2020, section 4): with s_c
    the channel sensitivities, S = sum_c s_c, p_c = s_c / S and
    alpha = 2 C log(8 eta / delta), the sample complexity is
    m = ceil(K (6 + 2 eps) alpha S / eps^2), and the layer keeps the expected number of
    distinct channels among m draws from p, ceil(sum_c 1 - (1 - p_c)^m), at least 1."""
    out = {}
    for n, d in data.items():
        s = d.sensitivity.double().clamp_min(0)
        total = float(s.sum())
        if total <= 1e-12:
            out[n] = 1
            continue
        alpha = 2 * PFP_C * math.log(8 * d.sites / PFP_DELTA)
        m = min(math.ceil(PFP_K * (6 + 2 * eps) * alpha * total / eps ** 2), 10 ** 18)  # past 1e18 draws:
        p = s / total  # every channel with a sensitivity is drawn
        out[n] = float((-torch.expm1(float(m) * torch.log1p(-p.clamp(max=1 - 1e-15)))).sum())
    return _clamped(out, widths)


def spectral_rank(spectrum: Tensor, tau: float) -> int:
    """The smallest r whose first r singular values hold at least 1 - tau of the energy
    sum_i sigma_i^2 (the tail sum_{i >= r} sigma_i^2 <= tau x the total), at least 1."""
    e = spectrum.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])  # tail[r] = sum_{i >= r}
    ok = torch.nonzero(tail <= tau * total * (1 + 1e-12)).flatten()
    return max(1, int(ok[0]) if len(ok) else len(e))


def budgets(scores: dict[str, Tensor], allocation: Allocation, data: dict[str, LayerBudgetData],
            removed: Callable[[Counts], float]) -> Counts:
    """Per-layer keep counts of the pfp and spectral allocators for their target."""
    widths = {n: len(s) for n, s in scores.items()}
    n_total = sum(widths.values())
    if allocation.kind == "pfp":
        missing = [n for n in scores if data.get(n) is None or data[n].sensitivity is None]
        if missing:
            raise EvopruneError(f"allocator pfp needs the pfp_sens statistic of {missing[:3]}")
        at, lo, hi = (lambda eps: pfp_counts(data, widths, eps)), 1e-12, 1e12
    else:
        missing = [n for n in scores if data.get(n) is None or data[n].spectrum is None]
        if missing:
            raise EvopruneError(f"allocator spectral needs the singular values of {missing[:3]}")
        ranks = {n: spectral_rank(data[n].spectrum, allocation.tau) for n in scores}
        if allocation.target == "tau":
            return _clamped(ranks, widths)
        # each layer keeps ceil(r_l / x) filters: the ranks scaled by one factor 1/x
        at, lo, hi = (lambda x: _clamped({n: r / x for n, r in ranks.items()}, widths)), 1e-6, 1e6
    if allocation.target == "ratio":
        return _to_total(at, lo, hi, _keep_of(n_total, allocation.ratio), widths)
    return _to_flops(at, lo, hi, removed, allocation.flops_reduction)


def allocate(scores: dict[str, Tensor], allocation: Allocation, *, macs: dict[str, int],
             inputs_from: InputsFrom, expand: Callable[[Masks], Masks] | None = None,
             layers: Iterable[str] | None = None, data: dict[str, LayerBudgetData] | None = None) -> Masks:
    """Per-layer keep masks for `scores` (one tensor per layer, or per channel group whose
    members `expand` lists); `layers`: the layers whose MACs a FLOPs target counts; `data`:
    what pfp and spectral read (keyed like `scores`)."""
    expand = expand or (lambda m: m)
    if allocation.kind == "uniform":
        return expand(uniform(scores, allocation.ratio))
    if allocation.kind in ("flops", "global") and allocation.target == "flops":
        return flops(scores, allocation.flops_reduction, macs, inputs_from, expand=expand, layers=layers,
                     by=global_ if allocation.kind == "global" else uniform)
    if allocation.kind == "global":
        return expand(global_(scores, allocation.ratio))

    def removed(counts: Counts) -> float:
        return 1 - kept_share(expand(from_counts(scores, counts)), macs, inputs_from, layers)

    return expand(from_counts(scores, budgets(scores, allocation, data or {}, removed)))
