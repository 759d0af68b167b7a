"""The pretraining cache: each task's trained weights, keyed by a hash of its recipe and data.

Files in the cache directory (--cache-dir, $EVOPRUNE_CACHE, default ~/.cache/evoprune):
  TASK-KEY.pt    the model's state dict (loaded with weights_only=True: no pickle code runs)
  TASK-KEY.json  metadata: the sha256 of the .pt file, the task, accuracies, seconds
Both are written to temporary names and renamed into place, the .json last, so a reader never
sees half a checkpoint; a .pt whose hash does not match its .json is corrupt and is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from evoprune.data import DataSet
from evoprune.errors import Diverged, EvopruneError, one_line
from evoprune.models import build_model
from evoprune.progress import epoch_progress
from evoprune.tasks import Task
from evoprune.train import pick_device, train

DEFAULT_CACHE = Path.home() / ".cache" / "evoprune"


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    return Path(flag or os.environ.get("EVOPRUNE_CACHE") or DEFAULT_CACHE)


@dataclass
class Pretrained:
    task: Task
    data: DataSet
    model: nn.Module  # on the CPU, in eval mode
    meta: dict
    cached: bool  # True when loaded from the cache, False when trained now
    path: Path


class CorruptCache(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_model(task: Task, data: DataSet) -> nn.Module:
    torch.manual_seed(task.recipe.seed)
    return build_model(task.model, data.num_classes, data.input_shape[0], **task.model_kwargs)


@torch.no_grad()
def check_model_runs(model: nn.Module, task: Task, data: DataSet) -> None:
    """One forward pass of two blank images before any training: a model that cannot take the
    data set's images (ViT at 32x32) or does not return logits [N, classes] is told so in one line."""
    shape = "x".join(map(str, data.input_shape))
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *data.input_shape))
    except Exception as e:
        raise EvopruneError(f"task {task.name}: model {task.model} cannot run on {task.dataset}'s {shape} "
                            f"images ({one_line(e)})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, data.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvopruneError(f"task {task.name}: model {task.model} returns {got} on {shape} images, not logits "
                            f"[N, {data.num_classes}]")


def _load(task: Task, data: DataSet, pt: Path, meta_path: Path) -> tuple[nn.Module, dict]:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCache(f"metadata {meta_path.name} unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCache(f"metadata {meta_path.name} holds {type(meta).__name__}, not a table")
    if not pt.is_file():
        raise CorruptCache(f"{pt.name} is not a file")
    if meta.get("sha256") != _sha256(pt):
        raise CorruptCache(f"{pt.name} does not match its recorded sha256")
    model = new_model(task, data)
    try:
        model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    except Exception as e:
        raise CorruptCache(f"{pt.name} does not load ({type(e).__name__})") from None
    if bad := [n for n, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]:
        raise CorruptCache(f"{pt.name} holds inf or nan in {bad[0]} (its pretraining diverged)")
    return model.eval(), meta


def _set_aside(path: Path, console: Console | None) -> None:
    """A folder (or anything not a file) where a cache file belongs is renamed, not deleted."""
    if path.exists() and not path.is_file():
        aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        (console or Console(stderr=True)).print(f"[yellow]{path} was not a file: moved to {aside}[/]")


def _save(model: nn.Module, meta: dict, pt: Path, meta_path: Path, console: Console | None = None) -> None:
    pt.parent.mkdir(parents=True, exist_ok=True)
    for path in (pt, meta_path):
        _set_aside(path, console)
    tmp = pt.with_suffix(f".pt.tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    meta["sha256"] = _sha256(tmp)
    os.replace(tmp, pt)
    tmp_meta = meta_path.with_suffix(f".json.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path)


def pretrained(task: Task, *, data_root=None, cache_dir=None, device="auto", download=None,
               show_progress: bool = False, force: bool = False, console: Console | None = None) -> Pretrained:
    """The task's pretrained model: from the cache when present and intact, else trained now."""
    data = task.data(data_root, download)
    key = task.cache_key(data.fingerprint())
    cache = resolve_cache_dir(cache_dir)
    pt, meta_path = cache / f"{task.name}-{key}.pt", cache / f"{task.name}-{key}.json"
    if pt.exists() and not force:
        try:
            model, meta = _load(task, data, pt, meta_path)
            _warn_if_near_chance(task, data, meta, pt, console)
            return Pretrained(task, data, model, meta, cached=True, path=pt)
        except CorruptCache as e:
            (console or Console(stderr=True)).print(f"[yellow]cache file corrupt: {e}; rebuilding[/]")
    dev = pick_device(device)
    model = new_model(task, data)
    check_model_runs(model, task, data)
    try:
        with epoch_progress(task.name, task.recipe.epochs, console, show_progress) as on_epoch:
            result = train(model, data, task.recipe, device=dev, on_epoch=on_epoch)
    except Diverged as e:
        raise Diverged(f"pretraining {task.name} diverged: {e.what}",
                       "lower `lr` in the task's recipe (nothing was cached)") from None
    model.cpu().eval()
    meta = {"task": task.name, "key": key, "dataset": task.dataset, "data_source": data.source,
            "data_fingerprint": data.fingerprint(), "model": task.model, "model_args": task.model_kwargs,
            "recipe": asdict(task.recipe), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__, **asdict(result)}
    _save(model, meta, pt, meta_path, console)
    _warn_if_near_chance(task, data, meta, pt, console)
    return Pretrained(task, data, model, meta, cached=False, path=pt)


_WARNED: set[Path] = set()


def near_chance(accuracy: float, num_classes: int) -> bool:
    """Below min(2x chance, chance + 10 points): metrics cannot be told apart on such a network."""
    chance = 1 / num_classes
    return accuracy < min(2 * chance, chance + 0.1)


def _warn_if_near_chance(task: Task, data: DataSet, meta: dict, pt: Path, console: Console | None) -> None:
    """A model near chance accuracy is kept (it is what its recipe gives), with a warning, once
    per process, whether trained now or loaded: a search or a prune on it measures nothing."""
    chance, acc = 1 / data.num_classes, meta.get("test_acc")
    if isinstance(acc, (int, float)) and near_chance(acc, data.num_classes) and pt not in _WARNED:
        _WARNED.add(pt)
        (console or Console(stderr=True)).print(
            f"[yellow]warning: {task.name}'s test accuracy {acc:.1%} is near chance ({chance:.1%} for "
            f"{data.num_classes} classes): pruning metrics cannot be told apart on this model; train it longer "
            "or with another `lr` in its recipe[/]", highlight=False)
