"""Surgery: physically remove pruned channels (Torch-Pruning's DependencyGraph), after
checking they are zero, so the smaller model computes what the masked one did.

Masks are {layer name: BoolTensor[C_out]} (True = keep), as the allocators give them.
Residual coupling is either avoided, as TPP's released scripts do (`independent_layers`: the
layers whose output channels no other layer shares; in a ResNet, the convs inside blocks), or
handled (`channel_groups`: the layers that must lose the same channels, pruned together with
one mask). A mask that differs between members of a group is refused, never silently widened.
"""
from __future__ import annotations

import warnings

import torch
import torch_pruning as tp
from torch import Tensor, nn

from evoprune.errors import EvopruneError, one_line
from evoprune.masks import mask_targets
from evoprune.primitives.layers import grouped_conv

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
        with warnings.catch_warnings():  # parameters outside conv/linear/norm layers (ConvNeXt's
            # layer_scale): Torch-Pruning cuts their last non-singleton axis, which is right for
            # per-channel scales; every cut is checked against the masked model's outputs anyway
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as e:  # e.g. ShuffleNetV2's channel shuffle: Torch-Pruning cannot follow it
        raise EvopruneError(f"Torch-Pruning cannot trace how this model's channels depend on each other "
                            f"({one_line(e)}), so it cannot be cut") from None
    finally:
        model.train(was)


def channel_groups(model: nn.Module, example: Tensor, names: list[str],
                   dg: tp.DependencyGraph | None = None) -> list[list[str]]:
    """`names` partitioned into groups of layers whose output channels are tied together (by
    residual additions, concatenations): each group must be pruned with one mask. A group may
    name layers outside `names`; they are included, in model order. A grouped conv reading a
    group's channels does not tie it: its masks keep aligned positions (`Structure.periods`,
    checked by `surgery`)."""
    dg = dg or _graph(model, example)
    modules = dict(model.named_modules())
    name_of = {m: n for n, m in modules.items()}
    order = {n: i for i, n in enumerate(modules)}
    groups, seen = [], set()
    for n in names:
        if n in seen:
            continue
        m = modules[n]
        group = dg.get_pruning_group(m, _prune_fn(m), idxs=[0])
        members = sorted({name_of[item.dep.target.module] for item in group if item.dep.handler in _OUT.values()}
                         | {n}, key=order.__getitem__)
        seen.update(members)
        groups.append(members)
    return groups


def independent_layers(model: nn.Module, example: Tensor, names: list[str]) -> list[str]:
    """Those of `names` whose output channels are shared with no other conv or linear layer's
    output (their pruning group holds no other producer)."""
    return [g[0] for g in channel_groups(model, example, names) if len(g) == 1]


def scope_groups(model: nn.Module, example: Tensor, names: list[str], scope: str,
                 out_channels: dict[str, int]) -> list[list[str]]:
    """The groups a scope prunes among `names`, each with one mask: in-block, the layers whose
    channels no other layer shares (`independent_layers`), each alone; coupled, every channel
    group whose layers are all among `names` (a group with one left out stays whole). Raises
    EvopruneError where Torch-Pruning ties layers of different widths."""
    if scope == "in-block":
        return [[n] for n in independent_layers(model, example, names)]
    groups = []
    for g in channel_groups(model, example, names):
        if any(n not in names for n in g):
            continue  # a tied layer is skipped (or not prunable): the whole group stays
        widths = {out_channels[n] for n in g}
        if len(widths) > 1:
            raise EvopruneError(f"Torch-Pruning ties layers of different widths {sorted(widths)} ({g[0]}, ...): "
                                "it cannot follow this model's channel coupling (e.g. option-A zero-pad "
                                "shortcuts); use --scope in-block")
        groups.append(g)
    return groups


@torch.no_grad()
def zero_pruned(model: nn.Module, masks: dict[str, Tensor], bn_of: dict[str, str | None]) -> None:
    """Hard-zero the pruned filters, their biases and their BN scale and shift: each pruned
    channel then outputs exactly 0, which is what surgery removes. Pass `Structure.with_followers`
    masks (and `all_bn_of`) so the depthwise convs after a pruned layer keep its channels at 0."""
    for p, keep in mask_targets(model, masks, bn_of):
        p[~keep] = 0


def surgery(model: nn.Module, masks: dict[str, Tensor], example: Tensor, *, coupled: bool = False) -> nn.Module:
    """Remove every channel a mask drops, in place; returns the model.

    Without `coupled`, a mask on a layer that shares its channels is refused. With it, every
    member of a channel group must carry the same mask; the group is pruned once."""
    modules = dict(model.named_modules())
    if unknown := [n for n in masks if n not in modules]:
        raise EvopruneError(f"no layers named {unknown} in the model")
    dg = _graph(model, example)
    name_of = {m: n for n, m in modules.items()}
    groups = channel_groups(model, example, list(masks), dg)
    for members in groups:
        if len(members) > 1 and not coupled:
            raise EvopruneError(f"layers {members} share channels (residual coupling): prune only the layers "
                                "inside blocks, or prune the group together (scope 'coupled')")
        missing = [n for n in members if n not in masks]
        if missing or any(not torch.equal(masks[n], masks[members[0]]) for n in members):
            raise EvopruneError(f"layers {members} share channels and must carry one mask"
                                + (f" (no mask for {missing})" if missing else ""))
    for members in groups:
        keep = masks[members[0]]
        drop = torch.nonzero(~keep).flatten().tolist()
        if not drop:
            continue
        if len(drop) == len(keep):
            raise EvopruneError(f"mask of {members[0]} drops every channel")
        m = modules[members[0]]
        group = dg.get_pruning_group(m, _prune_fn(m), idxs=drop)
        _check_aligned(members[0], keep, [(item.dep.target.module, item.dep.handler in _OUT.values())
                                          for item in group], name_of)
        if not dg.check_pruning_group(group):
            raise EvopruneError(f"Torch-Pruning refused to prune {members}")
        group.prune()
    return model


def _check_aligned(name: str, keep: Tensor, touched: list[tuple[nn.Module, bool]],
                   name_of: dict[nn.Module, str]) -> None:
    """Refuse a mask that a grouped conv or a GroupNorm among the modules its pruning group
    `touches` ((module, whether its outputs are cut): reading the channels, or writing them)
    cannot take: it must repeat over their groups (Torch-Pruning keeps their number of groups)."""
    for m, out in dict.fromkeys((m, out) for m, out in touched if grouped_conv(m) or isinstance(m, nn.GroupNorm)):
        groups, kind = (m.groups, "grouped conv") if grouped_conv(m) else (m.num_groups, "GroupNorm")
        width = m.num_channels if kind == "GroupNorm" else m.out_channels if out else m.in_channels
        if width != len(keep):
            raise EvopruneError(f"the {kind} {name_of[m]} reads the channels of {name} with others (a concatenation): "
                                f"its {groups} groups cannot be kept equal; leave the layers writing into it whole "
                                "(--skip GLOB)")
        parts = keep.reshape(groups, -1)
        if not (parts == parts[0]).all():
            raise EvopruneError(f"the mask of {name} must keep the same positions in each of the {groups} "
                                f"groups of the {kind} {name_of[m]}")


class Widen(nn.Module):
    """A layer whose output channels are tied to other layers' (a residual stream), cut to the
    channels it keeps: `inner` computes only those, and they are written into a full-width
    output of zeros, which is what the masked layer outputs (its pruned channels are exactly 0)."""

    def __init__(self, inner: nn.Module, keep: Tensor):
        super().__init__()
        self.inner, self.width = inner, int(keep.numel())
        self.register_buffer("index", torch.nonzero(keep).flatten(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)  # in place into fresh zeros: out of place would copy the zeros once more
        return y.new_zeros(y.shape[0], self.width, *y.shape[2:]).index_copy_(1, self.index, y)

    def add_into(self, x: Tensor, other: Tensor) -> Tensor:
        """`self(x) + other` without the full-width zeros: the kept channels are added into a copy
        of `other` (a residual block's sum; 4 to 6% of a cut ResNet-20's training step on the CPU)."""
        return other.index_add(1, self.index, self.inner(x))


@torch.no_grad()
def narrow_tied(model: nn.Module, masks: dict[str, Tensor], bn_of: dict[str, str | None]) -> list[str]:
    """Cut each masked conv of `masks` to the filters it keeps (and its BN, which must be the
    conv's only reader: `bn_of`), and widen its output back with zeros (`Widen`): for layers
    whose channels surgery cannot remove because they are tied, the compute of the pruned
    filters is saved and the function is unchanged. Returns the layers narrowed; masks on
    other kinds of layers are left alone. The masks are read on the CPU (no device syncs)."""
    modules = dict(model.named_modules())
    done = []
    for name, keep in masks.items():
        conv, keep = modules.get(name), keep.cpu()
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or keep.all() or not keep.any():
            continue
        bn = bn_of.get(name)
        if bn and not isinstance(modules[bn], nn.modules.batchnorm._BatchNorm):
            continue  # a GroupNorm or InstanceNorm: left whole, as the BN pruner below cuts only BNs
        drop = torch.nonzero(~keep).flatten().tolist()
        tp.prune_conv_out_channels(conv, idxs=drop)
        if bn:
            tp.prune_batchnorm_out_channels(modules[bn], idxs=drop)
        model.set_submodule(bn or name, Widen(modules[bn or name], keep).to(conv.weight.device))
        done.append(name)
    return done
