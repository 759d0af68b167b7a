"""TPP: trainability-preserving regularization before surgery (Wang & Fu, ICLR 2023).

For each pruned layer with filters W [N, C*k*k] and keep mask m [N]:
  Gram penalty  ||W W^T * (1 - m m^T)||_F^2 / N^2: kept-kept entries get no gradient; pruned
                filters are decorrelated from the kept ones and driven towards zero; weighted
                `gram_weight` x reg in the loss (the paper: 1000 x reg);
  L2            grad += reg * param on the pruned filters, their own bias and their BN scale and shift;
  schedule      reg += reg_step every `update_every` iterations up to `reg_ceiling`, after which
                the stabilize phase keeps reg fixed for `stabilize_iters` iterations. reg is a
                function of the iteration count alone, so a resumed run needs only that count.
Defaults are the paper's CIFAR settings; ImageNet used update_every = 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from evoprune.errors import EvopruneError


@dataclass(frozen=True, kw_only=True)
class TPPConfig:
    reg_step: float = 1e-4  # reg increment
    update_every: int = 10  # iterations between increments (tau: 10 CIFAR, 5 ImageNet)
    reg_ceiling: float = 1.0  # reg stops growing here
    gram_weight: float = 1000.0  # the Gram term's weight per unit of reg
    stabilize_iters: int = 1000  # iterations at the ceiling before surgery
    lr: float = 1e-3  # SGD during regularization (momentum 0.9, weight decay 5e-4)

    def __post_init__(self):
        for ok, msg in [(self.reg_step > 0, "reg_step must be > 0"), (self.update_every >= 1, "update_every >= 1"),
                        (self.reg_ceiling > 0, "reg_ceiling must be > 0"), (self.gram_weight >= 0, "gram_weight >= 0"),
                        (self.stabilize_iters >= 0, "stabilize_iters >= 0"), (self.lr > 0, "lr must be > 0")]:
            if not ok:
                raise EvopruneError(f"[tpp] {msg}")

    @property
    def ramp_iterations(self) -> int:
        """Iterations until reg reaches the ceiling."""
        return math.ceil(self.reg_ceiling / self.reg_step - 1e-9) * self.update_every

    @property
    def total_iterations(self) -> int:
        return self.ramp_iterations + self.stabilize_iters


class TPPRegularizer:
    """Call `penalty()` into the loss, `apply_l2()` after backward, `step()` after each iteration."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor], bn_of: dict[str, str | None],
                 cfg: TPPConfig = TPPConfig(), followers: dict[str, tuple[Tensor, str | None]] | None = None):
        """`followers`: depthwise conv -> (the keep mask of the layer it follows, its BN's name): the
        L2 term drives their pruned channels (weights, BN scale and shift) to 0 as well, so cutting
        them costs nothing either (no Gram term: a depthwise filter is one channel's own)."""
        modules = dict(model.named_modules())
        self.cfg, self.iteration = cfg, 0
        self.layers = []
        for name, keep in masks.items():
            m = modules[name]
            bn = modules[bn_of[name]] if bn_of.get(name) else None
            self.layers.append((m, bn, keep.to(m.weight.device, torch.float32), ~keep.to(m.weight.device)))
        self._off = [1 - torch.outer(keep, keep) for _, _, keep, _ in self.layers]  # zero on kept-kept entries
        # (param, 0/1 factor broadcastable to it) for the L2 term: multiplications, no host syncs
        self._l2 = []
        decayed = [(m, bn, drop) for m, bn, _, drop in self.layers] + [
            (modules[f], modules[b] if b else None, ~keep.to(modules[f].weight.device))
            for f, (keep, b) in (followers or {}).items()]
        for m, bn, drop in decayed:
            # the layer's own bias too: with no BN after it, it is what a cut filter still adds
            for p in [m.weight, m.bias] + ([bn.weight, bn.bias] if bn is not None else []):
                if p is not None:
                    self._l2.append((p, drop.view(-1, *[1] * (p.dim() - 1)).to(p.dtype)))

    @property
    def reg(self) -> float:
        c = self.cfg
        return min(c.reg_ceiling, (self.iteration // c.update_every) * c.reg_step)

    @property
    def phase(self) -> str:
        """"regularize" while reg grows, then "stabilize"."""
        return "stabilize" if self.iteration >= self.cfg.ramp_iterations else "regularize"

    @property
    def done(self) -> bool:
        return self.iteration >= self.cfg.total_iterations

    def penalty(self) -> Tensor:
        total = None
        for (m, *_), off in zip(self.layers, self._off):
            w = m.weight.flatten(1)
            gram = w @ w.T
            term = (gram * off).pow(2).sum() / gram.shape[0] ** 2
            total = term if total is None else total + term
        return self.cfg.gram_weight * self.reg * total

    @torch.no_grad()
    def apply_l2(self) -> None:
        reg = self.reg
        for p, drop in self._l2:
            if p.grad is not None:
                p.grad.add_(p * drop, alpha=reg)

    def step(self) -> None:
        self.iteration += 1

    @torch.no_grad()
    def pruned_norms(self) -> tuple[float, float, float]:
        """(mean L2 of pruned filters, mean of |gamma| + |beta| of their BN (or of |bias| of a layer
        with no BN after it: what the channel outputs once its weights are 0), mean L2 of kept filters)."""
        pruned, bn_vals, kept = [], [], []
        for m, bn, _, drop in self.layers:
            norms = m.weight.flatten(1).norm(dim=1)
            pruned.append(norms[drop])
            kept.append(norms[~drop])
            if bn is not None and bn.weight is not None:
                bn_vals.append(bn.weight[drop].abs() + bn.bias[drop].abs())
            elif bn is None and m.bias is not None:
                bn_vals.append(m.bias[drop].abs())
        cat = lambda xs: torch.cat(xs).mean().item() if xs else 0.0  # noqa: E731
        return cat(pruned), cat(bn_vals), cat(kept)
