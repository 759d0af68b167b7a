"""Collect statistics from a model and a batch of images into a StatTable.

Only what is asked is computed: weights-only statistics need no data; activation statistics
need one forward pass (hooks on each layer's BN, or the layer itself without one); gradient
statistics add one backward pass of the cross-entropy loss. The model stays in eval mode
(BN uses its running statistics), so the result depends only on the images given.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evoprune.errors import EvopruneError
from evoprune.primitives.layers import LayerInfo, discover
from evoprune.primitives.stats import STATS, Activations, Cost, LayerData

PFP_CHUNK = 1 << 22  # contribution terms per matmul chunk (memory)
PFP_BUDGET = 1 << 25  # contribution terms per layer; past it, evenly strided positions are used
# (exact for CIFAR-size models at 64 images; ResNet-50 at 224x224 would need ~2.7e9 per image)


@dataclass
class StatTable:
    """stat name -> layer name -> Tensor[C_out] (or [K, C_out]), for the prunable layers in order."""

    layers: list[str]
    widths: list[int]
    values: dict[str, dict[str, Tensor]]
    meta: dict = field(default_factory=dict)
    _padded: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def layer(self, name: str) -> dict[str, Tensor]:
        return {s: v[name] for s, v in self.values.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.values.values())).values())).dtype

    @property
    def mask(self) -> Tensor:
        """[L, C_max] True where a filter exists (layers have different widths)."""
        if "__mask__" not in self._padded:
            cmax = max(self.widths)
            self._padded["__mask__"] = torch.arange(cmax)[None, :] < torch.tensor(self.widths)[:, None]
        return self._padded["__mask__"]

    def padded(self, stat: str) -> Tensor:
        """One statistic for all layers at once: [L, C_max], or [K, L, C_max] per class; padding = 1."""
        if stat not in self._padded:
            rows = [self.values[stat][name] for name in self.layers]
            cmax = max(self.widths)
            out = torch.ones(*rows[0].shape[:-1], len(rows), cmax, dtype=rows[0].dtype)
            for i, r in enumerate(rows):
                out[..., i, : r.shape[-1]] = r
            self._padded[stat] = out
        return self._padded[stat]

    def save(self, path: str | Path) -> None:
        torch.save({"layers": self.layers, "widths": self.widths, "values": self.values, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> "StatTable":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["layers"], d["widths"], d["values"], d.get("meta", {}))


def check_names(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    if unknown := [n for n in names if n not in STATS]:
        raise EvopruneError(f"unknown statistics {unknown}; see `evoprune primitives list`")
    return names


@contextlib.contextmanager
def _no_inplace_relu(model: nn.Module):
    """Gradient hooks on BN outputs must not see them overwritten by an in-place ReLU."""
    flipped = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


def collect_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], names: Iterable[str] | None = None,
                  *, max_images: int = 256, pfp_images: int = 64, spectral_tol: float = 0.1,
                  device: str | torch.device = "cpu", spectra: bool = False) -> StatTable:
    """Compute statistics `names` (all when None) for every prunable layer of `model`.

    `batches` yields (x [B, C, H, W], y [B]) already normalized; at most `max_images` are used.
    `meta` holds, per layer, PFP's `sites` (what the pfp allocator reads) and, with
    `spectra=True`, the singular values of the filters (what the spectral allocator reads).
    """
    names = check_names(names if names is not None else STATS)
    cost = max((STATS[n].cost for n in names), default=Cost.WEIGHTS)
    device = torch.device(device)
    model = model.to(device)
    it: Iterator = iter(batches)
    first = next(it, None)
    if first is None:
        raise EvopruneError("collect_stats: no images given")
    example = first[0][:2].to(device)
    infos = discover(model, example)
    if not infos:
        raise EvopruneError("no prunable layers in this model: evoprune ranks the filters of 2-D convs "
                            "(groups = 1) and linear layers whose outputs another such layer reads")
    modules = dict(model.named_modules())
    total_macs = sum(i.macs for i in infos)
    data = {i.name: LayerData(i, len(infos), total_macs, [modules[c] for c in i.consumers], spectral_tol)
            for i in infos}
    if cost >= Cost.FORWARD:
        _run_batches(model, infos, data, itertools.chain([first], it), names, cost, max_images, pfp_images, device)
    values = {n: {} for n in names}
    for name, d in data.items():
        for s in names:
            v = STATS[s].fn(d).detach().float().cpu()
            if v.shape[-1] != d.info.out_channels:
                raise AssertionError(f"statistic {s} on {name}: shape {tuple(v.shape)}")
            values[s][name] = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    meta = {"images": data[infos[0].name].act.n_images if cost >= Cost.FORWARD else 0,
            "spectral_tol": spectral_tol, "sites": {i.name: i.sites for i in infos}}
    if spectra:
        meta["spectra"] = {i.name: torch.linalg.svdvals(data[i.name].w_acting) for i in infos}
    return StatTable([i.name for i in infos], [i.out_channels for i in infos], values, meta)


def _run_batches(model, infos: list[LayerInfo], data: dict[str, LayerData], batches, names, cost,
                 max_images, pfp_images, device) -> None:
    want_grad = cost >= Cost.GRADIENT
    want_pfp = "pfp_sens" in names
    modules = dict(model.named_modules())
    pfp_inputs: dict[str, list[Tensor]] = {}
    hooks = []

    def act_hook(layer: str, axis: int):
        def hook(mod, inp, out):
            a = F.relu(out.detach()).movedim(axis, 1)  # channels on axis 1 from here on
            data[layer].act.add(a)
            if want_grad and out.requires_grad:
                def on_grad(g, a=a):
                    g = g.movedim(axis, 1)
                    prod = (a * g).reshape(a.shape[0], a.shape[1], -1).mean(2).abs().sum(0)
                    acc = data[layer].act
                    acc.taylor = prod if acc.taylor is None else acc.taylor + prod
                out.register_hook(on_grad)
        return hook

    def input_hook(consumer: str):
        def hook(mod, inp):
            have = sum(len(t) for t in pfp_inputs.setdefault(consumer, []))
            if have < pfp_images:
                pfp_inputs[consumer].append(inp[0].detach()[: pfp_images - have])
        return hook

    for info in infos:
        data[info.name].act = Activations()
        hooks.append((info.bn or info.module).register_forward_hook(act_hook(info.name, info.channel_axis)))
        if want_pfp:
            for c in info.consumers:
                if c not in pfp_inputs:
                    pfp_inputs[c] = []
                    hooks.append(modules[c].register_forward_pre_hook(input_hook(c)))
    labels, n_batches, seen = [], 0, 0
    was_training = model.training
    model.eval()
    if want_grad:
        model.zero_grad(set_to_none=True)
    try:
        with _no_inplace_relu(model) if want_grad else contextlib.nullcontext(), torch.set_grad_enabled(want_grad):
            for x, y in batches:
                if seen >= max_images:
                    break
                x, y = x[: max_images - seen].to(device), y[: max_images - seen].to(device)
                out = model(x)
                if want_grad:
                    F.cross_entropy(out, y).backward()
                labels.append(y.cpu())
                seen += len(y)
                n_batches += 1
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    y_all = torch.cat(labels)
    for info in infos:
        d = data[info.name]
        d.labels = y_all
        d.act.responses = [r.cpu() for r in d.act.responses]
        for attr in ("s1", "s2", "zeros", "amax", "taylor"):
            if getattr(d.act, attr) is not None:
                setattr(d.act, attr, getattr(d.act, attr).cpu())
        if want_grad:
            d.grad_w = info.module.weight.grad.detach().flatten(1).float().cpu() / n_batches
        if want_pfp:
            d.pfp = torch.stack([info.ours(c, pfp_sensitivity(modules[c], torch.cat(pfp_inputs[c]), info.reads(c)[1]))
                                 for c in info.consumers]).amax(0).cpu()
    if want_grad:
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def pfp_sensitivity(consumer: nn.Module, x: Tensor, channels: int) -> Tensor:
    """PFP (Liebenwein et al. 2020): for each input channel c of `consumer`, the largest share
    of any pre-activation that c contributes, w+_{i,c} a_c(x,p) / sum_k w+_{i,k} a_k(x,p), over
    images x, outputs i and positions p; the same for w-, and the max of both. [channels]
    In a grouped conv a channel competes only within its group (depthwise: always 1)."""
    w, x = consumer.weight.detach().float(), x.float()
    if isinstance(consumer, nn.Linear):
        return _pfp_linear(x, w, channels)
    conv = dict(stride=consumer.stride, padding=consumer.padding, dilation=consumer.dilation)
    g = consumer.groups
    cin, cout = channels // g, w.shape[0] // g
    return torch.cat([_pfp_conv(x[:, i * cin:(i + 1) * cin], w[i * cout:(i + 1) * cout], conv) for i in range(g)])


def _max_share(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), 0.0)


def _pfp_conv(x: Tensor, w: Tensor, conv: dict) -> Tensor:
    """Per-channel contributions as one batched matmul per chunk of channels:
    [c, O, k] @ [c, k, N*P] over unfolded patches (a 1-channel grouped conv is slow on CPUs)."""
    n, channels = x.shape[:2]
    ksize = w.shape[2:]
    patches = F.unfold(x, ksize, conv["dilation"], conv["padding"], conv["stride"])  # [N, C*k, P]
    kk, p = w.shape[2] * w.shape[3], patches.shape[-1]
    patches = patches.view(n, channels, kk, p).permute(1, 2, 0, 3).reshape(channels, kk, n * p)
    o = w.shape[0]
    stride = -(-(n * p * channels * o) // PFP_BUDGET)  # ceil: 1 keeps every position
    cols = torch.arange(0, n * p, stride, device=x.device)
    patches = patches[:, :, cols]
    best = torch.zeros(channels, device=x.device)
    for part in (w.clamp_min(0), (-w).clamp_min(0)):
        wc = part.flatten(2).transpose(0, 1)  # [C, O, k]
        den = F.conv2d(x, part, None, **conv)  # [N, O, H', W'], a normal conv
        den = den.transpose(0, 1).reshape(o, -1)[:, cols]  # [O, N*P], the patches' order
        step = max(1, PFP_CHUNK // max(den.numel(), 1))
        for j in range(0, channels, step):
            num = torch.bmm(wc[j: j + step], patches[j: j + step])  # [c, O, N*P]
            share = _max_share(num, den[None]).flatten(1).amax(1)
            best[j: j + step] = torch.maximum(best[j: j + step], share)
    return best


def _pfp_linear(x: Tensor, w: Tensor, channels: int) -> Tensor:
    """A linear layer reads its input's last axis: every image (and position, on [N, ..., F])
    is one row; a flatten of a channels-first map puts each channel's features together."""
    o = w.shape[0]
    rows = x.reshape(-1, w.shape[1])
    stride = -(-(len(rows) * channels * o) // PFP_BUDGET)  # ceil: 1 keeps every row
    xv = rows[::stride].reshape(-1, channels, w.shape[1] // channels)
    step = max(1, PFP_CHUNK // (channels * o))
    best = torch.zeros(channels, device=x.device)
    for part in (w.clamp_min(0), (-w).clamp_min(0)):
        wv = part.view(o, channels, -1)
        for j in range(0, len(xv), step):
            num = torch.einsum("nck,ock->nco", xv[j: j + step], wv)
            best = torch.maximum(best, _max_share(num, num.sum(1, keepdim=True)).amax((0, 2)))
    return best


def task_stats(pre, names: Iterable[str] | None = None, *, n_images: int = 256, seed: int = 0,
               device: str | torch.device = "cpu", batch_size: int = 256, **kw) -> StatTable:
    """Statistics of a pretrained task's model over `n_images` training images (a seeded draw,
    no augmentation; validation images stay for fitness)."""
    from evoprune.data import iterate

    batches = iterate(pre.data, pre.data.train, batch_size=batch_size, shuffle=True, seed=seed,
                      device=device, limit=n_images)
    table = collect_stats(pre.model, batches, names, max_images=n_images, device=device, **kw)
    table.meta.update(task=pre.task.name, seed=seed)
    return table
