"""Tasks: a data set + a model + a pretraining recipe, under one name.

Built-in tasks live in `tasks.toml` beside this file; a user's TOML file of the same form
(`--tasks-file` or $EVOPRUNE_TASKS) adds tasks or overrides built-in ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from evoprune.errors import EvopruneError, UnknownName, read_toml
from evoprune.models import MODELS

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


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    model: str
    recipe: Recipe = field(default_factory=Recipe)
    model_args: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, hashable
    description: str = ""

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in self.model_args}

    def cache_key(self, data_fingerprint: str) -> str:
        """Hash of everything that decides the pretrained weights: data, model, recipe, code."""
        blob = json.dumps({"data": data_fingerprint, "model": self.model, "args": self.model_kwargs,
                           "recipe": asdict(self.recipe), "code": TRAIN_CODE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _task_from_table(name: str, t: dict[str, Any], source: str) -> Task:
    where = f"task {name!r} in {source}"
    allowed = {"description", "dataset", "model", "model_args", "recipe"}
    if not isinstance(t, dict):
        raise EvopruneError(f"{where}: expected a table")
    if extra := set(t) - allowed:
        raise EvopruneError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(allowed)})")
    for key in ("dataset", "model"):
        if not isinstance(t.get(key), str):
            raise EvopruneError(f"{where}: '{key}' (a string) is required")
    if t["model"] not in MODELS:
        raise EvopruneError(f"{where}: unknown model {t['model']!r}; known: {', '.join(MODELS)}")
    recipe_keys = {f.name for f in fields(Recipe)}
    recipe = t.get("recipe", {})
    if extra := set(recipe) - recipe_keys:
        raise EvopruneError(f"{where}: unknown recipe keys {sorted(extra)} (allowed: {sorted(recipe_keys)})")
    try:
        r = Recipe(**recipe)
    except EvopruneError as e:
        raise EvopruneError(f"{where}: {e}") from None
    return Task(name=name, dataset=t["dataset"], model=t["model"], recipe=r,
                model_args=tuple(sorted(t.get("model_args", {}).items())), description=t.get("description", ""))


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
