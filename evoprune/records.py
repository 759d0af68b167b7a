"""The records that cross layers: what a worker returns, what the search hands its recorder,
what the database stores and gives back. Plain typed dataclasses, no behaviour beyond
conversion, so `db/`, `workers/` and `evolve/` can all import them without importing each other.
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class RunStatus(str, enum.Enum):
    running = "running"
    finished = "finished"
    failed = "failed"
    interrupted = "interrupted"


@dataclass
class TaskResult:
    """One candidate's masks trained (or screened) on one task."""

    accuracy: float  # validation top-1 after the stage
    kept_flops: float  # share of the prunable layers' MACs left (depthwise followers included)
    kept_params: float  # share of their parameters left
    seconds: float
    mask: str  # hash of the masks the worker applied (evoprune.masks.mask_hash)
    score: float | None = None  # what the fitness uses ([proxy] score); None: the accuracy
    diverged: bool = False  # some validation outputs were not finite (they count wrong, probability 0)

    @property
    def fitness_score(self) -> float:
        return self.accuracy if self.score is None else self.score


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitnessRecord":
        d = dict(d)
        d["tasks"] = {k: TaskResult(**v) for k, v in d.get("tasks", {}).items()}
        return cls(**d)

    def renamed(self, expression: str) -> "FitnessRecord":
        """The same result for another formula with the same masks."""
        return replace(self, expression=expression)

    def mask_key(self, tasks) -> tuple[str, ...]:
        return tuple(self.tasks[t].mask for t in tasks)


def mask_key_of(masks) -> str:
    """One key for a formula's (task, mask hash) pairs, in any order and with repeats (a stage
    stored twice): equal for two formulas that prune the same filters on every task."""
    return ",".join(sorted({f"{t}:{m}" for t, m in masks}))


def invalid(expression: str, reason: str, stage: str = "screen") -> FitnessRecord:
    return FitnessRecord(expression, stage, 0.0, False, reason)


def geometric_mean(values: list[float]) -> float:
    if not values or min(values) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class CandidateRecord:
    """A distinct formula of a run with the result of its best stage."""

    expression: str
    canonical: str
    canonical_hash: str
    size: int
    depth: int
    parents: tuple[str, ...]
    birth_generation: int
    record: FitnessRecord
    baseline: str = ""  # the baseline's name when it was seeded
    id: int | None = None  # the database's ID, once stored

    def mask_key(self) -> str:
        """Equal for two formulas that prune the same filters on every task (at their best stage)."""
        return mask_key_of((t, r.mask) for t, r in self.record.tasks.items())


@dataclass(frozen=True)
class GenerationRecord:
    """One completed generation: statistics, the population and the random state after it."""

    index: int
    best: float
    mean: float
    median: float
    size_mean: float
    diversity: float  # distinct canonical formulas / population
    evaluations: int  # proxy runs executed in this generation
    cache_hits: int
    seconds: float
    population: tuple[tuple[str, float], ...]  # (expression, raw fitness), in order
    rng_state: Any  # Python's random state after this generation, as JSON


@dataclass(frozen=True)
class TransferRecord:
    """`evoprune prune`'s result, stored as a "transfer" evaluation of a candidate."""

    task: str
    accuracy: float  # test top-1 after retraining
    kept_flops: float
    kept_params: float
    seconds: float
    mask: str
    host: str
    seed: int | None = None  # the retraining seed, when a suite runs several
