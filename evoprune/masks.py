"""Masks are made here, once: formula + StatTable + allocator settings [+ channel groups] -> masks.

The search's driver calls `make_masks` (through `TaskMasks`) and ships the masks with each job,
so workers hold the model and the data but never the statistics, and the hash the database
stores is the hash of the masks that were trained. `evoprune prune` calls the same function
with its channel groups. Masks are {layer name: BoolTensor[C_out]} on the CPU, True = keep.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from evoprune.allocators import Allocation, LayerBudgetData, Masks, allocate, keep_top, kept_share, spectral_rank
from evoprune.errors import EvopruneError
from evoprune.primitives.collect import StatTable
from evoprune.primitives.expr import Node, check_scores, evaluate, scores_by_layer
from evoprune.primitives.layers import Structure
from evoprune.primitives.runtime import rank as average_rank


class UnusableMetric(EvopruneError):
    """A formula that cannot rank this model's filters (non-finite or constant scores)."""


def require_statistics(node: Node) -> None:
    if not node.stats():
        raise UnusableMetric("the formula reads no statistic: a constant ranks no filters")


def group_scores(groups: list[list[str]], scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """One score per channel of each group (keyed by its first layer): the layer's own scores,
    or for tied layers the mean of their per-layer ranks (metrics need not share a scale)."""
    out = {}
    for g in groups:
        if len(g) == 1:
            out[g[0]] = scores[g[0]]
        else:
            out[g[0]] = torch.stack([average_rank(scores[n].double()) for n in g]).mean(0)
    return out


def make_masks(node: Node, table: StatTable, allocation: Allocation, structure: Structure,
               groups: list[list[str]] | None = None) -> Masks:
    """Keep masks for every layer of `groups` (default: every layer of the table, each alone);
    the layers of a group share one mask. Raises UnusableMetric for a formula that cannot
    rank the filters, EvopruneError for a FLOPs target the layers cannot reach."""
    require_statistics(node)
    scores = evaluate(node, table)
    validity = check_scores(scores, table)
    if not validity.ok:
        raise UnusableMetric(validity.reason)
    by_layer = scores_by_layer(scores, table)
    groups = groups if groups is not None else [[n] for n in table.layers]
    scores = group_scores(groups, by_layer)
    expand = expander(groups, scores, structure)
    macs = structure.cost_macs  # the prunable layers' and the depthwise convs' that follow their channels
    every = list(macs)
    inputs_from = structure.inputs_within(groups)
    masks = allocate(scores, allocation, macs=macs,
                     inputs_from=inputs_from, expand=expand, layers=every,
                     data=budget_data(groups, table, allocation))
    if allocation.target == "flops":
        removed = 1 - kept_share(masks, macs, inputs_from, layers=every)
        if removed < allocation.flops_reduction - 1e-6:
            layers = f"these {len(masks)} layers" if len(masks) != 1 else "this 1 layer"
            raise EvopruneError(f"pruning {layers} removes at most {removed:.1%} of the prunable MACs, not "
                                f"{allocation.flops_reduction:.0%}; ask for {math.floor(removed * 100)}% or less")
    elif allocation.target == "ratio" and allocation.kind in ("pfp", "spectral"):
        total = sum(len(masks[g[0]]) for g in groups)
        least = sum(period(g, structure) for g in groups)  # a grouped layer keeps a position in each group
        want = max(1, math.ceil((1 - allocation.ratio) * total - 1e-9))
        if least > want:
            raise EvopruneError(f"keeping one filter in each of {len(groups)} layers already keeps {least} of {total}: "
                                f"a ratio of {allocation.ratio:g} (keep {want}) cannot be met; ask for at most "
                                f"{1 - least / total:.3f}")
    return masks


def period(group: list[str], structure: Structure) -> int:
    """How many equal parts the mask of a group of layers (pruned as one) repeats over."""
    return math.lcm(*(structure.periods.get(n, 1) for n in group))


def expander(groups: list[list[str]], scores: dict[str, Tensor], structure: Structure) -> Callable[[Masks], Masks]:
    """What turns an allocator's masks, one per group (keyed by its first layer, as `scores`),
    into one per layer: each member gets its group's mask, in aligned positions where a grouped
    conv needs them (`aligned`, with the group's `period`)."""
    members = {g[0]: g for g in groups}
    periods = {g[0]: p for g in groups if (p := period(g, structure)) > 1}

    def expand(masks: Masks) -> Masks:
        masks = {key: aligned(scores[key], int(m.sum()), periods[key]) if key in periods else m
                 for key, m in masks.items()}
        return {n: m for key, m in masks.items() for n in members[key]}

    return expand


def aligned(scores: Tensor, keep: int, period: int) -> Tensor:
    """A mask keeping the same positions in each of `period` equal parts of the channels (what a
    grouped conv needs: `Structure.periods`): the positions with the best mean score over the
    parts, as many as make `keep` channels (rounded to the nearest whole position, at least one)."""
    by_position = scores.double().reshape(period, -1).mean(0)
    return keep_top(by_position, max(1, (keep + period // 2) // period)).repeat(period)


def budget_data(groups: list[list[str]], table: StatTable, allocation: Allocation) -> dict[str, LayerBudgetData]:
    """What the pfp and spectral allocators read, per group (keyed by its first layer): a tied
    group takes the channel-wise largest sensitivity and the largest eta of its members, and
    the spectrum of its member with the highest rank at tau."""
    if not allocation.needs:
        return {}
    sens = table.values.get("pfp_sens")
    spectra, sites = table.meta.get("spectra"), table.meta.get("sites", {})
    if "pfp_sens" in allocation.needs and sens is None:
        raise EvopruneError("allocator pfp needs the pfp_sens statistic, which these statistics lack")
    if "spectra" in allocation.needs and spectra is None:
        raise EvopruneError("allocator spectral needs the layers' singular values (collect_stats(spectra=True))")
    out = {}
    for g in groups:
        spectrum = None
        if spectra is not None:
            spectrum = max((spectra[n] for n in g), key=lambda v: spectral_rank(v, allocation.tau))
        out[g[0]] = LayerBudgetData(
            sensitivity=torch.stack([sens[n] for n in g]).amax(0) if sens is not None else None,
            sites=max(sites.get(n, 1) for n in g), spectrum=spectrum)
    return out


def mask_hash(masks: Masks) -> str:
    """Identical masks on the same task give identical fitness (common random numbers)."""
    h = hashlib.sha256()
    for n in sorted(masks):
        h.update(n.encode())
        h.update(masks[n].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def mask_targets(model, masks: Masks, bn_of: dict[str, str | None]) -> list[tuple[Tensor, Tensor]]:
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


def stat_table(pre, stats: list[str], allocation: Allocation, **kw) -> StatTable:
    """`task_stats` of `stats` plus what the allocator reads (pfp: the PFP sensitivities;
    spectral: the singular values)."""
    from evoprune.primitives.collect import task_stats

    names = list(dict.fromkeys([*stats, *(n for n in allocation.needs if n != "spectra")]))
    return task_stats(pre, names, spectra="spectra" in allocation.needs, **kw)


@dataclass
class TaskMasks:
    """One task as the search's driver sees it: statistics and layer structure, formula -> masks."""

    task: str
    table: StatTable
    structure: Structure
    allocation: Allocation

    def __call__(self, node: Node) -> Masks:
        return make_masks(node, self.table, self.allocation, self.structure)

    @classmethod
    def load(cls, task_name: str, allocation: Allocation, stats: list[str], *, stat_images: int, seed: int,
             data_root=None, cache_dir=None, tasks_file=None, device: str = "cpu") -> "TaskMasks":
        """The task's pretrained model (trained on `device` on first use), its statistics over
        `stat_images` training images, always on the CPU: the masks then do not depend on
        where the driver or the workers run."""
        from evoprune.pretrain import pretrained
        from evoprune.tasks import get_task

        pre = pretrained(get_task(task_name, tasks_file), data_root=data_root, cache_dir=cache_dir, device=device)
        return cls.from_pretrained(pre, allocation, stats, stat_images=stat_images, seed=seed)

    @classmethod
    def from_pretrained(cls, pre, allocation: Allocation, stats: list[str], *, stat_images: int,
                        seed: int) -> "TaskMasks":
        """The same from a task's Pretrained already in hand (the driver loads it once)."""
        from evoprune.data import iterate
        from evoprune.primitives.layers import structure

        table = stat_table(pre, stats, allocation, n_images=stat_images, seed=seed, device="cpu")
        example = next(iterate(pre.data, pre.data.train, batch_size=2))[0]
        return cls(pre.task.name, table, structure(pre.model, example), allocation)
