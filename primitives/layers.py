"""Which layers have prunable filters, and how they connect.

One forward pass with hooks finds, for every conv (depthwise convs aside: they follow the layer
whose channels they carry) and hidden linear layer:
its batch norm (the BN whose input *is* the layer's output), the layers that consume its
channels (found by walking the autograd graph back from each layer's input until another
layer's output is met: this sees through ReLUs, pools, flatten, residual additions and
concatenations on the channel axis, where the layer's channels are a slice of the consumer's
input: Inception branches, DenseNet layers), and its FLOPs. The model's output layer (nothing
consumes it) is not prunable. A grouped conv (ResNeXt, RegNet) keeps its groups equal only if a
pruned position is pruned in every group: its filters, and the channels of the layers it reads,
are pruned in aligned slots (`Structure.periods`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

WEIGHTED = (nn.Conv2d, nn.Linear)
# the norms a layer's output may go through, masked with its filters; an InstanceNorm gives a zeroed
# channel its shift alone, as a BN does; a GroupNorm's cut is not its masked self (see prune)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.GroupNorm)


def _norm_width(m: nn.Module) -> int:
    return m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    index: int  # execution order among prunable layers
    out_channels: int
    bn: nn.Module | None = None  # one of NORMS: its scale and shift are the filter's too
    consumers: list[str] = field(default_factory=list)  # layers whose inputs carry our channels
    macs: int = 0  # multiply-accumulates for one input image
    sites: int = 1  # PFP's eta: max over consumers of (output positions + 1) x the inputs each channel feeds
    channel_axis: int = 1  # the output's channel axis: 1, or the last for a linear layer on [N, ..., C]
    # depthwise convs whose channels are ours (through them, not just into them): name -> (MACs, params,
    # their BN's name or None); cutting our filters cuts their channels too, and the input of the layers
    # they feed (`through`)
    followers: dict[str, tuple[int, int, str | None]] = field(default_factory=dict)
    through: list[str] = field(default_factory=list)  # prunable layers reading our channels past followers
    # where our input comes from several layers at once (a residual sum, a squeeze-excitation product),
    # those layers, past followers: our input keeps what they keep when they are pruned as one group
    inputs_among: list[str] = field(default_factory=list)
    # consumers that read our channels as a slice of a concatenation: name -> (offset, channels of
    # the concatenation); a consumer not named here reads exactly our channels
    slices: dict[str, tuple[int, int]] = field(default_factory=dict)
    # batch norms that normalize our channels as a slice of a concatenation (DenseNet's pre-activation
    # BN over every earlier layer's output): name -> (offset, their channels); a pruned filter's
    # channel must be zeroed there too (`Structure.with_followers`), as surgery cuts it there
    slice_bns: dict[str, tuple[int, int]] = field(default_factory=dict)
    # where our input is a concatenation of prunable layers' channels (past followers): (its
    # channels, those layers); what our cost keeps when they are pruned
    concat_of: tuple[int, tuple[str, ...]] | None = None
    # the groups of the GroupNorms that normalize our channels (their least common multiple): a cut
    # keeps their groups equal only if our mask repeats over them (`Structure.periods`)
    norm_groups: int = 1

    def reads(self, consumer: str) -> tuple[int, int]:
        """Where our channels are in `consumer`'s input: (offset, that input's channels)."""
        return self.slices.get(consumer, (0, self.out_channels))

    def ours(self, consumer: str, per_input_channel: Tensor) -> Tensor:
        """Of a value per input channel of `consumer` (`reads(consumer)[1]` of them), our channels'."""
        offset = self.reads(consumer)[0]
        return per_input_channel[offset:offset + self.out_channels]

    def filters(self) -> Tensor:
        """The layer's filters flattened: [C_out, fan_in] (detached)."""
        return self.module.weight.detach().flatten(1)


# per layer, what its input channels are made of: the one prunable layer whose channels they are,
# or for a concatenation (its channels, the prunable layers writing parts of it)
InputsFrom = dict[str, "str | tuple[int, tuple[str, ...]]"]


@dataclass
class Structure:
    """Per prunable layer (by name): cost, BN and the single layer feeding it, for allocators."""
    macs: dict[str, int]
    params: dict[str, int]
    inputs_from: InputsFrom  # of the prunable layers and their followers
    bn_of: dict[str, str | None]  # the BN module's name, or None
    out_channels: dict[str, int]
    # depthwise convs that follow a prunable layer's channels (not prunable themselves): their cost
    # shrinks with that layer's kept filters (MobileNet, EfficientNet: a sizeable share of the MACs),
    # and a pruned filter's channel must be zeroed in them too (`with_followers`)
    follower_macs: dict[str, int] = field(default_factory=dict)
    follower_params: dict[str, int] = field(default_factory=dict)
    followers: dict[str, str] = field(default_factory=dict)  # depthwise conv -> the prunable layer it follows
    follower_bn: dict[str, str | None] = field(default_factory=dict)
    inputs_among: dict[str, list[str]] = field(default_factory=dict)  # LayerInfo.inputs_among, where known
    # batch norms over a concatenation of prunable layers' channels: name -> (their channels,
    # ((layer, offset), ...)); a pruned filter's channel is zeroed there too (`follower_masks`)
    concat_bns: dict[str, tuple[int, tuple[tuple[str, int], ...]]] = field(default_factory=dict)
    # layers whose mask must keep the same positions in each of `g` equal parts of its channels:
    # grouped convs (their filters), the layers a grouped conv reads and those a GroupNorm
    # normalizes (their groups stay equal); name -> g (the least common multiple where several
    # apply); a layer not named has g = 1
    periods: dict[str, int] = field(default_factory=dict)

    def inputs_within(self, groups: list[list[str]]) -> InputsFrom:
        """`inputs_from`, and for a layer whose input several layers make, all of them in one of
        `groups` (pruned with one mask), that group's first."""
        group_of = {n: i for i, g in enumerate(groups) for n in g}
        extra = {c: ps[0] for c, ps in self.inputs_among.items()
                 if c not in self.inputs_from and ps[0] in group_of
                 and all(group_of.get(p) == group_of[ps[0]] for p in ps)}
        return {**self.inputs_from, **extra}

    def follower_masks(self, masks: dict[str, Tensor], cut: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """For each depthwise conv following a layer of `masks`, that layer's mask; for each batch
        norm over a concatenation that a layer of `masks` writes into, the masks of its parts
        (where layers `cut` by surgery write into it too, over the channels they left)."""
        out = {f: masks[src] for f, src in self.followers.items() if src in masks}
        for bn, (channels, parts) in self.concat_bns.items():
            if not any(p in masks for p, _ in parts):
                continue
            keep, alive = torch.ones(channels, dtype=torch.bool), torch.ones(channels, dtype=torch.bool)
            for p, offset in parts:
                span = slice(offset, offset + self.out_channels[p])
                if p in masks:
                    keep[span] = masks[p].cpu()
                if cut is not None and p in cut:
                    alive[span] = cut[p].cpu()
            if not keep.all():
                out[bn] = keep[alive]
        return out

    def with_followers(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """`masks` and their `follower_masks`: what a masked network zeroes so that a pruned
        channel is 0 all the way, as in the cut network (else the depthwise conv's BN, or the BN
        that normalizes a concatenation, turns the 0 into its shift, which reaches later layers)."""
        return {**masks, **self.follower_masks(masks)}

    @property
    def all_bn_of(self) -> dict[str, str | None]:
        """`bn_of` with the followers' BNs: what `with_followers` masks need (a BN over a
        concatenation is masked itself: its scale and shift are its weight and bias)."""
        return {**self.bn_of, **self.follower_bn, **dict.fromkeys(self.concat_bns)}

    @property
    def cost_macs(self) -> dict[str, int]:
        """The MACs masks change: the prunable layers' and their followers' (what a FLOPs target counts)."""
        return {**self.macs, **self.follower_macs}

    @property
    def cost_params(self) -> dict[str, int]:
        return {**self.params, **self.follower_params}


def structure(model: nn.Module, example: Tensor) -> Structure:
    infos = discover(model, example)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    producers: dict[str, list[str]] = {}
    for i in infos:
        for c in i.consumers:
            producers.setdefault(c, []).append(i.name)
    sliced = {c for i in infos for c in i.slices}
    inputs_from: InputsFrom = {
        c: p[0] for c, p in producers.items() if len(p) == 1 and c not in sliced}
    for i in infos:  # a depthwise conv, and what reads it, take their input channels from the layer it follows
        for c in [*i.followers, *i.through]:
            inputs_from.setdefault(c, i.name)
    inputs_from.update({i.name: i.concat_of for i in infos if i.concat_of is not None})
    return Structure(macs={i.name: i.macs for i in infos}, params={i.name: i.module.weight.numel() for i in infos},
                     inputs_from=inputs_from,
                     bn_of={i.name: names[i.bn] if i.bn is not None else None for i in infos},
                     out_channels={i.name: i.out_channels for i in infos},
                     follower_macs={d: c[0] for i in infos for d, c in i.followers.items()},
                     follower_params={d: c[1] for i in infos for d, c in i.followers.items()},
                     followers={d: i.name for i in infos for d in i.followers},
                     follower_bn={d: c[2] for i in infos for d, c in i.followers.items()},
                     inputs_among={i.name: i.inputs_among for i in infos if i.inputs_among},
                     concat_bns=_concat_bns(infos),
                     periods={i.name: p for i in infos
                              if (p := math.lcm(_period(i.module, [modules[c] for c in [*i.consumers, *i.through]]),
                                                i.norm_groups)) > 1})


def grouped_conv(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): it reads channel c only in the
    group c belongs to, and each group's filters are a contiguous block of its outputs."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _follows(m)


def _period(m: nn.Module, readers: list[nn.Module]) -> int:
    """How many equal parts `m`'s mask must repeat over: `m`'s groups if it is a grouped conv, and
    the groups of each grouped conv reading its channels (their least common multiple)."""
    return math.lcm(*(x.groups for x in [m, *readers] if grouped_conv(x)), 1)


def _concat_bns(infos: list[LayerInfo]) -> dict[str, tuple[int, tuple[tuple[str, int], ...]]]:
    parts: dict[str, list[tuple[str, int]]] = {}
    channels: dict[str, int] = {}
    for i in infos:
        for bn, (offset, total) in i.slice_bns.items():
            parts.setdefault(bn, []).append((i.name, offset))
            channels[bn] = total
    return {bn: (channels[bn], tuple(sorted(ps, key=lambda p: p[1]))) for bn, ps in parts.items()}


def _prunable(m: nn.Module) -> bool:
    return isinstance(m, WEIGHTED) and not _follows(m)


@torch.enable_grad()
def discover(model: nn.Module, example: Tensor) -> list[LayerInfo]:
    """Prunable layers of `model` in execution order, traced on `example` [N, C, H, W]."""
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    outputs: dict[nn.Module, Tensor] = {}
    inputs: dict[nn.Module, Tensor] = {}
    bn_of: dict[nn.Module, nn.Module] = {}
    bn_inputs: dict[nn.Module, Tensor] = {}
    by_output_id: dict[int, nn.Module] = {}
    hooks = []

    def on_weighted(m, inp, out):
        if m not in outputs:  # a module called twice keeps its first call
            order.append(m)
            outputs[m], inputs[m] = out, inp[0]
            by_output_id[id(out)] = m

    def on_bn(m, inp, out):
        bn_inputs.setdefault(m, inp[0])
        producer = by_output_id.get(id(inp[0]))
        if producer is not None and outputs.get(producer) is inp[0] and producer not in bn_of \
                and _norm_width(m) == _out_width(producer) and _channel_axis(producer, inp[0]) == 1:
            bn_of[producer] = m

    for m in model.modules():
        if isinstance(m, WEIGHTED):
            hooks.append(m.register_forward_hook(on_weighted))
        elif isinstance(m, NORMS):
            hooks.append(m.register_forward_hook(on_bn))
    was_training = model.training
    model.eval()
    try:
        with _Concatenations() as cats:
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    node_owner = {outputs[m].grad_fn: m for m in order if outputs[m].grad_fn is not None}
    consumers: dict[nn.Module, list[nn.Module]] = {m: [] for m in order}
    slices: dict[tuple[nn.Module, nn.Module], tuple[int, int]] = {}
    reached = {m: _producers(inputs[m], node_owner, cats.found) for m in order}
    producers = {m: list(reached[m]) for m in order}
    for m in order:
        for producer, at in reached[m].items():
            if at is None and feeds_channelwise(producer, m, _channel_axis(producer, outputs[producer]) == 1):
                consumers[producer].append(m)
            elif at and _reads_slice(producer, m, at, outputs[producer]):
                consumers[producer].append(m)
                slices[producer, m] = at
    n_img = example.shape[0]
    infos = []
    for m in order:
        if not _prunable(m) or not consumers[m]:
            continue
        reads = {c: slices.get((m, c), (0, _out_width(m))) for c in consumers[m]}
        infos.append(LayerInfo(name=names[m], module=m, index=len(infos), out_channels=_out_width(m),
                               bn=bn_of.get(m), consumers=[names[c] for c in consumers[m]],
                               macs=_macs(m, outputs[m], n_img),
                               sites=max(_sites(c, outputs[c], n_img, reads[c][1]) for c in consumers[m]),
                               channel_axis=_channel_axis(m, outputs[m]),
                               slices={names[c]: at for c, at in reads.items() if (m, c) in slices}))
    by_module = {i.module: i for i in infos}

    def writer(p: nn.Module) -> nn.Module | None:
        """The prunable layer whose channels `p`'s output carries: itself, or the one a depthwise conv follows."""
        src = p if p in by_module else _source(p, producers, outputs)[0] if _follows(p) else None
        return src if src in by_module else None

    for m in order:  # channels followed through depthwise convs
        source, passed = _source(m, producers, outputs)
        if passed and source in by_module:
            if _follows(m):
                bn = names[bn_of[m]] if m in bn_of else None
                by_module[source].followers[names[m]] = (_macs(m, outputs[m], n_img), m.weight.numel(), bn)
            elif m in by_module:
                by_module[source].through.append(names[m])
        if m in by_module and len(producers[m]) > 1:
            sources = [writer(p) for p in producers[m] if feeds_channelwise(p, m, _channel_axis(p, outputs[p]) == 1)]
            if len(sources) == len(producers[m]) and None not in sources:
                by_module[m].inputs_among = list(dict.fromkeys(names[src] for src in sources))
        if m in by_module:  # our input is a concatenation
            parts = {p: at if (p, m) in slices else None for p, at in reached[m].items()}
            if (total := _concatenation(parts)) is not None:
                writers = [writer(p) for p in sorted(parts, key=lambda p: parts[p][0])]
                by_module[m].concat_of = (total, tuple(dict.fromkeys(names[w] for w in writers if w is not None)))
    own = set(bn_of.values())
    for bn, x in bn_inputs.items():  # a BN over a concatenation: the channels of each part are its writer's
        reached_bn = _producers(x, node_owner, cats.found)
        parts = {p: at if at and _channel_axis(p, outputs[p]) == 1 else None for p, at in reached_bn.items()}
        if isinstance(bn, nn.GroupNorm):  # its groups stay equal where its writers' masks repeat over them
            for p, at in reached_bn.items():
                if at is None and _channel_axis(p, outputs[p]) == 1 and _out_width(p) == bn.num_channels \
                        and (w := writer(p)) is not None:
                    by_module[w].norm_groups = math.lcm(by_module[w].norm_groups, bn.num_groups)
        elif bn not in own and _concatenation(parts) == bn.num_features:
            for p, at in parts.items():
                if (w := writer(p)) is not None:
                    by_module[w].slice_bns[names[bn]] = at
    return infos


class _Concatenations(TorchFunctionMode):
    """Notes each concatenation made while active: its autograd node -> (axis, the sizes of its
    parts along it). The autograd graph alone does not keep the sizes."""

    FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)

    def __init__(self):
        super().__init__()
        self.found = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.FUNCTIONS and isinstance(out, Tensor) and out.grad_fn is not None and out.dim() > 0:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if isinstance(dim, int):
                dim %= out.dim()
                self.found[out.grad_fn] = (dim, [t.shape[dim] if t.dim() > dim else 0 for t in tensors])
        return out


def _concatenation(parts: dict) -> int | None:
    """The channels of the concatenation of which each of `parts` (layer -> where its channels
    are, as `_producers` gives it) writes a slice, no two the same channels; None where they do
    not (two concatenations added together: a channel then leaves only with both)."""
    if not parts or not all(isinstance(at, tuple) for at in parts.values()):
        return None
    totals = {at[1] for at in parts.values()}
    spans = sorted((at[0], at[0] + _out_width(p)) for p, at in parts.items())
    ok = len(totals) == 1 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return totals.pop() if ok else None


def _reads_slice(producer: nn.Module, consumer: nn.Module, at: tuple[int, int], out: Tensor) -> bool:
    """Whether a consumer whose input is a channel concatenation of `at[1]` channels reads the
    producer's channels as one slice of it: a conv (groups = 1) reading all of them, or a linear
    layer reading them flattened from a channels-first map (or as they are)."""
    if _channel_axis(producer, out) != 1:
        return False
    if isinstance(consumer, nn.Conv2d):
        return consumer.groups == 1 and consumer.in_channels == at[1]
    return isinstance(consumer, nn.Linear) and consumer.in_features % at[1] == 0


def _follows(m: nn.Module) -> bool:
    """A depthwise conv: output channel c is computed from input channel c alone."""
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _source(m: nn.Module, producers: dict, outputs: dict) -> tuple[nn.Module | None, list[nn.Module]]:
    """The single layer whose channels are `m`'s input channels, followed back through depthwise
    convs (and `m` itself when it is one), and the depthwise convs passed; None where the input
    has several producers or is not channelwise."""
    passed, cur = [m] if _follows(m) else [], m
    while True:
        ps = producers[cur]
        if len(ps) != 1 or not feeds_channelwise(ps[0], cur, _channel_axis(ps[0], outputs[ps[0]]) == 1):
            return None, passed
        if not _follows(ps[0]) or ps[0] in passed:
            return ps[0], passed
        cur = ps[0]
        passed.append(cur)


def _sites(consumer: nn.Module, out: Tensor, n_img: int, channels: int) -> int:
    """(output positions + 1) x the weights each input channel meets per output: PFP's eta."""
    positions = out.numel() // n_img // _out_width(consumer)
    per_channel = consumer.weight[0, 0].numel() if isinstance(consumer, nn.Conv2d) else \
        max(1, _in_width(consumer) // channels)
    return (positions + 1) * per_channel


def _producers(x: Tensor, node_owner: dict, cats: dict) -> dict[nn.Module, tuple[int, int] | None | bool]:
    """Layers whose outputs reach `x` through non-weighted operations (a walk on the autograd
    graph), each with where its channels are in `x`: None where no concatenation on the channel
    axis lies between (they are `x`'s channels if the widths agree), (offset, channels of the
    outermost concatenation) where they are a slice of one, False where they are neither (they
    reach `x` at two places, or a concatenation's parts do not add up to what they feed)."""
    found: dict[nn.Module, tuple[int, int] | None | bool] = {}
    seen, frontier = set(), [(x.grad_fn, None)] if x.grad_fn is not None else []
    while frontier:
        node, at = frontier.pop()  # at: None, (offset, width of this part, total), or False
        if node is None or (node, at) in seen:
            continue
        seen.add((node, at))
        if node in node_owner:
            m = node_owner[node]
            here = at if at is None or at is False else (at[0], at[2]) if at[1] == _out_width(m) else False
            found[m] = here if found.get(m, here) == here else False
            continue
        nexts = [nf for nf, _ in node.next_functions]
        if node in cats and cats[node][0] == 1 and at is not False:
            sizes = cats[node][1]
            if len(sizes) != len(nexts) or (at is not None and sum(sizes) != at[1]):
                frontier.extend((nf, False) for nf in nexts)
                continue
            base, total = (0, sum(sizes)) if at is None else (at[0], at[2])
            frontier.extend((nf, (base + sum(sizes[:i]), sizes[i], total)) for i, nf in enumerate(nexts))
            continue
        frontier.extend((nf, at) for nf in nexts)
    return found


def _out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_width(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _channel_axis(m: nn.Module, out: Tensor) -> int:
    """Where a layer's output keeps its channels: axis 1 for a conv, the last axis for a linear
    layer (which acts on [N, ..., C], e.g. ConvNeXt's pointwise layers on channels-last maps)."""
    return out.dim() - 1 if isinstance(m, nn.Linear) else 1


def feeds_channelwise(producer: nn.Module, consumer: nn.Module, channels_first: bool = True) -> bool:
    """Whether the producer's channels are the consumer's inputs one-to-one (a conv), or as
    equal contiguous blocks (a linear layer after flattening a channels-first map); not through
    a pad or a concat. A flattened channels-last map interleaves the channels: not channelwise."""
    c, w = _out_width(producer), _in_width(consumer)
    return w == c or (channels_first and isinstance(consumer, nn.Linear) and w % c == 0)


def _macs(m: nn.Module, out: Tensor, n_img: int) -> int:
    per_out = m.weight[0].numel()  # (C_in / groups) * kh * kw, or in_features
    return int(out.numel() // n_img * per_out)


def consumer_sq(consumer: nn.Module, channels: int) -> Tensor:
    """Per input channel of `consumer`, the sum of squares of the weights that read it: [channels].
    In a grouped conv (depthwise included) a channel is read only by its group's filters."""
    w = consumer.weight.detach().float()
    if isinstance(consumer, nn.Conv2d):
        g = consumer.groups  # weight [O, C/g, kh, kw]: group i's filters read channels i*C/g ...
        return w.reshape(g, w.shape[0] // g, channels // g, -1).pow(2).sum((1, 3)).reshape(channels)
    # a flatten of a channels-first map puts channel c's features contiguously
    return w.reshape(w.shape[0], channels, -1).pow(2).sum((0, 2))
