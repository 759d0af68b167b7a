"""`evoprune prune`: apply a metric to a task's pretrained network, for real, in five phases.

    measure    the unpruned model: MACs, parameters, latency, test accuracy;
    masks      score every filter with the metric (statistics on training images) and keep the
               best of each layer by the allocator (`evoprune.masks.make_masks`, as the search
               does); layers are those inside blocks ("in-block", as TPP's scripts) or every
               layer with tied channels pruned together ("coupled");
    tpp        (optional) TPP regularization: Gram penalty + growing L2 on the pruned filters
               and their BN, then a stabilize phase;
    cut        the pruned filters are hard-zeroed and Torch-Pruning removes them; the smaller
               model must compute what the masked one did (checked on a batch, eval mode)
               before anything else happens;
    retrain    the task's retraining recipe (TPP's CIFAR schedule unless the task sets a
               shorter one), AMP + channels_last on GPU;
    report     params, MACs, speedup, latency, test accuracy before/after, the schedule used;
               the whole pruned model; a "transfer" evaluation in the database when the metric
               has a candidate there.

Everything lands in the output folder: config.json, masks.pt, checkpoint.pt (the weights,
the optimizer and a `PruneState`; rewritten after every retraining epoch and, at pass
boundaries, every TPP_SAVE_EVERY_S of TPP; `--resume` continues from it), pruned_model.pt,
report.json. Launched by torchrun, both training phases run under DDP (see docs/transfer.md).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from rich.console import Console
from torch import Tensor, nn

from evoprune import dist
from evoprune.allocators import Allocation, Masks
from evoprune.data import iterate
from evoprune.errors import Diverged, EvopruneError
from evoprune.masks import UnusableMetric, make_masks, mask_hash, require_statistics, stat_table
from evoprune.metricref import MetricRef
from evoprune.primitives.expr import canonical, canonical_hash, parse
from evoprune.primitives.layers import Structure, structure
from evoprune.progress import epoch_progress, progress
from evoprune.records import TransferRecord
from evoprune.tasks import RETRAIN, Recipe, get_task
from evoprune.train import TrainResult, accuracy, autocast, pick_device, recalibrate_bn, train
from evoprune.transfer.surgery import scope_groups, surgery, zero_pruned
from evoprune.transfer.tpp import TPPConfig, TPPRegularizer

SCOPES = ("in-block", "coupled")
CHECK_TOL = 1e-4  # surgery equivalence: max |pruned - masked| <= tol * max(1, max |masked|)
TPP_SAVE_EVERY_S = 60.0  # checkpoint interval of the TPP phase (at pass boundaries)
RECALIBRATE_IMAGES = 1024  # training images that re-estimate BN statistics where surgery's check needs it
FILES = ("config.json", "masks.pt", "checkpoint.pt", "pruned_model.pt", "report.json")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    task: str
    metric: str  # as given: ID, NAME, baseline:NAME or expr:EXPRESSION
    expression: str  # what it resolved to
    allocator: str = "uniform"  # uniform (per-layer ratio) | global | flops | pfp | spectral
    ratio: float = 0.5  # share of filters pruned (uniform: per layer; the others: overall)
    flops_reduction: float = 0.5  # share of the prunable layers' MACs removed (flops; pfp, spectral)
    target: str = ""  # ratio | flops | tau (spectral alone); "": what the allocator takes by default
    tau: float = 0.01  # spectral: share of each layer's spectral energy it may lose
    scope: str = "in-block"  # in-block (TPP's scripts) | coupled (tied channels pruned together)
    skip: tuple[str, ...] = ()  # glob patterns of layer names left whole
    # accept a cut that is not the masked model (a GroupNorm or LayerNorm over pruned channels
    # normalizes fewer of them): the difference is measured and reported, retraining repairs it
    approximate_cut: bool = False
    stat_images: int = 256  # training images the metric's statistics are collected on
    tpp: TPPConfig | None = field(default_factory=TPPConfig)  # None: prune without regularization
    retrain: Recipe = RETRAIN
    latency_batch: int = 64  # images per forward pass when timing

    def __post_init__(self):
        try:
            self.allocation
        except EvopruneError as e:
            raise EvopruneError(f"prune: {e}") from None
        checks = [(self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}"),
                  (self.stat_images >= 1, "stat images must be >= 1"),
                  (isinstance(self.approximate_cut, bool), "approximate_cut must be true or false"),
                  (self.latency_batch >= 1, "latency batch must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"prune: {msg}")

    @property
    def allocation(self) -> Allocation:
        return Allocation(kind=self.allocator, ratio=self.ratio, flops_reduction=self.flops_reduction,
                          target=self.target, tau=self.tau)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as they come back from JSON

    def schedule(self) -> str:
        """The TPP and retraining schedule in words (the report and the console state it)."""
        r = self.retrain
        tpp = "no TPP" if self.tpp is None else (
            f"TPP {self.tpp.total_iterations} iterations (reg +{self.tpp.reg_step:g} every {self.tpp.update_every} "
            f"up to {self.tpp.reg_ceiling:g}, then {self.tpp.stabilize_iters} at the ceiling; lr {self.tpp.lr:g})")
        return f"{tpp}; retraining {r.epochs} epochs, lr {r.lr:g} {r.schedule}, batch {r.batch_size}"


def prune_config(*, task: str, metric: str, ratio: float | None = None, flops_reduction: float | None = None,
                 allocator: str | None = None, tau: float | None = None, tpp: dict | None, retrain: dict,
                 tasks_file=None, db=None, **settings) -> PruneConfig:
    """The settings of a run from what the user gave: the metric resolved, the task's transfer
    recipe with `tpp` and `retrain` overrides over it (`tpp=None`: no TPP), one target (a
    ratio, a FLOPs reduction, or for the spectral allocator its tolerance alone)."""
    from evoprune.metricref import resolve

    allocator = allocator or ("flops" if flops_reduction is not None else "uniform")
    rank_only = allocator == "spectral" and ratio is None and flops_reduction is None
    if (ratio is None) == (flops_reduction is None) and not rank_only:
        raise EvopruneError("give exactly one of --ratio R and --flops-reduction F (or --allocator spectral with "
                            "--tau T alone)")
    if (allocator == "flops" and ratio is not None) or (allocator == "uniform" and flops_reduction is not None):
        raise EvopruneError("--flops-reduction goes with --allocator flops, --ratio with uniform (global, pfp and "
                            "spectral take either)")
    recipe = get_task(task, tasks_file).transfer  # the task's defaults; what is given replaces them
    source = resolve(metric, db)
    try:
        require_statistics(parse(source.expression))
    except UnusableMetric as e:
        raise EvopruneError(f"metric {metric}: {e}") from None
    target = "tau" if rank_only else "flops" if flops_reduction is not None else "ratio"
    return PruneConfig(task=task, metric=metric, expression=source.expression, allocator=allocator,
                       ratio=ratio if ratio is not None else 0.5,
                       flops_reduction=flops_reduction if flops_reduction is not None else 0.5,
                       target=target, tau=tau if tau is not None else 0.01,
                       tpp=None if tpp is None else recipe.tpp_config(**tpp),
                       retrain=replace(recipe.retrain, **retrain), **settings)


@dataclass
class Measured:
    """The unpruned model."""

    macs: int  # for one image
    params: int
    latency_ms: float
    test: float


@dataclass
class PruneState:
    """Where a prune run is and what it measured; the checkpoint holds it beside the weights."""

    phase: str = "tpp"  # "tpp": before surgery (regularizing, if TPP is on); "retrain": surgery done
    epoch: int = 0  # passes over the data finished in the current phase
    iteration: int = 0  # TPP iterations done
    tpp_seconds: float = 0.0
    base: Measured | None = None
    after_tpp_test: float | None = None  # test accuracy after TPP, before the pruned filters are zeroed
    pruned_test: float | None = None  # right after surgery, before retraining
    equivalence_max_diff: float | None = None
    equivalence_output_scale: float | None = None  # max |output| of the masked model there: what the diff is of
    exact_cut: bool = True  # False: the cut model is not the masked one (approximate_cut accepted the difference)
    tpp_norms: list[float] | None = None  # after TPP: mean L2 of pruned filters, |gamma|+|beta| of their BN, kept
    bn_recalibrated: bool = False  # surgery's check needed BN statistics re-estimated on both models

    @classmethod
    def from_checkpoint(cls, ck: dict) -> "PruneState":
        d = {f.name: ck.get(f.name, f.default) for f in fields(cls)}  # an older checkpoint lacks newer fields
        d["base"] = Measured(**d["base"]) if d["base"] is not None else None
        return cls(**d)


# --------------------------------------------------------------------------- masks
def choose_groups(model: nn.Module, example: Tensor, s: Structure, cfg: PruneConfig) -> list[list[str]]:
    names = [n for n in s.macs if not any(fnmatch.fnmatchcase(n, p) for p in cfg.skip)]
    groups = scope_groups(model, example, names, cfg.scope, s.out_channels)
    if not groups:
        raise EvopruneError(f"no prunable layers left on {cfg.task} (scope {cfg.scope}, skip {list(cfg.skip)})")
    return groups


def compute_masks(pre, model: nn.Module, example: Tensor, s: Structure, cfg: PruneConfig,
                  device: torch.device) -> Masks:
    """Keep masks (True = keep) for every pruned layer; tied layers get the same mask."""
    node = parse(cfg.expression)
    groups = choose_groups(model, example, s, cfg)
    try:
        require_statistics(node)
        table = stat_table(replace(pre, model=model), node.stats(), cfg.allocation, n_images=cfg.stat_images, seed=0,
                           device=device)
        return make_masks(node, table, cfg.allocation, s, groups)
    except UnusableMetric as e:  # still an UnusableMetric: a suite marks the (case, metric) n/a and goes on
        raise UnusableMetric(f"metric {cfg.metric} cannot rank the filters of {cfg.task}: {e}") from None
    except EvopruneError as e:
        raise EvopruneError(f"{e} (scope {cfg.scope}; --scope coupled prunes more layers)") from None


# --------------------------------------------------------------------------- measurements
def count(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """(MACs for one image, parameters), by Torch-Pruning's counter."""
    was = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example_inputs=example[:1])
    model.train(was)
    return int(macs), int(params)


@torch.no_grad()
def latency_ms(model: nn.Module, example: Tensor, batch: int, min_reps: int = 10, min_seconds: float = 0.5) -> float:
    """Median wall time of one eval-mode forward pass on `batch` images, in milliseconds, over
    at least `min_reps` passes and `min_seconds` (after 3 warm-up passes)."""
    model.eval()
    x = example[:1].expand(batch, *example.shape[1:]).contiguous()
    cuda = x.device.type == "cuda"
    if cuda:
        x = x.to(memory_format=torch.channels_last)
    times = []
    for i in range(10_000):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(x.device):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:  # warm-up passes first
            times.append(time.perf_counter() - t0)
            if len(times) >= min_reps and sum(times) >= min_seconds:
                break
    return sorted(times)[len(times) // 2] * 1000


@contextlib.contextmanager
def full_precision():
    """Plain fp32 convolutions and matmuls (no TF32 on GPUs), so the equivalence check compares
    the two models and not two roundings."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
@torch.no_grad()
def max_diff(masked_out: Tensor, pruned: nn.Module, x: Tensor) -> float:
    """max |pruned(x) - masked_out|, in eval mode and full precision."""
    pruned.eval()
    with full_precision():
        return (pruned(x) - masked_out).abs().max().item()


def check_equivalence(masked_out: Tensor, pruned: nn.Module, x: Tensor, recalibrated: bool = False,
                      before: str = "") -> float:
    diff = max_diff(masked_out, pruned, x)
    if not diff <= CHECK_TOL * max(1.0, masked_out.abs().max().item()):
        also = ", also with BN statistics re-estimated" if recalibrated else ""
        mixers = [n for n, m in pruned.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
        why = (f"a layer that normalizes channels together ({', '.join(mixers[:3])}{', ...' if len(mixers) > 3 else ''}"
               ": a GroupNorm or LayerNorm computes other statistics without the pruned channels) may read the pruned "
               "channels, or Torch-Pruning did not follow this model's structure; keep the layers feeding it whole "
               "with --skip GLOB, or accept a cut that retraining repairs with --approximate-cut") if mixers \
            else "Torch-Pruning did not follow this model's structure"
        raise EvopruneError(f"surgery {before}changed the model's outputs (max |diff| {diff:.3g}){also}: {why}; "
                            "nothing was retrained")
    return diff


# --------------------------------------------------------------------------- files
def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _prepare_out(out: Path, cfg: PruneConfig, resume: bool) -> None:
    """Check the folder against --resume; a new run writes its config.json."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise EvopruneError(f"--out {out} is a file, not a folder")
    if not resume:
        if any((out / f).exists() for f in FILES[1:]):  # a config.json alone: a run that failed at once
            raise EvopruneError(f"{out} already holds a prune run: pass --resume to continue it, or another --out")
        out.mkdir(parents=True, exist_ok=True)
        _write_json(cfg.to_dict(), cfg_path)
        return
    if not cfg_path.exists():
        raise EvopruneError(f"--resume: no prune run in {out} (config.json missing)")
    try:
        old = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:
        raise EvopruneError(f"--resume: {cfg_path} is unreadable ({e})") from None
    if not isinstance(old, dict):
        raise EvopruneError(f"--resume: {cfg_path} does not hold a prune configuration")
    new = cfg.to_dict()
    added = {f.name: f.default for f in fields(PruneConfig) if f.name not in old}  # settings newer than the run
    if diff := sorted(k for k in set(old) | set(new) if old.get(k, added.get(k)) != new.get(k)):
        raise EvopruneError(f"--resume: {out} was started with other settings ({', '.join(diff)} differ); "
                            "repeat the original command with --resume")
    if (out / "report.json").exists():
        raise EvopruneError(f"--resume: the run in {out} already finished (report.json exists)")
    _checkpoint(out)  # loads: a damaged file is reported now


def _load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message advises weights_only=False: advice never to pass on
        raise EvopruneError(f"--resume: {path} does not load as {what} ({type(e).__name__}: damaged, or not "
                            "written by evoprune prune); start again with another --out") from None


def _checkpoint(out: Path) -> dict | None:
    """The checkpoint to continue from; None when the run stopped before its first one (it then
    starts over: the masks are recomputed identically)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    ck = _load(path, "a prune checkpoint")
    need = {f.name for f in fields(PruneState)} | {"model", "opt"}
    if not isinstance(ck, dict) or not need <= set(ck) or ck["phase"] not in ("tpp", "retrain"):
        raise EvopruneError(f"--resume: {path} is not a checkpoint of evoprune prune; start again with another --out")
    return ck


def _stored_masks(path: Path, s: Structure) -> Masks:
    masks = _load(path, "masks")
    ok = isinstance(masks, dict) and all(
        isinstance(m, Tensor) and m.dtype == torch.bool and n in s.out_channels and m.shape == (s.out_channels[n],)
        for n, m in masks.items())
    if not ok or not masks:
        raise EvopruneError(f"--resume: {path} does not hold masks for this model; start again with another --out")
    return masks


# --------------------------------------------------------------------------- the run
@dataclass
class PruneRun:
    """What every phase works on."""

    cfg: PruneConfig
    out: Path
    device: torch.device
    pre: Any  # evoprune.pretrain.Pretrained
    model: nn.Module  # the model being pruned, on the device
    example: Tensor  # two training images, for tracing
    structure: Structure
    console: Console
    show: bool
    masks: Masks = field(default_factory=dict)

    @property
    def data(self):
        return self.pre.data

    def test(self) -> float:
        return accuracy(self.model, self.data, self.data.test, device=self.device)

    def save(self, state: PruneState, opt) -> None:
        """The checkpoint: state, weights, optimizer (rank 0 writes; every process waits)."""
        if dist.is_main():
            _atomic_save({**asdict(state), "model": self.model.state_dict(),
                          "opt": opt.state_dict() if opt is not None else {}}, self.out / "checkpoint.pt")
        dist.barrier()


def _setup(cfg: PruneConfig, out: Path, resume: bool, device, data_root, cache_dir, tasks_file,
           console: Console, show: bool) -> tuple[PruneRun, dict | None]:
    from evoprune.pretrain import pretrained

    device = dist.setup(pick_device(device))
    dist.on_main(lambda: _prepare_out(out, cfg, resume))
    ck = _checkpoint(out) if resume else None
    task = get_task(cfg.task, tasks_file)
    loaded = {}

    def load() -> None:  # one process trains a missing model; the others then read the cache
        loaded["pre"] = pretrained(task, data_root=data_root, cache_dir=cache_dir, device=str(device),
                                   show_progress=show, console=console)
    dist.on_main(load)
    pre = loaded.get("pre") or pretrained(task, data_root=data_root, cache_dir=cache_dir, device=str(device))
    model = copy.deepcopy(pre.model).to(device).eval()
    example = next(iterate(pre.data, pre.data.train, batch_size=2, device=device))[0]
    run = PruneRun(cfg, out, device, pre, model, example, structure(model, example), console, show)
    return run, ck


def measure(run: PruneRun) -> Measured:
    """Phase 1: the unpruned model."""
    macs, params = count(run.model, run.example)
    return Measured(macs, params, latency_ms(run.model, run.example, run.cfg.latency_batch), run.test())


def masks_phase(run: PruneRun, resuming: bool) -> Masks:
    """Phase 2: the masks, computed once by rank 0 and written to masks.pt (read back on resume)."""
    path = run.out / "masks.pt"
    if resuming and path.exists():
        return _stored_masks(path, run.structure)

    def make() -> Masks:
        masks = compute_masks(run.pre, run.model, run.example, run.structure, run.cfg, run.device)
        _atomic_save(masks, path)
        return masks
    return dist.on_main(make)


def regularize(run: PruneRun, state: PruneState, ck: dict | None) -> None:
    """Phase 3: TPP, to its end, from `ck` when resuming mid-TPP. A checkpoint is written at
    the end of a pass over the data when the last one is TPP_SAVE_EVERY_S old (a small data
    set has thousands of passes), and at the end."""
    cfg, tpp = run.cfg, run.cfg.tpp
    s = run.structure
    reg = TPPRegularizer(run.model, run.masks, s.bn_of, tpp,
                         followers={f: (m, s.all_bn_of[f]) for f, m in s.follower_masks(run.masks).items()})
    opt = torch.optim.SGD(run.model.parameters(), lr=tpp.lr, momentum=0.9, weight_decay=5e-4)
    if ck is not None:
        opt.load_state_dict(ck["opt"])
    reg.iteration = state.iteration
    net = dist.wrap(run.model, run.device)
    recipe = cfg.retrain
    t0 = last_save = time.perf_counter()
    before = state.tpp_seconds
    run.model.train()
    every = 20  # reading the loss waits for the GPU: the display is updated every 20 iterations

    def finite(loss: torch.Tensor) -> float:  # the mean over processes: each one stops, or none
        if not math.isfinite(value := dist.all_sum([float(loss.detach())], run.device)[0] / dist.world()):
            raise Diverged(f"TPP diverged: the loss is {value} at iteration {reg.iteration} of {tpp.total_iterations} "
                           f"(reg {reg.reg:g}, lr {tpp.lr:g}); nothing was cut",
                           "lower --tpp-lr, --reg-step or --gram-weight and start again with another --out")
        return value
    with progress("tpp", tpp.total_iterations, run.console, run.show, fields={"phase": "s", "reg": ".4f",
                  "loss": ".3f"}, log_every=max(every, tpp.total_iterations // 20)) as update:
        while not reg.done:
            for x, y in iterate(run.data, run.data.train, batch_size=max(1, recipe.batch_size // dist.world()),
                                shuffle=True, augment=recipe.augment or run.data.augment,
                                seed=recipe.seed * 100003 + 50021 + state.epoch, device=run.device, drop_last=True,
                                shard=dist.shard()):
                with autocast(run.device):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y) + reg.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                reg.apply_l2()
                opt.step()
                reg.step()
                if reg.iteration % every == 0 or reg.done:
                    update(reg.iteration, phase=reg.phase, reg=reg.reg, loss=finite(loss))
                if reg.done:
                    break
            state.epoch += 1
            state.iteration, state.tpp_seconds = reg.iteration, before + time.perf_counter() - t0
            due = reg.done or time.perf_counter() - last_save >= TPP_SAVE_EVERY_S
            if dist.all_sum([float(due)], run.device)[0]:  # one process's clock decides for all: saving
                # (the loss check, the barrier) is collective, and ranks whose clocks disagree would hang
                finite(loss)  # a checkpoint never holds a diverged model
                run.save(state, opt)
                last_save = time.perf_counter()
    state.tpp_norms = list(reg.pruned_norms())
    state.after_tpp_test = run.test()  # before the pruned filters are hard-zeroed


def _cut(run: PruneRun, model: nn.Module | None = None) -> None:
    surgery(run.model if model is None else model, {n: m.to(run.device) for n, m in run.masks.items()},
            run.example, coupled=run.cfg.scope == "coupled")


def check_before_tpp(run: PruneRun) -> None:
    """The cut made on a copy of the model before TPP trains it for hours: a model whose cut
    does not compute what its masked self does (a GroupNorm over pruned channels) is refused
    now, not after TPP. The cut after TPP is checked again (`cut_and_check`)."""
    _checked_cut(run, PruneState(), copy.deepcopy(run.model), before="before TPP ")


def cut_and_check(run: PruneRun, state: PruneState) -> None:
    """Phase 4: zero the pruned filters, remove them, check the smaller model computes what the
    masked one did, measure it; then the checkpoint moves to the retraining phase (a later
    kill resumes there, not before TPP)."""
    _checked_cut(run, state, run.model)
    state.pruned_test = run.test()
    state.phase, state.epoch = "retrain", 0
    run.save(state, None)


def _checked_cut(run: PruneRun, state: PruneState, model: nn.Module, before: str = "") -> None:
    """Zero `model`'s pruned filters, cut them out in place, and check it computes what it did
    masked (`state` gets the figures); raises EvopruneError where it does not, unless the run
    accepts an approximate cut (`PruneConfig.approximate_cut`: the difference is reported)."""
    zero_pruned(model, run.structure.with_followers(run.masks), run.structure.all_bn_of)
    model.eval()
    check_x = next(iterate(run.data, run.data.val, batch_size=64, device=run.device))[0]
    with torch.no_grad(), full_precision():
        masked_out = model(check_x).float()
    if not masked_out.isfinite().all():
        raise Diverged("the model's outputs on validation images are inf or nan before anything was cut, so "
                       "surgery cannot be checked: a model that diverged, or one that computes nan on real images")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    masked = copy.deepcopy(model) if has_bn else None
    _cut(run, model)
    try:
        _compare(run, state, model, masked, masked_out, check_x, before)
    except EvopruneError:
        if not run.cfg.approximate_cut:
            raise
        diff = max_diff(masked_out, model, check_x)  # the cut as it is (its BN statistics re-estimated if it has BNs)
        state.equivalence_max_diff, state.equivalence_output_scale = diff, masked_out.abs().max().item()
        state.exact_cut, state.bn_recalibrated = False, masked is not None
        if run.show and not before:
            run.console.print(f"surgery: an approximate cut (--approximate-cut): the cut model's outputs differ from "
                              f"the masked one's by up to {diff:.3g} (its outputs reach {masked_out.abs().max():.3g}"
                              f"{'; its BN statistics re-estimated' if masked is not None else ''}); retraining "
                              "starts from the cut model", highlight=False)


def _compare(run: PruneRun, state: PruneState, model: nn.Module, masked: nn.Module | None, masked_out: Tensor,
             check_x: Tensor, before: str) -> None:
    """Whether the cut `model` computes `masked_out`, the masked model's outputs on `check_x`
    (`state` gets the figures); where it does not, and `masked` (the masked model, None without
    BNs) does once both models' BN statistics are re-estimated, the cut model keeps them."""
    try:
        state.equivalence_max_diff = check_equivalence(masked_out, model, check_x, before=before)
        state.equivalence_output_scale = masked_out.abs().max().item()
    except EvopruneError:
        if masked is None:
            raise
        # A pruned channel can reach later layers as a constant: a depthwise conv (cut with the channel)
        # gives 0, its BN turns that into its shift. The next BN's batch mean removes a constant, its
        # running mean does not: with both models' statistics re-estimated on the same images, the cut
        # model computes what the masked one does (MobileNetV2's inverted residuals). Checked in float64:
        # in float32 that cancellation loses digits (a constant much larger than what a layer left with one
        # filter of 96 varies by), and over a dozen such layers the outputs part by 1e-3 (global + L1).
        for m in (masked, model):
            recalibrate_bn(m, run.data, images=RECALIBRATE_IMAGES, seed=run.cfg.retrain.seed, device=run.device)
        masked, cut = masked.double(), copy.deepcopy(model).double()
        for m in (masked, cut):
            recalibrate_bn(m, run.data, images=RECALIBRATE_IMAGES, seed=run.cfg.retrain.seed, device=run.device,
                           dtype=torch.float64)
        with torch.no_grad():
            masked_out = masked(check_x.double())
        state.equivalence_max_diff = check_equivalence(masked_out, cut, check_x.double(), recalibrated=True,
                                                       before=before)
        state.equivalence_output_scale = masked_out.abs().max().item()
        del cut
        state.bn_recalibrated = True
        if run.show and not before:
            run.console.print("surgery: the cut model computes what the masked one does once BN statistics are "
                              f"re-estimated on {RECALIBRATE_IMAGES} training images (a pruned channel reached "
                              "later layers as a BN shift); both were, and the cut model keeps them", highlight=False)
    del masked


def retrain(run: PruneRun, state: PruneState, ck: dict | None) -> TrainResult:
    """Phase 5: the retraining recipe, from `ck` when resuming mid-retraining."""
    opt_state = (ck["opt"] or None) if ck is not None else None

    def save(epoch: int, opt) -> None:
        state.epoch = epoch
        run.save(state, opt)

    try:
        with epoch_progress("retrain", run.cfg.retrain.epochs, run.console, run.show) as on_epoch:
            result = train(run.model, run.data, run.cfg.retrain, device=run.device, on_epoch=on_epoch,
                           start_epoch=state.epoch, optimizer_state=opt_state, checkpoint=save)
    except Diverged as e:
        raise Diverged(f"retraining the pruned model diverged: {e.what}",
                       "lower --lr and start again with another --out") from None
    run.model.eval()
    return result


def report(run: PruneRun, state: PruneState, result: TrainResult, seconds: dict[str, float]) -> dict:
    """Phase 6: what was done and what it gave."""
    cfg, base, masks = run.cfg, state.base, run.masks
    macs1, params1 = count(run.model, run.example)
    latency1 = latency_ms(run.model, run.example, cfg.latency_batch)
    tests = {"pretrained": base.test, "after_tpp": state.after_tpp_test, "pruned": state.pruned_test,
             "retrained": result.test_acc}
    return {
        "task": cfg.task, "classes": run.data.num_classes, "test_images": len(run.data.test), "metric": cfg.metric,
        "expression": cfg.expression,
        "canonical": str(canonical(parse(cfg.expression))), "config": cfg.to_dict(), "schedule": cfg.schedule(),
        "layers": {n: [int(m.sum()), len(m)] for n, m in masks.items()}, "mask": mask_hash(masks),
        "params": [base.params, params1], "macs": [base.macs, macs1],
        "params_kept": params1 / base.params, "macs_kept": macs1 / base.macs,
        "speedup": base.macs / max(macs1, 1),
        "latency_ms": [base.latency_ms, latency1], "latency_batch": cfg.latency_batch,
        "measured_speedup": base.latency_ms / max(latency1, 1e-9),
        "test_acc": {k: v for k, v in tests.items() if v is not None},
        "val_acc": result.val_acc, "equivalence_max_diff": state.equivalence_max_diff,
        "equivalence_output_scale": state.equivalence_output_scale, "exact_cut": state.exact_cut,
        "bn_recalibrated": state.bn_recalibrated,
        "tpp_norms": None if state.tpp_norms is None else dict(zip(("pruned", "pruned_bn", "kept"), state.tpp_norms)),
        "pretrained_sha256": run.pre.meta.get("sha256"),  # which pretrained model: a suite's runs must share one
        "seconds": seconds, "device": str(run.device), "processes": dist.world(), "host": socket.gethostname(),
        "files": {"model": str(run.out / "pruned_model.pt"), "report": str(run.out / "report.json")},
    }


def prune(cfg: PruneConfig, *, out: Path, resume: bool = False, data_root=None, cache_dir=None, tasks_file=None,
          device: str = "auto", db: str | None = None, record: bool = True, console: Console | None = None,
          show_progress: bool = True) -> dict:
    """Run the whole transfer stage; returns the report (also written to OUT/report.json)."""
    console = console or Console(stderr=True)
    show = show_progress and dist.is_main()
    t_start = time.perf_counter()
    out = Path(out)
    run, ck = _setup(cfg, out, resume, device, data_root, cache_dir, tasks_file, console, show)
    state = PruneState.from_checkpoint(ck) if ck is not None else PruneState(base=measure(run))
    run.masks = masks_phase(run, resuming=ck is not None)
    if show:
        kept = sum(int(m.sum()) for m in run.masks.values())
        console.print(f"{cfg.task}: {cfg.metric} ({cfg.expression}) keeps {kept} of "
                      f"{sum(len(m) for m in run.masks.values())} filters in {len(run.masks)} layers\n"
                      f"schedule: {cfg.schedule()}", highlight=False)
        if cfg.tpp is not None:
            per_pass = max(1, len(run.data.train) // max(1, cfg.retrain.batch_size))
            console.print(f"TPP's {cfg.tpp.total_iterations} iterations are {cfg.tpp.total_iterations / per_pass:,.0f} "
                          f"passes over the {len(run.data.train)} training images (the retraining makes "
                          f"{cfg.retrain.epochs}); --reg-step, --update-every and --stabilize-iters size it "
                          "(docs/transfer.md, \"Schedules\")", highlight=False)
    if state.phase == "tpp":
        if ck is not None:
            run.model.load_state_dict(ck["model"])
        if cfg.tpp is not None:
            if ck is None:
                check_before_tpp(run)
            regularize(run, state, ck)
        cut_and_check(run, state)
        ck = None
    else:  # resume retraining: rebuild the pruned shape, then load its weights
        _cut(run)
        run.model.load_state_dict(ck["model"])
    t0 = time.perf_counter()
    result = retrain(run, state, ck)
    rep = report(run, state, result, {"tpp": state.tpp_seconds, "retrain": time.perf_counter() - t0,
                                      "total": time.perf_counter() - t_start})
    if dist.is_main():
        cpu_model = copy.deepcopy(run.model).cpu().to(memory_format=torch.contiguous_format).eval()
        _atomic_save(cpu_model, out / "pruned_model.pt")
        if record:
            rep["recorded"] = record_transfer(db, cfg, rep)
        _write_json(rep, out / "report.json")
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: the report marks it
    dist.barrier()
    dist.teardown()
    return rep


# --------------------------------------------------------------------------- database
def record_transfer(db: str | None, cfg: PruneConfig, report: dict, seed: int | None = None) -> dict | None:
    """Store the result as a "transfer" evaluation of the metric's candidate: the one named
    (ID or promoted NAME), else the newest candidate with the same canonical formula in an
    existing database. Returns where it went, or None when there is no such candidate."""
    from evoprune.db.store import connect, record_transfer as store_transfer
    from evoprune.metricref import resolve

    ref = MetricRef.parse(cfg.metric)
    try:
        engine = connect(db, create=False)
    except EvopruneError:
        if ref.in_database:
            raise
        return None  # a baseline or an expression, and no database: nothing to attach to
    cid = resolve(ref, db).candidate_id if ref.in_database else None
    t = TransferRecord(task=cfg.task, accuracy=report["test_acc"]["retrained"], kept_flops=report["macs_kept"],
                       kept_params=report["params_kept"], seconds=report["seconds"]["total"], mask=report["mask"],
                       host=report["host"], seed=seed)
    stored = store_transfer(engine, cid, canonical_hash(parse(cfg.expression)), t)
    return None if stored is None else {"candidate": stored[0], "evaluation": stored[1], "db": str(engine.url)}
