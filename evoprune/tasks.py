"""Tasks: a data set + a model + a pretraining recipe, under one name.

Built-in tasks live in `tasks.toml` beside this file; a user's TOML file of the same form
(`--tasks-file` or $EVOPRUNE_TASKS) adds tasks or overrides built-in ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from evoprune.errors import EvopruneError, UnknownName
from evoprune.models import model_source_hash, model_spec
from evoprune.tomlfiles import read_toml

TRAIN_CODE_VERSION = 1  # bump when the training loop changes what a recipe produces: old caches miss
AUGMENTS = ("none", "flip", "crop", "crop-flip", "imagenet")
SCHEDULES = ("onecycle", "cosine", "step")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    epochs: int = 30  # passes over the train split; 0 = use the weights as given, only evaluate
    batch_size: int = 128  # images per SGD step
    lr: float = 0.1  # peak SGD learning rate
    momentum: float = 0.9  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 on conv/linear weights (not BN, not biases)
    label_smoothing: float = 0.0  # cross-entropy smoothing
    schedule: str = "onecycle"  # onecycle (linear warm-up then cosine) | cosine | step (x0.1 at 50%, 75%)
    warmup: float = 0.15  # onecycle: fraction of steps spent rising to lr
    augment: str | None = None  # None: the data set's default (crop-flip for CIFAR, none for digits)
    seed: int = 0  # weight init and data order

    def __post_init__(self):
        checks = [
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (self.augment is None or self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"recipe: {msg}")


# TPP's CIFAR retraining (Wang & Fu 2023): lr 0.01, x0.1 at 50% and 75% of the epochs (60, 90 of 120)
RETRAIN = Recipe(epochs=120, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="step")


@dataclass(frozen=True)
class TransferRecipe:
    """What `evoprune prune` does on this task unless told otherwise: the TPP schedule (keys of
    evoprune.transfer.tpp.TPPConfig, over the paper's CIFAR settings) and the retraining recipe
    (over TPP's CIFAR schedule, RETRAIN). Small tasks set short ones: the paper's schedule is
    101,000 TPP iterations and 120 epochs, sized for 50,000 images."""

    tpp: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, hashable
    retrain: Recipe = RETRAIN

    def tpp_config(self, **overrides):
        from evoprune.transfer.tpp import TPPConfig

        return TPPConfig(**{**dict(self.tpp), **overrides})


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    model: str
    recipe: Recipe = field(default_factory=Recipe)
    model_args: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, hashable
    description: str = ""
    transfer: TransferRecipe = field(default_factory=TransferRecipe)
    val_fraction: float = 0.1  # share of the training images held out as val (search tasks: more)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in self.model_args}

    def data(self, data_root=None, download=None):
        """The task's data set, with its validation split."""
        from evoprune.data import load_dataset

        return load_dataset(self.dataset, data_root, download, val_fraction=self.val_fraction)

    def cache_key(self, data_fingerprint: str) -> str:
        """Hash of everything that decides the pretrained weights: data, model, recipe, code."""
        key = {"data": data_fingerprint, "model": self.model, "args": self.model_kwargs,
               "recipe": asdict(self.recipe), "code": TRAIN_CODE_VERSION}
        if source := model_source_hash(self.model):  # an imported model's own code (none for the zoo's)
            key["source"] = source
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _task_from_table(name: str, t: dict[str, Any], source: str) -> Task:
    where = f"task {name!r} in {source}"
    allowed = {"description", "dataset", "model", "model_args", "recipe", "transfer", "val_fraction"}
    if not isinstance(t, dict):
        raise EvopruneError(f"{where}: expected a table")
    if extra := set(t) - allowed:
        raise EvopruneError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(allowed)})")
    for key in ("dataset", "model"):
        if not isinstance(t.get(key), str):
            raise EvopruneError(f"{where}: '{key}' (a string) is required")
    try:
        model_spec(t["model"])
    except EvopruneError as e:
        raise EvopruneError(f"{where}: {e}") from None
    r = _recipe(t.get("recipe", {}), Recipe(), where, "recipe")
    vf = t.get("val_fraction", 0.1)
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 0.9:
        raise EvopruneError(f"{where}: val_fraction must be a number in (0, 0.9), got {vf!r}")
    return Task(name=name, dataset=t["dataset"], model=t["model"], recipe=r, val_fraction=float(vf),
                model_args=tuple(sorted(_table(t.get("model_args", {}), f"{where}: model_args").items())),
                description=t.get("description", ""), transfer=_transfer(t.get("transfer", {}), where))


def _table(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise EvopruneError(f"{where} must be a table")
    return v


def _recipe(d, base: Recipe, where: str, what: str) -> Recipe:
    keys = {f.name for f in fields(Recipe)}
    if extra := set(_table(d, f"{where}: {what}")) - keys:
        raise EvopruneError(f"{where}: unknown {what} keys {sorted(extra)} (allowed: {sorted(keys)})")
    try:
        return replace(base, **d)
    except (EvopruneError, TypeError) as e:
        raise EvopruneError(f"{where}: {what}: {str(e).removeprefix('recipe: ')}") from None


def _transfer(d, where: str) -> TransferRecipe:
    d = _table(d, f"{where}: transfer")
    if extra := set(d) - {"tpp", "retrain"}:
        raise EvopruneError(f"{where}: unknown transfer keys {sorted(extra)} (allowed: ['retrain', 'tpp'])")
    from evoprune.transfer.tpp import TPPConfig

    tpp = _table(d.get("tpp", {}), f"{where}: transfer.tpp")
    if extra := set(tpp) - {f.name for f in fields(TPPConfig)}:
        raise EvopruneError(f"{where}: unknown transfer.tpp keys {sorted(extra)} "
                            f"(allowed: {sorted(f.name for f in fields(TPPConfig))})")
    out = TransferRecipe(tpp=tuple(sorted(tpp.items())),
                         retrain=_recipe(d.get("retrain", {}), RETRAIN, where, "transfer.retrain"))
    try:
        out.tpp_config()
    except (EvopruneError, TypeError) as e:
        raise EvopruneError(f"{where}: transfer.tpp: {e}") from None
    return out


def read_tasks_file(path: Path) -> dict[str, Task]:
    tables = read_toml(path, "tasks file")
    return {name: _task_from_table(name, t, str(path)) for name, t in tables.items()}


def all_tasks(tasks_file: str | os.PathLike | None = None) -> dict[str, Task]:
    builtin = resources.files("evoprune").joinpath("tasks.toml")
    with resources.as_file(builtin) as p:
        tasks = read_tasks_file(p)
    user = tasks_file or os.environ.get("EVOPRUNE_TASKS")
    if user:
        tasks.update(read_tasks_file(Path(user)))
    return tasks


def get_task(name: str, tasks_file: str | os.PathLike | None = None) -> Task:
    tasks = all_tasks(tasks_file)
    if name not in tasks:
        raise UnknownName("task", name, list(tasks))
    return tasks[name]
