"""K candidates in one step: the masked proxy of K jobs trained as one vmapped model.

One ResNet-20 fine-tune fills about 1% of an H100; the step's cost is launching kernels, not
arithmetic. Here the K candidates' parameters and BN buffers are stacked along a leading
dimension (`torch.func.stack_module_state`) and every forward runs through `vmap` over them
with the same input batch (all candidates see the same data stream anyway: common random
numbers), so a step launches the kernels of one model for K of them. The loss is the sum of
the K candidates' losses: the parameters are disjoint, so each gets exactly its own gradient,
and SGD (momentum, Nesterov, weight decay: element-wise) on the stacked tensors is K separate
optimizers. Pruned filters are held at 0 by one fused multiply with stacked 0/1 factors.

It is the masked proxy (`[proxy] train = "masked"`) computed K at a time: the same function up to
floating-point order (tests/test_batched.py checks K = 3 against three single runs on the CPU).
BN recalibration is the cumulative average of the masked proxy (PyTorch's `momentum = None`),
written as momentum 1/n for the n-th batch, which vmap can batch (`momentum = None` reads the
batch counter on the host).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from evoprune.allocators import Masks
from evoprune.data import iterate
from evoprune.masks import mask_hash, mask_targets
from evoprune.records import TaskResult
from evoprune.train import autocast, classified_right, seeded, true_class_prob


class Stack:
    """K masked copies of a context's pretrained model, as stacked tensors."""

    def __init__(self, ctx, masks_list: list[Masks]):
        self.ctx, self.k = ctx, len(masks_list)
        names = {id(p): n for n, p in ctx.base.named_parameters()}
        factors: dict[str, list[torch.Tensor | None]] = {}
        for i, masks in enumerate(masks_list):
            for p, keep in mask_targets(ctx.base, ctx.structure.with_followers(masks), ctx.structure.all_bn_of):
                factors.setdefault(names[id(p)], [None] * self.k)[i] = \
                    keep.to(p.dtype).view(-1, *[1] * (p.dim() - 1)).expand_as(p)
        # K stacked copies of the pretrained tensors (torch.stack copies: the base is never touched);
        # the parameters are new leaves that require grad
        self.params, self.buffers = stack_module_state([ctx.base] * self.k)
        shape = {n: p.shape[1:] for n, p in self.params.items()}
        self.factors = {n: torch.stack([f if f is not None else torch.ones(shape[n], device=self.params[n].device)
                                        for f in fs]) for n, fs in factors.items()}
        self.skeleton = copy.deepcopy(ctx.base).to("meta")
        self.bns = [m for m in self.skeleton.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.zero()

    @torch.no_grad()
    def zero(self) -> None:
        names = list(self.factors)
        if names:
            torch._foreach_mul_([self.params[n] for n in names], [self.factors[n] for n in names])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B, classes]: every candidate on the same batch."""
        def one(params, buffers, inputs):
            return functional_call(self.skeleton, (params, buffers), (inputs,))
        return vmap(one, in_dims=(0, 0, None), randomness="same")(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.skeleton.train(mode)

    @torch.no_grad()
    def recalibrate(self, seed: int) -> None:
        """The masked proxy's BN recalibration: running statistics reset, then the cumulative
        average over the recalibration batches (momentum 1/n for the n-th)."""
        ctx = self.ctx
        if not self.bns or not ctx.cfg.recalibrate_images:
            return
        for name, b in self.buffers.items():
            if name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1)
        self.train()
        for n, (x, _) in enumerate(iterate(ctx.data, ctx.data.train, batch_size=256, shuffle=True, seed=seed + 1,
                                           device=ctx.device, limit=ctx.cfg.recalibrate_images), start=1):
            for m in self.bns:
                m.momentum = 1.0 / n
            self.forward(x)
        for m in self.bns:
            m.momentum = 0.1
        self.train(False)

    def finetune(self, seed: int) -> None:
        opt = self.ctx.optimizer(list(self.params.values()))  # element-wise: K optimizers in one
        self.train()
        for x, y in self.ctx.train_batches(seed):
            out = self.forward(x)  # [K, B, classes]
            # the sum of the K mean losses: each candidate's gradient is its own
            loss = F.cross_entropy(out.flatten(0, 1), y.repeat(self.k), reduction="sum") / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.zero()
        self.train(False)

    @torch.no_grad()
    def scores(self) -> list[tuple[float, float, int]]:
        """(top-1 accuracy, mean true-class probability, images with non-finite outputs) on val,
        per candidate."""
        ctx = self.ctx
        self.train(False)
        correct = torch.zeros(self.k, device=ctx.device)
        prob = torch.zeros(self.k, device=ctx.device, dtype=torch.float64)
        bad = torch.zeros(self.k, device=ctx.device)
        total = 0
        for x, y in iterate(ctx.data, ctx.data.val, batch_size=512, device=ctx.device,
                            limit=ctx.cfg.val_images or None):
            with autocast(ctx.device):
                out = self.forward(x).float()
            correct += classified_right(out, y).sum(1)
            prob += true_class_prob(out, y).sum(1).double()
            bad += out.isfinite().all(-1).logical_not().sum(1)
            total += len(y)
        return [(float(a) / max(total, 1), float(p) / max(total, 1), int(b))
                for a, p, b in zip(correct.cpu(), prob.cpu(), bad.cpu())]


def run_batch(ctx, masks_list: list[Masks], stage: str, data_seed: int | None = None) -> list[TaskResult]:
    """The masked proxy of every mask set in `masks_list`, trained together: one TaskResult each
    (`seconds` is the batch's time divided among its candidates)."""
    t0 = time.perf_counter()
    seed = ctx.cfg.data_seed if data_seed is None else data_seed
    stack = Stack(ctx, masks_list)
    with seeded(seed, ctx.device):  # as a single run: vmap's "same" randomness draws what it draws
        stack.recalibrate(seed)
        if stage == "full" and ctx.cfg.finetune_steps:
            stack.finetune(seed)
            stack.recalibrate(seed)
    scores = stack.scores()
    share = (time.perf_counter() - t0) / len(masks_list)
    return [TaskResult(accuracy=acc, kept_flops=ctx.kept(m)[0], kept_params=ctx.kept(m)[1], seconds=share,
                       mask=mask_hash(m),
                       score=prob if ctx.cfg.score == "probability" else None, diverged=bad > 0)
            for m, (acc, prob, bad) in zip(masks_list, scores)]
