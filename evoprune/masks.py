"""Masks are made here, once: formula + StatTable + allocator settings [+ channel groups] -> masks.

The search's driver calls `make_masks` (through `TaskMasks`) and ships the masks with each job,
so workers hold the model and the data but never the statistics, and the hash the database
stores is the hash of the masks that were trained. `evoprune prune` calls the same function
with its channel groups. Masks are {layer name: BoolTensor[C_out]} on the CPU, True = keep.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from evoprune.allocators import Allocation, Masks, allocate, kept_share
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
    members = {g[0]: g for g in groups}

    def expand(masks: Masks) -> Masks:
        return {n: m for key, m in masks.items() for n in members[key]}

    every = list(structure.macs)
    masks = allocate(group_scores(groups, by_layer), allocation, macs=structure.macs,
                     inputs_from=structure.inputs_from, expand=expand, layers=every)
    if allocation.kind == "flops":
        removed = 1 - kept_share(masks, structure.macs, structure.inputs_from, layers=every)
        if removed < allocation.flops_reduction - 1e-6:
            raise EvopruneError(f"pruning these {len(masks)} layers removes at most {removed:.0%} of the prunable "
                                f"MACs; ask for less than {allocation.flops_reduction:.0%}")
    return masks


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
        from evoprune.data import iterate
        from evoprune.pretrain import pretrained
        from evoprune.primitives.collect import task_stats
        from evoprune.primitives.layers import structure
        from evoprune.tasks import get_task

        pre = pretrained(get_task(task_name, tasks_file), data_root=data_root, cache_dir=cache_dir, device=device)
        table = task_stats(pre, stats, n_images=stat_images, seed=seed, device="cpu")
        example = next(iterate(pre.data, pre.data.train, batch_size=2))[0]
        return cls(task_name, table, structure(pre.model, example), allocation)
