"""Read-side queries behind `evoprune runs` and `evoprune metrics ...`: plain dicts out, so the
CLI can print them as a table, JSON or CSV."""
from __future__ import annotations

import statistics

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from evoprune.db.models import Candidate, Evaluation, Generation, Metric, Run
from evoprune.errors import EvopruneError
from evoprune.records import mask_key_of


def runs(engine: Engine) -> list[dict]:
    with Session(engine) as s:
        gens = dict(s.execute(select(Generation.run_id, func.max(Generation.index)).group_by(Generation.run_id)).all())
        best = dict(s.execute(select(Candidate.run_id, func.max(Candidate.fitness))
                              .where(Candidate.valid, Candidate.stage == "full").group_by(Candidate.run_id)).all())
        count = dict(s.execute(select(Candidate.run_id, func.count()).group_by(Candidate.run_id)).all())
        out = []
        for r in s.scalars(select(Run).order_by(Run.id)):
            out.append({"id": r.id, "status": _status(r), "started": r.started.isoformat(timespec="seconds"),
                        "ended": r.ended.isoformat(timespec="seconds") if r.ended else "",
                        "seed": r.seed, "tasks": ",".join(r.config.get("proxy", {}).get("tasks", [])),
                        "generations": gens.get(r.id, -1) + 1, "candidates": count.get(r.id, 0),
                        "best_fitness": best.get(r.id), "note": r.note or ""})
        return out


def _status(r: Run) -> str:
    """A run marked running whose driver process is gone was interrupted (killed, or its machine
    rebooted): say so, and that --resume continues it."""
    from evoprune.db.store import driver_alive

    if r.status.value == "running" and driver_alive(r.host, r.driver) is False:
        return "interrupted (driver gone; --resume continues it)"
    return r.status.value


def _cand_row(c: Candidate) -> dict:
    tasks = {e.task: e for e in c.evaluations if e.stage == c.stage}
    return {"id": c.id, "run": c.run_id, "fitness": c.fitness, "stage": c.stage, "size": c.size,
            "baseline": c.is_baseline, "canonical": c.canonical, "expression": c.expression,
            **{f"acc:{t}": e.accuracy for t, e in sorted(tasks.items())},
            # the mean over the tasks, as the search's summary table gives it
            "kept_flops": statistics.fmean(e.kept_flops for e in tasks.values()) if tasks else None,
            "masks": c.mask_key()}


def top(engine: Engine, run: int | None = None, task: str | None = None, limit: int = 10,
        distinct: bool = False) -> list[dict]:
    """Best valid formulas (fully evaluated ones first), optionally of one run, ranked by the
    fitness or by one task's validation accuracy. `distinct`: one formula per run and set of
    masks (the best ranked, then the smallest: formulas that prune the same filters on every task
    score alike in one run), each row with `same_masks`, how many others of its run prune as it does."""
    with Session(engine) as s:
        q = select(Candidate).where(Candidate.valid)
        if run is not None:
            _require_run(s, run)
            q = q.where(Candidate.run_id == run)
        if task is None:
            q = q.order_by((Candidate.stage == "full").desc(), Candidate.fitness.desc(), Candidate.size, Candidate.id)
        else:
            q = q.join(Evaluation).where(Evaluation.task == task, Evaluation.stage == Candidate.stage)
            q = q.order_by((Candidate.stage == "full").desc(), Evaluation.accuracy.desc(), Candidate.size,
                           Candidate.id)
        if not distinct:
            rows = [_cand_row(c) for c in s.scalars(q.options(selectinload(Candidate.evaluations))
                                                    .limit(limit)).unique()]
        else:  # the masks of the whole scope as plain rows, then only the listed candidates loaded
            masks: dict[int, list[tuple[str, str]]] = {}
            scope = select(Evaluation.candidate_id, Evaluation.task, Evaluation.mask).join(Candidate).where(
                Candidate.valid, Evaluation.stage == Candidate.stage)
            if run is not None:
                scope = scope.where(Candidate.run_id == run)
            for cid, t, mask in s.execute(scope):
                masks.setdefault(cid, []).append((t, mask))
            groups: dict[tuple[int, str], dict[int, None]] = {}  # per run: its proxy settings make the fitness
            for cid, rid in s.execute(q.with_only_columns(Candidate.id, Candidate.run_id)):
                groups.setdefault((rid, mask_key_of(masks.get(cid, ()))), {})[cid] = None
            listed = [list(g) for g in list(groups.values())[:limit]]
            loaded = {c.id: c for c in s.scalars(select(Candidate).where(Candidate.id.in_([g[0] for g in listed]))
                                                  .options(selectinload(Candidate.evaluations)))}
            rows = [{**_cand_row(loaded[g[0]]), "same_masks": len(g) - 1} for g in listed]
        if task is not None and not rows:
            raise EvopruneError(f"no candidate was evaluated on task {task!r}")
        return rows


def candidate(engine: Engine, cid: int) -> dict:
    """One candidate with its evaluations and its lineage (parents, as far as they are stored)."""
    with Session(engine) as s:
        c = s.get(Candidate, cid)
        if c is None:
            raise EvopruneError(f"no candidate with ID {cid} in {engine.url}")
        row = _cand_row(c)
        row.update(parents=c.parents, birth_generation=c.birth_generation, depth=c.depth, valid=c.valid,
                   reason=c.reason, evaluations=[{"task": e.task, "stage": e.stage, "accuracy": e.accuracy,
                                                  "kept_flops": e.kept_flops, "kept_params": e.kept_params,
                                                  "seconds": e.seconds, "worker": e.worker, "seed": e.seed,
                                                  "diverged": bool(e.diverged)}
                                                 for e in c.evaluations])
        row["lineage"] = _lineage(s, c)
        return row


def _lineage(s: Session, c: Candidate, depth: int = 4) -> list[dict]:
    """Ancestors found in the same run, breadth first, a few generations back."""
    out, frontier, seen = [], list(c.parents), set()
    for level in range(1, depth + 1):
        nxt = []
        for expr in frontier:
            if expr in seen:
                continue
            seen.add(expr)
            p = s.scalars(select(Candidate).where(Candidate.run_id == c.run_id, Candidate.expression == expr)).first()
            if p is not None:
                out.append({"level": level, "id": p.id, "fitness": p.fitness, "expression": p.expression})
                nxt.extend(p.parents)
        frontier = nxt
    return out


def pareto(engine: Engine, run: int) -> list[dict]:
    """The non-dominated fully evaluated formulas of a run: no other is both fitter and no
    larger (screened-only fitness is accuracy without fine-tuning: not comparable)."""
    with Session(engine) as s:
        _require_run(s, run)
        cands = s.scalars(select(Candidate).where(Candidate.run_id == run, Candidate.valid,
                                                  Candidate.stage == "full")
                          .options(selectinload(Candidate.evaluations))
                          .order_by(Candidate.size, Candidate.fitness.desc(), Candidate.id)).all()
        front, best = [], float("-inf")
        for c in cands:  # by size ascending: keep each one fitter than every smaller one
            if c.fitness > best:
                front.append(_cand_row(c))
                best = c.fitness
        return front


def validation(engine: Engine, run: int) -> dict[int, dict]:
    """Candidate ID -> its validation on fresh data orders (mean fitness and 95% CI; the paired
    difference to the run's best baseline, with its CI, and the verdict), for the candidates
    of `run` that were validated."""
    from evoprune.db.store import validation_scores
    from evoprune.uncertainty import against_best

    with Session(engine) as s:
        baselines = dict(s.execute(select(Candidate.id, Candidate.is_baseline)
                                   .where(Candidate.run_id == run, Candidate.is_baseline != "")).all())
    best, results = against_best(validation_scores(engine, run), set(baselines))
    out = {}
    for cid, r in results.items():
        out[cid] = {"val_fitness": r.fitness.mean, "val_low": r.fitness.low, "val_high": r.fitness.high,
                    "val_orders": r.fitness.n, "best_baseline": baselines.get(best, ""),
                    "diff": r.diff.mean if r.diff else None, "diff_low": r.diff.low if r.diff else None,
                    "diff_high": r.diff.high if r.diff else None, "verdict": r.verdict or "best baseline"}
    return out


def promote(engine: Engine, cid: int, name: str) -> dict:
    if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
        raise EvopruneError(f"metric name {name!r}: use letters, digits, '_', '-' or '.'")
    try:
        with Session(engine) as s, s.begin():
            c = s.get(Candidate, cid)
            if c is None:
                raise EvopruneError(f"no candidate with ID {cid} in {engine.url}")
            m = Metric(name=name, expression=c.expression, candidate_id=c.id)
            s.add(m)
            s.flush()
            return {"id": m.id, "name": name, "candidate": cid, "expression": c.expression}
    except IntegrityError:
        raise EvopruneError(f"a metric named {name!r} already exists") from None


def metric_by_name(engine: Engine, name: str) -> dict:
    with Session(engine) as s:
        m = s.scalars(select(Metric).where(Metric.name == name)).first()
        if m is None:
            raise EvopruneError(f"no metric named {name!r} (promote one with `evoprune metrics promote ID NAME`)")
        return {"id": m.id, "name": m.name, "expression": m.expression, "candidate": m.candidate_id}


def _require_run(s: Session, run: int) -> None:
    if s.get(Run, run) is None:
        raise EvopruneError(f"no run with ID {run}")
