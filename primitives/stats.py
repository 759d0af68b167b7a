"""Per-filter statistics: the terminals of the search.

Each statistic is a small registered function of one layer's collected data returning a float
tensor of shape [C_out] (one value per output filter), or [K, C_out] for the class-conditional
ones (class k against the rest; an expression over them is averaged over k; ETPF summed).
Its cost class says what collecting it needs: the weights only, one forward pass over a batch,
or a backward pass as well. `collect_stats` computes only what is asked.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor, nn

from evoprune.errors import EvopruneError
from evoprune.primitives.layers import LayerInfo, consumer_sq

NORM_FLOOR = 1e-12  # smallest norm divided by (cosines, spectral tolerance)


class Cost(enum.IntEnum):
    WEIGHTS = 0  # weights only
    FORWARD = 1  # one forward pass over a batch
    GRADIENT = 2  # forward and backward


@dataclass(frozen=True)
class Statistic:
    name: str
    description: str
    cost: Cost
    fn: Callable[["LayerData"], Tensor]
    nonneg: bool = False  # values are never negative (lets monotone-transform detection peel sqrt, square)
    per_class: bool = False  # shape [K, C_out]
    layer_level: bool = False  # one value per layer, broadcast to every filter


STATS: dict[str, Statistic] = {}


def statistic(name: str, description: str, cost: Cost, **flags):
    def register(fn):
        STATS[name] = Statistic(name, description, cost, fn, **flags)
        return fn

    return register


# --------------------------------------------------------------------------- collected data
@dataclass
class Activations:
    """Running per-channel sums of post-BN+ReLU activations a [N, C, P] over the batch."""

    n_images: int = 0
    n_elems: int = 0  # images x positions
    s1: Tensor | None = None  # sum of a          [C]
    s2: Tensor | None = None  # sum of a^2        [C]
    zeros: Tensor | None = None  # count of a == 0  [C]
    amax: Tensor | None = None  # max of a          [C]
    responses: list[Tensor] = field(default_factory=list)  # per-image spatial means [N, C]
    taylor: Tensor | None = None  # sum over images of |mean_p a * dL/da|  [C]

    def add(self, a: Tensor) -> None:
        n, c = a.shape[:2]
        flat = a.detach().reshape(n, c, -1).float()
        s1, s2 = flat.sum((0, 2)), flat.pow(2).sum((0, 2))
        z, mx = (flat == 0).sum((0, 2)).float(), flat.amax((0, 2))
        if self.s1 is None:
            self.s1, self.s2, self.zeros, self.amax = s1, s2, z, mx
        else:
            self.s1, self.s2, self.zeros = self.s1 + s1, self.s2 + s2, self.zeros + z
            self.amax = torch.maximum(self.amax, mx)
        self.responses.append(flat.mean(2))
        self.n_images += n
        self.n_elems += n * flat.shape[2]


@dataclass
class LayerData:
    """Everything statistics are computed from, for one layer."""

    info: LayerInfo
    n_layers: int
    total_macs: int
    consumers: list[nn.Module]
    spectral_tol: float = 0.1
    act: Activations | None = None
    labels: Tensor | None = None  # [N] labels of the images behind act.responses
    grad_w: Tensor | None = None  # mean dL/dW over batches, [C_out, fan_in]
    pfp: Tensor | None = None  # PFP sensitivity [C_out]

    @cached_property
    def w(self) -> Tensor:
        """[C_out, fan_in] on the CPU: statistics are cheap next to the passes that feed them."""
        return self.info.filters().float().cpu()

    @cached_property
    def w_acting(self) -> Tensor:
        """The filters as they act on the layer's whole input, [C_out, C_in x kh x kw]: `w`, but a
        grouped conv's filter is placed at its group's input channels, zero elsewhere (filters of
        two groups read disjoint inputs: orthogonal). What relations between filters read."""
        m = self.info.module
        if not isinstance(m, nn.Conv2d) or m.groups == 1:
            return self.w
        return torch.block_diag(*self.w.chunk(m.groups))

    @cached_property
    def gram(self) -> Tensor:
        return self.w_acting @ self.w_acting.T

    @cached_property
    def cos(self) -> Tensor:
        n = self.w.norm(dim=1).clamp_min(NORM_FLOOR)
        c = (self.gram / (n[:, None] * n[None, :])).abs()
        return c.fill_diagonal_(0.0)

    @cached_property
    def svd(self) -> tuple[Tensor, Tensor, int]:
        """U [C, q], Vh [q, F] and the kept rank r at tolerance tau: the smallest r with
        ||sigma[r:]||_2 < tau * ||sigma||_2 (Tucker-DLRT's truncation rule)."""
        u, s, vh = torch.linalg.svd(self.w_acting, full_matrices=False)
        tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0]))  # tail[r] = ||s[r:]||
        ok = torch.nonzero(tail < self.spectral_tol * tail[0].clamp_min(NORM_FLOOR)).flatten()
        r = int(ok[0]) if len(ok) else len(s)
        return u, vh, max(r, 1)

    @cached_property
    def class_moments(self) -> dict[str, Tensor]:
        return class_moments(self)

    def bn_param(self, attr: str, default: float) -> Tensor:
        bn = self.info.bn
        if bn is None or getattr(bn, attr, None) is None:
            return torch.full((self.info.out_channels,), default)
        return getattr(bn, attr).detach().float().cpu().clone()

    def need_act(self) -> Activations:
        if self.act is None or self.act.n_images == 0:
            raise RuntimeError(f"layer {self.info.name}: no activations collected")
        return self.act


def _ones(d: LayerData, value: float) -> Tensor:
    return torch.full((d.info.out_channels,), float(value))


# --------------------------------------------------------------------------- weights
statistic("w_l1", "L1 norm of the filter's weights", Cost.WEIGHTS, nonneg=True)(lambda d: d.w.abs().sum(1))
statistic("w_l2", "L2 norm of the filter's weights", Cost.WEIGHTS, nonneg=True)(lambda d: d.w.norm(dim=1))
statistic("w_linf", "largest |weight| of the filter", Cost.WEIGHTS, nonneg=True)(lambda d: d.w.abs().amax(1))
statistic("w_mean", "mean weight of the filter", Cost.WEIGHTS)(lambda d: d.w.mean(1))
statistic("w_std", "standard deviation of the filter's weights", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.w.std(1, unbiased=False))


@statistic("w_out_l2", "L2 norm of the next layers' weights reading this channel", Cost.WEIGHTS, nonneg=True)
def _w_out(d: LayerData) -> Tensor:
    sq = torch.zeros(d.info.out_channels)
    for name, m in zip(d.info.consumers, d.consumers):
        sq += d.info.ours(name, consumer_sq(m, d.info.reads(name)[1])).cpu()
    return sq.sqrt()


# --------------------------------------------------------------------------- Gram matrix
statistic("gram_diag", "diagonal of W W^T: squared L2 norm of the filter", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.gram.diagonal().clone())
statistic("gram_offdiag", "row sum of |off-diagonal| entries of W W^T", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.gram.abs().sum(1) - d.gram.diagonal().abs())
statistic("cos_mean", "mean |cosine similarity| to the layer's other filters", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.cos.sum(1) / max(d.info.out_channels - 1, 1))
statistic("cos_max", "largest |cosine similarity| to another filter", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.cos.amax(1))
statistic("fpgm_dist", "FPGM: sum of L2 distances to the other filters (small = near the geometric median)",
          Cost.WEIGHTS, nonneg=True)(lambda d: torch.cdist(d.w_acting[None], d.w_acting[None])[0].sum(1))

# --------------------------------------------------------------------------- batch norm
statistic("bn_gamma", "BN scale gamma (1 without BN)", Cost.WEIGHTS)(lambda d: d.bn_param("weight", 1.0))
statistic("bn_beta", "BN shift beta (0 without BN)", Cost.WEIGHTS)(lambda d: d.bn_param("bias", 0.0))
statistic("bn_abs_gamma", "|BN scale gamma| (network slimming)", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.bn_param("weight", 1.0).abs())
statistic("bn_mean", "BN running mean of the conv output", Cost.WEIGHTS)(lambda d: d.bn_param("running_mean", 0.0))
statistic("bn_var", "BN running variance of the conv output", Cost.WEIGHTS, nonneg=True)(
    lambda d: d.bn_param("running_var", 1.0))


# --------------------------------------------------------------------------- activations
@statistic("act_mean", "mean post-BN+ReLU activation over images and positions", Cost.FORWARD, nonneg=True)
def _act_mean(d):
    a = d.need_act()
    return a.s1 / a.n_elems


@statistic("act_var", "variance of the post-BN+ReLU activation", Cost.FORWARD, nonneg=True)
def _act_var(d):
    a = d.need_act()
    m = a.s1 / a.n_elems
    return (a.s2 / a.n_elems - m * m).clamp_min(0)


statistic("act_l1", "L1 norm of the activation map, averaged over images", Cost.FORWARD, nonneg=True)(
    lambda d: d.need_act().s1 / d.need_act().n_images)
statistic("act_zero_frac", "fraction of zero activations (APoZ)", Cost.FORWARD, nonneg=True)(
    lambda d: d.need_act().zeros / d.need_act().n_elems)
statistic("act_max", "largest activation over the batch", Cost.FORWARD, nonneg=True)(lambda d: d.need_act().amax)


def class_moments(d: LayerData) -> dict[str, Tensor]:
    """Moments of the per-image channel responses r [N, C] for class k (in) and the rest (out)."""
    r = torch.cat(d.need_act().responses)
    y = d.labels
    if len(r) != len(y):  # e.g. a layer applied to two views of each image, concatenated on the batch axis
        raise EvopruneError(f"layer {d.info.name} sees {len(r)} inputs for {len(y)} images: class-conditional "
                            "statistics (cls_*) need one response per image; leave them out of this model's "
                            "search ([search] stats) or metric")
    rows = {k: [] for k in ("mean_in", "mean_out", "var_in", "var_out", "n_in", "n_out")}
    for k in torch.unique(y):
        inside = y == k
        for side, sel in (("in", inside), ("out", ~inside)):
            part = r[sel]
            rows[f"mean_{side}"].append(part.mean(0) if len(part) else torch.zeros(r.shape[1]))
            rows[f"var_{side}"].append(part.var(0, unbiased=False) if len(part) else torch.zeros(r.shape[1]))
            rows[f"n_{side}"].append(torch.full((r.shape[1],), float(int(sel.sum()))))
    return {k: torch.stack(v) for k, v in rows.items()}


for _key, _desc in [("mean_in", "mean response of images of class k"), ("mean_out", "mean response of the other images"),
                    ("var_in", "response variance within class k"), ("var_out", "response variance of the other images"),
                    ("n_in", "number of images of class k"), ("n_out", "number of other images")]:
    # responses are means of post-ReLU maps, so every moment is >= 0
    statistic(f"cls_{_key}", f"per class k: {_desc} (ETPF's P / Q)", Cost.FORWARD, per_class=True,
              nonneg=True)(lambda d, _k=_key: d.class_moments[_k])


# --------------------------------------------------------------------------- gradients
statistic("taylor_act", "Taylor: |mean over positions of a * dL/da|, averaged over images", Cost.GRADIENT,
          nonneg=True)(lambda d: d.need_act().taylor / d.need_act().n_images)


@statistic("taylor_w", "Taylor on weights: sum over the filter of |w * dL/dw|", Cost.GRADIENT, nonneg=True)
def _taylor_w(d):
    if d.grad_w is None:
        raise RuntimeError(f"layer {d.info.name}: no gradient collected")
    return (d.w * d.grad_w).abs().sum(1)


# --------------------------------------------------------------------------- data-informed, spectral
@statistic("pfp_sens", "PFP sensitivity: max relative contribution of the channel to the next layer",
           Cost.FORWARD, nonneg=True)
def _pfp(d):
    if d.pfp is None:
        raise RuntimeError(f"layer {d.info.name}: no PFP sensitivity collected")
    return d.pfp


@statistic("spec_leverage", "leverage ||U[i, :r]||^2 of the filter on the top-r singular subspace",
           Cost.WEIGHTS, nonneg=True)
def _leverage(d):
    u, _, r = d.svd
    return u[:, :r].pow(2).sum(1)


@statistic("spec_residual", "L2 norm of the filter's residual after projection on the top-r subspace",
           Cost.WEIGHTS, nonneg=True)
def _residual(d):
    _, vh, r = d.svd
    v = vh[:r]
    w = d.w_acting
    return (w - (w @ v.T) @ v).norm(dim=1)


# --------------------------------------------------------------------------- layer level
statistic("layer_depth", "relative depth of the layer (0 first, 1 last)", Cost.WEIGHTS, nonneg=True,
          layer_level=True)(lambda d: _ones(d, d.info.index / max(d.n_layers - 1, 1)))
statistic("layer_width", "number of filters in the layer", Cost.WEIGHTS, nonneg=True, layer_level=True)(
    lambda d: _ones(d, d.info.out_channels))
statistic("layer_flops", "the layer's share of the model's prunable-layer FLOPs", Cost.WEIGHTS, nonneg=True,
          layer_level=True)(lambda d: _ones(d, d.info.macs / max(d.total_macs, 1)))
statistic("layer_rank", "spectral keep ratio: kept rank r at tolerance tau over the width", Cost.WEIGHTS,
          nonneg=True, layer_level=True)(lambda d: _ones(d, d.svd[2] / d.info.out_channels))
