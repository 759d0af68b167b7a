"""Engine setup and the service functions the driver and the CLI call. Each function owns its
transaction (`with Session(engine) as s, s.begin():`); the models never commit."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

from sqlalchemy import create_engine, delete, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError
from sqlalchemy.orm import Session

from evoprune.db.models import Base, Candidate, Evaluation, Generation, Meta, Run, utcnow
from evoprune.errors import EvopruneError
from evoprune.progress import counted
from evoprune.records import (
    CandidateRecord,
    FitnessRecord,
    GenerationRecord,
    RunStatus,
    TaskResult,
    TransferRecord,
    geometric_mean,
)

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


def known_revisions() -> set[str]:
    """The schema revisions this evoprune can read (db/migrations/versions)."""
    return {p.name.split("_")[0] for p in (Path(__file__).parent / "migrations" / "versions").glob("[0-9]*.py")}


def _peek_sqlite(path: Path) -> set[str]:
    """Look at an existing SQLite file read-only before anything opens it for writing: a file
    that is not ours, is damaged, or was written by a newer evoprune is refused, byte for byte
    untouched (opening it normally would already switch its journal to WAL)."""
    try:
        con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            revs = ([r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
                    if "alembic_version" in names else [])
        finally:
            con.close()
    except sqlite3.Error as e:  # not a database at all, or a damaged one
        raise EvopruneError(f"{path} is not an evoprune database ({e})") from None
    if names and "evoprune_meta" not in names:
        raise EvopruneError(f"{path} is a database of something else (tables: {sorted(names)[:5]})")
    if unknown := [r for r in revs if r not in known_revisions()]:
        raise EvopruneError(f"{path} was written by a newer evoprune (schema revision {unknown[0]}; this one knows "
                            f"up to {max(known_revisions())}): upgrade evoprune to read it")
    return names


def connect(url: str | None = None, *, create: bool = True) -> Engine:
    """An engine on `url` with the schema in place; a file that is not an evoprune database is
    refused with one clear message and left untouched."""
    url = resolve_url(url)
    if url == "sqlite://" or ":memory:" in url or "mode=memory" in url:
        raise EvopruneError(f"{url} is an in-memory database: everything in it is lost when evoprune exits; "
                            "give a file path or a server URL")
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?")[0])
        if path.exists():
            if not _peek_sqlite(path) and not create:
                raise EvopruneError(f"{path} holds no evoprune database (it is empty); run `evoprune evolve` first")
        elif not create:
            raise EvopruneError(f"no database at {path.resolve()} (run `evoprune evolve` first, or pass --db)")
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError, ValueError) as e:
        raise EvopruneError(f"bad database URL {url!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    from alembic.util.exc import CommandError

    try:
        _ensure_schema(engine)
    except CommandError as e:  # a revision this evoprune does not know: a newer evoprune wrote it
        engine.dispose()
        raise EvopruneError(f"{url}: the database was written by a newer evoprune ({e}); upgrade evoprune") from None
    except DatabaseError as e:
        engine.dispose()
        raise EvopruneError(f"{url} cannot be used as an evoprune database ({str(e.orig or e).splitlines()[0]})") \
            from None
    return engine


def _alembic(conn):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = conn
    return cfg


def _ensure_schema(engine: Engine) -> None:
    """A new database gets the newest schema; an older one is upgraded in place (Alembic).
    One made before migrations existed (no alembic_version) is the first schema, 0001. On a
    server, two searches starting at once take turns (an advisory lock), so neither sees half
    a schema."""
    from alembic import command
    from sqlalchemy import text

    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(741852963)"))
        names = set(inspect(conn).get_table_names())
        if names and "evoprune_meta" not in names:
            raise EvopruneError(f"{engine.url} is a database of something else (tables: {sorted(names)[:5]})")
        cfg = _alembic(conn)
        if not names:
            Base.metadata.create_all(conn)
            command.stamp(cfg, "head")
        else:
            if "alembic_version" not in names:
                command.stamp(cfg, "0001")
            command.upgrade(cfg, "head")
    try:
        with Session(engine) as s, s.begin():
            if s.get(Meta, "created_by") is None:
                s.add(Meta(key="created_by", value="evoprune"))
    except IntegrityError:  # another process wrote it first
        pass


# --------------------------------------------------------------------------- runs
def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused PID is not taken
    for the driver; "" where /proc does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_driver() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def driver_alive(host: str, driver: str) -> bool | None:
    """Whether a run's driver process still runs: True or False when it ran on this machine,
    None when that cannot be told from here (another machine, or a run from before 0003)."""
    import socket

    if not driver or host != socket.gethostname():
        return None
    pid, _, start = driver.partition(":")
    if start:
        return _start_time(int(pid)) == start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_run(engine: Engine, config: dict, seed: int, code_version: str) -> int:
    import socket

    with Session(engine) as s, s.begin():
        run = Run(config=config, seed=seed, code_version=code_version, host=socket.gethostname(),
                  driver=this_driver())
        s.add(run)
        s.flush()
        return run.id


def claim_run(engine: Engine, run_id: int, generations: int | None = None) -> Run:
    """Make this process the driver of a stored run (--resume); refused while its own driver
    still runs, and for a run that finished unless `generations` extends it. `generations`
    (--generations) becomes the run's number of generations: at least those it completed, and
    more than it had for a finished run (its config is updated)."""
    import socket

    with Session(engine, expire_on_commit=False) as s, s.begin():
        run = s.get(Run, run_id)
        if run is None:
            raise EvopruneError(f"no run with ID {run_id} in {engine.url}")
        search = dict((run.config or {}).get("search") or {})
        had = search.get("generations")
        if run.status == RunStatus.finished and (generations is None or not isinstance(had, int)
                                                 or generations <= had):
            more = f" (it ran {counted(had, 'generation')}; --generations more than that extends it)" \
                if isinstance(had, int) else ""
            raise EvopruneError(f"run {run_id} already finished{more}; or start a new search")
        if run.status == RunStatus.running and driver_alive(run.host, run.driver):
            raise EvopruneError(f"run {run_id} is still running (driver process {run.driver.split(':')[0]} on "
                                f"{run.host}); stop it before resuming")
        if generations is not None and generations != had:
            done = s.scalars(select(Generation.index).where(Generation.run_id == run_id)
                             .order_by(Generation.index.desc()).limit(1)).first()
            if done is not None and generations < done:
                raise EvopruneError(f"run {run_id} has completed {done} generations: --generations must be at least "
                                    f"{done}")
            run.config = {**run.config, "search": {**search, "generations": generations}}
        run.host, run.driver, run.status, run.ended = socket.gethostname(), this_driver(), RunStatus.running, None
        return run


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


# --------------------------------------------------------------------------- writes
def record_candidates(engine: Engine, run_id: int, rows: Iterable[CandidateRecord], summary: bool = False) -> None:
    """Insert new candidates with their evaluations; a known formula gets the new evaluations
    and its fitness raised to the best stage seen (a screen result never replaces a full one).
    One transaction: the known ones found by one query per 500 (not one each, which flushed
    every row on its own), the new rows inserted together. `summary`: the evaluations are the
    final round's (an extended run's generations do not see them: `candidate_records`); a
    generation's result for a stage the summary already ran (the same masks and data order:
    the same numbers) replaces the summary's rows."""
    rows = list(rows)
    with Session(engine) as s, s.begin():
        hashes = list(dict.fromkeys(row.canonical_hash for row in rows))
        known: dict[str, Candidate] = {}
        for i in range(0, len(hashes), 500):
            known.update((c.canonical_hash, c) for c in s.scalars(select(Candidate).where(
                Candidate.run_id == run_id, Candidate.canonical_hash.in_(hashes[i: i + 500]))))
        for row in rows:
            cand = known.get(row.canonical_hash)
            rec = row.record
            if cand is None:
                cand = known[row.canonical_hash] = Candidate(
                    run_id=run_id, expression=row.expression, canonical=row.canonical,
                    canonical_hash=row.canonical_hash, size=row.size, depth=row.depth, parents=list(row.parents),
                    birth_generation=row.birth_generation, is_baseline=row.baseline)
                s.add(cand)
            elif rec.stage != "full" and cand.stage == "full":
                continue
            elif not summary and cand.stage == rec.stage:
                s.execute(delete(Evaluation).where(Evaluation.candidate_id == cand.id, Evaluation.stage == rec.stage,
                                                   Evaluation.summary.is_(True)))
            cand.fitness, cand.stage, cand.valid, cand.reason = rec.fitness, rec.stage, rec.valid, rec.reason
            for task, r in rec.tasks.items():  # by the candidate's side: its stored evaluations are not loaded
                s.add(Evaluation(candidate=cand, task=task, stage=rec.stage, accuracy=r.accuracy, score=r.score,
                                 kept_flops=r.kept_flops, kept_params=r.kept_params, seconds=r.seconds,
                                 mask=r.mask, worker=rec.worker, diverged=r.diverged, summary=summary))


def record_generation(engine: Engine, run_id: int, g: GenerationRecord) -> None:
    with Session(engine) as s, s.begin():
        s.add(Generation(run_id=run_id, index=g.index, best=g.best, mean=g.mean, median=g.median,
                         size_mean=g.size_mean, diversity=g.diversity, evaluations=g.evaluations,
                         cache_hits=g.cache_hits, seconds=g.seconds, population=[list(p) for p in g.population],
                         rng_state=g.rng_state))


def record_validation(engine: Engine, candidate_id: int, seed: int, rec: FitnessRecord) -> None:
    """A candidate re-scored on a fresh data order (stage "validation"); its search fitness stays."""
    with Session(engine) as s, s.begin():
        for task, r in rec.tasks.items():
            s.add(Evaluation(candidate_id=candidate_id, task=task, stage="validation", accuracy=r.accuracy,
                             score=r.score, seed=seed, kept_flops=r.kept_flops, kept_params=r.kept_params,
                             seconds=r.seconds, mask=r.mask, worker=rec.worker, diverged=r.diverged))


def validation_scores(engine: Engine, run_id: int) -> dict[int, dict[int, float]]:
    """Candidate ID -> {data order: fitness} of the run's validation evaluations (the geometric
    mean over tasks of what the fitness used)."""
    with Session(engine) as s:
        rows = s.execute(select(Evaluation.candidate_id, Evaluation.seed, Evaluation.task, Evaluation.accuracy,
                                Evaluation.score).join(Candidate)
                         .where(Candidate.run_id == run_id, Evaluation.stage == "validation")).all()
    by: dict[int, dict[int, dict[str, float]]] = {}
    for cid, seed, task, acc, score in rows:
        by.setdefault(cid, {}).setdefault(seed, {})[task] = acc if score is None else score
    return {cid: {seed: geometric_mean(list(t.values())) for seed, t in seeds.items()} for cid, seeds in by.items()}


def record_transfer(engine: Engine, candidate_id: int | None, canonical_hash: str,
                    t: TransferRecord) -> tuple[int, int] | None:
    """Store a transfer result as an evaluation of the candidate named, else of the newest
    candidate with the same canonical formula; returns (candidate ID, evaluation ID), or None
    when there is no such candidate (nothing is stored). The same report stored again (a suite
    killed after storing a run and before noting it, then continued) is not stored twice: its
    evaluation's IDs are returned."""
    with Session(engine) as s, s.begin():
        if candidate_id is None:
            candidate_id = s.scalars(select(Candidate.id).where(Candidate.canonical_hash == canonical_hash)
                                     .order_by(Candidate.id.desc())).first()
        if candidate_id is None or s.get(Candidate, candidate_id) is None:
            return None
        same = s.scalars(select(Evaluation.id).where(
            Evaluation.candidate_id == candidate_id, Evaluation.stage == "transfer", Evaluation.task == t.task,
            Evaluation.seed == t.seed, Evaluation.mask == t.mask, Evaluation.accuracy == t.accuracy,
            Evaluation.seconds == t.seconds, Evaluation.worker == t.host[:128])).first()
        if same is not None:
            return candidate_id, same
        ev = Evaluation(candidate_id=candidate_id, task=t.task, stage="transfer", accuracy=t.accuracy,
                        kept_flops=t.kept_flops, kept_params=t.kept_params, seconds=t.seconds, mask=t.mask,
                        worker=t.host[:128], seed=t.seed)
        s.add(ev)
        s.flush()
        return candidate_id, ev.id


# --------------------------------------------------------------------------- reads
def candidates(engine: Engine, run_id: int) -> list[Candidate]:
    with Session(engine, expire_on_commit=False) as s:
        rows = s.scalars(select(Candidate).where(Candidate.run_id == run_id)).all()
        for r in rows:
            _ = r.evaluations  # load while the session is open
        return list(rows)


def candidate_records(engine: Engine, run_id: int, generations_only: bool = False) -> list[CandidateRecord]:
    """A run's candidates as typed records, each with the result of its best stage.
    `generations_only`: of the best stage its generations ran, without what the run's summary
    added (a finished run's summary fine-tunes candidates its generations only screened): what
    the caches of a run that goes on must hold, so that it goes on as an uninterrupted run would."""
    return [candidate_record(c, generations_only) for c in candidates(engine, run_id)]


def candidate_record(c: Candidate, generations_only: bool = False) -> CandidateRecord:
    """One loaded candidate (`candidates`) as `candidate_records` gives it."""
    stage, fitness = c.stage, c.fitness
    evals = [e for e in c.evaluations if e.stage == stage]
    summary_made = generations_only and evals and all(e.summary for e in evals)
    if summary_made:
        ran = [e for e in c.evaluations if e.stage in ("screen", "full") and not e.summary]
        stage = "full" if any(e.stage == "full" for e in ran) else "screen"
        evals = sorted((e for e in ran if e.stage == stage), key=lambda e: e.id)  # in the tasks' order
    tasks = {e.task: TaskResult(e.accuracy, e.kept_flops, e.kept_params, e.seconds, e.mask, e.score,
                                bool(e.diverged)) for e in evals}
    if summary_made:  # the fitness of the stage the generations left, as the proxy computes it
        fitness = geometric_mean([t.fitness_score for t in tasks.values()])
    rec = FitnessRecord(c.expression, stage, fitness, c.valid, c.reason, tasks, sum(e.seconds for e in evals),
                        evals[0].worker if evals else "")
    return CandidateRecord(c.expression, c.canonical, c.canonical_hash, c.size, c.depth, tuple(c.parents),
                           c.birth_generation, rec, c.is_baseline, c.id)


def last_generation(engine: Engine, run_id: int) -> GenerationRecord | None:
    with Session(engine) as s:
        g = s.scalars(select(Generation).where(Generation.run_id == run_id)
                      .order_by(Generation.index.desc()).limit(1)).first()
        if g is None:
            return None
        return GenerationRecord(index=g.index, best=g.best, mean=g.mean, median=g.median, size_mean=g.size_mean,
                                diversity=g.diversity, evaluations=g.evaluations, cache_hits=g.cache_hits,
                                seconds=g.seconds, population=tuple((e, f) for e, f in g.population),
                                rng_state=g.rng_state)
