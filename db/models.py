"""The metrics database: runs, generations, candidates, evaluations, promoted metrics.

SQLAlchemy 2.0 typed models. Models never commit: the service functions in `store.py` own
the transactions. Expressions are stored as strings in the project's grammar and read back
only through `evoprune.primitives.expr.parse`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Optional

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from evoprune.records import RunStatus, mask_key_of

SCHEMA_HEAD = "0006"  # the newest Alembic revision (db/migrations/versions); create_all builds this schema

intpk = Annotated[int, mapped_column(primary_key=True)]
expression = Annotated[str, mapped_column(Text)]
json_dict = Annotated[dict[str, Any], mapped_column(JSON, default=dict)]


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "evoprune_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[intpk]
    config: Mapped[json_dict]
    seed: Mapped[int]
    code_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[RunStatus] = mapped_column(default=RunStatus.running)
    started: Mapped[datetime] = mapped_column(default=utcnow)
    ended: Mapped[Optional[datetime]]
    note: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str] = mapped_column(String(255), default="", server_default="")  # the driver's machine
    driver: Mapped[str] = mapped_column(String(64), default="", server_default="")  # "PID:START" of its process
    generations: Mapped[list["Generation"]] = relationship(back_populates="run", order_by="Generation.index")


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("run_id", "index"),)
    id: Mapped[intpk]
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int]
    best: Mapped[float]
    mean: Mapped[float]
    median: Mapped[float]
    size_mean: Mapped[float]
    diversity: Mapped[float]  # distinct canonical formulas / population
    evaluations: Mapped[int]  # proxy runs actually executed this generation
    cache_hits: Mapped[int]
    seconds: Mapped[float]
    population: Mapped[list[Any]] = mapped_column(JSON)  # [[expression, fitness], ...] in order
    rng_state: Mapped[list[Any]] = mapped_column(JSON)  # Python random state after this generation
    created: Mapped[datetime] = mapped_column(default=utcnow)
    run: Mapped[Run] = relationship(back_populates="generations")


class Candidate(Base):
    """A distinct formula of a run (one row per canonical form)."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("run_id", "canonical_hash"), Index("ix_candidates_fitness", "run_id", "fitness"))
    id: Mapped[intpk]
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    expression: Mapped[expression]
    canonical: Mapped[expression]
    canonical_hash: Mapped[str] = mapped_column(String(32))
    size: Mapped[int]
    depth: Mapped[int]
    parents: Mapped[list[Any]] = mapped_column(JSON, default=list)  # parent expressions
    birth_generation: Mapped[int]
    fitness: Mapped[float] = mapped_column(default=0.0)  # best stage's fitness
    stage: Mapped[str] = mapped_column(String(16), default="")
    valid: Mapped[bool] = mapped_column(default=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    is_baseline: Mapped[str] = mapped_column(String(32), default="")  # baseline name when seeded
    evaluations: Mapped[list["Evaluation"]] = relationship(back_populates="candidate")

    def mask_key(self) -> str:
        """Equal for two formulas that prune the same filters on every task (at their best stage)."""
        return mask_key_of((e.task, e.mask) for e in self.evaluations if e.stage == self.stage)


class Evaluation(Base):
    """One candidate on one task at one proxy stage."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_task_stage", "task", "stage"),)
    id: Mapped[intpk]
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(128))
    stage: Mapped[str] = mapped_column(String(16))  # screen | full | validation | transfer
    accuracy: Mapped[float]
    score: Mapped[Optional[float]]  # what the fitness used, when not the accuracy ([proxy] score)
    seed: Mapped[Optional[int]]  # the data order (validation) or retraining seed (transfer), when it varies
    diverged: Mapped[Optional[bool]]  # some validation outputs were not finite (NULL before revision 0005)
    # made by the run's summary, not by its generations (NULL before revision 0006: not known)
    summary: Mapped[Optional[bool]]
    kept_flops: Mapped[float]
    kept_params: Mapped[float]
    seconds: Mapped[float]
    mask: Mapped[str] = mapped_column(String(32), default="")
    worker: Mapped[str] = mapped_column(String(128), default="")
    created: Mapped[datetime] = mapped_column(default=utcnow)
    candidate: Mapped[Candidate] = relationship(back_populates="evaluations")


class Metric(Base):
    """A formula promoted by name for reuse."""

    __tablename__ = "metrics"
    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(128), unique=True)
    expression: Mapped[expression]
    candidate_id: Mapped[Optional[int]] = mapped_column(ForeignKey("candidates.id", ondelete="SET NULL"))
    created: Mapped[datetime] = mapped_column(default=utcnow)
