"""The search: DEAP genetic programming over metric expressions.

One generation: tournament selection (with a parsimony term) -> subtree crossover or one of
four mutations (uniform subtree, node replacement, shrink, constant tweak) under height and
size limits -> evaluation of the new individuals -> the elites and offspring form the next
population. Evaluation never runs twice for the same formula (canonical form) nor for the
same masks (mask hash: identical masks give identical fitness under the fixed data order),
and with racing on, every new candidate is screened (BN recalibration, no training) and only
the best share is fine-tuned.

Each generation is written to the database as it completes, with the population and the
random state, so `resume` continues a killed run exactly where the uninterrupted one would be.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from deap import base, creator, gp, tools

from evoprune import __version__
from evoprune.db import store
from evoprune.db.models import RunStatus
from evoprune.evolve.config import Config
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import Node, canonical, canonical_hash, parse
from evoprune.primitives.pset import Vec, build_pset, to_deap
from evoprune.workers.allocators import mask_hash
from evoprune.workers.evaluator import Job
from evoprune.workers.proxy import FitnessRecord, TaskContext, TaskResult, invalid


def _types():
    """DEAP creator types, created once per process (driver and workers alike)."""
    if not hasattr(creator, "EvoFitness"):
        creator.create("EvoFitness", base.Fitness, weights=(1.0,))
    if not hasattr(creator, "EvoIndividual"):
        creator.create("EvoIndividual", gp.PrimitiveTree, fitness=creator.EvoFitness, raw=0.0, parents=list)
    return creator.EvoIndividual


@dataclass
class Counters:
    evaluations: int = 0  # proxy runs executed (screen or full)
    full: int = 0  # full fine-tunes executed
    screened_only: int = 0  # candidates racing kept from the full fine-tune
    canonical_hits: int = 0  # formula seen before
    mask_hits: int = 0  # new formula, masks seen before
    invalid: int = 0  # rejected before any proxy run

    def snapshot(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationReport:
    index: int
    best: float
    best_expression: str
    mean: float
    evaluations: int
    cache_hits: int
    seconds: float
    counters: dict = field(default_factory=dict)


class Search:
    def __init__(self, cfg: Config, evaluator, contexts: dict[str, TaskContext], engine,
                 on_progress: Callable[[str, dict], None] | None = None):
        self.cfg, self.evaluator, self.contexts, self.db = cfg, evaluator, contexts, engine
        self.on_progress = on_progress or (lambda kind, info: None)
        self.Individual = _types()
        s = cfg.search
        self.pset = build_pset(s.stat_names, s.op_names)
        self.toolbox = self._toolbox()
        self.records: dict[str, FitnessRecord] = {}  # canonical hash -> best record
        self.by_masks: dict[tuple, FitnessRecord] = {}  # per-task mask hashes -> record
        self.canon: dict[str, tuple[str, str]] = {}  # expression -> (canonical, hash)
        self.counters = Counters()
        self.run_id: int | None = None
        self.history: list[GenerationReport] = []
        # the best distinct formulas seen (by canonical form); rebuilt from the database on resume
        self.hall_of_fame = tools.HallOfFame(s.hall_of_fame, similar=lambda a, b: self._same(a, b))

    # ------------------------------------------------------------------ setup
    def _toolbox(self) -> base.Toolbox:
        s, tb = self.cfg.search, base.Toolbox()
        tb.register("expr", gp.genHalfAndHalf, pset=self.pset, min_=s.init_min_depth, max_=s.init_max_depth,
                    type_=Vec)
        tb.register("individual", tools.initIterate, self.Individual, tb.expr)
        tb.register("select", tools.selTournament, tournsize=s.tournament)
        mutations = [lambda ind: gp.mutUniform(ind, expr=lambda pset, type_: gp.genFull(pset, 0, 2, type_),
                                               pset=self.pset),
                     lambda ind: gp.mutNodeReplacement(ind, pset=self.pset),
                     gp.mutShrink,
                     lambda ind: gp.mutEphemeral(ind, "one")]
        limits = [gp.staticLimit(key=lambda t: t.height, max_value=s.max_height),
                  gp.staticLimit(key=len, max_value=s.max_size)]
        tb.register("mate", gp.cxOnePoint)
        for lim in limits:
            tb.decorate("mate", lim)
        self.mutations = []
        for m in mutations:
            f = m
            for lim in limits:
                f = lim(f)
            self.mutations.append(f)
        return tb

    def _from_expression(self, text: str):
        ind = self.Individual(to_deap(parse(text), self.pset))
        ind.parents = []
        return ind

    def initial_population(self) -> list:
        s = self.cfg.search
        pop, seen = [], set()
        for name in s.seeds:
            b = BASELINES[name]
            if all(n.is_const or n.name in self.pset.mapping for n in b.node.walk()):  # within this search space
                if b.expression not in seen:
                    pop.append(self._from_expression(b.expression))
                    seen.add(b.expression)
        while len(pop) < s.population:
            ind = self.toolbox.individual()
            ind.parents = []
            pop.append(ind)
        return pop[: s.population]

    # ------------------------------------------------------------------ evaluation
    def _canonical(self, text: str) -> tuple[str, str]:
        if text not in self.canon:
            node = parse(text)
            self.canon[text] = (canonical(node), canonical_hash(node))
        return self.canon[text]

    def _same(self, a, b) -> bool:
        return self._canonical(str(a))[1] == self._canonical(str(b))[1]

    def _masks_key(self, node: Node) -> tuple[tuple | None, str]:
        keys = []
        for name, ctx in self.contexts.items():
            masks, reason = ctx.masks(node)
            if masks is None:
                return None, f"{name}: {reason}"
            keys.append(mask_hash(masks))
        return tuple(keys), ""

    def evaluate(self, individuals: list, generation: int) -> tuple[int, int]:
        """Give every individual its fitness; returns (proxy runs executed, cache hits)."""
        c0 = self.counters.snapshot()
        pending: dict[str, list] = {}  # canonical hash -> individuals waiting for it
        todo: dict[tuple, list[str]] = {}  # mask key -> canonical hashes sharing it
        rows = []
        for ind in individuals:
            text = str(ind)
            canon, h = self._canonical(text)
            if h in self.records:
                self.counters.canonical_hits += 1
                continue
            if h in pending:
                pending[h].append(ind)
                self.counters.canonical_hits += 1
                continue
            pending[h] = [ind]
            key, reason = self._masks_key(parse(text))
            if key is None:
                self.records[h] = invalid(text, reason)
                self.counters.invalid += 1
            elif key in self.by_masks:
                self.records[h] = _renamed(self.by_masks[key], text)
                self.counters.mask_hits += 1
            else:
                todo.setdefault(key, []).append(h)
        if todo:
            self._run_proxy(todo, pending, generation)
        for h, inds in pending.items():
            rec = self.records[h]
            canon, _ = self._canonical(str(inds[0]))
            node = parse(str(inds[0]))
            rows.append(store.CandidateRow(str(inds[0]), canon, h, node.size, node.depth, inds[0].parents, generation,
                                           rec.to_dict(), _baseline_name(str(inds[0]))))
        if rows and self.run_id is not None:
            store.record_candidates(self.db, self.run_id, rows)
        for ind in individuals:
            self._assign(ind)
        c1 = self.counters.snapshot()
        return c1["evaluations"] - c0["evaluations"], (c1["canonical_hits"] + c1["mask_hits"]
                                                       - c0["canonical_hits"] - c0["mask_hits"])

    def _run_proxy(self, todo: dict[tuple, list[str]], pending: dict[str, list], generation: int) -> None:
        p = self.cfg.proxy
        first = {key: pending[hs[0]][0] for key, hs in todo.items()}
        stage = "screen" if p.screen else "full"
        results = self._run_jobs({str(k): (str(ind), stage) for k, ind in first.items()}, generation)
        if p.screen:
            ranked = sorted(todo, key=lambda k: -results[str(k)].fitness)
            n_full = max(1, math.ceil(p.promote * len(ranked)))
            promote = [k for k in ranked[:n_full] if results[str(k)].valid]
            self.counters.screened_only += len(ranked) - len(promote)
            results.update(self._run_jobs({str(k): (str(first[k]), "full") for k in promote}, generation))
        for key, hs in todo.items():
            rec = results[str(key)]
            self.by_masks[key] = rec
            for h in hs:
                self.records[h] = _renamed(rec, str(pending[h][0]))

    def _run_jobs(self, jobs: dict[str, tuple[str, str]], generation: int) -> dict[str, FitnessRecord]:
        out = {}
        # sorted: the same jobs in the same order on every run, whatever the dict order
        batch = [Job(k, e, st) for k, (e, st) in sorted(jobs.items())]
        for job, rec in self.evaluator.run(batch):
            if job.key in out:
                raise RuntimeError(f"job {job.key} returned twice")
            out[job.key] = rec
            self.counters.evaluations += 1
            self.counters.full += job.stage == "full"
            self.on_progress("evaluation", {"generation": generation, "record": rec, "done": len(out),
                                            "total": len(batch), "stage": job.stage})
        missing = set(jobs) - set(out)
        if missing:
            raise RuntimeError(f"{len(missing)} jobs never returned")
        return out

    def _assign(self, ind) -> None:
        rec = self.records[self._canonical(str(ind))[1]]
        ind.raw = rec.fitness
        ind.fitness.values = (rec.fitness - self.cfg.search.parsimony * len(ind),)

    # ------------------------------------------------------------------ variation
    def offspring(self, pop: list) -> list:
        s, tb = self.cfg.search, self.toolbox
        clone = tb.clone  # DEAP's toolbox registers deepcopy as clone
        kids = []
        while len(kids) < s.population - s.elites:
            r = random.random()
            if r < s.p_crossover:
                p1, p2 = (clone(x) for x in tb.select(pop, 2))
                parents = [str(p1), str(p2)]
                child, _ = tb.mate(p1, p2)
            elif r < s.p_crossover + s.p_mutation:
                (p1,) = (clone(x) for x in tb.select(pop, 1))
                parents = [str(p1)]
                kind = random.choices(range(4), weights=s.mutation_weights)[0]
                (child,) = self.mutations[kind](p1)
            else:
                kids.append(clone(tb.select(pop, 1)[0]))
                continue
            child.parents = parents
            del child.fitness.values
            kids.append(child)
        return kids

    # ------------------------------------------------------------------ the run
    def start(self) -> int:
        self.run_id = store.create_run(self.db, _json(self.cfg), self.cfg.search.seed, __version__)
        return self.run_id

    def run(self, resume_from: int | None = None) -> list:
        s = self.cfg.search
        if resume_from is None:
            if self.run_id is None:
                self.start()
            random.seed(s.seed)
            pop = self.initial_population()
            start = 0
            self._generation(0, pop, time.perf_counter())
        else:
            pop, start = self._restore(resume_from)
        try:
            for g in range(start + 1, s.generations + 1):
                t0 = time.perf_counter()
                elites = [self.toolbox.clone(x) for x in tools.selBest(pop, s.elites)]
                kids = self.offspring(pop)
                pop = elites + kids
                self._generation(g, pop, t0)
        except KeyboardInterrupt:
            store.set_status(self.db, self.run_id, RunStatus.interrupted, "interrupted; resume with --resume")
            raise
        except Exception as e:
            store.set_status(self.db, self.run_id, RunStatus.failed, f"{type(e).__name__}: {e}")
            raise
        store.set_status(self.db, self.run_id, RunStatus.finished)
        return pop

    def _generation(self, g: int, pop: list, t0: float) -> None:
        todo = [ind for ind in pop if not ind.fitness.valid]
        n_eval, hits = self.evaluate(todo, g)  # assigns every individual in todo
        self.hall_of_fame.update(pop)
        raws = [ind.raw for ind in pop]
        best = self.hall_of_fame[0]
        canon = {self._canonical(str(i))[1] for i in pop}
        stats = dict(best=max(raws), mean=statistics.fmean(raws), median=statistics.median(raws),
                     size_mean=statistics.fmean(len(i) for i in pop), diversity=len(canon) / len(pop),
                     evaluations=n_eval, cache_hits=hits, seconds=time.perf_counter() - t0)
        store.record_generation(self.db, self.run_id, g, stats, [(str(i), i.raw) for i in pop],
                                _state_to_json(random.getstate()))
        rep = GenerationReport(g, stats["best"], str(best), stats["mean"], n_eval, hits, stats["seconds"],
                               self.counters.snapshot())
        self.history.append(rep)
        self.on_progress("generation", {"report": rep})

    def _restore(self, run_id: int) -> tuple[list, int]:
        """Population, random state and caches of a stored run, at its last generation."""
        self.run_id = run_id
        last = store.last_generation(self.db, run_id)
        if last is None:
            raise ValueError(f"run {run_id} has no completed generation to resume from")
        cands = store.candidates(self.db, run_id)
        for cand in cands:
            rec = record_from_candidate(cand)
            self.records[cand.canonical_hash] = rec
            self.canon[cand.expression] = (cand.canonical, cand.canonical_hash)
            if rec.valid:
                self.by_masks[tuple(rec.tasks[t].mask for t in self.contexts)] = rec
        for cand in sorted(cands, key=lambda c: (-c.fitness, c.size, c.id)):
            if cand.valid and len(self.hall_of_fame) < self.hall_of_fame.maxsize:
                ind = self._from_expression(cand.expression)
                self._assign(ind)
                self.hall_of_fame.update([ind])
        pop = []
        for text, raw in last.population:
            ind = self._from_expression(text)
            ind.raw = raw
            ind.fitness.values = (raw - self.cfg.search.parsimony * len(ind),)
            pop.append(ind)
        random.setstate(_state_from_json(last.rng_state))
        store.set_status(self.db, run_id, RunStatus.running)
        return pop, last.index


def _renamed(rec: FitnessRecord, expression: str) -> FitnessRecord:
    return FitnessRecord(expression, rec.stage, rec.fitness, rec.valid, rec.reason, rec.tasks, rec.seconds, rec.worker)


def _baseline_name(expression: str) -> str:
    return next((b.name for b in BASELINES.values() if b.expression == expression), "")


def _json(cfg: Config) -> dict:
    return json.loads(cfg.to_json())


def _state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


def record_from_candidate(cand) -> FitnessRecord:
    """A stored candidate as the record its best stage produced."""
    evals = [e for e in cand.evaluations if e.stage == cand.stage]
    tasks = {e.task: TaskResult(e.accuracy, e.kept_flops, e.kept_params, e.seconds, e.mask) for e in evals}
    return FitnessRecord(cand.expression, cand.stage, cand.fitness, cand.valid, cand.reason, tasks,
                         sum(e.seconds for e in evals), evals[0].worker if evals else "")
