"""`evoprune evolve` as a service function: config -> a finished (or resumed) run in the database.

The service validates what it can before anything is written, builds the driver's masks
(statistics on the CPU) and the evaluator, and wires the engine's recorder to the store.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from typing import Callable

from evoprune import __version__
from evoprune.db import store
from evoprune.errors import EvopruneError
from evoprune.evolve.canon import Simplifier
from evoprune.evolve.config import Config
from evoprune.evolve.engine import GenerationReport, ResumePoint, Search
from evoprune.evolve.proxy_check import Floor, near_chance_warning
from evoprune.evolve.validation import Validation, validate
from evoprune.masks import TaskMasks, UnusableMetric
from evoprune.pretrain import pretrained
from evoprune.progress import counted
from evoprune.records import CandidateRecord, FitnessRecord, GenerationRecord, RunStatus
from evoprune.tasks import get_task
from evoprune.train import pick_device
from evoprune.workers.evaluator import ClusterError, InProcessEvaluator, RayEvaluator, WorkerSpec, init_ray


@dataclass
class Finalist:
    candidate_id: int
    expression: str
    canonical: str
    size: int
    record: FitnessRecord
    baseline: str = ""

    @classmethod
    def of(cls, c: CandidateRecord) -> "Finalist":
        return cls(c.id, c.expression, c.canonical, c.size, c.record, c.baseline)


@dataclass
class SearchResult:
    run_id: int
    finalists: list[Finalist]  # the top formulas with distinct masks, fully evaluated
    baselines: list[Finalist]  # the seeded baselines, fully evaluated
    history: list[GenerationReport]
    counters: dict
    validation: Validation | None = None  # finalists and baselines on fresh data orders
    seconds: dict = field(default_factory=dict)  # the search's wall time and its parts (Search.seconds)
    warnings: list[str] = field(default_factory=list)  # what makes the result worth less (`proxy_warnings`)
    stopped: str = ""  # why the run stopped before its last generation ([run] time_limit), with how to go on


def proxy_warnings(records, floors: dict[str, Floor], diverged: int, runs: int, cfg: Config) -> list[str]:
    """What a search's proxy results say about the proxy itself: `near_chance_warning` over the
    full-proxy records of `records`; `diverged` of `runs` proxy runs gave non-finite outputs
    (scored as wrong)."""
    best: dict[str, float] = {}
    for r in records:
        if r.valid and r.stage == "full":
            for task, t in r.tasks.items():
                best[task] = max(best.get(task, 0.0), t.accuracy)
    out = [w] if (w := near_chance_warning({t: a for t, a in best.items() if t in floors}, floors, cfg.proxy)) else []
    if diverged:
        out.append(f"{counted(diverged, 'proxy run')} of {runs} diverged (outputs not finite on val: scored as "
                   f"wrong, probability 0); lower [proxy] lr ({cfg.proxy.lr:g})")
    return out


class StoreRecorder:
    """The engine's recorder, writing to the database (one transaction per call)."""

    def __init__(self, engine, run_id: int):
        self.engine, self.run_id = engine, run_id

    @classmethod
    def new_run(cls, engine, cfg: Config) -> "StoreRecorder":
        return cls(engine, store.create_run(engine, json.loads(cfg.to_json()), cfg.search.seed, __version__))

    def candidates(self, rows: list[CandidateRecord], summary: bool = False) -> None:
        store.record_candidates(self.engine, self.run_id, rows, summary)

    def generation(self, record: GenerationRecord) -> None:
        store.record_generation(self.engine, self.run_id, record)

    def status(self, status: RunStatus, note: str = "") -> None:
        store.set_status(self.engine, self.run_id, status, note)


def _spec(cfg: Config, device: str, pretrained: dict) -> WorkerSpec:
    r = cfg.run
    return WorkerSpec(proxy=cfg.proxy, data_root=r.data_root or None, cache_dir=r.cache_dir or None,
                      tasks_file=r.tasks_file or None, device=device, threads=r.threads, pretrained=pretrained)


def ray_workers(requested: int, gpus_per_worker: float, device: str) -> tuple[int, float]:
    """The actors and each one's GPU share: `gpus_per_worker`, else (0) one GPU where the
    cluster has any and the device is not cpu (Ray hides the GPUs from an actor that asks for
    none); -1 actors: one per share the cluster offers, else one per CPU left after the
    driver's. Ray is up: run_search joined the cluster first."""
    import ray

    from evoprune.workers.evaluator import gpu_share, node_gpus

    gpus = node_gpus()
    share, _ = gpu_share(gpus_per_worker or None, device, gpus, "[run] gpus_per_worker",
                         requested if requested > 0 else None)
    if requested > 0:
        return requested, share
    if share:
        return max(1, int(sum(gpus) / share + 1e-9)), share
    return max(1, int(ray.cluster_resources().get("CPU", 2)) - 1), 0.0


def driver_device(run) -> str:
    """The device of the driver's own work (pretraining a missing model). With Ray workers,
    `[run] device` is theirs (checked against the cluster's GPUs by `gpu_share`): a CPU head
    node of a GPU cluster is the usual layout, so the driver then takes a GPU only where it has
    one, unless told cpu."""
    if run.workers and run.device != "cpu":
        return str(pick_device("auto"))
    return str(pick_device(run.device))


def check_inputs(cfg: Config) -> None:
    """What can be checked without running anything: the tasks exist and their data sets load,
    the device exists. Called before the database is touched."""
    from evoprune.tasks import get_task

    driver_device(cfg.run)
    for name in cfg.proxy.tasks:
        task = get_task(name, cfg.run.tasks_file or None)
        data = task.data(cfg.run.data_root or None)  # cached: the search reads it again for free
        if cfg.proxy.finetune_steps and cfg.proxy.batch_size > len(data.train):
            raise EvopruneError(f"[proxy] batch_size {cfg.proxy.batch_size} is larger than the train split of {name} "
                                f"({len(data.train)} images): the fine-tune would never take a step")


def _setup(cfg: Config, device: str, on_progress: Callable[[str, dict], None]) -> tuple[dict, object, dict]:
    """Each task's model and data, loaded once here: the masks are made from them and the workers
    get them (through Ray's object store), so every node scores what the driver means. Returns
    the driver's maskers, the evaluator and each task's `Floor`."""
    on_progress("status", {"text": f"loading tasks {', '.join(cfg.proxy.tasks)} (pretraining on first use)"})
    r, p = cfg.run, cfg.proxy
    pre = {t: pretrained(get_task(t, r.tasks_file or None), data_root=r.data_root or None,
                         cache_dir=r.cache_dir or None, device=device) for t in p.tasks}
    maskers = {t: TaskMasks.from_pretrained(pre[t], p.allocation, cfg.search.stat_names, stat_images=p.stat_images,
                                            seed=p.data_seed) for t in p.tasks}
    floors = {t: Floor.of(pre[t]) for t in p.tasks}
    _some_statistic_ranks(maskers, cfg.search.stat_names)
    if r.workers:  # the search's clock starts with a worker to run its jobs
        return maskers, start_pool(cfg, pre, lambda text: on_progress("status", {"text": text})), floors
    return maskers, InProcessEvaluator(_spec(cfg, device, pre)), floors


def start_pool(cfg: Config, pre: dict, on_status: Callable[[str], None] = lambda text: None) -> RayEvaluator:
    """`[run] workers` Ray actors for `cfg.proxy` (`ray_workers`: how many, their GPU share),
    shipped the driver's models and data `pre`; returns once one of them is up."""
    r = cfg.run
    init_ray(r.address or None)  # how many and their share depend on the cluster joined
    n, gpus = ray_workers(r.workers, r.gpus_per_worker, r.device)
    on_status(f"starting {n} Ray workers, {gpus:g} GPU each")
    pool = RayEvaluator(_spec(cfg, "cuda" if gpus else "cpu", pre), n, gpus, address=r.address or None,
                        placement_timeout_s=r.placement_timeout_s, on_status=on_status)
    try:
        ready = pool.wait_ready()
    except BaseException:
        pool.close()
        raise
    on_status(f"{ready} of {n} Ray workers ready, {gpus:g} GPU each")
    return pool


def _some_statistic_ranks(maskers: dict[str, TaskMasks], stats: list[str]) -> None:
    """Refuse a search none of whose statistics can rank some task's filters (`[search] stats` of
    BN statistics only, on a network without BN): a formula of them is non-finite or constant in
    every layer too, so every one would be invalid and the search would score nothing (it ran to
    its end with empty tables)."""
    from evoprune.primitives.expr import parse

    for task, masker in maskers.items():
        why = {}
        for stat in stats:
            try:
                masker(parse(stat))
                break
            except UnusableMetric as e:
                why[stat] = str(e)
        else:
            shown = "; ".join(f"{s}: {w}" for s, w in list(why.items())[:3]) + ("; ..." if len(why) > 3 else "")
            raise EvopruneError(f"[search] stats: none of them can rank the filters of {task} ({shown}), so no "
                                "formula of them can; add statistics its network has (`evoprune primitives list`; "
                                "BN statistics need a BN after the layer)")


def run_search(cfg: Config, *, db_url: str | None = None, resume: int | None = None, top: int = 5,
               on_progress: Callable[[str, dict], None] | None = None,
               generations: int | None = None, config_given: bool = False) -> SearchResult:
    """Search, score the finalists and the baselines with the full proxy, validate them on
    `[search] validation_orders` fresh data orders (0: not), and mark the run finished.
    `generations` with `resume`: the run's new number of generations (a finished run is
    extended); without, it is `cfg`'s. `config_given`: `cfg` came from a file the user named, whose
    [search] and [proxy] must then be the resumed run's (they cannot change a run)."""
    if generations is not None:  # checked now (0 to 100,000), before a stored run's config takes it
        search = replace(cfg.search, generations=generations)
        if resume is None:
            cfg = replace(cfg, search=search)
    if resume is None:
        check_inputs(cfg)
    if cfg.run.workers:  # a cluster that cannot be joined is refused before the database is touched
        init_ray(cfg.run.address or None)
    engine = store.connect(store.resolve_url(db_url, cfg.run.db), create=resume is None)
    if resume is not None:  # what is searched comes from the run; where it runs, from this call
        if config_given:
            _same_search(Config.from_dict(store.get_run(engine, resume).config, f"run {resume}"), cfg, resume,
                         generations is not None)
        stored = Config.from_dict(store.claim_run(engine, resume, generations).config, f"run {resume}")
        cfg = replace(stored, run=cfg.run)
        check_inputs(cfg)
    device = driver_device(cfg.run)
    on_progress = on_progress or (lambda kind, info: None)
    on_progress("config", {"config": cfg})  # a resumed run's settings are the stored ones
    simplifier = Simplifier(cfg.run.simplify_processes)  # its helpers start while the tasks load
    try:
        maskers, evaluator, floors = _setup(cfg, device, on_progress)
    except BaseException:
        simplifier.close()
        raise
    try:
        if resume is None:
            recorder, point = StoreRecorder.new_run(engine, cfg), None
        else:
            recorder = StoreRecorder(engine, resume)
            point = ResumePoint(store.candidate_records(engine, resume, generations_only=True),
                                store.last_generation(engine, resume))
        warned = False

        def progress(kind: str, info: dict) -> None:
            """The first generation this call completes is checked for a proxy that measures nothing
            (`proxy_warnings`): said then, not only after the whole search."""
            nonlocal warned
            on_progress(kind, info)
            if kind == "generation" and not warned:
                warned = True
                k = search.counters
                for text in proxy_warnings(search.records.values(), floors, k.diverged, k.evaluations, cfg):
                    on_progress("warning", {"text": text})

        search = Search(cfg, evaluator, maskers, recorder, progress, simplifier)
        on_progress("status", {"text": "searching"})
        try:
            search.run(point)
        except ClusterError as e:
            raise ClusterError(f"{e}; run {recorder.run_id} is marked failed: `evoprune evolve --resume "
                               f"{recorder.run_id}` continues it once the cluster is back") from None
        with _status_on_error(recorder):
            on_progress("status", {"text": "fine-tuning the finalists and the baselines for the summary"})
            # a run stopped at its time limit goes on with --resume: its summary's full fine-tunes
            # are not stored (the run's end makes and stores the same ones)
            finalists, baselines = _final_round(search, engine, recorder.run_id, top,
                                                record=search.stopped_after is None)
            checked = None
            if cfg.search.validation_orders:
                checked = validate(cfg, engine, recorder.run_id, evaluator,
                                   {f.candidate_id: f.expression for f in finalists + baselines},
                                   {b.candidate_id for b in baselines}, cfg.search.validation_orders, device,
                                   on_progress)
        stopped = ""
        if search.stopped_after is not None:  # the summary is made; the generations left are for --resume
            stopped = (f"stopped at the time limit ({cfg.run.time_limit}) after generation {search.stopped_after} "
                       f"of {cfg.search.generations}; `evoprune evolve --resume {recorder.run_id}` continues it")
            recorder.status(RunStatus.interrupted, stopped)
        else:
            recorder.status(RunStatus.finished)
    finally:
        evaluator.close()
        simplifier.close()
    k = search.counters
    warnings = proxy_warnings([f.record for f in finalists + baselines], floors, k.diverged, k.evaluations, cfg)
    return SearchResult(recorder.run_id, finalists, baselines, search.history, k.snapshot(), checked,
                        dict(search.seconds), warnings, stopped)


def _same_search(stored: Config, given: Config, run_id: int, generations_flag: bool) -> None:
    """Refuse a resume whose config file asks for other [search] or [proxy] settings than the
    run's: they would be ignored (a run keeps its own), which the user should know before it
    runs. The number of generations may differ when --generations sets it."""
    def flat(c: Config) -> dict:
        d = json.loads(c.to_json())
        return {f"{t}.{k}": v for t in ("search", "proxy") for k, v in d[t].items()}
    a, b = flat(stored), flat(given)
    if generations_flag:
        a.pop("search.generations"), b.pop("search.generations")
    if diff := [k for k in a if a[k] != b.get(k)]:
        shown = ", ".join(f"{k} {json.dumps(b.get(k))} (the run's: {json.dumps(a[k])})" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        hint = " (--generations N extends or shortens it)" if diff == ["search.generations"] else ""
        raise EvopruneError(f"--resume {run_id}: the config asks for other settings than the run has: {shown}{more}"
                            f"{hint}; a run keeps its own: drop --config, or start a new search")


@contextlib.contextmanager
def _status_on_error(recorder: StoreRecorder):
    try:
        yield
    except KeyboardInterrupt:
        recorder.status(RunStatus.interrupted, "interrupted; resume with --resume")
        raise
    except Exception as e:
        recorder.status(RunStatus.failed, f"{type(e).__name__}: {e}; resume with --resume")
        raise


def _ranked(cands: list[CandidateRecord]) -> list[CandidateRecord]:
    return sorted((c for c in cands if c.record.valid), key=lambda c: (-c.record.fitness, c.size, c.id))


def _final_round(search: Search, engine, run_id: int, top: int,
                 record: bool = True) -> tuple[list[Finalist], list[Finalist]]:
    """Full-proxy results for the best formulas and the seeded baselines (racing may have only
    screened some of them), so the summary compares like with like; stored unless `record` is
    false. They are picked from what the generations made: an extended run's first summary
    fine-tuned some candidates already, whose results are reused where they are needed (the
    same masks and data order: the same numbers) and left out where they are not, so the
    summary is that of a run started with as many generations."""
    rows = store.candidates(engine, run_id)
    cands = [store.candidate_record(c, generations_only=True) for c in rows]
    done = {r.expression: r.record for r in map(store.candidate_record, rows) if r.record.stage == "full"}
    seeds = [c for c in cands if c.baseline]
    need = {c.expression for c in _ranked(cands)[: top * 2] + seeds if c.record.stage != "full" and c.record.valid}
    got = {e: done[e] for e in need if e in done}
    if need - set(got):
        got.update(search.rescore(sorted(need - set(got)), "full", record=record))
    cands = [replace(c, record=got[c.expression]) if c.expression in got else c for c in cands]
    distinct, seen = [], set()
    for c in _ranked(cands):  # one formula per set of masks: the others prune exactly the same filters
        if c.record.stage == "full" and c.mask_key() not in seen:
            seen.add(c.mask_key())
            distinct.append(Finalist.of(c))
    baselines = sorted((Finalist.of(c) for c in cands if c.baseline), key=lambda f: -f.record.fitness)
    return distinct[:top], baselines
