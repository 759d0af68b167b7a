"""Training and evaluation loops shared by pretraining, fine-tuning proxies and retraining."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evoprune import dist
from evoprune.data import DataSet, Split, iterate
from evoprune.errors import Diverged, EvopruneError
from evoprune.tasks import Recipe


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise EvopruneError(f"--device {str(device)!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvopruneError(f"--device {device} asked for, but no CUDA device is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EvopruneError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


def describe_device(device: str | torch.device) -> str:
    """The machine in words, for benchmark tables: the GPU's name, or the CPU and torch's threads."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (same range as fp32, no loss scaling); nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, ds: DataSet, *, images: int, seed: int, device, dtype=None,
                   batch_size: int = 256) -> None:
    """Re-estimate every BN's running statistics as the cumulative average over `images`
    training images in the order `seed` fixes (the same images on every process); leaves the
    model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in iterate(ds, ds.train, batch_size=batch_size, shuffle=True, seed=seed, device=device, limit=images):
        model(x if dtype is None else x.to(dtype))
    for m in bns:
        m.momentum = 0.1
    model.eval()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Torch's global RNG seeded with `seed` inside, restored after (the caller's stream goes on
    as if nothing had drawn from it): what a proxy run draws (dropout) depends on its seed alone."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def classified_right(out: Tensor, y: Tensor) -> Tensor:
    """Which images the logits `out` [..., N, classes] classify right; a row with a non-finite
    logit (a network that diverged) counts as wrong, where argmax would pick its nan."""
    return (out.argmax(-1) == y) & out.isfinite().all(-1)


def true_class_prob(out: Tensor, y: Tensor) -> Tensor:
    """The softmax probability of the true class per image [..., N]; 0 for a non-finite row."""
    return out.softmax(-1).gather(-1, y.expand(out.shape[:-1])[..., None]).squeeze(-1).nan_to_num(0.0)


@torch.no_grad()
def accuracy(model: nn.Module, ds: DataSet, split: Split, *, device: torch.device | str = "cpu",
             batch_size: int = 512, limit: int | None = None) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of `model` in eval mode on a split. Under DDP each
    process scores its shard and the counts are summed (a split not divisible by the number of
    processes loses its last few images)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in iterate(ds, split, batch_size=batch_size, device=device, limit=limit, shard=dist.shard()):
        with autocast(device):
            out = model(x)
        correct += int(classified_right(out, y).sum())
        total += len(y)
    model.train(was_training)
    correct, total = dist.all_sum([correct, total], device)
    return correct / max(total, 1)


@torch.no_grad()
def true_class_probability(model: nn.Module, ds: DataSet, split: Split, *, device: torch.device | str = "cpu",
                           batch_size: int = 512, limit: int | None = None) -> tuple[float, float, int]:
    """(top-1 accuracy, mean softmax probability of the true class, images whose logits are not
    finite): the second is a continuous score (on a 143-image split accuracy moves in steps of 0.7
    points; this does not). An image whose logits are not finite is wrong and has probability 0."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = bad = 0
    prob = 0.0
    for x, y in iterate(ds, split, batch_size=batch_size, device=device, limit=limit, shard=dist.shard()):
        with autocast(device):
            out = model(x).float()
        correct += int(classified_right(out, y).sum())
        prob += float(true_class_prob(out, y).sum())
        bad += int(out.isfinite().all(-1).logical_not().sum())
        total += len(y)
    model.train(was_training)
    correct, prob, total, bad = dist.all_sum([correct, prob, total, bad], device)
    return correct / max(total, 1), prob / max(total, 1), int(bad)


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    """The learning rate at `step` of `total` under the recipe's schedule."""
    t = step / max(total, 1)
    if recipe.schedule == "step":
        return recipe.lr * (0.1 ** (int(t >= 0.5) + int(t >= 0.75)))
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * t))
    if t < recipe.warmup:  # onecycle: linear rise, then cosine to zero
        return recipe.lr * (0.1 + 0.9 * t / recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * (t - recipe.warmup) / (1 - recipe.warmup)))


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv/linear weights only (not BN, not biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)


@dataclass
class TrainResult:
    val_acc: float
    test_acc: float
    final_loss: float
    seconds: float
    epochs: int
    device: str


def train(model: nn.Module, ds: DataSet, recipe: Recipe, *, device: torch.device,
          on_epoch: Callable[[int, float, float], None] | None = None, start_epoch: int = 0,
          optimizer_state: dict | None = None,
          checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None) -> TrainResult:
    """Train `model` on the train split by `recipe`; val accuracy each epoch, test at the end.

    `on_epoch(epoch, smoothed_loss, val_acc)` is called after each epoch (progress display),
    then `checkpoint(epoch, optimizer)`. To resume after epoch E pass `start_epoch=E` and the
    optimizer's saved state: data order and learning rate depend only on the epoch and step,
    so the resumed run continues the interrupted one exactly. Under torchrun the model trains
    inside DDP, each process on its shard of every global batch of `recipe.batch_size`.
    """
    t0 = time.perf_counter()
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, recipe)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    net = dist.wrap(model, device)
    augment = recipe.augment or ds.augment
    steps_per_epoch = max(1, len(ds.train) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    step, loss_avg, val, loss_ema = start_epoch * steps_per_epoch, float("nan"), float("nan"), None
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        for x, y in iterate(ds, ds.train, batch_size=max(1, recipe.batch_size // dist.world()), shuffle=True,
                            augment=augment, seed=recipe.seed * 100003 + epoch, device=device, drop_last=True,
                            shard=dist.shard()):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, recipe)
            with autocast(device):
                loss = F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = loss.detach().float()  # kept on the device: no wait for the GPU at every step
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        if loss_ema is not None:  # the mean over processes: under DDP a nan in one is seen by all
            loss_avg = dist.all_sum([float(loss_ema)], device)[0] / dist.world()
            if not math.isfinite(loss_avg):  # before the checkpoint: a good one is not overwritten
                raise Diverged(f"the training loss is {loss_avg} in epoch {epoch + 1} of {recipe.epochs} "
                               f"(peak lr {recipe.lr:g})")
        val = accuracy(model, ds, ds.val, device=device)
        if on_epoch:
            on_epoch(epoch + 1, loss_avg, val)
        if checkpoint:
            checkpoint(epoch + 1, opt)
    if recipe.epochs == start_epoch:
        val = accuracy(model, ds, ds.val, device=device)
    test = accuracy(model, ds, ds.test, device=device)
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(val_acc=val, test_acc=test, final_loss=loss_avg, seconds=time.perf_counter() - t0,
                       epochs=recipe.epochs, device=str(device))
