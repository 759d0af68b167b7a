"""The `evoprune` command line. Commands are thin: parse options, call one service function.

User mistakes (bad flags, unknown names, missing data) print one `error:` line and exit 2,
never a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import evoprune
from evoprune.errors import EvopruneError

app = typer.Typer(help="Evolve, store and apply channel-pruning metrics.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
data_app = typer.Typer(help="Data sets: list them, check that one loads.", no_args_is_help=True)
models_app = typer.Typer(help="The model zoo.", no_args_is_help=True)
tasks_app = typer.Typer(help="Tasks: data set + model + pretraining recipe.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(tasks_app, name="tasks")
metrics_app = typer.Typer(help="Query the formulas a search found.", no_args_is_help=True)
app.add_typer(metrics_app, name="metrics")
primitives_app = typer.Typer(help="The search space: statistics, operators, baseline metrics.", no_args_is_help=True)
app.add_typer(primitives_app, name="primitives")
proxy_app = typer.Typer(help="The fitness proxy: its noise and its fidelity.", no_args_is_help=True)
app.add_typer(proxy_app, name="proxy")

# long formulas stay on one line when piped; tables get room for formulas in logs and pipes
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

try:  # typer >= 0.20 bundles its own click; older releases raise click's own exceptions
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="Where data sets live "
                     "(else $EVOPRUNE_DATA_ROOT, else ./data).", show_default=False)]
Download = Annotated[bool, typer.Option("--download", help="Allow torchvision to download a missing "
                     "data set (needs a network; also $EVOPRUNE_DOWNLOAD=1).")]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Pretrained-model cache "
                     "(else $EVOPRUNE_CACHE, else ~/.cache/evoprune).", show_default=False)]
Db = Annotated[Optional[str], typer.Option("--db", help="Database URL or SQLite path (else $EVOPRUNE_DB, "
                                         "else ./evoprune.db).", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Csv = Annotated[bool, typer.Option("--csv", help="Print CSV.")]
TasksFile = Annotated[Optional[Path], typer.Option("--tasks-file", help="A TOML file of extra tasks "
                      "(else $EVOPRUNE_TASKS).", show_default=False)]
# evolve's and proxy check's Ray options (validate's --workers counts runs at once, not actors)
RayWorkers = Annotated[Optional[str], typer.Option("--workers", help="Ray actors: N, or auto for every GPU (else "
                                                   "CPU) of the cluster; 0 evaluates in this process.")]
RayAddress = Annotated[Optional[str], typer.Option("--address", help="The Ray cluster to join (else [run] address, "
                                                   "$RAY_ADDRESS, a `ray start` on this machine); implies Ray "
                                                   "workers.")]


def parse_id(value: str) -> int:
    """A database ID: ASCII digits (int() would read Arabic-Indic ones), below 2^63."""
    from evoprune.metricref import MAX_ID

    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise typer.BadParameter(f"{value!r} is not an ID (a whole number, ASCII digits)")
    if not 1 <= int(text) <= MAX_ID:
        raise typer.BadParameter(f"{text} is not an ID in this database (IDs are 1 to 2^63 - 1)")
    return int(text)


@app.command()
def version():
    """Print the evoprune version and the versions of the libraries it runs on."""
    import deap
    import ray
    import torch

    out.print(f"evoprune {evoprune.__version__} (torch {torch.__version__}, ray {ray.__version__}, "
              f"deap {deap.__version__}, python {sys.version.split()[0]})")


@data_app.command("list")
def data_list(data_root: DataRoot = None):
    """List the data sets and whether their files are under the data root."""
    from evoprune.data import DATASETS, quick_status, resolve_data_root

    root, origin = resolve_data_root(data_root)
    t = Table(title=f"data sets (data root {root.resolve()}, from {origin})")
    for col in ("name", "files", "expected at", "description"):
        t.add_column(col)
    for name, spec in DATASETS.items():
        t.add_row(name, quick_status(name, root), spec.where, spec.description)
    t.add_row("imagefolder:PATH", "-", "PATH/train/CLASS/*.jpg (+ PATH/val)", "ImageNet-style image tree")
    out.print(t)


@data_app.command("check")
def data_check(name: Annotated[str, typer.Argument(help="digits, mnist, cifar10, cifar100, svhn or "
                                                    "imagefolder:PATH")],
               data_root: DataRoot = None, download: Download = False):
    """Load a data set and report where we looked, what we found and the split sizes."""
    from evoprune.data import load_dataset, resolve_data_root, suffix_counts

    root, origin = resolve_data_root(data_root)
    out.print(f"looking under {root.resolve()} (data root from {origin})")
    ds = load_dataset(name, root, download or None)
    counts = ds.train.y.bincount(minlength=ds.num_classes)
    out.print(f"[green]ok[/] {ds.name}: read from {ds.source}\n"
              f"  classes {ds.num_classes}, input {'x'.join(map(str, ds.input_shape))}\n"
              f"  train {len(ds.train)}  val {len(ds.val)}  test {len(ds.test)} "
              f"(train per class {int(counts.min())}-{int(counts.max())})\n"
              f"  fingerprint {ds.fingerprint()}")
    if ds.skipped:
        out.print(f"  left out {sum(n for _, n in ds.skipped)} files whose suffix is not an image's "
                  f"({suffix_counts(ds.skipped)})")


@models_app.command("list")
def models_list():
    """List the models of the zoo."""
    from evoprune.models import IMPORT, MODELS, TORCHVISION

    t = Table(title="models")
    for col in ("name", "input", "description"):
        t.add_column(col)
    for spec in MODELS.values():
        t.add_row(spec.name, f"{spec.input_size}x{spec.input_size}", spec.description)
    t.add_row(f"{TORCHVISION}ARCH", "224x224", "any torchvision classifier, e.g. torchvision:efficientnet_b0 "
              "(weights=PATH; what can be cut: docs/configuration.md)")
    t.add_row(f"{IMPORT}MODULE:CALLABLE", "any", "your own: a callable taking num_classes (and in_channels, the "
              "task's model_args) that returns an nn.Module")
    out.print(t)


@tasks_app.command("list")
def tasks_list(tasks_file: TasksFile = None):
    """List the tasks (built-in and from --tasks-file)."""
    from evoprune.tasks import all_tasks

    t = Table(title="tasks")
    for col in ("name", "data set", "model", "epochs", "description"):
        t.add_column(col)
    for task in all_tasks(tasks_file).values():
        t.add_row(task.name, task.dataset, task.model, str(task.recipe.epochs), task.description)
    out.print(t)


@primitives_app.command("list")
def primitives_list():
    """List the statistics (terminals), the operators and the baseline metrics."""
    from evoprune.primitives.baselines import BASELINES
    from evoprune.primitives.ops import OPS
    from evoprune.primitives.stats import STATS

    t = Table(title="statistics (one value per output filter)")
    for col in ("name", "cost", "shape", "description"):
        t.add_column(col)
    for s in STATS.values():
        shape = "[K, C_out]" if s.per_class else "[C_out] (per layer)" if s.layer_level else "[C_out]"
        t.add_row(s.name, s.cost.name.lower(), shape, s.description)
    out.print(t)
    t = Table(title="operators")
    for col in ("name", "arity", "meaning"):
        t.add_column(col)
    for o in OPS.values():
        t.add_row(o.name, str(o.arity), o.description)
    out.print(t)
    t = Table(title="baseline metrics (use as baseline:NAME)")
    for col in ("name", "expression", "description"):
        t.add_column(col)
    for b in BASELINES.values():
        t.add_row(b.name, b.expression, b.description)
    out.print(t)
    out.print("Constants are plain numbers (0.05, -1e-3). Per-class statistics [K, C_out] make the whole "
              "expression per class; the scores are then averaged over classes.")


@primitives_app.command("check")
def primitives_check(expression: Annotated[str, typer.Argument(help="An expression, e.g. "
                                                                 "'div(w_l1, add(bn_abs_gamma, 0.1))' or "
                                                                 "'w_l1 / (bn_abs_gamma + 0.1)', or baseline:NAME.")]):
    """Parse an expression: its simplified form, LaTeX and the statistics it needs."""
    from evoprune.primitives.baselines import get_baseline
    from evoprune.primitives.expr import canonical, canonical_hash, strip_monotone, to_latex
    from evoprune.primitives.infix import read_formula
    from evoprune.primitives.stats import STATS

    if expression.startswith("baseline:"):
        expression = get_baseline(expression.split(":", 1)[1]).expression
    node = read_formula(expression)
    core, rev = strip_monotone(node)
    out.print(f"expression   {node}\n"
              f"simplified   {canonical(node)}\n"
              f"latex        {to_latex(node)}\n"
              f"hash         {canonical_hash(node)}\n"
              f"size/depth   {node.size} / {node.depth}", highlight=False, markup=False)
    if core != node:
        out.print(f"ranks like   {'reverse of ' if rev else ''}{core}", highlight=False, markup=False)
    needs = node.stats()
    cost = max((STATS[s].cost for s in needs), default=None)
    out.print(f"statistics   {', '.join(needs) or '(none: a constant cannot rank filters)'}"
              + (f"  (needs: {cost.name.lower()})" if cost is not None else ""), highlight=False, markup=False)


@app.command()
def pretrain(task: Annotated[str, typer.Argument(help="Task name (see `evoprune tasks list`).")],
             data_root: DataRoot = None, cache_dir: CacheDir = None, tasks_file: TasksFile = None,
             device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
             download: Download = False,
             force: Annotated[bool, typer.Option("--force", help="Retrain even if cached.")] = False):
    """Train a task's model (or load it from the cache) and report its accuracy."""
    from evoprune.pretrain import pretrained, resolve_cache_dir
    from evoprune.tasks import get_task

    t = get_task(task, tasks_file)
    p = pretrained(t, data_root=data_root, cache_dir=cache_dir, device=device, download=download or None,
                   show_progress=True, force=force, console=out)
    how = "loaded from cache" if p.cached else f"trained in {p.meta['seconds']:.1f} s on {p.meta['device']}"
    out.print(f"{t.name}: {how}\n  val {p.meta['val_acc']:.2%}  test {p.meta['test_acc']:.2%}\n"
              f"  checkpoint {p.path}  (cache {resolve_cache_dir(cache_dir).resolve()})")


def _workers_flag(workers: str | None, address: str | None, cfg) -> int | None:
    """--workers N | auto as [run] workers (auto: -1); a cluster named with --address and no
    workers asked for anywhere: all it offers. None: the config's."""
    if workers is not None:
        if workers != "auto" and not workers.isdigit():
            raise EvopruneError(f"--workers takes a number or 'auto', got {workers!r}")
        return -1 if workers == "auto" else int(workers)
    if address is not None and not cfg.run.workers:
        return -1  # a cluster asked for: one worker per CPU (or GPU) it offers
    return None


@app.command()
def evolve(config: Annotated[Optional[Path], typer.Option("--config", help="Search config (TOML); "
                                                          "defaults: two digits tasks, 12 generations x 32.")] = None,
           resume: Annotated[Optional[int], typer.Option("--resume", parser=parse_id, help="Continue run RUN_ID "
                                                         "from its last completed generation.")] = None,
           db: Annotated[Optional[str], typer.Option("--db", help="Database URL or SQLite path (else "
                                                     "$EVOPRUNE_DB, else the config, else ./evoprune.db).")] = None,
           workers: RayWorkers = None,
           generations: Annotated[Optional[int], typer.Option("--generations", help="Override [search] "
                                                              "generations; with "
                                                              "--resume, the run's new number (more extends a "
                                                              "finished run).")] = None,
           time_limit: Annotated[Optional[str], typer.Option("--time-limit", help="No generation starts that "
                                                             "would likely end past this (90m, 2h, 1h30m); the "
                                                             "summary follows, --resume continues ([run] "
                                                             "time_limit).")] = None,
           address: RayAddress = None,
           data_root: DataRoot = None, cache_dir: CacheDir = None, tasks_file: TasksFile = None,
           device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda.")] = None):
    """Search for a pruning metric (the default search runs on the digits task)."""
    from dataclasses import replace

    from evoprune.evolve.config import duration_s, load_config
    from evoprune.evolve.progress import SearchDisplay
    from evoprune.evolve.service import run_search

    cfg = load_config(config)
    if time_limit is not None:
        duration_s(time_limit, "--time-limit")
    if generations is not None and not 0 <= generations <= 100_000:
        raise EvopruneError(f"--generations must be in [0, 100000], got {generations}")
    workers = _workers_flag(workers, address, cfg)
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in
                 dict(workers=workers, data_root=data_root, cache_dir=cache_dir, device=device,
                      address=address, tasks_file=tasks_file, time_limit=time_limit).items() if v is not None}
    cfg = replace(cfg, run=replace(cfg.run, **overrides))
    with SearchDisplay(out, cfg, db) as display:
        result = run_search(cfg, db_url=db, resume=resume, on_progress=display.update, generations=generations,
                            config_given=config is not None)
    display.summary(result)


@proxy_app.command("check")
def proxy_check(config: Annotated[Optional[Path], typer.Option("--config", help="Search config (TOML) whose "
                                                               "proxy is checked; default: the default search's.")]
                = None,
                orders: Annotated[int, typer.Option("--orders", min=2, max=100, help="Data orders the noise is "
                                                    "measured over (>= 5 for a verdict).")] = 5,
                random_formulas: Annotated[int, typer.Option("--random", min=0, max=100, help="Random formulas "
                                                             "besides the seeded baselines (at least 12 metrics "
                                                             "in all).")] = 6,
                reference_factor: Annotated[int, typer.Option("--reference-factor", min=2, max=1000, help="The "
                                                              "reference fine-tune is this many times longer.")]
                = 10,
                reference_seeds: Annotated[int, typer.Option("--reference-seeds", min=1, max=20, help="Data orders "
                                                             "the reference is averaged over.")] = 3,
                plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write the plot here (PNG); "
                                                                  "default proxy-check.png.")] = None,
                as_json: Json = False, data_root: DataRoot = None, cache_dir: CacheDir = None,
                tasks_file: TasksFile = None,
                device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda.")] = None,
                workers: RayWorkers = None, address: RayAddress = None):
    """Measure the proxy's noise over data orders and its fidelity to a long fine-tune (on Ray
    workers as the search, with [run] workers or --workers: the same figures)."""
    from dataclasses import replace

    from evoprune.evolve.config import load_config
    from evoprune.evolve.proxy_check import check_proxy, plot
    from evoprune.evolve.service import check_inputs
    from evoprune.progress import progress, warn

    cfg = load_config(config)
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in
                 dict(data_root=data_root, cache_dir=cache_dir, device=device, tasks_file=tasks_file,
                      workers=_workers_flag(workers, address, cfg), address=address).items() if v is not None}
    cfg = replace(cfg, run=replace(cfg.run, **overrides))
    check_inputs(cfg)
    with progress("proxy check", orders + reference_seeds, Console(stderr=True), not as_json,
                  fields={"stage": "s"}) as update:
        res = check_proxy(cfg, orders=orders, n_random=random_formulas, reference_factor=reference_factor,
                          reference_seeds=reference_seeds,
                          on_progress=lambda kind, done, total: update(done, stage=kind))
    png = plot_path or Path("proxy-check.png")
    plot(res, png)
    if as_json:
        print_json(res.to_dict())
        return
    t = Table(title=f"proxy check: {', '.join(res.tasks)}, {res.finetune_steps} steps, {res.orders} data orders; "
                    f"reference {res.reference_steps} steps x {res.reference_seeds}")
    for col in ("metric", "proxy mean", "std", "reference", "formula"):
        t.add_column(col)
    for m in sorted(res.metrics, key=lambda m: -m.mean):
        t.add_row(m.name + (" (baseline)" if m.baseline else ""), f"{m.mean:.4f}", f"{m.std:.4f}",
                  f"{m.reference_mean:.4f}", m.expression[:60])
    out.print(t)
    out.print(f"noise (mean std) {res.noise:.4f}; spread of the means {res.spread:.4f}; best - median baseline "
              f"{res.gap:.4f}; Kendall tau {res.tau:.2f} (95% CI {res.tau_ci[0]:.2f} to {res.tau_ci[1]:.2f}); "
              f"{res.seconds:.0f} s", highlight=False, markup=False)
    if a := res.by_accuracy:
        out.print(f"scored by accuracy instead (both sides): noise {a['noise']:.4f}; best - median baseline "
                  f"{a['gap']:.4f}; Kendall tau {a['tau']:.2f} (95% CI {a['tau_ci'][0]:.2f} to {a['tau_ci'][1]:.2f})",
                  highlight=False, markup=False)
    for text in res.warnings:
        warn(out, text)
    out.print(f"{res.verdict}\nplot: {png}", highlight=False, markup=False)


def print_json(obj) -> None:
    """`obj` as JSON that strict readers (jq, JavaScript) take: an inf or nan (a CI of one seed, a
    tau of tied scores), which Python would write as a bare Infinity or NaN, is null."""
    import json
    import math

    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    print(json.dumps(clean(obj), indent=2, default=str, allow_nan=False))


def emit(rows: list[dict], title: str, as_json: bool = False, as_csv: bool = False,
         columns: list[str] | None = None) -> None:
    """Rows as a table, or as JSON / CSV for scripts."""
    import csv

    if as_json and as_csv:
        raise EvopruneError("--json and --csv exclude each other")
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    if as_json:
        print_json(rows)
    elif as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    else:
        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_cell(r.get(c)) for c in cols])
        out.print(t)


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _db(db: str | None):
    from evoprune.db.store import connect

    return connect(db, create=False)


@app.command()
def runs(db: Db = None, as_json: Json = False, as_csv: Csv = False):
    """List the search runs in the database."""
    from evoprune.db import queries

    emit(queries.runs(_db(db)), "runs", as_json, as_csv)


_TOP_COLS = ["id", "run", "fitness", "stage", "size", "kept_flops", "baseline", "canonical"]


@metrics_app.command("top")
def metrics_top(run: Annotated[Optional[int], typer.Option("--run", parser=parse_id, help="Only this run.")] = None,
                task: Annotated[Optional[str], typer.Option("--task", help="Rank by this task's accuracy.")] = None,
                limit: Annotated[int, typer.Option("--limit", min=1)] = 10,
                every: Annotated[bool, typer.Option("--all", help="Every formula, also those that prune the same "
                                                    "filters as a better ranked one.")] = False,
                db: Db = None, as_json: Json = False, as_csv: Csv = False):
    """The best formulas (fully evaluated first), by fitness or by one task's accuracy: one per
    run and set of masks (the simplest of those ranked alike; "same masks" counts the others of
    its run), or --all."""
    from evoprune.db import queries

    rows = queries.top(_db(db), run, task, limit, distinct=not every)
    acc = sorted({k for r in rows for k in r if k.startswith("acc:")})
    emit(rows, "top formulas", as_json, as_csv, columns=None if (as_json or as_csv) else _TOP_COLS[:3] + acc
         + _TOP_COLS[3:] + ([] if every else ["same_masks"]))


@metrics_app.command("show")
def metrics_show(candidate_id: Annotated[int, typer.Argument(parser=parse_id, help="Candidate ID (see `evoprune "
                                                              "metrics top`).")],
                 db: Db = None, as_json: Json = False, as_csv: Csv = False):
    """One formula: raw, simplified, LaTeX, per-task results, lineage (--csv: its evaluations)."""

    from evoprune.db import queries
    from evoprune.primitives.expr import parse, to_latex

    row = queries.candidate(_db(db), candidate_id)
    row["latex"] = to_latex(parse(row["expression"]))
    if as_json and as_csv:
        raise EvopruneError("--json and --csv exclude each other")
    if as_json:
        print_json(row)
        return
    if as_csv:
        emit([{"candidate": row["id"], "expression": row["expression"], **e} for e in row["evaluations"]], "",
             as_csv=True)
        return
    out.print(f"candidate {row['id']} of run {row['run']} (born in generation {row['birth_generation']})\n"
              f"expression  {row['expression']}\nsimplified  {row['canonical']}\nlatex       {row['latex']}\n"
              f"fitness     {row['fitness']:.4f} ({row['stage'] or 'not evaluated'}), size {row['size']}, "
              f"depth {row['depth']}" + ("" if row["valid"] else f"\ninvalid     {row['reason']}"),
              highlight=False, markup=False)
    # the table says "diverged" where it happened, not False on every other row
    emit([{**e, "diverged": "diverged" if e["diverged"] else ""} for e in row["evaluations"]], "evaluations")
    if row["lineage"]:
        emit(row["lineage"], "lineage (ancestors in this run)")


@metrics_app.command("pareto")
def metrics_pareto(run: Annotated[int, typer.Argument(parser=parse_id, help="Run ID.")], db: Db = None,
                   as_json: Json = False, as_csv: Csv = False):
    """The run's Pareto front of fitness against formula size."""
    from evoprune.db import queries

    emit(queries.pareto(_db(db), run), f"run {run}: Pareto front (fitness vs size)", as_json, as_csv,
         columns=None if (as_json or as_csv) else ["id", "fitness", "size", "stage", "canonical"])


@metrics_app.command("compare")
def metrics_compare(ids: Annotated[list[int], typer.Argument(parser=parse_id, help="Candidate IDs.")], db: Db = None,
                    as_json: Json = False, as_csv: Csv = False):
    """Formulas side by side, with the baselines seeded into the same runs."""
    from evoprune.db import queries

    engine = _db(db)
    rows = [queries.candidate(engine, i) for i in ids]
    for run in sorted({r["run"] for r in rows}):
        rows += [r for r in queries.top(engine, run=run, limit=10**6) if r["baseline"] and r["id"] not in ids]
    checked = {cid: v for run in sorted({r["run"] for r in rows}) for cid, v in queries.validation(engine, run).items()}
    for r in rows:
        v = checked.get(r["id"])
        if v:
            r.update(v)
            r["validated"] = f"{v['val_fitness']:.4f} ({v['val_low']:.4f} to {v['val_high']:.4f})"
            r["vs best baseline"] = "" if v["diff"] is None else \
                f"{v['diff']:+.4f} ({v['diff_low']:+.4f} to {v['diff_high']:+.4f}) {v['verdict']} {v['best_baseline']}"
    acc = sorted({k for r in rows for k in r if k.startswith("acc:")})
    extra = ["validated", "vs best baseline"] if checked else []
    emit(rows, "comparison (validated: mean fitness and 95% CI over fresh data orders)", as_json, as_csv,
         columns=None if (as_json or as_csv) else _TOP_COLS[:3] + acc + extra + _TOP_COLS[3:])


@metrics_app.command("promote")
def metrics_promote(candidate_id: Annotated[int, typer.Argument(parser=parse_id, help="Candidate ID.")],
                    name: Annotated[str, typer.Argument(help="A name to use the formula by.")], db: Db = None,
                    as_json: Json = False, as_csv: Csv = False):
    """Give a formula a name for reuse (`evoprune export NAME`)."""
    from evoprune.db import queries

    m = queries.promote(_db(db), candidate_id, name)
    if as_json or as_csv:
        emit([m], "", as_json, as_csv)
        return
    out.print(f"metric {m['name']!r} = {m['expression']} (candidate {m['candidate']})", highlight=False, markup=False)


@app.command()
def export(ref: Annotated[str, typer.Argument(help="A candidate ID, a promoted metric's NAME, baseline:NAME or "
                                                  "expr:EXPRESSION.")],
           fmt: Annotated[str, typer.Option("--format", "-f", help="python | torch-pruning | sympy | "
                                            "latex")] = "python",
           output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write to FILE (else "
                                                          "stdout).")] = None,
           max_images: Annotated[int, typer.Option("--max-images", min=1, help="Images the statistics use.")] = 256,
           db: Db = None):
    """Export a metric as a standalone Python module (needs only torch), a Torch-Pruning
    importance, a sympy expression or LaTeX."""
    from evoprune.export import export as make
    from evoprune.metricref import resolve

    code = make(resolve(ref, db), fmt, max_images)
    if output is None:
        sys.stdout.write(code)
        return
    if output.is_dir():
        raise EvopruneError(f"-o {output} is a folder: give a file name, e.g. {output / 'metric.py'}")
    try:
        output.write_text(code)
    except OSError as e:
        raise EvopruneError(f"cannot write {output}: {e.strerror or e}") from None
    out.print(f"wrote {fmt} export of {ref} to {output}", highlight=False, markup=False)


@app.command()
def report(run: Annotated[int, typer.Argument(parser=parse_id, help="Run ID.")],
           output: Annotated[Path, typer.Option("-o", "--output", help="Directory for index.html and the PNGs.")]
           = Path("report"),
           db: Db = None):
    """An HTML page with plots of a run: fitness curves, Pareto front, top formulas."""
    from evoprune.report import build_report

    page = build_report(_db(db), run, output)
    out.print(f"wrote {page}", highlight=False, markup=False)


def default_suite() -> Path:
    """configs/suite.toml of this source tree (an editable install, as the README installs)."""
    return Path(evoprune.__file__).resolve().parents[1] / "configs" / "suite.toml"


@app.command()
def validate(metrics: Annotated[list[str], typer.Argument(help="Metrics: candidate IDs, promoted NAMEs, "
                                                         "baseline:NAME or expr:EXPRESSION.")],
             suite_file: Annotated[Optional[Path], typer.Option("--suite", help="Suite (TOML); default "
                                                                "configs/suite.toml.")] = None,
             seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, max=100, help="Retraining seeds per "
                                                          "case (else the suite's).")] = None,
             workers: Annotated[int, typer.Option("--workers", min=0, max=10_000, help="Ray workers running "
                                                  "cases in parallel (0: one at a time, here).")] = 0,
             gpus_per_run: Annotated[Optional[float], typer.Option("--gpus-per-run", min=0, max=8, help="GPUs each "
                                                                   "run on Ray asks for (default: 1 on a cluster "
                                                                   "with GPUs, an even share where --workers "
                                                                   "outnumber them, else 0).")] = None,
             address: Annotated[Optional[str], typer.Option("--address", help="The Ray cluster for --workers "
                                                          "(else $RAY_ADDRESS, a `ray start` on this machine, "
                                                          "else a local Ray).")] = None,
             out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the runs and results "
                                                             "(default validate/SUITE-NAME); the same command "
                                                             "continues a killed suite.")] = None,
             plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Accuracy against MACs kept "
                                                               "(PNG; default OUT/suite.png).")] = None,
             record: Annotated[bool, typer.Option("--record/--no-record", help="Store each run as a transfer "
                                                  "evaluation of the metric's candidate.")] = True,
             as_json: Json = False, as_csv: Csv = False, db: Db = None, data_root: DataRoot = None,
             cache_dir: CacheDir = None, tasks_file: TasksFile = None,
             device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto"):
    """Apply metrics to a suite of networks the search did not use: test top-1 mean +- std over
    seeds and the paired difference to every baseline of the suite, with 95% CIs."""
    from dataclasses import replace

    from evoprune.progress import counted, progress, warn
    from evoprune.transfer.suite import (
        load_suite,
        metric_list,
        mixed_pretrained,
        near_chance_cases,
        not_applicable,
        overall,
        plot,
        run_suite,
        shown,
        summarize,
        usable,
    )
    from evoprune.uncertainty import MARKS, verdict

    if as_json and as_csv:
        raise EvopruneError("--json and --csv exclude each other")
    if not workers and (gpus_per_run is not None or address):
        raise EvopruneError("--gpus-per-run and --address are for runs on Ray: give --workers N as well")
    suite = load_suite(suite_file or default_suite())
    if seeds is not None:
        suite = replace(suite, seeds=seeds)
    out_dir = out_dir or Path("validate") / suite.name
    n_runs = len(suite.cases) * suite.seeds * len(metric_list(suite, list(metrics), db))
    console = Console(stderr=True)

    def schedules(plan: dict) -> None:  # a run's length is its schedule: say it before hours pass
        cases: dict[int, tuple] = {}
        for run, cfg in plan.values():  # the metrics of a case share its schedule
            cases.setdefault(run.case.index, (run.case.label, cfg))
        for i, (label, cfg) in sorted(cases.items()):
            console.print(f"case {i + 1} ({label}): {cfg.schedule()}", highlight=False, markup=False, soft_wrap=True)

    with progress("validate", n_runs, console, not (as_json or as_csv), fields={"last": "s"}) as update:
        rows = run_suite(suite, list(metrics), out=out_dir, db=db, data_root=data_root, cache_dir=cache_dir,
                         tasks_file=tasks_file, device=device, workers=workers, record=record,
                         gpus_per_run=gpus_per_run, address=address,
                         on_result=lambda row, done, total: update(done, last=f"{row['key']} {shown(row)}"),
                         on_plan=None if as_json or as_csv else schedules)
    results, wtl = summarize(rows, suite.baselines)
    png = plot_path or out_dir / "suite.png"
    if usable(rows):
        plot(rows, png)
    else:
        png = None  # every metric was n/a on every case: nothing to draw
    na = not_applicable(rows)
    table = [{"case": r.case + 1, "setting": r.label, "metric": r.metric, "macs_kept": r.macs_kept,
              "test_mean": r.test.mean, "test_std": r.test.std, "seeds": r.test.n,
              **{f"vs {b.removeprefix('baseline:')}": d.mean for b, d in r.diffs.items()},
              **{f"vs {b.removeprefix('baseline:')} low": d.low for b, d in r.diffs.items()},
              **{f"vs {b.removeprefix('baseline:')} high": d.high for b, d in r.diffs.items()},
              **{f"vs {b.removeprefix('baseline:')} verdict": v for b, v in r.verdicts.items()}} for r in results]
    warnings = near_chance_cases(rows) + mixed_pretrained(rows)
    level, pooled = overall(rows, list(metrics), suite.baselines)
    headline = [{"metric": m, "baseline": b, "diff": d.mean, "low": d.low, "high": d.high, "pairs": d.n,
                 "verdict": verdict(d)} for m, by in pooled.items() for b, d in by.items()]
    if as_json:
        print_json({"suite": suite.name, "cases": table, "wins_ties_losses": wtl,
                    "overall": {"level": level, "comparisons": headline}, "runs": usable(rows),
                    "not_applicable": na, "plot": png and str(png), "warnings": warnings})
        return
    if as_csv:  # a (case, metric) n/a there: a row with the reason and no numbers
        emit(table + [{"case": n["case"] + 1, "setting": n["case_label"], "metric": n["metric"],
                       "not_applicable": n["reason"]} for n in na], "", as_csv=True)
        return
    t = Table(title=f"suite {suite.name}: test top-1, mean +- std over seeds; paired difference to each baseline "
                    "(95% CI): + beats, = ties, - loses")
    bases = [f"baseline:{b}" for b in suite.baselines]
    for col in ("case", "metric", "MACs kept", "test top-1", *[f"vs {b[9:]}" for b in bases]):
        t.add_column(col)
    na_at = {(n["case"], n["metric"]) for n in na}
    lines = [(r.case, r.metric, r) for r in results] + [(n["case"], n["metric"], n) for n in na]
    for case, metric, r in sorted(lines, key=lambda x: x[:2]):
        if isinstance(r, dict):  # a metric this case's network cannot use (the reason is below the table)
            t.add_row(f"{case + 1} {r['case_label']}", metric[:40], "", "n/a", *["" for _ in bases])
            continue
        cells = []
        for b in bases:
            d = r.diffs.get(b)
            mark = MARKS.get(r.verdicts.get(b, ""), "")
            ci = f"{d.low:+.2%}..{d.high:+.2%}" if d is not None and d.n > 1 else "no CI: one seed"
            cells.append("n/a" if (case, b) in na_at else "" if d is None else f"{mark} {d.mean:+.2%} ({ci})")
        t.add_row(f"{case + 1} {r.label}", metric[:40], f"{r.macs_kept:.1%}",
                  f"{r.test.mean:.2%} +- {r.test.std:.2%}" if r.test.n > 1 else f"{r.test.mean:.2%}", *cells)
    out.print(t)
    for metric, by in wtl.items():
        out.print(f"{metric}: " + "; ".join(f"vs {b[9:]} {counted(w, 'win')}, {counted(ti, 'tie')}, "
                                             f"{counted(lo, 'loss', 'losses')}" for b, (w, ti, lo) in by.items()),
                  highlight=False, markup=False)
    if headline:
        out.print(f"overall, over every case and seed both ran ({level:.1%} CIs: 95% for the {len(headline)} "
                  "comparisons together):", highlight=False, markup=False)
    for h in headline:
        ci = f"{h['low']:+.2%}..{h['high']:+.2%}" if h["pairs"] > 1 else "no CI: one pair"
        out.print(f"  {h['metric']} vs {h['baseline'][9:]}: {h['diff']:+.2%} ({ci}) over {h['pairs']} pairs: "
                  f"{h['verdict']}", highlight=False, markup=False)
    for n in na:
        out.print(f"n/a: case {n['case'] + 1} ({n['case_label']}), {n['metric']}: {n['reason']} (not compared "
                  "there)", highlight=False, markup=False, soft_wrap=True)
    for text in warnings:
        warn(out, text)
    out.print(f"plot: {png or 'none (no metric could be applied)'}\nruns: {out_dir / 'runs'}  results: "
              f"{out_dir / 'results.jsonl'}", highlight=False, markup=False)


def _slug(text: str) -> str:
    """A folder name for a metric reference; a formula's from its prefix form, which keeps the
    operators that infix spells with symbols (w_l1 / x and w_l1 * x get two folders)."""
    import re

    from evoprune.metricref import MetricRef, resolve

    if MetricRef.parse(text).kind == "expr":  # a prefix form as given (the folders of earlier runs)
        text = f"expr:{resolve(text).expression}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60] or "metric"


@app.command("prune")
def prune_cmd(
    task: Annotated[str, typer.Option("--task", help="Task whose pretrained model is pruned.")],
    metric: Annotated[str, typer.Option("--metric", help="Candidate ID, promoted NAME, baseline:NAME or "
                                                         "expr:EXPRESSION.")],
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="Share of filters pruned in each layer "
                                                   "(uniform) or overall (global, pfp, spectral).")] = None,
    flops_reduction: Annotated[Optional[float], typer.Option("--flops-reduction", help="Share of the prunable "
                                                             "layers' MACs to remove (flops, pfp, spectral).")] = None,
    allocator: Annotated[Optional[str], typer.Option("--allocator", help="uniform | global | flops | pfp | "
                                                     "spectral (default: uniform with --ratio, flops with "
                                                     "--flops-reduction; docs/allocators.md).")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help="spectral: share of each layer's spectral energy "
                                                 "it may lose (0.01); alone, without --ratio or "
                                                 "--flops-reduction, each layer keeps its rank.")] = None,
    scope: Annotated[str, typer.Option("--scope", help="in-block: only layers whose channels no other layer "
                                       "shares (TPP's scripts); coupled: also residual-tied layers, pruned "
                                       "together.")] = "in-block",
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Glob of layer names to leave whole "
                                                      "(repeatable).")] = None,
    approximate_cut: Annotated[bool, typer.Option("--approximate-cut", help="Accept a cut that is not the masked "
                                                  "model (a GroupNorm or LayerNorm over pruned channels): the "
                                                  "difference is reported, retraining repairs it.")] = False,
    tpp: Annotated[bool, typer.Option("--tpp/--no-tpp", help="TPP regularization before surgery.")] = True,
    reg_step: Annotated[Optional[float], typer.Option("--reg-step", help="TPP: reg increment (default: the "
                                                      "task's; the paper's 1e-4 for CIFAR).")] = None,
    update_every: Annotated[Optional[int], typer.Option("--update-every", help="TPP: iterations between "
                                                        "increments (10 CIFAR, 5 ImageNet).")] = None,
    reg_ceiling: Annotated[Optional[float], typer.Option("--reg-ceiling", help="TPP: reg stops growing "
                                                         "here.")] = None,
    gram_weight: Annotated[Optional[float], typer.Option("--gram-weight", help="TPP: Gram term weight per "
                                                         "unit of reg.")] = None,
    stabilize_iters: Annotated[Optional[int], typer.Option("--stabilize-iters", help="TPP: iterations at the "
                                                           "ceiling.")] = None,
    tpp_lr: Annotated[Optional[float], typer.Option("--tpp-lr", help="TPP: SGD learning rate.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Retraining epochs after surgery (default: "
                                                  "the task's; TPP's 120 for CIFAR).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Retraining peak learning rate.")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="step (x0.1 at 50%, 75%) | cosine | "
                                                    "onecycle.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per step (all processes "
                                                      "together).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay")] = None,
    stat_images: Annotated[int, typer.Option("--stat-images", help="Training images for the metric's "
                                             "statistics.")] = 256,
    latency_batch: Annotated[int, typer.Option("--latency-batch", help="Images per timed forward pass.")] = 64,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default "
                                                    "pruned/TASK-METRIC).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last "
                                         "checkpoint.")] = False,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Store the result as a transfer "
                                         "evaluation of the metric's candidate.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (torchrun: one GPU per "
                                        "process).")] = "auto",
    data_root: DataRoot = None, cache_dir: CacheDir = None, tasks_file: TasksFile = None, db: Db = None):
    """Prune a task's pretrained model with a metric: TPP regularization, surgery, retraining,
    a report. Run under torchrun for multi-GPU retraining (docs/transfer.md)."""
    from evoprune.transfer.prune import prune, prune_config

    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    cfg = prune_config(task=task, metric=metric, ratio=ratio, flops_reduction=flops_reduction, allocator=allocator,
                       tau=tau, scope=scope, skip=tuple(skip or ()), approximate_cut=approximate_cut,
                       stat_images=stat_images,
                       latency_batch=latency_batch,
                       tpp=given(reg_step=reg_step, update_every=update_every, reg_ceiling=reg_ceiling,
                                 gram_weight=gram_weight, stabilize_iters=stabilize_iters, lr=tpp_lr) if tpp else None,
                       retrain=given(epochs=epochs, lr=lr, schedule=schedule, batch_size=batch_size,
                                     weight_decay=weight_decay), tasks_file=tasks_file, db=db)
    out_dir = out_dir or Path("pruned") / f"{task}-{_slug(metric)}"
    rep = prune(cfg, out=out_dir, resume=resume, data_root=data_root, cache_dir=cache_dir, tasks_file=tasks_file,
                device=device, db=db, record=record, console=out)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one process reports
        return
    acc = rep["test_acc"]
    t = Table(title=f"{task} pruned with {metric}")
    for col in ("", "params", "MACs", f"latency (batch {rep['latency_batch']})", "test accuracy"):
        t.add_column(col)
    t.add_row("before", f"{rep['params'][0]:,}", f"{rep['macs'][0]:,}", f"{rep['latency_ms'][0]:.2f} ms",
              f"{acc['pretrained']:.2%}")
    if "after_tpp" in acc:
        t.add_row("after TPP", "", "", "", f"{acc['after_tpp']:.2%}")
    t.add_row("after surgery" if rep.get("exact_cut", True) else "after an approximate cut", "", "", "",
              f"{acc['pruned']:.2%}")
    t.add_row("retrained", f"{rep['params'][1]:,} ({rep['params_kept']:.0%})",
              f"{rep['macs'][1]:,} ({rep['speedup']:.2f}x fewer)",
              f"{rep['latency_ms'][1]:.2f} ms ({rep['measured_speedup']:.2f}x)", f"{acc['retrained']:.2%}")
    out.print(t)
    where = rep.get("recorded")
    out.print(f"schedule {rep['schedule']}\nmodel   {rep['files']['model']}\nreport  {rep['files']['report']}\n"
              + (f"stored  evaluation {where['evaluation']} of candidate {where['candidate']}" if where else
                 "stored  not in the database (no candidate has this formula)" if record else ""),
              highlight=False, markup=False)


def _database_error(e: Exception) -> bool:
    """A database that is damaged, read-only or gone (not a bug of ours): one line, not a traceback."""
    exc = sys.modules.get("sqlalchemy.exc")
    return exc is not None and isinstance(e, (exc.OperationalError, exc.DatabaseError))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user mistakes into one line and exit status 2."""
    err = Console(stderr=True, soft_wrap=True)  # one error, one line
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="evoprune", standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into exit status 130, silently
            err.print("aborted")
        return rv if isinstance(rv, int) else 0
    except click_exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e))
        return 0
    except click_exc.UsageError as e:
        msg = e.format_message()
        if isinstance(e, click_exc.NoSuchOption) and not e.option_name.startswith("--"):
            # click reads `-w_l1` as the short option -w: the whole word says what was meant
            word = next((a for a in (sys.argv[1:] if argv is None else argv) if a.startswith(e.option_name)),
                        e.option_name)
            if e.option_name[1:2].isdigit():
                msg += f"; to pass a negative number, put -- before it: `... -- {word}`"
            elif len(word) > 2:
                msg += f"; to pass an expression that starts with '-', put -- before it: `... -- {word}`"
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err.print(f"error: {msg}{where}", markup=False, highlight=False)
        return 2
    except EvopruneError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        return 2
    except Exception as e:
        if type(e).__name__ == "ClusterError":  # evoprune.workers.evaluator: not the user's doing
            err.print(f"error: the Ray cluster failed under the run: {e}", markup=False, highlight=False)
            return 3
        if not _database_error(e):
            raise
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        err.print(f"error: the database cannot be used: {first}", markup=False, highlight=False)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
