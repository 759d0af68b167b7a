"""`evoprune validate`: metrics applied for real to networks the search did not use.

A suite (TOML) lists cases: a task, a target (ratio or FLOPs reduction), an allocator, TPP on
or off and a retraining budget. Every metric asked for, and every baseline the suite names, is
applied to every case with `seeds` retraining seeds (the seed orders the TPP and retraining
data), each run a full `evoprune prune`. The table gives test top-1 mean +- std over seeds and,
for every metric against every suite baseline, the paired difference (same case, same seed)
with its 95% CI: a win when the CI lies above 0, a loss when below, else a tie.

Everything lands in one folder: suite.json (the suite and the metrics; a resume must ask for
the same), runs/ (one prune folder per run: a killed run resumes inside itself) and
results.jsonl (one line per finished run): the same command continues a killed suite where it
stopped. Runs may go to Ray workers (`workers`); the database is written by this process only.
A metric that cannot rank a case's filters (BN scale on a network without BN) is not applicable
there: its runs of that case get rows with `unusable` (the reason) and no accuracy, and the
suite goes on (`usable`, `not_applicable`).
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evoprune.errors import Diverged, EvopruneError
from evoprune.masks import UnusableMetric
from evoprune.metricref import resolve
from evoprune.primitives.baselines import BASELINES
from evoprune.tomlfiles import read_toml
from evoprune.uncertainty import VERDICTS, Estimate, estimate, family_level, paired, verdict

CASE_KEYS = {"task", "ratio", "flops_reduction", "allocator", "tau", "scope", "skip", "approximate_cut", "tpp",
             "tpp_settings", "retrain", "stat_images"}
SUITE_KEYS = {"name", "seeds", "baselines", "defaults", "case", "description"}


@dataclass(frozen=True)
class Case:
    index: int
    task: str
    settings: dict[str, Any]  # keys of CASE_KEYS besides task

    @property
    def label(self) -> str:
        s = self.settings
        target = f"ratio {s['ratio']:g}" if s.get("ratio") is not None else \
            f"-{s['flops_reduction']:.0%} MACs" if s.get("flops_reduction") is not None else f"tau {s.get('tau')}"
        alloc = s.get("allocator") or ""
        return (f"{self.task} {target}{' ' + alloc if alloc else ''}{'' if s.get('tpp', True) else ' no-TPP'}"
                f"{' approximate cut' if s.get('approximate_cut') else ''}")


@dataclass
class Suite:
    name: str
    seeds: int
    baselines: list[str]  # baseline names, compared with every metric
    cases: list[Case]
    source: str = ""
    description: str = ""


def _check_case(d: dict, where: str) -> dict:
    if not isinstance(d, dict):
        raise EvopruneError(f"{where} must be a table")
    if extra := set(d) - CASE_KEYS:
        raise EvopruneError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(CASE_KEYS)})")
    for k in ("ratio", "flops_reduction", "tau"):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
            raise EvopruneError(f"{where}: {k} must be a number in (0, 1), got {v!r}")
    for k in ("tpp", "approximate_cut"):
        if k in d and not isinstance(d[k], bool):
            raise EvopruneError(f"{where}: {k} must be true or false")
    for k in ("tpp_settings", "retrain"):
        if not isinstance(d.get(k, {}), dict):
            raise EvopruneError(f"{where}: {k} must be a table")
    return d


def load_suite(path: str | Path) -> Suite:
    """A suite file, checked; one EvopruneError for anything wrong (tasks, targets, metrics and
    every setting are checked again, as prune configurations, before any work starts)."""
    d = read_toml(path, "suite file")
    where = f"suite {path}"
    if extra := set(d) - SUITE_KEYS:
        raise EvopruneError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(SUITE_KEYS)})")
    seeds = d.get("seeds", 3)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise EvopruneError(f"{where}: seeds must be a whole number in [1, 100]")
    baselines = d.get("baselines", ["l1"])
    if not isinstance(baselines, list) or not all(isinstance(b, str) for b in baselines):
        raise EvopruneError(f"{where}: baselines must be a list of baseline names")
    if bad := [b for b in baselines if b not in BASELINES]:
        raise EvopruneError(f"{where}: unknown baselines {bad}; known: {', '.join(BASELINES)}")
    defaults = _check_case(d.get("defaults", {}), f"{where}: [defaults]")
    cases = d.get("case", [])
    if not isinstance(cases, list) or not cases:
        raise EvopruneError(f"{where}: no [[case]] tables")
    out = []
    for i, c in enumerate(cases):
        merged = _check_case({**defaults, **_check_case(c, f"{where}: case {i + 1}")}, f"{where}: case {i + 1}")
        if not isinstance(merged.get("task"), str):
            raise EvopruneError(f"{where}: case {i + 1} needs a task")
        out.append(Case(i, merged["task"], {k: v for k, v in merged.items() if k != "task"}))
    name = d.get("name", Path(path).stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise EvopruneError(f"{where}: name must be letters, digits, '.', '_' or '-'")
    return Suite(name, seeds, list(dict.fromkeys(baselines)), out, str(path), str(d.get("description", "")))


@dataclass(frozen=True)
class Run:
    case: Case
    metric: str  # as given (ID, NAME, baseline:NAME, expr:...)
    seed: int

    @property
    def key(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._]+", "-", self.metric).strip("-")
        if len(slug) > 40 or slug != self.metric.replace(":", "-", 1):  # formulas that share a prefix, or differ
            slug = f"{slug[:31]}-{hashlib.sha1(self.metric.encode()).hexdigest()[:8]}"  # only in symbols: hashed
        return f"c{self.case.index:02d}-{slug}-s{self.seed}"


def configs(suite: Suite, metrics: list[str], *, tasks_file=None, db=None, data_root=None) -> dict[str, Any]:
    """Every run's PruneConfig, built (and so checked) before anything runs."""
    from evoprune.tasks import get_task
    from evoprune.transfer.prune import prune_config

    out = {}
    for case in suite.cases:
        s = dict(case.settings)
        task = get_task(case.task, tasks_file)
        task.data(data_root)  # a missing data set is refused now, not after hours
        for metric in metrics:
            for seed in range(suite.seeds):
                run = Run(case, metric, seed)
                try:
                    out[run.key] = (run, prune_config(
                        task=case.task, metric=metric, ratio=s.get("ratio"), flops_reduction=s.get("flops_reduction"),
                        allocator=s.get("allocator"), tau=s.get("tau"),
                        tpp=dict(s.get("tpp_settings", {})) if s.get("tpp", True) else None,
                        retrain={**s.get("retrain", {}), "seed": seed}, tasks_file=tasks_file, db=db,
                        scope=s.get("scope", "in-block"), skip=tuple(s.get("skip", ())),
                        approximate_cut=s.get("approximate_cut", False), stat_images=s.get("stat_images", 256)))
                except (EvopruneError, TypeError) as e:
                    raise EvopruneError(f"suite case {case.index + 1} ({case.label}), metric {metric}: {e}") from None
    return out


def metric_list(suite: Suite, metrics: list[str], db=None) -> list[str]:
    """The metrics asked for (resolved now, so an unknown one is refused before any work), then
    the suite's baselines that are not among them by name."""
    out = list(dict.fromkeys([*metrics, *(f"baseline:{b}" for b in suite.baselines)]))
    for m in out:
        resolve(m, db)
    return out


# --------------------------------------------------------------------------- running
def _do_run(cfg, out: Path, data_root, cache_dir, tasks_file, device) -> dict:
    """One prune run (resumed when its folder holds an unfinished one). Module level: Ray ships it."""
    from evoprune.transfer.prune import prune

    report = out / "report.json"
    if report.exists():  # finished, its row not yet written (the suite was stopped in between)
        try:
            rep = json.loads(report.read_text())
            _same_formula(out.name, rep["expression"], cfg.expression)
        except (ValueError, KeyError, TypeError, OSError) as e:  # damaged by hand: the suite cannot use it
            raise EvopruneError(f"{report} is unreadable ({type(e).__name__}: {e}); delete its folder to redo "
                                "that run") from None
        return rep
    return prune(cfg, out=out, resume=(out / "config.json").exists(), data_root=data_root, cache_dir=cache_dir,
                 tasks_file=tasks_file, device=device, record=False, show_progress=False)


def _row(run: Run, rep: dict) -> dict:
    return {"key": run.key, "case": run.case.index, "case_label": run.case.label, "task": run.case.task,
            "metric": run.metric, "seed": run.seed, "test": rep["test_acc"]["retrained"],
            "pruned": rep["test_acc"].get("pruned"), "macs_kept": rep["macs_kept"], "params_kept": rep["params_kept"],
            "speedup": rep["speedup"], "seconds": rep["seconds"]["total"], "expression": rep["expression"],
            "report": rep["files"]["report"], "mask": rep["mask"], "host": rep["host"],
            "tpp": run.case.settings.get("tpp", True), "classes": rep.get("classes"),
            "test_images": rep.get("test_images"), "pretrained": rep.get("pretrained_sha256")}


def _na_rows(plan: dict[str, Any], run: Run, reason: str) -> list[dict]:
    """The rows of every seed of `run`'s case and metric: a metric's masks do not depend on the
    seed, so one that cannot rank the case's filters cannot on any seed."""
    return [{"key": key, "case": r.case.index, "case_label": r.case.label, "task": r.case.task, "metric": r.metric,
             "seed": r.seed, "expression": cfg.expression, "unusable": reason}
            for key, (r, cfg) in plan.items() if r.case == run.case and r.metric == run.metric]


def usable(rows: list[dict]) -> list[dict]:
    """The rows of runs that ran (not those of a metric a case's network cannot use)."""
    return [r for r in rows if "unusable" not in r]


def not_applicable(rows: list[dict]) -> list[dict]:
    """One entry per (case, metric) that could not be applied, with the reason."""
    out = {}
    for r in rows:
        if "unusable" in r:
            out.setdefault((r["case"], r["metric"]), {"case": r["case"], "case_label": r["case_label"],
                                                      "metric": r["metric"], "reason": r["unusable"]})
    return [out[k] for k in sorted(out)]


def shown(row: dict) -> str:
    """A row's result for a progress bar: its test top-1, or n/a."""
    return "n/a" if "unusable" in row else f"{row['test']:.2%}"


def one_image(rows: list[dict]) -> float:
    """The step test accuracy moves in over these rows (one image of the smallest test split;
    0 for reports of an older evoprune, which did not say): the least spread a CI of theirs
    credits (`evoprune.uncertainty.estimate`)."""
    sizes = [r.get("test_images") for r in usable(rows)]
    return 0.0 if not sizes or None in sizes else 1 / min(sizes)


def mixed_pretrained(rows: list[dict]) -> list[str]:
    """A warning for each case whose runs started from different pretrained models (Ray nodes
    that do not share one --cache-dir, each pretraining its own): its differences mix models.
    Rows from reports that did not say (older evoprune) are not judged."""
    models: dict[int, set[str]] = {}
    label = {}
    for r in usable(rows):
        if r.get("pretrained"):
            models.setdefault(r["case"], set()).add(r["pretrained"])
            label[r["case"]] = r["case_label"]
    return [f"case {case + 1} ({label[case]}): its runs started from {len(m)} different pretrained models (Ray "
            "nodes that do not share --cache-dir pretrained their own), so its differences mix models: give every "
            "node one cache (docs/cluster.md) and run the case again in another --out"
            for case, m in sorted(models.items()) if len(m) > 1]


def near_chance_cases(rows: list[dict]) -> list[str]:
    """A warning for each case where every metric's mean test accuracy is near chance (the
    pretraining's threshold): its differences there are noise, whatever the CIs say. Rows from
    reports without the number of classes (older evoprune) are not judged."""
    from evoprune.pretrain import near_chance

    by: dict[int, dict[str, list[float]]] = {}
    label, classes = {}, {}
    for r in usable(rows):
        by.setdefault(r["case"], {}).setdefault(r["metric"], []).append(r["test"])
        label[r["case"]] = r["case_label"]
        classes.setdefault(r["case"], set()).add(r.get("classes"))
    out = []
    for case, metrics in sorted(by.items()):
        (k,) = classes[case] if len(classes[case]) == 1 else (None,)
        best = max(statistics.fmean(v) for v in metrics.values())
        if isinstance(k, int) and k > 1 and near_chance(best, k):
            out.append(f"case {case + 1} ({label[case]}): every metric ends near chance accuracy (best mean "
                       f"{best:.1%}, chance {1 / k:.1%}): its differences are noise; a lighter target or longer "
                       "retraining in the suite file would tell metrics apart")
    return out


def _ray_for_runs(address: str | None, asked: float | None, device: str, workers: int) -> tuple[float, str]:
    """Join (or start) Ray and size each run's GPU share, before anything is written."""
    from evoprune.workers.evaluator import gpu_share, init_ray, node_gpus

    init_ray(address)
    return gpu_share(asked, device, node_gpus(), "--gpus-per-run", workers)


def run_suite(suite: Suite, metrics: list[str], *, out: Path, db=None, data_root=None, cache_dir=None,
              tasks_file=None, device: str = "auto", workers: int = 0, record: bool = True,
              on_result: Callable[[dict, int, int], None] | None = None,
              on_plan: Callable[[dict[str, Any]], None] | None = None, gpus_per_run: float | None = None,
              address: str | None = None) -> list[dict]:
    """Run (or continue) the suite; returns one row per run. `on_plan` sees every run's
    (Run, PruneConfig) by key before the first one starts. With `workers`, the runs go to Ray
    (`address`, else the Ray this machine runs, else a local one), each asking for
    `gpus_per_run` GPUs (`evoprune.workers.evaluator.gpu_share`)."""
    out = Path(out)
    metrics = metric_list(suite, metrics, db)
    plan = configs(suite, metrics, tasks_file=tasks_file, db=db, data_root=data_root)
    gpus = 0.0
    if workers:
        gpus, device = _ray_for_runs(address, gpus_per_run, device, workers)
    _claim_folder(out, suite, metrics)
    results = out / "results.jsonl"
    rows = _read_rows(results)
    for r in rows:
        if r["key"] in plan:
            _same_formula(r["key"], r["expression"], plan[r["key"]][1].expression)
    if on_plan is not None:  # once the folder is known to be usable: a refusal is the only line said
        on_plan(plan)
    done = {r["key"] for r in rows}
    todo = [(run, cfg) for key, (run, cfg) in plan.items() if key not in done]
    on_result = on_result or (lambda row, n_done, n_total: None)
    args = (str(data_root) if data_root else None, str(cache_dir) if cache_dir else None,
            str(tasks_file) if tasks_file else None, device)

    def write(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        done.add(row["key"])
        on_result(row, len(rows), len(plan))

    def finished(run: Run, rep: dict | UnusableMetric) -> None:
        """A run's report, or the reason its metric cannot rank its case's filters (then every
        seed of that case and metric is written n/a, and those not yet run are skipped)."""
        if run.key in done:  # on Ray, another seed of a case and metric found n/a first
            return
        if isinstance(rep, UnusableMetric):
            for row in _na_rows(plan, run, str(rep)):
                if row["key"] not in done:
                    write(row)
            return
        row = _row(run, rep)
        if record:
            row["recorded"] = _record(db, plan[run.key][1], rep, run.seed)
        write(row)

    if workers:
        _on_ray(todo, out, args, workers, gpus, finished, done)
    else:
        for run, cfg in todo:
            if run.key in done:
                continue
            try:
                rep = _do_run(cfg, out / "runs" / run.key, *args)
            except UnusableMetric as e:
                rep = e
            except EvopruneError as e:
                raise _in_case(run, e) from None
            finished(run, rep)
    return [r for r in rows if r["key"] in plan]


def _read_rows(path: Path) -> list[dict]:
    """results.jsonl's rows. A last line cut short (the suite killed while writing it) is dropped,
    from the file too, so the next row starts a line of its own: its run's report is in its
    folder and is read again. Any other unreadable line is refused, the file left as it is."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"key", "case", "metric", "seed"} <= row.keys():
                raise ValueError("not a row of a run")
        except ValueError as e:
            if i == len(lines) - 1 and not text.endswith("\n"):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(text[: len(text) - len(line)])
                tmp.replace(path)
                break
            raise EvopruneError(f"{path} line {i + 1} is unreadable ({e}); mend or delete that line (a run whose "
                                "report.json is in runs/ is read again, not redone), or use another --out") from None
        rows.append(row)
    return rows


def _in_case(run: Run, e: Exception) -> EvopruneError:
    """A run's error, naming its case: the runs finished before it are kept (rerun to continue).
    A run that diverged is advised in the suite's terms, not prune's flags."""
    if isinstance(e, Diverged):
        e = (f"{e.what}; lower this case's `lr` in `tpp_settings` or `retrain` (or the task's) in the suite "
             "file, and run validate again with another --out")
    return EvopruneError(f"suite case {run.case.index + 1} ({run.case.label}), metric {run.metric}, seed {run.seed}: "
                         f"{e}")


def _pretrain(task: str, data_root, cache_dir, tasks_file, device) -> str:
    """A task's pretrained model, loaded or trained where this runs; returns its sha256.
    Module level: Ray ships it."""
    from evoprune.pretrain import pretrained
    from evoprune.tasks import get_task

    return pretrained(get_task(task, tasks_file), data_root=data_root, cache_dir=cache_dir,
                      device=device).meta.get("sha256", "")


def _on_ray(todo, out: Path, args, workers: int, gpus: float, finished, done: set[str]) -> None:
    import ray

    from evoprune.workers.evaluator import users_error

    # Each task pretrained once, before its runs: several runs starting together on a cache they
    # share would each train it, and the last to write would not be the model the others used.
    first = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_pretrain)
    tasks = list(dict.fromkeys(run.case.task for run, _ in todo if run.key not in done))
    for task, ref in zip(tasks, [first.remote(t, *args) for t in tasks]):
        try:
            ray.get(ref)
        except Exception as e:
            if mistake := users_error(e):
                raise EvopruneError(f"pretraining {task} for the suite: {mistake}") from None
            raise
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(_do_run)
    pending, queue = {}, list(todo)
    while queue or pending:
        while queue and len(pending) < workers:
            run, cfg = queue.pop(0)
            if run.key not in done:  # not one a seed before it found n/a
                pending[remote.remote(cfg, out / "runs" / run.key, *args)] = run
        if not pending:
            continue
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            run = pending.pop(ref)
            try:
                rep = ray.get(ref)
            except Exception as e:
                if isinstance(mistake := users_error(e), UnusableMetric):
                    rep = mistake
                elif mistake:  # the user's case, not the cluster, is at fault
                    raise _in_case(run, mistake) from None
                else:
                    raise
            finished(run, rep)


def _claim_folder(out: Path, suite: Suite, metrics: list[str]) -> None:
    """A new folder gets suite.json; an existing one must hold the same cases (a run's key names
    its case by position). Other metrics, baselines or seeds continue it: the runs it already
    has are reused (their formulas are checked, `_same_formula`) and only the missing ones run,
    so a baseline dropped from a suite, or a metric added, does not redo the rest."""
    want = {"suite": {"name": suite.name, "seeds": suite.seeds, "baselines": suite.baselines,
                      "cases": [{"task": c.task, **c.settings} for c in suite.cases]}, "metrics": metrics}
    want = json.loads(json.dumps(want))  # tuples as lists, as they come back from the file
    path = out / "suite.json"
    if out.exists() and not out.is_dir():
        raise EvopruneError(f"--out {out} is a file, not a folder")
    if path.exists():
        try:
            have = json.loads(path.read_text())
            cases = have["suite"]["cases"]
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise EvopruneError(f"{path} is unreadable ({e}); use another --out") from None
        if cases != want["suite"]["cases"]:
            raise EvopruneError(f"{out} holds a suite with other cases; use another --out (the same cases with "
                                "other metrics, baselines or seeds continue it)")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=2))


def _same_formula(key: str, have: str, want: str) -> None:
    """A run kept in --out under `key` must be of the formula the metric names now (a candidate
    ID names another formula in another database)."""
    if have != want:
        raise EvopruneError(f"run {key} in --out pruned with {have!r}, but its metric now names {want!r} (another "
                            "--db?); use another --out")


def _record(db, cfg, rep: dict, seed: int):
    from evoprune.transfer.prune import record_transfer

    try:
        return record_transfer(db, cfg, rep, seed=seed)
    except EvopruneError:
        return None


# --------------------------------------------------------------------------- the table
@dataclass
class CaseResult:
    case: int
    label: str
    metric: str
    test: Estimate
    macs_kept: float
    seeds: list[int]
    diffs: dict[str, Estimate] = field(default_factory=dict)  # baseline metric -> paired difference
    verdicts: dict[str, str] = field(default_factory=dict)


def summarize(rows: list[dict], baselines: list[str]) -> tuple[list[CaseResult], dict[str, dict[str, list[int]]]]:
    """Per case and metric: test mean and CI over seeds, and the paired difference to each
    baseline; per metric and baseline: [wins, ties, losses] over the cases."""
    rows = usable(rows)  # a metric n/a on a case has no result there, and so no comparison
    by: dict[tuple[int, str], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["case"], r["metric"]), {})[r["seed"]] = r
    base_refs = [f"baseline:{b}" for b in baselines]
    steps = {case: one_image([r for r in rows if r["case"] == case]) for case in {case for case, _ in by}}
    results, wtl = [], {}
    for (case, metric), seeds in sorted(by.items()):
        any_row = next(iter(seeds.values()))
        step = steps[case]
        cr = CaseResult(case, any_row["case_label"], metric,
                        estimate([seeds[s]["test"] for s in sorted(seeds)], floor=step, bounds=(0.0, 1.0)),
                        statistics.fmean(r["macs_kept"] for r in seeds.values()), sorted(seeds))
        for b in base_refs:
            other = by.get((case, b))
            if other is None or b == metric:
                continue
            common = sorted(set(seeds) & set(other))
            if not common:
                continue
            d = paired([seeds[s]["test"] for s in common], [other[s]["test"] for s in common], floor=step,
                       bounds=(-1.0, 1.0))
            cr.diffs[b], cr.verdicts[b] = d, verdict(d)
            counts = wtl.setdefault(metric, {}).setdefault(b, [0, 0, 0])
            counts[VERDICTS.index(cr.verdicts[b])] += 1
        results.append(cr)
    return results, wtl


def overall(rows: list[dict], asked: list[str], baselines: list[str]) -> tuple[float, dict[str, dict[str, Estimate]]]:
    """Each metric asked for against each suite baseline over every (case, seed) both ran: the
    mean paired difference, with a CI that holds for all these comparisons together (Bonferroni;
    the per-case verdicts are each at 95%, so among many cases and metrics some read as wins or
    losses by chance). Returns the per-comparison level and metric -> baseline -> difference."""
    rows = usable(rows)
    by: dict[str, dict[tuple[int, int], float]] = {}
    for r in rows:
        by.setdefault(r["metric"], {})[(r["case"], r["seed"])] = r["test"]
    pairs = [(m, b) for m in dict.fromkeys(asked) if m in by
             for b in (f"baseline:{name}" for name in baselines) if b in by and b != m and set(by[m]) & set(by[b])]
    level, step = family_level(len(pairs)), one_image(rows)
    out: dict[str, dict[str, Estimate]] = {}
    for m, b in pairs:
        common = sorted(set(by[m]) & set(by[b]))
        out.setdefault(m, {})[b] = paired([by[m][k] for k in common], [by[b][k] for k in common], level,
                                          floor=step, bounds=(-1.0, 1.0))
    return level, out


def plot(rows: list[dict], path: Path) -> None:
    """Test top-1 against the MACs kept, one line per metric (and TPP on/off), a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = usable(rows)
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines: dict[tuple[str, bool], dict[float, list[float]]] = {}
        for r in rows:
            if r["task"] == task:
                lines.setdefault((r["metric"], r["tpp"]), {}).setdefault(round(r["macs_kept"], 4), []).append(r["test"])
        metrics = sorted({m for m, _ in lines})
        colors = plt.get_cmap("tab20" if len(metrics) > 10 else "tab10")
        every = [x for pts in lines.values() for x in pts]
        lo, hi = min(every), max(every)
        # metrics pruned to the same MACs share one x: each is moved sideways a little, so that
        # their error bars do not hide one another (a share of the axis, not a MACs difference)
        step = 0.01 * max(hi - lo, 0.25)
        for (metric, tpp), pts in sorted(lines.items()):
            i = metrics.index(metric)  # one color and marker per metric; dashed without TPP
            xs = sorted(pts)
            ys = [statistics.fmean(pts[x]) for x in xs]
            err = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs]
            shift = (i - (len(metrics) - 1) / 2) * step
            ax.errorbar([x + shift for x in xs], ys, yerr=err, marker="osD^vP*Xhp"[i % 10], capsize=3,
                        linestyle="-" if tpp else "--", color=colors(i % colors.N),
                        label=f"{metric[:40]}{'' if tpp else ' (no TPP)'}")
        if hi - lo < 0.1:  # one target: an axis of a few percent around it, not one the dodge fills
            mid = (lo + hi) / 2
            ax.set_xlim(mid - 0.05, mid + 0.05)
        ax.set_xlabel("MACs kept (share of the unpruned model; metrics set slightly apart)")
        ax.set_ylabel("test top-1 (mean +- std over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
