"""`evoprune prune`: apply a metric to a task's pretrained network, for real.

    masks      score every filter with the metric (statistics on training images), keep the
               best of each layer by the allocator; layers are those inside blocks ("in-block",
               as TPP's scripts) or every layer with tied channels pruned together ("coupled");
    tpp        (optional) TPP regularization: Gram penalty + growing L2 on the pruned filters
               and their BN, then a stabilize phase, then the pruned filters are hard-zeroed;
    surgery    Torch-Pruning removes the channels; the smaller model must compute what the
               masked one did (checked on a batch, eval mode) before anything else happens;
    retrain    the recipe's epochs (TPP's CIFAR schedule by default), AMP + channels_last on GPU;
    report     params, MACs, speedup, latency, test accuracy before/after; the whole pruned
               model; a "transfer" evaluation row in the database when the metric has a candidate.

Everything lands in the output folder: config.json, masks.pt, checkpoint.pt (rewritten after
every retraining epoch and, at pass boundaries, every TPP_SAVE_EVERY_S of TPP; `--resume`
continues from it), pruned_model.pt, report.json. Launched by torchrun, both training phases run under DDP (see docs/transfer.md).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from evoprune import dist
from evoprune.data import iterate
from evoprune.errors import EvopruneError
from evoprune.primitives.collect import task_stats
from evoprune.primitives.expr import canonical, canonical_hash, check_scores, evaluate, parse, scores_by_layer
from evoprune.primitives.layers import Structure, structure
from evoprune.primitives.runtime import rank as average_rank
from evoprune.tasks import Recipe, get_task
from evoprune.train import accuracy, autocast, pick_device, train
from evoprune.transfer.surgery import channel_groups, independent_layers, surgery, zero_pruned
from evoprune.transfer.tpp import TPPConfig, TPPRegularizer
from evoprune.workers.allocators import ALLOCATORS, allocate, flops, kept_share, mask_hash

SCOPES = ("in-block", "coupled")
# TPP's CIFAR retraining: lr 0.01, x0.1 at 50% and 75% of the epochs (60 and 90 of 120)
RETRAIN = Recipe(epochs=120, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step")
CHECK_TOL = 1e-4  # surgery equivalence: max |pruned - masked| <= tol * max(1, max |masked|)
TPP_SAVE_EVERY_S = 60.0  # checkpoint interval of the TPP phase (at pass boundaries)
FILES = ("config.json", "masks.pt", "checkpoint.pt", "pruned_model.pt", "report.json")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    task: str
    metric: str  # as given: ID, NAME, baseline:NAME or expr:EXPRESSION
    expression: str  # what it resolved to
    allocator: str = "uniform"  # uniform (per-layer ratio) | global | flops
    ratio: float = 0.5  # share of filters pruned (uniform: per layer; global: overall)
    flops_reduction: float = 0.5  # allocator flops: share of the prunable layers' MACs removed
    scope: str = "in-block"  # in-block (TPP's scripts) | coupled (tied channels pruned together)
    skip: tuple[str, ...] = ()  # glob patterns of layer names left whole
    stat_images: int = 256  # training images the metric's statistics are collected on
    tpp: TPPConfig | None = field(default_factory=TPPConfig)  # None: prune without regularization
    retrain: Recipe = RETRAIN
    latency_batch: int = 64  # images per forward pass when timing

    def __post_init__(self):
        checks = [(self.allocator in ALLOCATORS, f"allocator must be one of {', '.join(ALLOCATORS)}"),
                  (0 < self.ratio < 1, "ratio must be in (0, 1)"),
                  (0 < self.flops_reduction < 1, "flops reduction must be in (0, 1)"),
                  (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}"),
                  (self.stat_images >= 1, "stat images must be >= 1"),
                  (self.latency_batch >= 1, "latency batch must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"prune: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples become lists, as they come back from JSON


# --------------------------------------------------------------------------- masks
def _group_scores(groups: list[list[str]], scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """One score per channel of each group (keyed by its first layer): the layer's own scores,
    or for tied layers the mean of their per-layer ranks (metrics need not share a scale)."""
    out = {}
    for g in groups:
        if len(g) == 1:
            out[g[0]] = scores[g[0]]
        else:
            out[g[0]] = torch.stack([average_rank(scores[n].double()) for n in g]).mean(0)
    return out


def choose_groups(model: nn.Module, example: Tensor, s: Structure, cfg: PruneConfig) -> list[list[str]]:
    names = [n for n in s.macs if not any(fnmatch.fnmatchcase(n, p) for p in cfg.skip)]
    if cfg.scope == "in-block":
        groups = [[n] for n in independent_layers(model, example, names)]
    else:
        groups = []
        for g in channel_groups(model, example, names):
            if any(n not in names for n in g):
                continue  # a tied layer is skipped (or not prunable): the whole group stays
            widths = {s.out_channels[n] for n in g}
            if len(widths) > 1:
                raise EvopruneError(f"Torch-Pruning ties layers of different widths {sorted(widths)} ({g[0]}, ...): "
                                    "it cannot follow this model's channel coupling (e.g. option-A zero-pad "
                                    "shortcuts); use --scope in-block")
            groups.append(g)
    if not groups:
        raise EvopruneError(f"no prunable layers left on {cfg.task} (scope {cfg.scope}, skip {list(cfg.skip)})")
    return groups


def compute_masks(pre, model: nn.Module, example: Tensor, s: Structure, cfg: PruneConfig,
                  device: torch.device) -> dict[str, Tensor]:
    """Keep masks (True = keep) for every pruned layer; tied layers get the same mask."""
    node = parse(cfg.expression)
    table = task_stats(replace(pre, model=model), node.stats(), n_images=cfg.stat_images, seed=0, device=device)
    scores = evaluate(node, table)
    validity = check_scores(scores, table)
    if not validity.ok:
        raise EvopruneError(f"metric {cfg.metric} cannot rank the filters of {cfg.task}: {validity.reason}")
    by_layer = {n: v.cpu() for n, v in scores_by_layer(scores, table).items()}
    groups = choose_groups(model, example, s, cfg)
    members = {g[0]: g for g in groups}

    def expand(masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: m for key, m in masks.items() for n in members[key]}

    gscores = _group_scores(groups, by_layer)
    if cfg.allocator == "flops":
        masks = flops(gscores, cfg.flops_reduction, s.macs, s.inputs_from, expand=expand, layers=list(s.macs))
        removed = 1 - kept_share(masks, s.macs, s.inputs_from, layers=list(s.macs))
        if removed < cfg.flops_reduction - 1e-6:
            raise EvopruneError(f"pruning {len(masks)} layers (scope {cfg.scope}) removes at most {removed:.0%} of the "
                                f"prunable MACs; ask for less than {cfg.flops_reduction:.0%} or use --scope coupled")
        return masks
    return expand(allocate(cfg.allocator, gscores, ratio=cfg.ratio))


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
def check_equivalence(masked_out: Tensor, pruned: nn.Module, x: Tensor) -> float:
    pruned.eval()
    with full_precision():
        diff = (pruned(x) - masked_out).abs().max().item()
    if not diff <= CHECK_TOL * max(1.0, masked_out.abs().max().item()):
        raise EvopruneError(f"surgery changed the model's outputs (max |diff| {diff:.3g}): Torch-Pruning did not "
                            "follow this model's structure; nothing was retrained")
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
    except ValueError as e:
        raise EvopruneError(f"--resume: {cfg_path} is unreadable ({e})") from None
    new = cfg.to_dict()
    if diff := sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)):
        raise EvopruneError(f"--resume: {out} was started with other settings ({', '.join(diff)} differ); "
                            "repeat the original command with --resume")
    if (out / "report.json").exists():
        raise EvopruneError(f"--resume: the run in {out} already finished (report.json exists)")
    _checkpoint(out)  # loads: a damaged file is reported now


def _checkpoint(out: Path) -> dict | None:
    """The checkpoint to continue from; None when the run stopped before its first one (it then
    starts over: the masks are recomputed identically)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvopruneError(f"--resume: {path} does not load ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- phases
def regularize(model: nn.Module, masks: dict[str, Tensor], s: Structure, cfg: PruneConfig, data,
               device: torch.device, state: dict | None, save, progress) -> float:
    """The TPP phase, to its end; `save(epoch, iteration, opt, seconds)` at the end of a pass
    over the data when the last save is TPP_SAVE_EVERY_S old (a small data set has thousands of
    passes), and at the end. Returns its seconds (those before a resume included)."""
    tpp = cfg.tpp
    reg = TPPRegularizer(model, masks, s.bn_of, tpp)
    opt = torch.optim.SGD(model.parameters(), lr=tpp.lr, momentum=0.9, weight_decay=5e-4)
    epoch, before = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["opt"])
        reg.iteration, epoch, before = state["iteration"], state["epoch"], state["seconds"]
    net = dist.wrap(model, device)
    recipe = cfg.retrain
    t0 = last_save = time.perf_counter()
    model.train()
    while not reg.done:
        for x, y in iterate(data, data.train, batch_size=max(1, recipe.batch_size // dist.world()), shuffle=True,
                            augment=recipe.augment or data.augment, seed=recipe.seed * 100003 + 50021 + epoch,
                            device=device, drop_last=True, shard=dist.shard()):
            with autocast(device):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y) + reg.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reg.apply_l2()
            opt.step()
            reg.step()
            progress(reg, loss.detach())
            if reg.done:
                break
        epoch += 1
        if reg.done or time.perf_counter() - last_save >= TPP_SAVE_EVERY_S:
            save(epoch, reg.iteration, opt, before + time.perf_counter() - t0)
            last_save = time.perf_counter()
    return before + time.perf_counter() - t0


def _tpp_progress(console: Console, total: int, show: bool):
    """A progress callback for the TPP phase and the object to close it."""
    if not show:
        return (lambda reg, loss: None), None
    if not console.is_terminal:
        every = max(1, total // 20)

        def log(reg, loss):
            if reg.iteration % every == 0 or reg.done:
                console.print(f"tpp {reg.iteration}/{total}  {reg.phase}  reg {reg.reg:.4f}  loss {float(loss):.3f}",
                              highlight=False)
        return log, None
    prog = Progress(TextColumn("[bold]tpp[/] {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("reg {task.fields[reg]:.4f}  loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                    console=console)
    bar = prog.add_task("tpp", total=total, phase="regularize", reg=0.0, loss=float("nan"))
    prog.start()

    def update(reg, loss):  # reading the loss waits for the GPU: every 20 iterations only
        if reg.iteration % 20 == 0 or reg.done:
            prog.update(bar, completed=reg.iteration, phase=reg.phase, reg=reg.reg, loss=float(loss))
    return update, prog


def prune(cfg: PruneConfig, *, out: Path, resume: bool = False, data_root=None, cache_dir=None, tasks_file=None,
          device: str = "auto", db: str | None = None, record: bool = True, console: Console | None = None,
          show_progress: bool = True) -> dict:
    """Run the whole transfer stage; returns the report (also written to OUT/report.json)."""
    from evoprune.pretrain import epoch_progress, pretrained

    console = console or Console(stderr=True)
    show = show_progress and dist.is_main()
    t_start = time.perf_counter()
    device = dist.setup(pick_device(device))
    out = Path(out)
    dist.on_main(lambda: _prepare_out(out, cfg, resume))
    state = _checkpoint(out) if resume else None
    task = get_task(cfg.task, tasks_file)

    loaded = {}

    def load() -> None:  # one process trains a missing model; the others then read the cache
        loaded["pre"] = pretrained(task, data_root=data_root, cache_dir=cache_dir, device=str(device),
                                   show_progress=show, console=console)
    dist.on_main(load)
    pre = loaded.get("pre") or pretrained(task, data_root=data_root, cache_dir=cache_dir, device=str(device))
    data = pre.data
    model = copy.deepcopy(pre.model).to(device).eval()
    example = next(iterate(data, data.train, batch_size=2, device=device))[0]
    s = structure(model, example)
    if state is not None:  # the unpruned model was measured before the interruption
        info: dict[str, Any] = json.loads(state["info"])
    else:
        macs0, params0 = count(model, example)
        info = {"base_macs": macs0, "base_params": params0,
                "base_latency_ms": latency_ms(model, example, cfg.latency_batch),
                "pretrained_test": accuracy(model, data, data.test, device=device), "tpp_seconds": 0.0}

    masks_path = out / "masks.pt"
    if state is not None and masks_path.exists():
        masks = torch.load(masks_path, map_location="cpu", weights_only=True)
    else:
        def make() -> dict[str, Tensor]:
            masks = compute_masks(pre, model, example, s, cfg, device)
            _atomic_save(masks, masks_path)
            return masks
        masks = dist.on_main(make)
    if show:
        kept = sum(int(m.sum()) for m in masks.values())
        console.print(f"{cfg.task}: {cfg.metric} ({cfg.expression}) keeps {kept} of "
                      f"{sum(len(m) for m in masks.values())} filters in {len(masks)} layers", highlight=False)

    def save(phase: str, epoch: int, opt, **extra) -> None:
        if dist.is_main():
            _atomic_save({"phase": phase, "epoch": epoch, "model": model.state_dict(),
                          "opt": opt.state_dict() if opt is not None else {}, "info": json.dumps(info), **extra},
                         out / "checkpoint.pt")
        dist.barrier()

    def cut() -> None:
        surgery(model, {n: m.to(device) for n, m in masks.items()}, example, coupled=cfg.scope == "coupled")

    def save_retrain(epoch: int, opt) -> None:
        save("retrain", epoch, opt)

    if state is None or state["phase"] == "tpp":
        if cfg.tpp is not None:
            if state is not None:
                model.load_state_dict(state["model"])
            log, bar = _tpp_progress(console, cfg.tpp.total_iterations, show)
            try:
                info["tpp_seconds"] = regularize(
                    model, masks, s, cfg, data, device, state,
                    lambda e, it, opt, sec: save("tpp", e, opt, iteration=it, seconds=sec), log)
            finally:
                if bar is not None:
                    bar.stop()
            info["after_tpp_test"] = accuracy(model, data, data.test, device=device)  # before hard-zeroing
        zero_pruned(model, masks, s.bn_of)
        model.eval()
        check_x = next(iterate(data, data.val, batch_size=64, device=device))[0]
        with torch.no_grad(), full_precision():
            masked_out = model(check_x).float()
        cut()
        info["equivalence_max_diff"] = check_equivalence(masked_out, model, check_x)
        info["pruned_test"] = accuracy(model, data, data.test, device=device)
        start_epoch, opt_state = 0, None
        save_retrain(0, None)  # surgery done: a later kill resumes here, not before TPP
    else:  # resume retraining: rebuild the pruned shape, then load its weights
        cut()
        model.load_state_dict(state["model"])
        start_epoch, opt_state = state["epoch"], state["opt"] or None
    t0 = time.perf_counter()
    with epoch_progress("retrain", cfg.retrain.epochs, console, show) as on_epoch:
        result = train(model, data, cfg.retrain, device=device, on_epoch=on_epoch, start_epoch=start_epoch,
                       optimizer_state=opt_state, checkpoint=save_retrain)
    model.eval()
    macs1, params1 = count(model, example)
    latency1 = latency_ms(model, example, cfg.latency_batch)
    report = {
        "task": cfg.task, "metric": cfg.metric, "expression": cfg.expression,
        "canonical": str(canonical(parse(cfg.expression))), "config": cfg.to_dict(),
        "layers": {n: [int(m.sum()), len(m)] for n, m in masks.items()}, "mask": mask_hash(masks),
        "params": [info["base_params"], params1], "macs": [info["base_macs"], macs1],
        "params_kept": params1 / info["base_params"], "macs_kept": macs1 / info["base_macs"],
        "speedup": info["base_macs"] / max(macs1, 1),
        "latency_ms": [info["base_latency_ms"], latency1], "latency_batch": cfg.latency_batch,
        "measured_speedup": info["base_latency_ms"] / max(latency1, 1e-9),
        "test_acc": {**{k.removesuffix("_test"): v for k, v in info.items() if k.endswith("_test")},
                     "retrained": result.test_acc},
        "val_acc": result.val_acc, "equivalence_max_diff": info.get("equivalence_max_diff"),
        "seconds": {"tpp": info["tpp_seconds"], "retrain": time.perf_counter() - t0,
                    "total": time.perf_counter() - t_start},
        "device": str(device), "processes": dist.world(), "host": socket.gethostname(),
        "files": {"model": str(out / "pruned_model.pt"), "report": str(out / "report.json")},
    }
    if dist.is_main():
        cpu_model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
        _atomic_save(cpu_model, out / "pruned_model.pt")
        if record:
            report["recorded"] = record_transfer(db, cfg, report)
        _write_json(report, out / "report.json")
        (out / "checkpoint.pt").unlink(missing_ok=True)  # the run is complete: the report marks it
    dist.barrier()
    dist.teardown()
    return report


# --------------------------------------------------------------------------- database
def record_transfer(db: str | None, cfg: PruneConfig, report: dict) -> dict | None:
    """Store the result as a "transfer" evaluation of the metric's candidate: the one named
    (ID or promoted NAME), else the latest candidate with the same canonical formula in an
    existing database. Returns where it went, or None when there is no such candidate."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from evoprune.db import queries
    from evoprune.db.models import Candidate, Evaluation
    from evoprune.db.store import connect

    try:
        engine = connect(db, create=False)
    except EvopruneError:
        if cfg.metric.isdigit() or not cfg.metric.startswith(("baseline:", "expr:")):
            raise
        return None  # a baseline or an expression, and no database: nothing to attach to
    if cfg.metric.isdigit():
        cid = int(cfg.metric)
    elif not cfg.metric.startswith(("baseline:", "expr:")):
        cid = queries.metric_by_name(engine, cfg.metric)["candidate"]
    else:
        cid = None
    with Session(engine) as s, s.begin():
        if cid is None:
            cid = s.scalars(select(Candidate.id).where(Candidate.canonical_hash == canonical_hash(parse(cfg.expression)))
                            .order_by(Candidate.id.desc())).first()
        if cid is None or s.get(Candidate, cid) is None:
            return None
        ev = Evaluation(candidate_id=cid, task=cfg.task, stage="transfer", accuracy=report["test_acc"]["retrained"],
                        kept_flops=report["macs_kept"], kept_params=report["params_kept"],
                        seconds=report["seconds"]["total"], mask=report["mask"], worker=report["host"][:128])
        s.add(ev)
        s.flush()
        return {"candidate": cid, "evaluation": ev.id, "db": str(engine.url)}
