"""`evoprune proxy check`: can this proxy tell metrics apart, and does it rank them as a much
longer fine-tune does?

For the seeded baselines plus a few random formulas (at least 12 metrics):
  noise     each metric's full-proxy fitness over `orders` data orders (`data_seed` 0..n-1:
            the statistics' images, BN recalibration and fine-tune order all change); its std
            against the spread of the metrics' means and against the gap between the best and
            the median baseline (the search must resolve that gap to find anything better);
  fidelity  Kendall's tau between the proxy's ranking of the metrics (mean over orders) and a
            reference ranking from a `reference_factor` x longer fine-tune averaged over
            `reference_seeds` other data orders, with a bootstrap 95% CI over the metrics.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from evoprune.evolve.config import Config
from evoprune.masks import TaskMasks, UnusableMetric, mask_hash
from evoprune.pretrain import near_chance
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import canonical_hash, parse
from evoprune.records import geometric_mean
from evoprune.workers.evaluator import InProcessEvaluator, WorkerSpec
from evoprune.workers.proxy import Job, ProxyConfig

REFERENCE_SEED0 = 1000  # reference data orders start here: never one the noise measurement used


@dataclass
class MetricScores:
    name: str
    expression: str
    baseline: bool
    fitness: list[float]  # one per data order
    reference: list[float]  # one per reference seed: the fitness of the long fine-tune
    reference_accuracy: list[float] = field(default_factory=list)  # its accuracy (geometric mean over tasks)
    accuracy: list[float] = field(default_factory=list)  # the proxy's accuracy, one per data order

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fitness)

    @property
    def std(self) -> float:
        return statistics.stdev(self.fitness) if len(self.fitness) > 1 else 0.0

    @property
    def reference_mean(self) -> float:
        return statistics.fmean(self.reference)

    @property
    def reference_accuracy_mean(self) -> float:
        return statistics.fmean(self.reference_accuracy) if self.reference_accuracy else float("nan")


@dataclass
class ProxyCheck:
    tasks: list[str]
    orders: int
    finetune_steps: int
    reference_steps: int
    reference_seeds: int
    metrics: list[MetricScores]
    noise: float  # mean over metrics of the std over data orders
    spread: float  # std of the metrics' mean fitness
    gap: float  # best baseline mean - median baseline mean
    tau: float  # Kendall's tau-b, proxy mean vs reference mean
    tau_ci: tuple[float, float]  # bootstrap 95% CI over metrics
    seconds: float
    tau_accuracy: float = float("nan")  # against the reference's accuracy (= tau when the score is accuracy)
    # the same fine-tunes scored by accuracy on both sides (the fitness before `score = "probability"`):
    # noise, gap, tau and its CI of that proxy, measured without a second run
    by_accuracy: dict = field(default_factory=dict)
    verdict: str = ""
    checks: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # `near_chance_warning`

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, row in zip(self.metrics, d["metrics"]):
            row.update(mean=m.mean, std=m.std, reference_mean=m.reference_mean)
        return d


@dataclass(frozen=True)
class Floor:
    """A task's reference points for its proxy scores: chance accuracy and the pretrained model's
    validation accuracy (what pruning and the fine-tune start from)."""

    classes: int
    pretrained: float | None

    @classmethod
    def of(cls, pre) -> "Floor":
        acc = pre.meta.get("val_acc")
        return cls(pre.data.num_classes, acc if isinstance(acc, (int, float)) else None)

    @property
    def chance(self) -> float:
        return 1 / self.classes

    def near(self, accuracy: float) -> bool:
        return near_chance(accuracy, self.classes)


def near_chance_warning(best: dict[str, float], floors: dict[str, Floor], proxy, *,
                        in_check: bool = False) -> str | None:
    """A warning when on some task the best accuracy any proxy network reached (`best`, task ->
    accuracy) is near chance while the pretrained model was not: such a proxy cannot tell
    formulas apart (its fine-tune undoes what pruning left, or it prunes too much). A pretrained
    model itself near chance was warned of when it was loaded."""
    low = []
    for task, acc in best.items():
        floor = floors[task]
        if floor.near(acc) and not (floor.pretrained is not None and floor.near(floor.pretrained)):
            was = "" if floor.pretrained is None else f", {floor.pretrained:.1%} before pruning"
            low.append(f"{task} at best {acc:.1%} (chance {floor.chance:.1%}{was})")
    if not low:
        return None
    a = proxy.allocation
    amount = {"ratio": f"ratio {a.ratio:g}", "flops": f"flops_reduction {a.flops_reduction:g}",
              "tau": f"tau {a.tau:g}"}[a.target]
    return (f"every network the full proxy scored ends near chance accuracy on val: {'; '.join(low)}. "
            "Formulas cannot be told apart on such a proxy: its fine-tune undoes what pruning left "
            f"([proxy] lr {proxy.lr:g}, finetune_steps {proxy.finetune_steps}) or it prunes too much "
            f"({amount})" + ("" if in_check else "; `evoprune proxy check` measures whether it tells metrics apart"))


def kendall_tau(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    t = kendalltau(a, b).statistic
    return float(t) if t == t else 0.0


def bootstrap_tau(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of tau over metrics drawn with replacement."""
    rng = random.Random(seed)
    k, taus = len(a), []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        if len({a[i] for i in idx}) > 1 and len({b[i] for i in idx}) > 1:
            taus.append(kendall_tau([a[i] for i in idx], [b[i] for i in idx]))
    taus.sort()
    if not taus:
        return float("nan"), float("nan")
    return taus[int(0.025 * (len(taus) - 1))], taus[int(math.ceil(0.975 * (len(taus) - 1)))]


def metric_set(cfg: Config, n_random: int, seed: int, valid: Callable,
               left_out: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """(name, expression, is_baseline): the seeded baselines in the search space, then random
    formulas of the search's own primitive set (ramped half-and-half) until there are at least
    12 metrics and `n_random` random ones, each a new formula that ranks the filters of every
    task (`valid(node)`): one that cannot is not a metric whose rank tells anything. A seeded one
    that cannot (BN scale on a network without BN) is left out too, its name added to `left_out`:
    scored 0 by proxy and reference alike, it was a tie at the bottom that raised tau."""
    from deap import gp

    from evoprune.primitives.pset import Vec, build_pset

    s = cfg.search
    pset = build_pset(s.stat_names, s.op_names)
    out, seen = [], set()
    names = s.seeds or tuple(BASELINES)  # a formula of the user's (expr:) is ranked as a random one is
    for name, expression in zip(names, replace(s, seeds=names).seed_formulas()):
        node = parse(expression)
        if all(n.is_const or n.name in pset.mapping for n in node.walk()):
            if not valid(node):
                if left_out is not None:
                    left_out.append(name)
                continue
            out.append((name, expression, not name.startswith("expr:")))
            seen.add(canonical_hash(node))
    state = random.getstate()
    random.seed(seed)
    try:
        tries, added = 0, 0
        while (added < n_random or len(out) < 12) and tries < 1000:
            tries += 1
            tree = gp.PrimitiveTree(gp.genHalfAndHalf(pset, s.init_min_depth, min(s.init_max_depth, 3), Vec))
            node = parse(str(tree))
            if not node.stats() or canonical_hash(node) in seen or not valid(node):
                continue
            seen.add(canonical_hash(node))
            out.append((f"random{added + 1}", str(node), False))
            added += 1
    finally:
        random.setstate(state)
    return out


def _maskers(cfg: Config, proxy: ProxyConfig, stats: list[str], device: str) -> dict[str, TaskMasks]:
    r = cfg.run
    return {t: TaskMasks.load(t, proxy.allocation, stats, stat_images=proxy.stat_images, seed=proxy.data_seed,
                              data_root=r.data_root or None, cache_dir=r.cache_dir or None,
                              tasks_file=r.tasks_file or None, device=device) for t in proxy.tasks}


def score_metrics(cfg: Config, proxy: ProxyConfig, metrics: list[tuple[str, str, bool]],
                  device: str, best: dict[str, float] | None = None, pool=None) -> dict[str, tuple[float, float]]:
    """(fitness, geometric mean of the tasks' accuracies) of every metric's full proxy under
    `proxy` (its own data order); zeros for a metric that cannot rank a task's filters. `best`,
    when given, is raised to each task's highest accuracy among these runs. `pool`: Ray workers
    whose proxy is `proxy` but for its data order, which each job then names; else this process."""
    r = cfg.run
    maskers = _maskers(cfg, proxy, sorted({s for _, e, _ in metrics for s in parse(e).stats()}), device)
    evaluator = pool or InProcessEvaluator(WorkerSpec(proxy=proxy, data_root=r.data_root or None,
                                                      cache_dir=r.cache_dir or None, tasks_file=r.tasks_file or None,
                                                      device=device, threads=r.threads))
    order = proxy.data_seed if pool is not None else None
    out, jobs, by_key = {}, [], {}
    for name, expression, _ in metrics:
        node = parse(expression)
        try:
            masks = {t: m(node) for t, m in maskers.items()}
        except UnusableMetric:
            out[name] = (0.0, 0.0)
            continue
        key = ",".join(mask_hash(masks[t]) for t in proxy.tasks)
        if key not in by_key:  # two metrics with the same masks: trained once
            by_key[key] = []
            jobs.append(Job(key, expression, "full", masks, data_seed=order))
        by_key[key].append(name)
    for job, rec in evaluator.run(jobs):
        if best is not None:
            for task, r in rec.tasks.items():
                best[task] = max(best.get(task, 0.0), r.accuracy)
        for name in by_key[job.key]:
            out[name] = (rec.fitness, geometric_mean([r.accuracy for r in rec.tasks.values()]))
    return out


def check_proxy(cfg: Config, *, orders: int = 5, n_random: int = 6, reference_factor: int = 10,
                reference_seeds: int = 3, seed: int = 0,
                on_progress: Callable[[str, int, int], None] | None = None) -> ProxyCheck:
    from evoprune.evolve.service import driver_device

    t0 = time.perf_counter()
    on_progress = on_progress or (lambda label, done, total: None)
    device = driver_device(cfg.run)
    base = replace(cfg.proxy, screen=False)
    first = _maskers(cfg, base, cfg.search.stat_names, device)

    def valid(node) -> bool:
        try:
            return all(m(node) is not None for m in first.values())
        except UnusableMetric:
            return False

    left_out: list[str] = []
    metrics = metric_set(cfg, n_random, seed, valid, left_out)
    runs = [("proxy", replace(base, data_seed=d)) for d in range(orders)] + \
           [("reference", replace(base, data_seed=REFERENCE_SEED0 + j,
                                  finetune_steps=max(1, base.finetune_steps) * reference_factor))
            for j in range(reference_seeds)]
    results = {n: {k: [] for k in ("proxy", "reference", "proxy_acc", "reference_acc")} for n, _, _ in metrics}
    best: dict[str, float] = {}  # each task's best accuracy over the proxy's (not the reference's) runs
    pool, steps = None, None  # on Ray: a pool per fine-tune length in turn, its jobs naming their data order
    try:
        for i, (kind, proxy) in enumerate(runs):
            on_progress(kind, i, len(runs))
            if cfg.run.workers and proxy.finetune_steps != steps:
                if pool is not None:  # the proxy's orders are done: its workers make way
                    pool.close()
                    pool = None
                pool, steps = _pool(cfg, replace(proxy, data_seed=base.data_seed), device), proxy.finetune_steps
            for name, (f, acc) in score_metrics(cfg, proxy, metrics, device, best if kind == "proxy" else None,
                                                pool).items():
                results[name][kind].append(f)
                results[name][kind + "_acc"].append(acc)
    finally:
        if pool is not None:
            pool.close()
    on_progress("done", len(runs), len(runs))
    rows = [MetricScores(n, e, b, results[n]["proxy"], results[n]["reference"], results[n]["reference_acc"],
                         results[n]["proxy_acc"]) for n, e, b in metrics]
    check = summarize(cfg, rows, orders, reference_factor, reference_seeds, time.perf_counter() - t0)
    if best and (w := near_chance_warning(best, _floors(cfg, device), base, in_check=True)):
        check.warnings.append(w)
    if left_out:
        check.warnings.append(f"left out: {', '.join(left_out)}, which cannot rank the filters of every task "
                              f"({', '.join(cfg.proxy.tasks)}): a statistic some network lacks, such as BN "
                              "scale without BN, or a formula constant within a layer")
    return check


def _pool(cfg: Config, proxy: ProxyConfig, device: str):
    """Ray workers for `proxy`, started as the search starts them, shipped the driver's models
    and data."""
    from evoprune.evolve.service import start_pool
    from evoprune.pretrain import pretrained
    from evoprune.tasks import get_task

    r = cfg.run
    pre = {t: pretrained(get_task(t, r.tasks_file or None), data_root=r.data_root or None,
                         cache_dir=r.cache_dir or None, device=device) for t in proxy.tasks}
    return start_pool(replace(cfg, proxy=proxy), pre)


def _floors(cfg: Config, device: str) -> dict[str, Floor]:
    from evoprune.pretrain import pretrained
    from evoprune.tasks import get_task

    r = cfg.run
    return {t: Floor.of(pretrained(get_task(t, r.tasks_file or None), data_root=r.data_root or None,
                                   cache_dir=r.cache_dir or None, device=device)) for t in cfg.proxy.tasks}


def _noise_gap(rows: list[MetricScores], scores: Callable[[MetricScores], list[float]]) -> tuple[float, float]:
    """(mean std over data orders, best - median baseline mean) of one way of scoring the proxy."""
    base_means = sorted((statistics.fmean(scores(m)) for m in rows if m.baseline), reverse=True)
    gap = base_means[0] - statistics.median(base_means) if base_means else 0.0
    noise = statistics.fmean(statistics.stdev(scores(m)) if len(scores(m)) > 1 else 0.0 for m in rows)
    return noise, gap


def summarize(cfg: Config, rows: list[MetricScores], orders: int, reference_factor: int, reference_seeds: int,
              seconds: float) -> ProxyCheck:
    means = [m.mean for m in rows]
    refs = [m.reference_mean for m in rows]
    noise, gap = _noise_gap(rows, lambda m: m.fitness)
    tau = kendall_tau(means, refs)
    check = ProxyCheck(tasks=list(cfg.proxy.tasks), orders=orders, finetune_steps=cfg.proxy.finetune_steps,
                       reference_steps=max(1, cfg.proxy.finetune_steps) * reference_factor,
                       reference_seeds=reference_seeds, metrics=rows, noise=noise,
                       spread=statistics.stdev(means) if len(means) > 1 else 0.0, gap=gap, tau=tau,
                       tau_ci=bootstrap_tau(means, refs), seconds=seconds,
                       tau_accuracy=kendall_tau(means, [m.reference_accuracy_mean for m in rows]))
    if all(m.accuracy and m.reference_accuracy for m in rows):
        acc = [statistics.fmean(m.accuracy) for m in rows]
        ref_acc = [m.reference_accuracy_mean for m in rows]
        acc_noise, acc_gap = _noise_gap(rows, lambda m: m.accuracy)
        check.by_accuracy = dict(noise=acc_noise, gap=acc_gap, tau=kendall_tau(acc, ref_acc),
                                 tau_ci=bootstrap_tau(acc, ref_acc))
    check.checks = {"noise <= gap / 3": noise <= gap / 3, "tau >= 0.6": tau >= 0.6,
                    "tau CI above 0": check.tau_ci[0] > 0}
    check.verdict = verdict(check)
    return check


def verdict(c: ProxyCheck) -> str:
    lo, hi = c.tau_ci
    if c.gap <= 0:
        apart = "The seeded baselines all score the same here: this proxy cannot tell them apart."
    elif c.noise <= c.gap / 3:
        apart = (f"The proxy tells metrics apart: a metric's fitness varies by {c.noise:.4f} (std over "
                 f"{c.orders} data orders), {c.gap / max(c.noise, 1e-12):.1f}x less than the gap between the best "
                 f"and the median baseline ({c.gap:.4f}).")
    else:
        apart = (f"The proxy's noise is too large to tell metrics apart: a metric's fitness varies by "
                 f"{c.noise:.4f} (std over {c.orders} data orders), more than a third of the gap between the best "
                 f"and the median baseline ({c.gap:.4f}); differences of that size are ties.")
    if c.tau >= 0.6 and lo > 0:
        faithful = (f"It ranks metrics as a {c.reference_steps}-step fine-tune does (Kendall tau {c.tau:.2f}, "
                    f"95% CI {lo:.2f} to {hi:.2f}).")
    elif lo > 0:
        faithful = (f"Its ranking agrees only loosely with a {c.reference_steps}-step fine-tune (Kendall tau "
                    f"{c.tau:.2f}, 95% CI {lo:.2f} to {hi:.2f}; the target is 0.6).")
    else:
        faithful = (f"Its ranking does not predict a {c.reference_steps}-step fine-tune's (Kendall tau {c.tau:.2f}, "
                    f"95% CI {lo:.2f} to {hi:.2f}, which includes 0).")
    rough = (f" {c.orders} data orders are too few for a verdict (5 or more): the noise above is a rough reading."
             if c.orders < 5 else "")
    return f"{apart} {faithful}{rough}"


def plot(c: ProxyCheck, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(c.metrics, key=lambda m: m.mean)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, max(4, 0.3 * len(rows) + 1)), dpi=110)
    y = range(len(rows))
    a.errorbar([m.mean for m in rows], y, xerr=[m.std for m in rows], fmt="o", capsize=3, color="tab:blue")
    a.set_yticks(list(y), [m.name for m in rows])
    for i, m in enumerate(rows):
        if m.baseline:
            a.get_yticklabels()[i].set_fontweight("bold")
    a.set_xlabel(f"proxy fitness, mean +- std over {c.orders} data orders")
    a.set_title("noise: can the proxy tell metrics apart?")
    a.grid(alpha=0.3)
    b.scatter([m.mean for m in c.metrics], [m.reference_mean for m in c.metrics],
              c=["tab:orange" if m.baseline else "tab:gray" for m in c.metrics])
    for m in c.metrics:
        b.annotate(m.name, (m.mean, m.reference_mean), fontsize=7, alpha=0.8)
    b.set_xlabel(f"proxy ({c.finetune_steps} steps)")
    b.set_ylabel(f"reference ({c.reference_steps} steps, {c.reference_seeds} seeds)")
    b.set_title(f"fidelity: Kendall tau {c.tau:.2f} (95% CI {c.tau_ci[0]:.2f} to {c.tau_ci[1]:.2f})")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
