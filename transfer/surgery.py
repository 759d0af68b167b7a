"""Surgery: physically remove pruned channels (Torch-Pruning's DependencyGraph), after
checking they are zero, so the smaller model computes what the masked one did.

Masks are {layer name: BoolTensor[C_out]} (True = keep), as the allocators give them.
Residual coupling is avoided as TPP's released scripts do: `independent_layers` finds the
layers whose output channels no other layer shares (in a ResNet, the convs inside blocks);
masks on coupled layers are refused rather than silently widened.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn

from evoprune.errors import EvopruneError
from evoprune.workers.allocators import mask_targets

_OUT = {nn.Conv2d: tp.prune_conv_out_channels, nn.Linear: tp.prune_linear_out_channels}


def _prune_fn(m: nn.Module):
    for cls, fn in _OUT.items():
        if isinstance(m, cls):
            return fn
    raise EvopruneError(f"cannot prune the output channels of {type(m).__name__}")


def _graph(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
    was = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was)


def independent_layers(model: nn.Module, example: Tensor, names: list[str]) -> list[str]:
    """Those of `names` whose output channels are shared with no other conv or linear layer's
    output (their pruning group holds no other producer)."""
    dg = _graph(model, example)
    modules = dict(model.named_modules())
    out = []
    for n in names:
        m = modules[n]
        group = dg.get_pruning_group(m, _prune_fn(m), idxs=[0])
        producers = {item.dep.target.module for item in group if item.dep.handler in _OUT.values()}
        if producers == {m}:
            out.append(n)
    return out


@torch.no_grad()
def zero_pruned(model: nn.Module, masks: dict[str, Tensor], bn_of: dict[str, str | None]) -> None:
    """Hard-zero the pruned filters, their biases and their BN scale and shift: each pruned
    channel then outputs exactly 0, which is what surgery removes."""
    for p, keep in mask_targets(model, masks, bn_of):
        p[~keep] = 0


def surgery(model: nn.Module, masks: dict[str, Tensor], example: Tensor) -> nn.Module:
    """Remove every channel a mask drops, in place; returns the model. Coupled layers are refused."""
    modules = dict(model.named_modules())
    if unknown := [n for n in masks if n not in modules]:
        raise EvopruneError(f"no layers named {unknown} in the model")
    coupled = set(masks) - set(independent_layers(model, example, list(masks)))
    if coupled:
        raise EvopruneError(f"layers {sorted(coupled)} share channels with others (residual coupling): "
                            "prune only the layers inside blocks")
    dg = _graph(model, example)
    for name, keep in masks.items():
        drop = torch.nonzero(~keep).flatten().tolist()
        if not drop:
            continue
        if len(drop) == len(keep):
            raise EvopruneError(f"mask of {name} drops every channel")
        m = modules[name]
        group = dg.get_pruning_group(m, _prune_fn(m), idxs=drop)
        if not dg.check_pruning_group(group):
            raise EvopruneError(f"Torch-Pruning refused to prune {name}")
        group.prune()
    return model
