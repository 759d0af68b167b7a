"""The search: DEAP genetic programming over metric expressions.

One generation: tournament selection (with a parsimony term) -> subtree crossover or one of
four mutations (uniform subtree, node replacement, shrink, constant tweak) under height and
size limits -> evaluation of the new individuals -> the elites and offspring form the next
population. Evaluation never runs twice for the same formula (canonical form) nor for the
same masks (mask hash: identical masks give identical fitness under the fixed data order),
and with racing on, every new candidate is screened (BN recalibration, no training) and only
the best share is fine-tuned.

The masks are made here, in the driver (evoprune.masks), and travel with each job: the hash
the cache uses is the hash of the masks the worker trains, and the engine checks that the
worker reports that hash back.

Like DEAP's algorithms, which take their side effects (`halloffame`, `stats`) as arguments,
`Search` takes a recorder: it is told about new candidates, completed generations (with the
population and the random state) and the run's status, and the service wires it to the
database. The engine itself stores nothing. A run resumed from a `ResumePoint` continues
exactly where the uninterrupted one would be.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

from deap import base, creator, gp, tools

from evoprune.evolve.canon import Simplifier
from evoprune.evolve.config import Config
from evoprune.masks import TaskMasks, UnusableMetric, mask_hash
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.primitives.pset import Vec, build_pset, to_deap
from evoprune.records import CandidateRecord, FitnessRecord, GenerationRecord, RunStatus, invalid
from evoprune.workers.proxy import Job


def _types():
    """DEAP creator types, created once per process (driver and workers alike)."""
    if not hasattr(creator, "EvoFitness"):
        creator.create("EvoFitness", base.Fitness, weights=(1.0,))
    if not hasattr(creator, "EvoIndividual"):
        creator.create("EvoIndividual", gp.PrimitiveTree, fitness=creator.EvoFitness, raw=0.0, parents=list)
    return creator.EvoIndividual


class Recorder(Protocol):
    """Where a search's results go (the service stores them in the database)."""

    def candidates(self, rows: list[CandidateRecord], summary: bool = False) -> None:
        """`summary`: the results of the final round, not of a generation."""

    def generation(self, record: GenerationRecord) -> None: ...

    def status(self, status: RunStatus, note: str = "") -> None: ...


class NullRecorder:
    """A recorder that keeps nothing (tests, experiments in a notebook)."""

    def candidates(self, rows: list[CandidateRecord], summary: bool = False) -> None:
        pass

    def generation(self, record: GenerationRecord) -> None:
        pass

    def status(self, status: RunStatus, note: str = "") -> None:
        pass


@dataclass(frozen=True)
class ResumePoint:
    """What a stored run holds: its candidates (the caches) and its last completed generation
    (None when it stopped during generation 0: it then starts over, reusing the candidates)."""

    candidates: list[CandidateRecord]
    last: GenerationRecord | None


@dataclass
class Counters:
    evaluations: int = 0  # proxy runs executed (screen or full)
    full: int = 0  # full fine-tunes executed
    screened_only: int = 0  # candidates racing kept from the full fine-tune
    canonical_hits: int = 0  # formula seen before
    mask_hits: int = 0  # new formula, masks seen before
    invalid: int = 0  # rejected before any proxy run
    diverged: int = 0  # proxy runs whose network gave non-finite outputs on some task (scored as wrong)

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
    def __init__(self, cfg: Config, evaluator, maskers: dict[str, TaskMasks], recorder: Recorder | None = None,
                 on_progress: Callable[[str, dict], None] | None = None, simplifier: Simplifier | None = None):
        """`simplifier`: where canonical forms are made (default: one of `[run] simplify_processes`,
        which the search ends with `close`)."""
        self.cfg, self.evaluator, self.maskers = cfg, evaluator, maskers
        self.recorder = recorder or NullRecorder()
        self.on_progress = on_progress or (lambda kind, info: None)
        self.tasks = list(cfg.proxy.tasks)
        if missing := [t for t in self.tasks if t not in maskers]:
            raise ValueError(f"no masks for tasks {missing}")
        self.Individual = _types()
        s = cfg.search
        self.pset = build_pset(s.stat_names, s.op_names)
        self.toolbox = self._toolbox()
        self.records: dict[str, FitnessRecord] = {}  # canonical hash -> best record
        self.by_masks: dict[tuple, FitnessRecord] = {}  # per-task mask hashes -> record
        self.canon: dict[str, tuple[str, str]] = {}  # expression -> (canonical, hash)
        self.simplifier = simplifier or Simplifier(cfg.run.simplify_processes)
        self.counters = Counters()
        # wall seconds in `run`: the whole search, waiting for the proxy runs, and three parts of the
        # driver's own work: canonical forms, masks, the recorder (the database); and "worker",
        # the proxy runs' own seconds summed (with a pool, they overlap the driver's work), of
        # "capacity", the search's seconds times the evaluator's workers
        self.seconds = {"search": 0.0, "proxy": 0.0, "canonical": 0.0, "masks": 0.0, "database": 0.0,
                        "worker": 0.0, "capacity": 0.0}
        self._running = False
        # database writes that wait for the next generation's first job to go out (with a pool)
        self._unwritten: list[Callable[[], None]] = []
        self._defer = False
        self.history: list[GenerationReport] = []
        self.stopped_after: int | None = None  # the last generation, when `[run] time_limit` ended the run before
        # the best distinct formulas seen (by canonical form); rebuilt from the candidates on resume
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
        for expression in s.seed_formulas():  # a baseline outside this search space is left out; a
            #                                   formula of the user's is checked against it with the config
            if expression not in seen and all(n.is_const or n.name in self.pset.mapping
                                              for n in parse(expression).walk()):
                pop.append(self._from_expression(expression))
                seen.add(expression)
        while len(pop) < s.population:
            ind = self.toolbox.individual()
            ind.parents = []
            pop.append(ind)
        return pop[: s.population]

    # ------------------------------------------------------------------ evaluation
    def _canonical(self, text: str) -> tuple[str, str]:
        if text not in self.canon:
            self._simplify([text])
        return self.canon[text]

    def _simplify(self, texts: list[str]) -> None:
        """Make the canonical forms of those of `texts` not known yet, together (in parallel)."""
        if new := [t for t in texts if t not in self.canon]:
            t0 = time.perf_counter()
            self.canon.update(self.simplifier(new))
            self._spent("canonical", t0)

    def _ahead(self, texts: Iterable[str]) -> None:
        """Start the canonical forms of those of `texts` not known yet on the simplifier's helpers."""
        self.simplifier.ahead([t for t in texts if t not in self.canon])

    def _record(self, write: Callable[[], None]) -> None:
        """A database write. With a pool of workers it waits (in order) until the next
        generation's first job is out: the workers need not wait for the database. A run that
        stops writes what waits before it says why (`run`)."""
        self._unwritten.append(write)
        if not self._defer:
            self._flush()

    def _flush(self) -> None:
        while self._unwritten:
            t0 = time.perf_counter()
            self._unwritten.pop(0)()
            self._spent("database", t0)

    def _spent(self, what: str, since: float) -> None:
        if self._running:
            self.seconds[what] += time.perf_counter() - since

    def close(self) -> None:
        """End the simplifier's processes (the evaluator is the caller's)."""
        self.simplifier.close()

    def _same(self, a, b) -> bool:
        return self._canonical(str(a))[1] == self._canonical(str(b))[1]

    def masks_for(self, text: str) -> dict:
        """The candidate's masks on every task (raises UnusableMetric, naming the task)."""
        node, out = parse(text), {}
        for t in self.tasks:
            try:
                out[t] = self.maskers[t](node)
            except UnusableMetric as e:
                raise UnusableMetric(f"{t}: {e}") from None
        return out

    def _key(self, masks: dict) -> tuple[str, ...]:
        return tuple(mask_hash(masks[t]) for t in self.tasks)

    def evaluate(self, individuals: Iterable, generation: int) -> tuple[list, int, int]:
        """Give every individual without one its fitness; returns (the individuals, proxy runs
        executed, cache hits). `individuals` may be lazy (`children`): each new candidate's job
        goes to the evaluator as soon as it is known, so a pool of workers trains the first
        candidates while the driver breeds and simplifies the next (the same jobs and results as
        a list gives)."""
        c0 = self.counters.snapshot()
        pending: dict[str, list] = {}  # canonical hash -> individuals waiting for it
        todo: dict[tuple, list[str]] = {}  # mask key -> canonical hashes sharing it
        masks_of: dict[tuple, dict] = {}  # mask key -> the masks, per task
        everyone: list = []
        fresh: list = []  # those without a fitness (a child bred as a copy keeps its parent's)

        def new_keys():  # the mask keys no earlier candidate had, as the individuals come
            for ind in individuals:
                everyone.append(ind)
                if ind.fitness.valid:
                    continue
                fresh.append(ind)
                text = str(ind)
                _, h = self._canonical(text)
                if h in self.records or h in pending:
                    if h in pending:
                        pending[h].append(ind)
                    self.counters.canonical_hits += 1
                    continue
                pending[h] = [ind]
                t0 = time.perf_counter()
                try:
                    masks = self.masks_for(text)
                except UnusableMetric as e:
                    self.records[h] = invalid(text, str(e))
                    self.counters.invalid += 1
                    continue
                finally:
                    self._spent("masks", t0)
                key = self._key(masks)
                if key in self.by_masks:
                    self.records[h] = self.by_masks[key].renamed(text)
                    self.counters.mask_hits += 1
                elif key in todo:
                    todo[key].append(h)
                else:
                    todo[key], masks_of[key] = [h], masks
                    yield key

        screens = self._run_proxy(new_keys(), todo, pending, masks_of, generation)
        rows = []
        for key, hs in todo.items():  # a promoted candidate's screen too, before its full result
            if key in screens:
                rows += [self._candidate(pending[h][0], h, generation, screens[key]) for h in hs]
        rows += [self._candidate(inds[0], h, generation) for h, inds in pending.items()]
        if rows:
            self._record(lambda: self.recorder.candidates(rows))
        for ind in fresh:
            self._assign(ind)
        c1 = self.counters.snapshot()
        return everyone, c1["evaluations"] - c0["evaluations"], (c1["canonical_hits"] + c1["mask_hits"]
                                                                 - c0["canonical_hits"] - c0["mask_hits"])

    def _candidate(self, ind, h: str, generation: int, record: FitnessRecord | None = None) -> CandidateRecord:
        text = str(ind)
        node = parse(text)
        rec = self.records[h] if record is None else record.renamed(text)
        return CandidateRecord(text, self._canonical(text)[0], h, node.size, node.depth, tuple(ind.parents),
                               generation, rec, _baseline_name(text))

    def _run_proxy(self, keys: Iterable[tuple], todo: dict[tuple, list[str]], pending: dict[str, list],
                   masks_of: dict[tuple, dict], generation: int) -> dict[tuple, FitnessRecord]:
        """Run the proxy for the mask keys `keys` (possibly lazy: `todo` fills as they come), each
        on the first formula with it; with racing, screen them all, then fine-tune the best share.
        Returns the promoted ones' screen results (their full results replace them in the caches)."""
        p = self.cfg.proxy

        def first(key: tuple) -> str:
            return str(pending[todo[key][0]][0])

        stage = "screen" if p.screen else "full"
        results = self._run_jobs(((k, first(k), stage) for k in keys), masks_of, generation)
        screens = {}
        if p.screen:
            ranked = sorted(todo, key=lambda k: -results[k].fitness)
            n_full = max(1, math.ceil(p.promote * len(ranked)))
            promote = [k for k in ranked[:n_full] if results[k].valid]
            self.counters.screened_only += len(ranked) - len(promote)
            screens = {k: results[k] for k in promote}
            results.update(self._run_jobs([(k, first(k), "full") for k in promote], masks_of, generation))
        for key, hs in todo.items():
            rec = results[key]
            self.by_masks[key] = rec
            for h in hs:
                self.records[h] = rec.renamed(str(pending[h][0]))
        return screens

    def _run_jobs(self, jobs: Iterable[tuple[tuple, str, str]], masks_of: dict[tuple, dict],
                  generation: int) -> dict[tuple, FitnessRecord]:
        """Run (mask key, formula, stage) jobs, which may come lazily; time spent making them
        (canonical forms, masks) while the evaluator waits is the driver's, not the proxy's."""
        out: dict[tuple, FitnessRecord] = {}
        by_name: dict[str, tuple] = {}

        def batch():
            for i, (key, text, stage) in enumerate(jobs):
                by_name[str(key)] = key
                yield Job(str(key), text, stage, masks_of[key])
                if i == 0:  # the last generation's records, while the workers start on this one
                    self._flush()

        t0, driver0 = time.perf_counter(), self.seconds["canonical"] + self.seconds["masks"]
        for job, rec in self.evaluator.run(batch()):
            key = by_name[job.key]
            if key in out:
                raise RuntimeError(f"job {job.key} returned twice")
            if rec.valid and rec.mask_key(self.tasks) != key:
                raise RuntimeError(f"job {job.key}: the worker reports masks {rec.mask_key(self.tasks)}, "
                                   f"not the ones it was sent")
            out[key] = rec
            self.counters.evaluations += 1
            self.counters.full += job.stage == "full"
            self.counters.diverged += any(r.diverged for r in rec.tasks.values())
            self.seconds["worker"] += rec.seconds if self._running else 0.0
            self.on_progress("evaluation", {"generation": generation, "record": rec, "done": len(out),
                                            "total": len(by_name), "stage": job.stage})
        if self._running:
            driver = self.seconds["canonical"] + self.seconds["masks"] - driver0
            self.seconds["proxy"] += time.perf_counter() - t0 - driver
        if missing := set(by_name.values()) - set(out):
            raise RuntimeError(f"{len(missing)} jobs never returned")
        return out

    def rescore(self, expressions: list[str], stage: str = "full", record: bool = True) -> dict[str, FitnessRecord]:
        """Run `stage` for stored formulas again (the final round: candidates racing only
        screened); the recorder gets the new results unless `record` is false (a run that will
        go on: its caches must hold what its generations made, so that it continues as an
        uninterrupted run would). Returns expression -> record."""
        masks_of, first, key_of = {}, {}, {}
        self._simplify(expressions)
        for text in expressions:
            masks = self.masks_for(text)
            key_of[text] = key = self._key(masks)
            masks_of[key] = masks
            first.setdefault(key, text)
        # sorted: the same jobs in the same order on every run, whatever the order asked
        results = self._run_jobs([(k, first[k], stage) for k in sorted(first, key=str)], masks_of, -1)
        out = {text: results[key_of[text]].renamed(text) for text in expressions}
        if record:
            rows = []
            for text, rec in out.items():
                h = self._canonical(text)[1]
                self.records[h] = rec
                rows.append(self._candidate(self._from_expression(text), h, -1))
            self.recorder.candidates(rows, summary=True)
        return out

    def _assign(self, ind) -> None:
        rec = self.records[self._canonical(str(ind))[1]]
        ind.raw = rec.fitness
        ind.fitness.values = (rec.fitness - self.cfg.search.parsimony * len(ind),)

    # ------------------------------------------------------------------ variation
    def offspring(self, pop: list, taken: set[str] | None = None) -> list:
        """The next generation's new individuals (`children`, all of them)."""
        return list(self.children(pop, taken))

    def children(self, pop: list, taken: set[str] | None = None, chunk: int = 0) -> Iterator:
        """The next generation's new individuals, one at a time. A child whose formula (canonical
        form) is already in `taken` (the elites, the other children) is bred again, up to
        `unique_retries` times: a population of copies explores nothing, and copies cost no
        evaluation but a place.

        Breeding again is breeding the next child of one stream, so the children are bred ahead
        in chunks (`chunk`, at least the simplifier's processes; 0: all the children still
        needed) and their canonical forms started on the simplifier's helpers (`Simplifier.ahead`),
        which make them while the caller uses the children yielded before; the random state is
        then set back to where the last child used left it. The result is the one of breeding and
        simplifying one child at a time, whatever the chunks and the helpers, and whatever the
        caller does with `random` between two children."""
        s = self.cfg.search
        taken = set() if taken is None else taken
        need = s.population - s.elites
        kids = 0
        stream: list[tuple[object, object]] = []  # (child, the random state after breeding it)
        used = 0
        while kids < need:
            for attempt in range(s.unique_retries + 1):
                if used == len(stream):
                    if stream:  # go on with the stream's own state, whatever ran in between
                        random.setstate(stream[-1][1])
                    for _ in range(max(chunk or need - kids, self.simplifier.processes)):
                        stream.append((self._breed(pop), random.getstate()))
                    self._ahead(str(c) for c, _ in stream[used:])
                child = stream[used][0]
                used += 1
                h = self._canonical(str(child))[1]
                if h not in taken:
                    break
            taken.add(h)
            kids += 1
            if kids == need:
                random.setstate(stream[used - 1][1])
            yield child

    def _simplified(self, individuals: list) -> Iterator:
        """`individuals`, their canonical forms started on the simplifier's helpers."""
        self._ahead(str(ind) for ind in individuals)
        yield from individuals

    def _breed(self, pop: list):
        s, tb = self.cfg.search, self.toolbox
        clone = tb.clone  # DEAP's toolbox registers deepcopy as clone
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
            return clone(tb.select(pop, 1)[0])
        child.parents = parents
        del child.fitness.values
        return child

    # ------------------------------------------------------------------ the run
    def run(self, resume: ResumePoint | None = None) -> list:
        """Evolve to the configured number of generations; returns the last population. A run
        that stops on an error or an interrupt is recorded as failed or interrupted; marking it
        finished is the caller's (the service validates the finalists first)."""
        s = self.cfg.search
        t_run, self._running = time.perf_counter(), True
        try:
            # a pool of workers gets each child's job as soon as it is made (`evaluate`); all the
            # children are bred at once (0.07 ms each) and their forms started on the helpers, which
            # make them while the driver waits for proxy runs, in this process or on the pool
            self._defer = getattr(self.evaluator, "concurrent", False)
            if resume is not None:
                self._restore_caches(resume.candidates)
            if resume is None or resume.last is None:
                random.seed(s.seed)
                pop, start = self.initial_population(), 0
                pop = self._generation(0, [], self._simplified(pop), time.perf_counter())
            else:
                pop, start = self._restore_population(resume.last), resume.last.index
            for g in range(start + 1, s.generations + 1):
                if self._out_of_time(t_run):
                    self.stopped_after = g - 1
                    break
                t0 = time.perf_counter()
                elites = [self.toolbox.clone(x) for x in tools.selBest(pop, s.elites)]
                kids = self.children(pop, {self._canonical(str(e))[1] for e in elites})
                pop = self._generation(g, elites, kids, t0)
            self._flush()
        except KeyboardInterrupt:
            self._flush_on_stop()
            self.recorder.status(RunStatus.interrupted, "interrupted; resume with --resume")
            raise
        except Exception as e:
            self._flush_on_stop()
            self.recorder.status(RunStatus.failed, f"{type(e).__name__}: {e}; resume with --resume")
            raise
        finally:
            self._spent("search", t_run)
            # the proxy-run seconds the workers could have given meanwhile ("worker" of it they did)
            self.seconds["capacity"] = self.seconds["search"] * getattr(self.evaluator, "size", 1)
            self._running = False
        return pop

    def _out_of_time(self, t_run: float) -> bool:
        """With `[run] time_limit`: whether the next generation would likely end past it, at the
        pace of this call's generations (`pace`)."""
        limit = self.cfg.run.time_limit_s
        if limit is None or not self.history:
            return False
        return time.perf_counter() - t_run + pace({r.index: r.seconds for r in self.history}) > limit

    def _generation(self, g: int, kept: list, new: Iterable, t0: float) -> list:
        """Evaluate `new` (possibly lazy), record generation `g` of kept + new; returns it."""
        new, n_eval, hits = self.evaluate(new, g)  # assigns every new individual without a fitness
        pop = kept + new
        self.hall_of_fame.update(pop)
        raws = [ind.raw for ind in pop]
        best = max(pop, key=lambda ind: ind.raw)  # the formula of the fitness reported as best (the hall
        # of fame's first is the best by selection fitness, after parsimony: another formula)
        canon = {self._canonical(str(i))[1] for i in pop}
        rec = GenerationRecord(index=g, best=best.raw, mean=statistics.fmean(raws), median=statistics.median(raws),
                               size_mean=statistics.fmean(len(i) for i in pop), diversity=len(canon) / len(pop),
                               evaluations=n_eval, cache_hits=hits, seconds=time.perf_counter() - t0,
                               population=tuple((str(i), i.raw) for i in pop),
                               rng_state=_state_to_json(random.getstate()))
        self._record(lambda: self.recorder.generation(rec))
        rep = GenerationReport(g, rec.best, str(best), rec.mean, n_eval, hits, rec.seconds, self.counters.snapshot())
        self.history.append(rep)
        self.on_progress("generation", {"report": rep})
        return pop

    def _flush_on_stop(self) -> None:
        """The completed generations' writes still waiting, before the run is marked stopped (so
        a resume starts after them); a failing write (the database's own fault) is left."""
        try:
            self._flush()
        except Exception:
            self._unwritten.clear()

    def _restore_caches(self, cands: list[CandidateRecord]) -> None:
        """The caches and the hall of fame of a stored run."""
        for cand in cands:
            self.records[cand.canonical_hash] = cand.record
            self.canon[cand.expression] = (cand.canonical, cand.canonical_hash)
            if cand.record.valid:
                self.by_masks[cand.record.mask_key(self.tasks)] = cand.record
        for cand in sorted(cands, key=lambda c: (-c.record.fitness, c.size, c.id or 0)):
            if cand.record.valid and len(self.hall_of_fame) < self.hall_of_fame.maxsize:
                ind = self._from_expression(cand.expression)
                self._assign(ind)
                self.hall_of_fame.update([ind])

    def _restore_population(self, last: GenerationRecord) -> list:
        """The population and random state after the last completed generation."""
        pop = []
        for text, raw in last.population:
            ind = self._from_expression(text)
            ind.raw = raw
            ind.fitness.values = (raw - self.cfg.search.parsimony * len(ind),)
            pop.append(ind)
        random.setstate(_state_from_json(last.rng_state))
        return pop


def pace(seconds: dict[int, float]) -> float:
    """Expected seconds of the next generation from those one call ran (generation -> seconds):
    their mean, leaving out generation 0 (it scores the baselines and the whole population, ~3x
    slower) unless it is the only one. A resumed call's first generation is an ordinary one."""
    later = [t for g, t in seconds.items() if g != 0] or list(seconds.values())
    return sum(later) / len(later)


def _baseline_name(expression: str) -> str:
    return next((b.name for b in BASELINES.values() if b.expression == expression), "")


def _state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _state_from_json(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
