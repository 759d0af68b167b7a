"""TPP: trainability-preserving regularization before surgery (Wang & Fu, ICLR 2023).

For each pruned layer with filters W [N, C*k*k] and keep mask m [N]:
  Gram penalty  ||W W^T * (1 - m m^T)||_F^2 / N^2: kept-kept entries get no gradient; pruned
                filters are decorrelated from the kept ones and driven towards zero; weighted
                `gram_weight` x reg in the loss (the paper: 1000 x reg);
  L2            grad += reg * param on the pruned filters and their BN scale and shift;
  schedule      reg += reg_step every `update_every` iterations up to `reg_ceiling`, after which
                the stabilize phase keeps reg fixed.
Defaults are the paper's CIFAR settings; ImageNet used update_every = 5.
"""
from __future__ import annotations

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


class TPPRegularizer:
    """Call `penalty()` into the loss, `apply_l2()` after backward, `step()` after each iteration."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor], bn_of: dict[str, str | None],
                 cfg: TPPConfig = TPPConfig()):
        modules = dict(model.named_modules())
        self.cfg, self.reg, self.iteration = cfg, 0.0, 0
        self.layers = []
        for name, keep in masks.items():
            m = modules[name]
            bn = modules[bn_of[name]] if bn_of.get(name) else None
            self.layers.append((m, bn, keep.to(m.weight.device, torch.float32), ~keep.to(m.weight.device)))

    @property
    def phase(self) -> str:
        """"regularize" while reg grows, then "stabilize"."""
        return "stabilize" if self.reg >= self.cfg.reg_ceiling else "regularize"

    def penalty(self) -> Tensor:
        total = None
        for m, _, keep, _ in self.layers:
            w = m.weight.flatten(1)
            gram = w @ w.T
            off = 1 - torch.outer(keep, keep)  # zero on kept-kept entries
            term = (gram * off).pow(2).sum() / gram.shape[0] ** 2
            total = term if total is None else total + term
        return self.cfg.gram_weight * self.reg * total

    @torch.no_grad()
    def apply_l2(self) -> None:
        for m, bn, _, drop in self.layers:
            params = [m.weight] + ([bn.weight, bn.bias] if bn is not None else [])
            for p in params:
                if p.grad is not None:
                    p.grad[drop] += self.reg * p[drop]

    def step(self) -> None:
        self.iteration += 1
        if self.iteration % self.cfg.update_every == 0:
            self.reg = min(self.reg + self.cfg.reg_step, self.cfg.reg_ceiling)

    @torch.no_grad()
    def pruned_norms(self) -> tuple[float, float, float]:
        """(mean L2 of pruned filters, mean of |gamma| + |beta| of their BN, mean L2 of kept filters)."""
        pruned, bn_vals, kept = [], [], []
        for m, bn, _, drop in self.layers:
            norms = m.weight.flatten(1).norm(dim=1)
            pruned.append(norms[drop])
            kept.append(norms[~drop])
            if bn is not None:
                bn_vals.append(bn.weight[drop].abs() + bn.bias[drop].abs())
        cat = lambda xs: torch.cat(xs).mean().item() if xs else 0.0  # noqa: E731
        return cat(pruned), cat(bn_vals), cat(kept)
