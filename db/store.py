"""Engine setup and the service functions the driver and the CLI call. Each function owns its
transaction (`with Session(engine) as s, s.begin():`); the models never commit."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session

from evoprune.db.models import Base, Candidate, Evaluation, Generation, Meta, Run, RunStatus, utcnow
from evoprune.errors import EvopruneError

DEFAULT_URL = "sqlite:///evoprune.db"


def resolve_url(flag: str | None = None, config: str | None = None) -> str:
    """--db, then $EVOPRUNE_DB, then the config, then ./evoprune.db. A bare path means SQLite."""
    url = flag or os.environ.get("EVOPRUNE_DB") or config or DEFAULT_URL
    return url if "://" in url else f"sqlite:///{url}"


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cur.execute("PRAGMA busy_timeout=30000")  # ms a writer waits for another writer
    cur.close()


def connect(url: str | None = None, *, create: bool = True) -> Engine:
    """An engine on `url` with the schema in place; a file that is not an evoprune database is
    refused with one clear message and left untouched."""
    url = resolve_url(url)
    if url.startswith("sqlite:///") and not create:
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise EvopruneError(f"no database at {path.resolve()} (run `evoprune evolve` first, or pass --db)")
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError) as e:
        raise EvopruneError(f"bad database URL {url!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        _ensure_schema(engine)
    except DatabaseError as e:
        engine.dispose()
        raise EvopruneError(f"{url} is not an evoprune database ({e.orig or e})") from None
    return engine


def _alembic(conn):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = conn
    return cfg


def _ensure_schema(engine: Engine) -> None:
    """A new database gets the newest schema; an older one is upgraded in place (Alembic).
    One made before migrations existed (no alembic_version) is the first schema, 0001."""
    from alembic import command

    names = set(inspect(engine).get_table_names())
    if names and "evoprune_meta" not in names:
        raise EvopruneError(f"{engine.url} is a database of something else (tables: {sorted(names)[:5]})")
    with engine.begin() as conn:
        cfg = _alembic(conn)
        if not names:
            Base.metadata.create_all(conn)
            command.stamp(cfg, "head")
        else:
            if "alembic_version" not in names:
                command.stamp(cfg, "0001")
            command.upgrade(cfg, "head")
    with Session(engine) as s, s.begin():
        if s.get(Meta, "created_by") is None:
            s.add(Meta(key="created_by", value="evoprune"))


# --------------------------------------------------------------------------- runs
def create_run(engine: Engine, config: dict, seed: int, code_version: str) -> int:
    import socket

    with Session(engine) as s, s.begin():
        run = Run(config=config, seed=seed, code_version=code_version, host=socket.gethostname())
        s.add(run)
        s.flush()
        return run.id


def set_status(engine: Engine, run_id: int, status: RunStatus, note: str = "") -> None:
    with Session(engine) as s, s.begin():
        run = s.get(Run, run_id)
        run.status = status
        run.ended = None if status == RunStatus.running else utcnow()
        if note:
            run.note = note


def get_run(engine: Engine, run_id: int) -> Run:
    with Session(engine, expire_on_commit=False) as s:
        run = s.get(Run, run_id)
        if run is None:
            raise EvopruneError(f"no run with ID {run_id} in {engine.url}")
        return run


def last_generation(engine: Engine, run_id: int) -> Generation | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalars(select(Generation).where(Generation.run_id == run_id)
                         .order_by(Generation.index.desc()).limit(1)).first()


# --------------------------------------------------------------------------- writes
@dataclass
class CandidateRow:
    expression: str
    canonical: str
    canonical_hash: str
    size: int
    depth: int
    parents: list[str]
    birth_generation: int
    record: dict  # a FitnessRecord as a dict
    is_baseline: str = ""


def record_candidates(engine: Engine, run_id: int, rows: Iterable[CandidateRow]) -> None:
    """Insert new candidates with their evaluations; a known formula gets the new evaluations
    and its fitness raised to the best stage seen."""
    with Session(engine) as s, s.begin():
        for row in rows:
            cand = s.scalars(select(Candidate).where(Candidate.run_id == run_id,
                                                     Candidate.canonical_hash == row.canonical_hash)).first()
            rec = row.record
            if cand is None:
                cand = Candidate(run_id=run_id, expression=row.expression, canonical=row.canonical,
                                 canonical_hash=row.canonical_hash, size=row.size, depth=row.depth,
                                 parents=row.parents, birth_generation=row.birth_generation,
                                 is_baseline=row.is_baseline)
                s.add(cand)
            elif rec["stage"] == "full" or cand.stage != "full":
                pass
            else:
                continue  # a screen result never replaces a full one
            cand.fitness, cand.stage, cand.valid, cand.reason = rec["fitness"], rec["stage"], rec["valid"], rec["reason"]
            for task, r in rec["tasks"].items():
                cand.evaluations.append(Evaluation(task=task, stage=rec["stage"], accuracy=r["accuracy"],
                                                   kept_flops=r["kept_flops"], kept_params=r["kept_params"],
                                                   seconds=r["seconds"], mask=r["mask"], worker=rec["worker"]))


def record_generation(engine: Engine, run_id: int, index: int, stats: dict[str, Any],
                      population: list[tuple[str, float]], rng_state: Any) -> None:
    with Session(engine) as s, s.begin():
        s.add(Generation(run_id=run_id, index=index, population=[list(p) for p in population],
                         rng_state=rng_state, **stats))


# --------------------------------------------------------------------------- reads
def candidates(engine: Engine, run_id: int) -> list[Candidate]:
    with Session(engine, expire_on_commit=False) as s:
        rows = s.scalars(select(Candidate).where(Candidate.run_id == run_id)).all()
        for r in rows:
            _ = r.evaluations  # load while the session is open
        return list(rows)


def top_candidates(engine: Engine, run_id: int, limit: int = 5) -> list[Candidate]:
    with Session(engine, expire_on_commit=False) as s:
        rows = s.scalars(select(Candidate).where(Candidate.run_id == run_id, Candidate.valid)
                         .order_by(Candidate.fitness.desc(), Candidate.size, Candidate.id).limit(limit)).all()
        for r in rows:
            _ = r.evaluations
        return list(rows)
