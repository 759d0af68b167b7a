"""Finalists validated on data orders the search never used, honestly reported.

After a search, its top distinct formulas and every seeded baseline are scored again on
`orders` fresh data orders (data_seed 2000, 2001, ...: the statistics' images, BN
recalibration and fine-tune order all change; the search used `[proxy] data_seed`, the proxy
check 0.. and 1000..). Each formula gets its mean fitness with a 95% CI, and its paired
difference (order by order) to the best baseline with a CI; a formula *beats* that baseline
only when the CI of the difference lies above 0, *loses* when below, and otherwise *ties*
(the intervals of the evolved formulas hold at 95% for all of them together: Bonferroni).
Results are stored as "validation" evaluations (one per task and order), so a resumed run
scores only what is missing and `evoprune metrics compare` and the report can show them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

from evoprune.db import store
from evoprune.evolve.config import Config
from evoprune.masks import TaskMasks, UnusableMetric
from evoprune.primitives.expr import parse
from evoprune.progress import hms
from evoprune.uncertainty import Comparison, against_best
from evoprune.workers.proxy import Job

VALIDATION_SEED0 = 2000


@dataclass
class Validation:
    seeds: list[int]
    best_baseline: int | None  # candidate ID
    results: dict[int, Comparison]  # candidate ID -> its validation

    def of(self, cid: int) -> Comparison | None:
        return self.results.get(cid)


def validate(cfg: Config, engine, run_id: int, evaluator, candidates: dict[int, str], baselines: set[int],
             orders: int, device: str, on_progress: Callable[[str, dict], None] | None = None) -> Validation:
    """Score `candidates` (ID -> expression) on `orders` fresh data orders (what is already
    stored is not redone) and compare each with the best of `baselines`."""
    on_progress = on_progress or (lambda kind, info: None)
    seeds = [VALIDATION_SEED0 + i for i in range(orders)]
    scores = store.validation_scores(engine, run_id)
    stats = sorted({s for e in candidates.values() for s in parse(e).stats()})
    r = cfg.run
    t0, worked = time.perf_counter(), 0  # orders with something to score (a resumed run has some done)
    for i, seed in enumerate(seeds):
        todo = {cid: e for cid, e in candidates.items() if seed not in scores.get(cid, {})}
        eta = f"  eta {hms((time.perf_counter() - t0) / worked * (orders - i))}" if worked and todo else ""
        on_progress("status", {"text": f"validating {len(candidates)} formulas on fresh data order {i + 1}/{orders}"
                                       f"{eta}"})
        if not todo:
            continue
        worked += 1
        proxy = replace(cfg.proxy, data_seed=seed)
        maskers = {t: TaskMasks.load(t, proxy.allocation, stats, stat_images=proxy.stat_images, seed=seed,
                                     data_root=r.data_root or None, cache_dir=r.cache_dir or None,
                                     tasks_file=r.tasks_file or None, device=device) for t in proxy.tasks}
        jobs = []
        for cid, expression in sorted(todo.items()):
            try:
                masks = {t: m(parse(expression)) for t, m in maskers.items()}
            except UnusableMetric:  # ranked the search's images, not these: it scores 0 here
                store.record_validation(engine, cid, seed, _zero(expression, proxy.tasks))
                continue
            jobs.append(Job(str(cid), expression, "full", masks, data_seed=seed))
        for job, rec in evaluator.run(jobs):
            store.record_validation(engine, int(job.key), seed, rec)
        scores = store.validation_scores(engine, run_id)
    wanted = {cid: {s: f for s, f in scores.get(cid, {}).items() if s in seeds} for cid in candidates}
    best, results = against_best(wanted, baselines)
    return Validation(seeds, best, results)


def _zero(expression: str, tasks):
    from evoprune.records import FitnessRecord, TaskResult

    return FitnessRecord(expression, "full", 0.0, False, "cannot rank the filters on these images",
                         {t: TaskResult(0.0, 1.0, 1.0, 0.0, "", 0.0) for t in tasks})
