"""Masks are made once, in the driver, and the hash stored for an evaluation is the hash of the
masks the worker trained: on Ray workers, on CUDA, and in the transfer stage alike."""
from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest
import torch

from evoprune.allocators import Allocation
from evoprune.db import store
from evoprune.evolve.config import Config, ProxyConfig, SearchConfig
from evoprune.evolve.engine import Search
from evoprune.evolve.service import StoreRecorder, run_search
from evoprune.masks import TaskMasks, UnusableMetric, make_masks, mask_hash
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.primitives.stats import STATS
from evoprune.workers.evaluator import InProcessEvaluator, RayEvaluator, WorkerSpec
from evoprune.workers.proxy import Job

TINY_PROXY = ProxyConfig(tasks=("digits-cnn",), finetune_steps=3, recalibrate_images=128, stat_images=128)


@pytest.fixture(scope="module")
def masker(digits_pretrained, cache_dir) -> TaskMasks:
    return TaskMasks.load("digits-cnn", TINY_PROXY.allocation, list(STATS), stat_images=128, seed=0,
                          cache_dir=cache_dir)


def _stored_masks_match_the_driver(engine, run_id: int, masker: TaskMasks, worker_prefix: str) -> int:
    checked = 0
    for c in store.candidates(engine, run_id):
        if not c.valid:
            continue
        want = mask_hash(masker(parse(c.expression)))
        for e in c.evaluations:
            assert e.mask == want, (c.expression, e.stage)
            assert e.worker.startswith(worker_prefix), e.worker
            checked += 1
    return checked


def test_ray_workers_train_the_masks_the_driver_made(ray_session, masker, cache_dir, tmp_path):
    cfg = Config(search=SearchConfig(population=8, generations=1, seed=5, seeds=("l1", "fpgm", "pfp")),
                 proxy=TINY_PROXY)
    evaluator = RayEvaluator(WorkerSpec(proxy=cfg.proxy, cache_dir=str(cache_dir)), workers=2)
    engine = store.connect(f"sqlite:///{tmp_path / 'ray.db'}")
    recorder = StoreRecorder.new_run(engine, cfg)
    try:
        Search(cfg, evaluator, {"digits-cnn": masker}, recorder).run()
        held = evaluator.ray.get([a.__ray_call__.remote(lambda self: sorted(vars(self.contexts["digits-cnn"])))
                                  for a in (s.actor for s in evaluator.slots)])
        assert all("base" in h and "table" not in h for h in held), held  # the model, no statistics
    finally:
        evaluator.close()
    assert _stored_masks_match_the_driver(engine, recorder.run_id, masker, "ray-") >= 3


def _candidates(engine, run_id: int) -> list[tuple]:
    return sorted((c.expression, c.birth_generation, c.fitness, c.valid) for c in store.candidates(engine, run_id))


class _Drawing:
    """An evaluator as the engine sees it, counting the jobs drawn from the engine."""

    def __init__(self, inner, log: dict):
        self.inner, self.log = inner, log
        self.concurrent, self.size = inner.concurrent, inner.size

    def run(self, jobs):
        return self.inner.run(self._count(jobs))

    def _count(self, jobs):
        for job in jobs:
            self.log["drawn"] += 1
            yield job


class _Writes(StoreRecorder):
    """The store recorder, noting how many jobs had been drawn when each generation was written."""

    def __init__(self, engine, run_id: int, log: dict):
        super().__init__(engine, run_id)
        self.log = log

    def generation(self, record) -> None:
        self.log["written"][record.index] = self.log["drawn"]
        super().generation(record)


def test_a_pool_gets_each_child_as_it_is_bred_and_gives_the_in_process_run(ray_session, masker, cache_dir,
                                                                           tmp_path):
    """Ray workers train a generation's first children while the driver breeds and simplifies
    the rest (the first result comes back before the last job is made), a generation is written
    once the next one's first job is out (the workers do not wait for the database), and the run
    (candidates, fitnesses, populations) is the one the same search makes in this process, one
    job at a time, writing each generation at its end."""
    cfg = Config(search=SearchConfig(population=24, generations=2, seed=2, seeds=("l1", "fpgm")),
                 proxy=TINY_PROXY)
    spec = WorkerSpec(proxy=cfg.proxy, cache_dir=str(cache_dir), threads=1)  # as the actors: same floats
    runs, totals, logs = {}, {}, {}
    for name in ("pool", "here"):
        engine = store.connect(f"sqlite:///{tmp_path / name}.db")
        log = logs[name] = {"drawn": 0, "written": {}}
        recorder = _Writes(engine, StoreRecorder.new_run(engine, cfg).run_id, log)
        evaluator = _Drawing(RayEvaluator(spec, workers=2) if name == "pool" else InProcessEvaluator(spec), log)
        seen = totals.setdefault(name, {})

        def note(kind, info, seen=seen):
            if kind == "evaluation" and info["stage"] == "screen":
                seen.setdefault(info["generation"], []).append(info["total"])

        search = Search(cfg, evaluator, {"digits-cnn": masker}, recorder, note)
        try:
            pop = search.run()
        finally:
            evaluator.inner.close()
            search.close()
        runs[name] = ([(str(i), i.raw) for i in pop], _candidates(engine, recorder.run_id),
                      [h.best for h in search.history])
        log["made"] = [h.counters["evaluations"] for h in search.history]  # jobs made up to each generation's end
    assert runs["pool"] == runs["here"]
    for g in (1, 2):
        first, last = totals["pool"][g][0], totals["pool"][g][-1]
        assert first < last, (g, totals["pool"][g])  # jobs still being made when the first came back
        assert totals["here"][g][0] == 1  # in this process: one made, one run
    pool, here = logs["pool"], logs["here"]
    assert [pool["written"][g] > pool["made"][g] for g in range(3)] == [True, True, False]  # the last: at the end
    assert [here["written"][g] for g in range(3)] == here["made"]


def test_a_frozen_worker_costs_time_not_results(ray_session, masker, cache_dir):
    """Two calls wait on each actor; one actor frozen (SIGSTOP: a node that hangs without a word)
    holds both: after the timeout both run again on a new actor, each job returns once, and
    every result is the one this process computes."""
    proxy = replace(TINY_PROXY, timeout_s=4.0)
    spec = WorkerSpec(proxy=proxy, cache_dir=str(cache_dir), threads=1)
    jobs = [Job(name, BASELINES[name].expression, "full", {"digits-cnn": masker(BASELINES[name].node)})
            for name in ("l1", "l2", "bn_scale", "fpgm", "pfp", "taylor")]
    here = {job.key: rec.fitness for job, rec in InProcessEvaluator(spec).run(jobs)}
    pool = RayEvaluator(spec, workers=2)
    frozen = []
    try:
        victim = pool.pids()[0]
        got = {}
        for job, rec in pool.run(jobs):
            assert job.key not in got
            got[job.key] = rec.fitness
            if not frozen:
                os.kill(victim, signal.SIGSTOP)
                frozen.append(victim)
        assert got == here
        assert pool.restarts >= 1 and victim not in pool.pids()
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pool.close()


@pytest.mark.gpu
def test_cuda_workers_train_the_masks_the_driver_made(masker, cache_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = Config(search=SearchConfig(population=8, generations=1, seed=5, seeds=("l1", "fpgm", "pfp")),
                 proxy=TINY_PROXY)
    cfg = Config(search=cfg.search, proxy=cfg.proxy, run=type(cfg.run)(cache_dir=str(cache_dir), device="cuda"))
    res = run_search(cfg, db_url=f"sqlite:///{tmp_path / 'cuda.db'}")
    engine = store.connect(f"sqlite:///{tmp_path / 'cuda.db'}")
    assert _stored_masks_match_the_driver(engine, res.run_id, masker, "local-") >= 3


def test_one_function_makes_the_masks_of_search_and_transfer(masker):
    """The same formula, table and allocation give the same masks whether the search asks
    (every layer alone) or the transfer stage does (explicit singleton groups)."""
    node = parse("div(w_l1, add(bn_abs_gamma, 0.1))")
    alone = masker(node)
    groups = [[n] for n in masker.table.layers]
    assert mask_hash(alone) == mask_hash(make_masks(node, masker.table, masker.allocation, masker.structure, groups))
    assert all(int(m.sum()) == max(1, -(-len(m) // 4)) for m in alone.values())  # ratio 0.75: a quarter kept
    two = make_masks(node, masker.table, masker.allocation, masker.structure, [masker.table.layers[:2]])
    a, b = masker.table.layers[:2]
    assert list(two) == [a, b] and torch.equal(two[a], two[b])  # a group shares one mask
    with pytest.raises(UnusableMetric, match="constant"):
        masker(parse("add(layer_width, 1.0)"))  # the same score for every filter of a layer
    with pytest.raises(UnusableMetric, match="reads no statistic"):
        masker(parse("1.0"))


def test_flops_target_out_of_reach_is_an_error(masker):
    node = parse("w_l1")
    last = [[masker.table.layers[-1]]]  # one layer's MACs cannot make half the model's
    with pytest.raises(Exception, match="removes at most"):
        make_masks(node, masker.table, Allocation(kind="flops", flops_reduction=0.5), masker.structure, last)


@pytest.mark.parametrize("allocator, extra", [("pfp", {"ratio": 0.6}), ("spectral", {"target": "tau", "tau": 0.05}),
                                              ("spectral", {"target": "flops", "flops_reduction": 0.6})])
def test_the_search_runs_with_the_budget_allocators(allocator, extra, digits_pretrained, cache_dir, tmp_path):
    """The allocator reads what it needs (PFP's sensitivities, the spectra) even when the search
    may not use those statistics in its formulas."""
    from dataclasses import replace

    cfg = Config(search=SearchConfig(population=6, generations=1, seed=0, seeds=("l1", "bn_scale"),
                                     stats=("w_l1", "w_l2", "bn_abs_gamma")),
                 proxy=ProxyConfig(tasks=("digits-cnn",), finetune_steps=2, recalibrate_images=64, stat_images=64,
                                   allocator=allocator, **extra))
    cfg = replace(cfg, run=replace(cfg.run, cache_dir=str(cache_dir), device="cpu"))
    res = run_search(cfg, db_url=f"sqlite:///{tmp_path / 'a.db'}")
    rows = [r for f in res.finalists for r in f.record.tasks.values()]
    assert rows and all(0 < r.kept_params < 1 for r in rows)
    if extra.get("target") == "flops":
        assert all(r.kept_flops <= 0.4 + 1e-6 for r in rows)
