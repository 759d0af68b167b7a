"""The fitness proxy: prune a pretrained model with a candidate metric, fine-tune briefly,
measure validation accuracy.

A TaskContext is built once per worker and task: the pretrained model, its StatTable, the
layer structure. `evaluate(expression, stage)` then
  1. scores every filter with the expression (vectorized over all layers),
  2. turns the scores into keep masks with the configured allocator,
  3. zeroes the pruned filters and their BN scale and shift (the channel then outputs 0),
  4. "screen": recalibrates BN statistics on training images, no training (zero-cost proxy);
     "full": the screen, then `finetune_steps` SGD steps with the pruned filters held at 0,
  5. returns the validation accuracy (never test) with kept FLOPs / parameters and seconds.
The data order is fixed by `data_seed`, so all candidates see the same stream (common random
numbers): identical masks give identical fitness.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evoprune.data import iterate
from evoprune.errors import EvopruneError
from evoprune.primitives.collect import StatTable, task_stats
from evoprune.primitives.expr import Node, check_scores, evaluate, parse, scores_by_layer
from evoprune.primitives.layers import structure
from evoprune.tasks import get_task
from evoprune.workers.allocators import ALLOCATORS, allocate, kept_share, mask_hash, mask_targets

STAGES = ("screen", "full")


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    tasks: tuple[str, ...] = ("digits-cnn",)  # fitness = geometric mean of their val accuracies
    allocator: str = "uniform"  # uniform | global | flops
    ratio: float = 0.75  # share of filters pruned (uniform: per layer; global: overall); at 0.5 the
    #                      digits proxy recovers ~99% with any metric and cannot tell them apart
    flops_reduction: float = 0.5  # allocator "flops": share of prunable-layer MACs removed
    finetune_steps: int = 15  # SGD steps of the full proxy
    batch_size: int = 64  # images per fine-tune step
    lr: float = 0.01  # fine-tune learning rate (constant, Nesterov momentum 0.9)
    weight_decay: float = 5e-4
    stat_images: int = 256  # training images the statistics are collected on
    recalibrate_images: int = 512  # training images for BN recalibration (screen and full)
    val_images: int = 0  # validation images scored (0 = all)
    data_seed: int = 0  # the fixed data order shared by all candidates
    screen: bool = True  # racing: screen every new candidate, fine-tune only the best share
    promote: float = 0.5  # share of a generation's screened candidates that get the full proxy
    timeout_s: float = 600.0  # per evaluation (Ray evaluator)

    def __post_init__(self):
        checks = [
            (len(self.tasks) >= 1 and all(isinstance(t, str) for t in self.tasks), "tasks: a non-empty list of names"),
            (self.allocator in ALLOCATORS, f"allocator must be one of {ALLOCATORS}"),
            (0 < self.ratio < 1, "ratio must be in (0, 1)"),
            (0 < self.flops_reduction < 1, "flops_reduction must be in (0, 1)"),
            (self.finetune_steps >= 0, "finetune_steps must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.stat_images >= 1, "stat_images must be >= 1"),
            (self.recalibrate_images >= 0, "recalibrate_images must be >= 0"),
            (self.val_images >= 0, "val_images must be >= 0"),
            (0 < self.promote <= 1, "promote must be in (0, 1]"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"[proxy] {msg}")


@dataclass
class TaskResult:
    accuracy: float  # validation top-1 after the stage
    kept_flops: float  # share of the prunable layers' MACs left
    kept_params: float  # share of their parameters left
    seconds: float
    mask: str  # hash of the masks


@dataclass
class FitnessRecord:
    expression: str
    stage: str  # screen | full
    fitness: float  # geometric mean of the tasks' accuracies; 0 when invalid
    valid: bool
    reason: str = ""
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FitnessRecord":
        d = dict(d)
        d["tasks"] = {k: TaskResult(**v) for k, v in d.get("tasks", {}).items()}
        return cls(**d)


def invalid(expression: str, reason: str, stage: str = "screen") -> FitnessRecord:
    return FitnessRecord(expression, stage, 0.0, False, reason)


def geometric_mean(values: list[float]) -> float:
    if not values or min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


class TaskContext:
    """One task, loaded once: the pretrained model, its statistics and layer structure."""

    def __init__(self, task_name: str, cfg: ProxyConfig, stats: list[str], *, data_root=None, cache_dir=None,
                 device: str | torch.device = "cpu", tasks_file=None):
        from evoprune.pretrain import pretrained

        self.cfg, self.device = cfg, torch.device(device)
        pre = pretrained(get_task(task_name, tasks_file), data_root=data_root, cache_dir=cache_dir,
                         device=str(self.device))
        self.name, self.data = task_name, pre.data
        self.base = pre.model.to(self.device).eval()
        self.table: StatTable = task_stats(pre, stats, n_images=cfg.stat_images, seed=cfg.data_seed,
                                           device=self.device)
        example = next(iterate(self.data, self.data.train, batch_size=2, device=self.device))[0]
        s = structure(self.base, example)
        self.macs, self.params, self.inputs_from, self.bn_of = s.macs, s.params, s.inputs_from, s.bn_of

    # ------------------------------------------------------------------ masks
    def masks(self, node: Node) -> tuple[dict[str, Tensor] | None, str]:
        """Keep masks for the candidate, or (None, reason) when its scores are invalid."""
        scores = evaluate(node, self.table)
        validity = check_scores(scores, self.table)
        if not validity.ok:
            return None, validity.reason
        c = self.cfg
        return allocate(c.allocator, scores_by_layer(scores, self.table), ratio=c.ratio,
                        flops_reduction=c.flops_reduction, macs=self.macs, inputs_from=self.inputs_from), ""

    # ------------------------------------------------------------------ the proxy
    def run(self, masks: dict[str, Tensor], stage: str) -> TaskResult:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.base)
        zero = self._zeroer(model, masks)
        zero()
        if self.cfg.recalibrate_images:
            self._recalibrate(model)
        if stage == "full" and self.cfg.finetune_steps:
            self._finetune(model, zero)
            if self.cfg.recalibrate_images:
                self._recalibrate(model)
        acc = self._accuracy(model)
        return TaskResult(accuracy=acc, kept_flops=kept_share(masks, self.macs, self.inputs_from),
                          kept_params=kept_share(masks, self.params, self.inputs_from),
                          seconds=time.perf_counter() - t0, mask=mask_hash(masks))

    def _zeroer(self, model: nn.Module, masks: dict[str, Tensor]):
        """A function that (re)sets the pruned filters, their biases and BN scale/shift to 0."""
        targets = mask_targets(model, masks, self.bn_of)
        params = [p for p, _ in targets]
        factors = [k.to(p.dtype).view(-1, *[1] * (p.dim() - 1)) for p, k in targets]

        @torch.no_grad()
        def zero():
            # one fused multiply, no host sync: boolean-mask indexing would sync the GPU per tensor
            torch._foreach_mul_(params, factors)
        return zero

    @torch.no_grad()
    def _recalibrate(self, model: nn.Module) -> None:
        """Re-estimate BN running statistics for the pruned network (a cumulative average)."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x, _ in iterate(self.data, self.data.train, batch_size=256, shuffle=True, seed=self.cfg.data_seed + 1,
                            device=self.device, limit=self.cfg.recalibrate_images):
            model(x)
        for m in bns:
            m.momentum = 0.1
        model.eval()

    def _finetune(self, model: nn.Module, zero) -> None:
        c = self.cfg
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)
        model.train()
        step, epoch = 0, 0
        while step < c.finetune_steps:
            for x, y in iterate(self.data, self.data.train, batch_size=c.batch_size, shuffle=True,
                                augment=self.data.augment, seed=c.data_seed * 1000 + epoch, device=self.device,
                                drop_last=True):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                zero()  # pruned filters stay pruned
                step += 1
                if step >= c.finetune_steps:
                    break
            epoch += 1
        model.eval()

    def _accuracy(self, model: nn.Module) -> float:
        from evoprune.train import accuracy

        return accuracy(model, self.data, self.data.val, device=self.device, limit=self.cfg.val_images or None)


def evaluate_expression(contexts: dict[str, TaskContext], expression: str, stage: str = "full",
                        worker: str = "") -> FitnessRecord:
    """Score one candidate on every task; never raises for a bad candidate."""
    t0 = time.perf_counter()
    worker = worker or f"pid{os.getpid()}"
    try:
        node = parse(expression)
    except EvopruneError as e:
        return invalid(expression, f"parse error: {e}", stage)
    results = {}
    for name, ctx in contexts.items():
        masks, reason = ctx.masks(node)
        if masks is None:
            return FitnessRecord(expression, stage, 0.0, False, f"{name}: {reason}", seconds=time.perf_counter() - t0,
                                 worker=worker)
        results[name] = ctx.run(masks, stage)
    fitness = geometric_mean([r.accuracy for r in results.values()])
    return FitnessRecord(expression, stage, fitness, True, "", results, time.perf_counter() - t0, worker)
