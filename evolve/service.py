"""`evoprune evolve` as a service function: config -> a finished (or resumed) run in the database."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from evoprune.db import store
from evoprune.evolve.config import Config
from evoprune.evolve.engine import GenerationReport, Search, record_from_candidate
from evoprune.train import pick_device
from evoprune.workers.evaluator import InProcessEvaluator, Job, RayEvaluator, WorkerSpec
from evoprune.workers.proxy import FitnessRecord


@dataclass
class Finalist:
    candidate_id: int
    expression: str
    canonical: str
    size: int
    record: FitnessRecord
    baseline: str = ""


@dataclass
class SearchResult:
    run_id: int
    finalists: list[Finalist]  # the top formulas with distinct masks, fully evaluated
    baselines: list[Finalist]  # the seeded baselines, fully evaluated
    history: list[GenerationReport]
    counters: dict


def _spec(cfg: Config, device: str) -> WorkerSpec:
    r = cfg.run
    return WorkerSpec(proxy=cfg.proxy, stats=tuple(cfg.search.stat_names), data_root=r.data_root or None,
                      cache_dir=r.cache_dir or None, tasks_file=r.tasks_file or None, device=device)


def _workers(requested: int, gpus_per_worker: float) -> tuple[int, float]:
    """-1: one actor per GPU share the cluster offers (gpus_per_worker, default 1), else one per
    CPU left after the driver's."""
    if requested > 0:
        return requested, gpus_per_worker
    import ray

    from evoprune.workers.evaluator import init_ray

    init_ray()
    res = ray.cluster_resources()
    if res.get("GPU", 0) > 0:
        share = gpus_per_worker or 1.0
        return max(1, int(res["GPU"] / share + 1e-9)), share
    return max(1, int(res.get("CPU", 2)) - 1), 0.0


def run_search(cfg: Config, *, db_url: str | None = None, resume: int | None = None, top: int = 5,
               on_progress: Callable[[str, dict], None] | None = None) -> SearchResult:
    engine = store.connect(db_url or cfg.run.db)
    if resume is not None:  # what is searched comes from the run; where it runs, from this call
        stored = Config.from_dict(store.get_run(engine, resume).config, f"run {resume}")
        cfg = replace(stored, run=cfg.run)
    device = str(pick_device(cfg.run.device))
    on_progress = on_progress or (lambda kind, info: None)
    on_progress("status", {"text": f"loading tasks {', '.join(cfg.proxy.tasks)} (pretraining on first use)"})
    driver_spec = _spec(cfg, "cpu" if cfg.run.workers else device)
    contexts = driver_spec.contexts()  # the driver computes masks (for the mask cache) on the CPU
    if cfg.run.workers:
        n, gpus = _workers(cfg.run.workers, cfg.run.gpus_per_worker)
        on_progress("status", {"text": f"{n} Ray workers, {gpus:g} GPU each"})
        evaluator = RayEvaluator(_spec(cfg, "cuda" if gpus else "cpu"), n, gpus)
    else:
        evaluator = InProcessEvaluator(driver_spec, contexts)
    try:
        search = Search(cfg, evaluator, contexts, engine, on_progress)
        on_progress("status", {"text": "searching"})
        search.run(resume_from=resume)
        on_progress("status", {"text": "fine-tuning the finalists and the baselines for the summary"})
        finalists, baselines = _final_round(search, engine, evaluator, top)
    finally:
        evaluator.close()
    return SearchResult(search.run_id, finalists, baselines, search.history, search.counters.snapshot())


def _final_round(search: Search, engine, evaluator, top: int) -> tuple[list[Finalist], list[Finalist]]:
    """Full-proxy results for the best formulas and the seeded baselines (racing may have only
    screened some of them), so the summary compares like with like."""
    cands = store.candidates(engine, search.run_id)
    valid = sorted((c for c in cands if c.valid), key=lambda c: (-c.fitness, c.size, c.id))
    seeds = [c for c in cands if c.is_baseline]
    need = {c.expression for c in valid[: top * 2] + seeds if c.stage != "full" and c.valid}
    if need:
        jobs = [Job(e, e, "full") for e in sorted(need)]
        rows = []
        for job, rec in evaluator.run(jobs):
            c = next(c for c in cands if c.expression == job.expression)
            rows.append(store.CandidateRow(c.expression, c.canonical, c.canonical_hash, c.size, c.depth, c.parents,
                                           c.birth_generation, rec.to_dict(), c.is_baseline))
        store.record_candidates(engine, search.run_id, rows)
        cands = store.candidates(engine, search.run_id)

    def fin(c):
        return Finalist(c.id, c.expression, c.canonical, c.size, record_from_candidate(c), c.is_baseline)

    ranked = sorted((c for c in cands if c.valid and c.stage == "full"), key=lambda c: (-c.fitness, c.size, c.id))
    distinct, seen = [], set()
    for c in ranked:  # one formula per set of masks: the others prune exactly the same filters
        if c.mask_key() not in seen:
            seen.add(c.mask_key())
            distinct.append(fin(c))
    return distinct[:top], sorted((fin(c) for c in cands if c.is_baseline), key=lambda f: -f.record.fitness)
