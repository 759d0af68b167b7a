"""The fitness proxy: apply a candidate's masks to a pretrained model, fine-tune briefly,
measure validation accuracy.

A TaskContext is built once per worker and task: the pretrained model, the data and the layer
structure; it never sees the statistics or the formula. `run(masks, stage)`
  1. zeroes the pruned filters and their BN scale and shift (the channel then outputs 0),
  2. "screen": recalibrates BN statistics on training images, no training (zero-cost proxy);
     "full": the screen, then `finetune_steps` SGD steps with the pruned filters held at 0,
  3. returns the validation accuracy (never test) with kept FLOPs / parameters, seconds and
     the hash of the masks it applied.
The data order is fixed by `data_seed`, so all candidates see the same stream (common random
numbers): identical masks give identical fitness.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evoprune.allocators import ALLOCATORS, Allocation, Masks, kept_share
from evoprune.data import iterate
from evoprune.errors import EvopruneError
from evoprune.masks import mask_hash, mask_targets
from evoprune.primitives.layers import structure
from evoprune.records import FitnessRecord, TaskResult, geometric_mean
from evoprune.tasks import get_task
from evoprune.train import recalibrate_bn, seeded

STAGES = ("screen", "full")
SCORES = ("accuracy", "probability")
TRAINS = ("pruned", "masked")


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    tasks: tuple[str, ...] = ("digits-cnn", "digits-resnet8")  # fitness = geometric mean of their scores:
    #                         two architectures, so a winner must work on more than the one it was found on
    allocator: str = "uniform"  # uniform | global | flops | pfp | spectral (docs/allocators.md)
    ratio: float = 0.75  # share of filters pruned (uniform: per layer; others: overall); at 0.5 the
    #                      digits proxy recovers ~99% with any metric and cannot tell them apart
    flops_reduction: float = 0.5  # share of prunable-layer MACs removed (flops; pfp/spectral, target "flops")
    target: str = ""  # ratio | flops | tau (spectral alone); "": flops for the flops allocator, else ratio
    tau: float = 0.01  # spectral: share of each layer's spectral energy it may lose
    finetune_steps: int = 15  # SGD steps of the full proxy
    batch_size: int = 64  # images per fine-tune step
    lr: float = 0.01  # fine-tune learning rate (constant, Nesterov momentum 0.9)
    weight_decay: float = 5e-4
    stat_images: int = 256  # training images the statistics are collected on
    recalibrate_images: int = 512  # training images for BN recalibration (screen and full)
    val_images: int = 0  # validation images scored (0 = all)
    data_seed: int = 0  # the fixed data order shared by all candidates
    train: str = "pruned"  # pruned: fine-tune the physically smaller network (surgery on every layer whose
    #                        channels no other layer shares; a tied conv computes only its kept filters and
    #                        is widened back with zeros, transfer/surgery.py `Widen`); masked: the full-width
    #                        network with the pruned filters held at 0. The same function up to float order.
    score: str = "probability"  # what a task contributes to fitness: probability (mean softmax probability
    #                         of the true class on val: continuous) | accuracy (top-1 on val: on 431 images
    #                         it moves in steps of 0.23 points, and the proxy check found it too coarse)
    batch_candidates: int = 1  # K > 1: a worker trains K jobs at once as one vmapped model (the masked proxy,
    #                            workers/batched.py): on a GPU a step then costs about what one candidate's does
    screen: bool = True  # racing: screen every new candidate, fine-tune only the best share
    promote: float = 0.5  # share of a generation's screened candidates that get the full proxy
    timeout_s: float = 600.0  # per evaluation (Ray evaluator)

    def __post_init__(self):
        checks = [
            (len(self.tasks) >= 1 and all(isinstance(t, str) for t in self.tasks), "tasks: a non-empty list of names"),
            (self.allocator in ALLOCATORS, f"allocator must be one of {ALLOCATORS}"),
            (0 < self.ratio < 1, "ratio must be in (0, 1)"),
            (0 < self.flops_reduction < 1, "flops_reduction must be in (0, 1)"),
            (0 < self.tau < 1, "tau must be in (0, 1)"),
            (0 <= self.finetune_steps <= 1_000_000, "finetune_steps must be in [0, 1000000]"),
            (1 <= self.batch_size <= 65_536, "batch_size must be in [1, 65536]"),
            (0 < self.lr <= 10, "lr must be in (0, 10] (SGD diverges long before)"),
            (0 <= self.weight_decay <= 1, "weight_decay must be in [0, 1]"),
            (1 <= self.stat_images <= 100_000, "stat_images must be in [1, 100000]"),
            (0 <= self.recalibrate_images <= 10_000_000, "recalibrate_images must be in [0, 10000000]"),
            (self.val_images >= 0, "val_images must be >= 0"),
            (0 < self.promote <= 1, "promote must be in (0, 1]"),
            (1 <= self.batch_candidates <= 1024, "batch_candidates must be in [1, 1024]"),
            (self.score in SCORES, f"score must be one of {', '.join(SCORES)}"),
            (self.train in TRAINS, f"train must be one of {', '.join(TRAINS)}"),
            (0 < self.timeout_s <= 7 * 86400, "timeout_s must be in (0, 604800] (a week)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"[proxy] {msg}")
        try:
            self.allocation
        except EvopruneError as e:
            raise EvopruneError(f"[proxy] {e}") from None

    @property
    def allocation(self) -> Allocation:
        return Allocation(kind=self.allocator, ratio=self.ratio, flops_reduction=self.flops_reduction,
                          target=self.target, tau=self.tau)


@dataclass(frozen=True)
class Job:
    """One candidate to score: its masks per task, made by the driver (evoprune.masks)."""

    key: str  # the engine's handle for the result
    expression: str  # for the record and the logs; workers never parse it
    stage: str  # screen | full
    masks: dict[str, Masks]  # task -> layer -> BoolTensor[C_out] (True = keep)
    data_seed: int | None = None  # another data order than the proxy's (validation); None: the proxy's


class TaskContext:
    """One task, loaded once by a worker: the pretrained model, its data and layer structure."""

    def __init__(self, task_name: str, cfg: ProxyConfig, *, data_root=None, cache_dir=None,
                 device: str | torch.device = "cpu", tasks_file=None, pretrained=None):
        """`pretrained`: the task's Pretrained (model and data) as the driver holds it; without
        it, loaded from the cache (trained there on first use)."""
        from evoprune.pretrain import pretrained as load

        self.cfg, self.device = cfg, torch.device(device)
        pre = pretrained or load(get_task(task_name, tasks_file), data_root=data_root, cache_dir=cache_dir,
                                 device=str(self.device))
        self.name, self.data = task_name, pre.data
        self.base = copy.deepcopy(pre.model).to(self.device).eval()
        self.example = next(iterate(self.data, self.data.train, batch_size=2, device=self.device))[0]
        s = structure(self.base, self.example)
        self.macs, self.bn_of = s.macs, s.bn_of
        self.structure = s
        self.out_channels = s.out_channels
        self._independent: set[str] | None = None
        self._narrows: bool | None = None
        self._trains_alike: bool | None = None

    @property
    def independent(self) -> set[str]:
        """The layers whose output channels no other layer shares: these the pruned proxy cuts."""
        if self._independent is None:
            from evoprune.transfer.surgery import independent_layers

            self._independent = set(independent_layers(self.base, self.example, list(self.macs)))
        return self._independent

    def run(self, masks: Masks, stage: str, data_seed: int | None = None, clock=None) -> TaskResult:
        """`clock(name)`: a context manager timing each phase (benchmarks/proxy_profile.py)."""
        t0 = time.perf_counter()
        clock = clock or _untimed
        seed = self.cfg.data_seed if data_seed is None else data_seed
        with clock("copy the model"):
            model = copy.deepcopy(self.base)
        with clock("apply the masks"):
            zero = self._apply(model, masks, self.trains)
        with seeded(seed, self.device):  # dropout draws from torch's global RNG: the same draws every run
            if self.cfg.recalibrate_images:
                with clock("recalibrate BN"):
                    self._recalibrate(model, seed)
            if stage == "full" and self.cfg.finetune_steps:
                with clock("fine-tune"):
                    self._finetune(model, zero, seed)
                if self.cfg.recalibrate_images:
                    with clock("recalibrate BN again"):
                        self._recalibrate(model, seed)
        with clock("validation pass"):
            acc, prob, bad = self._scores(model)
        kept_flops, kept_params = self.kept(masks)
        return TaskResult(accuracy=acc, kept_flops=kept_flops, kept_params=kept_params,
                          seconds=time.perf_counter() - t0, mask=mask_hash(masks),
                          score=prob if self.cfg.score == "probability" else None, diverged=bad > 0)

    def kept(self, masks: Masks) -> tuple[float, float]:
        """(MACs, parameters) left of the masked layers and the depthwise convs that follow them."""
        s = self.structure
        layers = [*masks, *s.follower_macs]
        return (kept_share(masks, s.cost_macs, s.inputs_from, layers),
                kept_share(masks, s.cost_params, s.inputs_from, layers))

    @property
    def trains(self) -> str:
        """What the proxy trains: "pruned" (the cut network) where the config asks for it and the
        task's cut network trains as its masked one does (`trains_alike`), else "masked"."""
        return "pruned" if self.cfg.train == "pruned" and self.trains_alike else "masked"

    def _apply(self, model: nn.Module, masks: Masks, train: str):
        """Zero the pruned filters; with `train` "pruned", then cut them out of every layer whose
        channels no other layer shares (Torch-Pruning). Returns what keeps the rest (tied layers) at 0."""
        zero = self._zeroer(model, self.structure.with_followers(masks))
        zero()
        if train == "masked":
            return zero
        from evoprune.transfer.surgery import narrow_tied, surgery

        cut = {n: m for n, m in masks.items() if n in self.independent and not m.all()}
        surgery(model, {n: m.to(self.device) for n, m in cut.items()}, self.example)
        tied = {n: m for n, m in masks.items() if n not in cut}
        follow = self.structure.follower_masks(tied, cut=cut)  # their channels were not cut
        if self.narrows:
            for n in narrow_tied(model, tied, self.bn_of):
                del tied[n]
        zero = self._zeroer(model, {**tied, **follow})
        from evoprune.transfer.layout import channels_last_convs, use_channels_last

        for name in channels_last_convs(model, self.conv_inputs):  # on the CPU: narrow convs on large maps
            use_channels_last(model.get_submodule(name))
        return zero

    @functools.cached_property
    def conv_inputs(self) -> dict[str, tuple[int, ...]]:
        """Each conv's input shape on the pretrained model, traced once: cutting channels keeps the
        maps, which is what the pruned proxy's choice of layout reads (transfer/layout.py)."""
        from evoprune.transfer.layout import conv_inputs

        return conv_inputs(self.base, self.example)

    @property
    def narrows(self) -> bool:
        """Whether the tied layers can compute only their kept filters (`narrow_tied`): checked once
        per task on the pretrained model, against the masked network's output, so an architecture
        where a conv's output feeds more than its BN keeps those layers masked instead."""
        if self._narrows is None:
            from evoprune.transfer.surgery import narrow_tied

            masks = self._random_masks(0, [n for n in self.out_channels if n not in self.independent])
            masked = copy.deepcopy(self.base)
            self._zeroer(masked, self.structure.with_followers(masks))()
            narrowed = copy.deepcopy(masked)
            narrow_tied(narrowed, masks, self.bn_of)
            with torch.no_grad():
                a, b = masked(self.example), narrowed(self.example)
            self._narrows = bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-6))
        return self._narrows

    @property
    def trains_alike(self) -> bool:
        """Whether the cut network trains as the masked one does: checked once per task with a proxy
        run in miniature of each (BN recalibrated as the config says, on fewer images, then two
        short fine-tune steps) from the pretrained weights, on two draws of random masks, in float64;
        then one training batch through both, with the same RNG state. In float64 they part by
        about 1e-13 of their largest output where the function is the same (in float32 floating-
        point order alone can part them by 1e-2 and more after two steps, where BN normalizes a few
        values); where it is not, as with dropout reading a cut layer (MobileNetV2's classifier:
        it draws a mask over fewer features), by 0.1 to 1. Over 1e-6 the task trains masked: the
        same fitness, at the masked cost."""
        if self._trains_alike is None:
            batch = min(16, self.cfg.batch_size)
            x = next(self.train_batches(1, steps=1, batch_size=batch))[0].double()
            self._trains_alike = True
            for draw in (1, 2):
                masks = self._random_masks(draw, list(self.out_channels))
                outs = []
                for train in ("masked", "pruned"):
                    model = copy.deepcopy(self.base)
                    try:
                        zero = self._apply(model, masks, train)
                    except EvopruneError:  # surgery refuses this model's structure: it trains masked
                        self._trains_alike = False
                        return False
                    model.double()
                    with seeded(0, self.device):
                        if self.cfg.recalibrate_images:
                            self._recalibrate(model, 0, images=32, dtype=torch.float64)
                        self._finetune(model, zero, 0, steps=2, batch_size=batch, dtype=torch.float64)
                        with torch.no_grad():
                            outs.append(model.train()(x))
                a, b = outs
                if not float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()) + 1e-9:
                    self._trains_alike = False
                    break
        return self._trains_alike

    def _random_masks(self, seed: int, names: list[str]) -> Masks:
        """Masks keeping each filter of the layers `names` with probability 1/2 (the first always,
        so no layer loses them all), drawn from `seed`: what the per-task checks prune. A layer with
        a period (a grouped conv's) keeps the same positions in each of its parts."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for n in names:
            p = self.structure.periods.get(n, 1)
            keep = (torch.rand(self.out_channels[n] // p, generator=gen) < 0.5).index_fill(0, torch.tensor([0]), True)
            out[n] = keep.repeat(p)
        return out

    def _zeroer(self, model: nn.Module, masks: Masks):
        """A function that (re)sets the pruned filters, their biases and BN scale/shift to 0."""
        targets = mask_targets(model, masks, self.structure.all_bn_of)
        params = [p for p, _ in targets]
        factors = [k.to(p.dtype).view(-1, *[1] * (p.dim() - 1)) for p, k in targets]

        @torch.no_grad()
        def zero():
            # one fused multiply, no host sync: boolean-mask indexing would sync the GPU per tensor
            if params:
                torch._foreach_mul_(params, factors)
        return zero

    def _recalibrate(self, model: nn.Module, seed: int, images: int | None = None, dtype=None) -> None:
        """Re-estimate BN running statistics for the pruned network (a cumulative average)."""
        recalibrate_bn(model, self.data, images=images or self.cfg.recalibrate_images, seed=seed + 1,
                       device=self.device, dtype=dtype)

    def train_batches(self, seed: int, steps: int | None = None, batch_size: int | None = None):
        """The fine-tune's `finetune_steps` batches: the same stream for every candidate (and for
        the batched proxy), epoch after epoch of the train split in the order `seed` fixes."""
        c = self.cfg
        steps, batch_size = steps or c.finetune_steps, batch_size or c.batch_size
        step, epoch = 0, 0
        while step < steps:
            before = step
            for batch in iterate(self.data, self.data.train, batch_size=batch_size, shuffle=True,
                                 augment=self.data.augment, seed=seed * 1000 + epoch, device=self.device,
                                 drop_last=True):
                yield batch
                step += 1
                if step >= steps:
                    return
            if step == before:
                raise EvopruneError(f"[proxy] batch_size {batch_size} is larger than the train split of "
                                    f"{self.name} ({len(self.data.train)} images)")
            epoch += 1

    def optimizer(self, params) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.SGD(params, lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)

    def _finetune(self, model: nn.Module, zero, seed: int, dtype=None, **batches) -> None:
        opt = self.optimizer(model.parameters())
        model.train()
        for x, y in self.train_batches(seed, **batches):
            x = x if dtype is None else x.to(dtype)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            zero()  # pruned filters stay pruned
        model.eval()

    def _scores(self, model: nn.Module) -> tuple[float, float, int]:
        from evoprune.train import true_class_probability

        return true_class_probability(model, self.data, self.data.val, device=self.device,
                                      limit=self.cfg.val_images or None)


@contextlib.contextmanager
def _untimed(name: str):
    yield


def _check_masks(contexts: dict[str, TaskContext], job: Job) -> None:
    if missing := sorted(set(contexts) - set(job.masks)):
        raise ValueError(f"job {job.key} carries no masks for {missing}")


def _record(job: Job, results: dict[str, TaskResult], seconds: float, worker: str) -> FitnessRecord:
    fitness = geometric_mean([r.fitness_score for r in results.values()])
    return FitnessRecord(job.expression, job.stage, fitness, True, "", results, seconds, worker or f"pid{os.getpid()}")


def evaluate_job(contexts: dict[str, TaskContext], job: Job, worker: str = "") -> FitnessRecord:
    """Train the job's masks on every task; the record carries the hash of the masks applied."""
    t0 = time.perf_counter()
    _check_masks(contexts, job)
    results = {name: ctx.run(job.masks[name], job.stage, job.data_seed) for name, ctx in contexts.items()}
    return _record(job, results, time.perf_counter() - t0, worker)


def evaluate_jobs(contexts: dict[str, TaskContext], jobs: list[Job], worker: str = "") -> list[FitnessRecord]:
    """Every job's record, in order. With `[proxy] batch_candidates` K > 1 the jobs of one stage and
    data order are trained K at a time (workers/batched.py); each record's seconds is its share."""
    from evoprune.workers.batched import run_batch

    k = next(iter(contexts.values())).cfg.batch_candidates if contexts else 1
    if k <= 1:
        return [evaluate_job(contexts, j, worker) for j in jobs]
    for job in jobs:
        _check_masks(contexts, job)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.stage, job.data_seed), []).append(i)
    out: dict[int, FitnessRecord] = {}
    for (stage, seed), idx in groups.items():
        for c in range(0, len(idx), k):
            chunk, t0 = idx[c: c + k], time.perf_counter()
            per_task = {name: run_batch(ctx, [jobs[i].masks[name] for i in chunk], stage, seed)
                        for name, ctx in contexts.items()}
            share = (time.perf_counter() - t0) / len(chunk)
            for pos, i in enumerate(chunk):
                out[i] = _record(jobs[i], {name: r[pos] for name, r in per_task.items()}, share, worker)
    return [out[i] for i in range(len(jobs))]

