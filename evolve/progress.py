"""The live display of a search and its closing summary (rich)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from evoprune.evolve.config import Config
from evoprune.evolve.engine import pace
from evoprune.progress import counted, hms, warn


class SearchDisplay:
    """Generation, evaluations/s, cache hits, best fitness and formula, refreshed live on a
    terminal; one line per generation otherwise (logs, CI, `ray submit`)."""

    def __init__(self, console: Console, cfg: Config, db: str | None = None):
        self.console, self.cfg, self.db = console, cfg, db
        self.t0 = time.perf_counter()
        self.status, self.gen, self.best, self.best_expr = "starting", -1, 0.0, ""
        self.done = self.total = self.evals = self.hits = 0
        self.gen_seconds: dict[int, float] = {}  # generation -> its seconds, as this call ran them
        self.gen_ended = time.perf_counter()
        self.searching: float | None = None  # when the generations began
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=True) \
            if console.is_terminal else None

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def eta(self) -> float | None:
        """Seconds until the last generation ends: the generations left at the pace of those this
        call ran (`pace`: generation 0 counts only while it is the only one), less the time the one
        under way has had; None before the first generation ends or after the last."""
        left = self.cfg.search.generations - self.gen
        if self.gen < 0 or left <= 0 or not self.gen_seconds:
            return None
        now = time.perf_counter()
        eta = pace(self.gen_seconds) * left - (now - self.gen_ended)
        if (limit := self.cfg.run.time_limit_s) is not None and self.searching is not None:
            eta = min(eta, limit - (now - self.searching))  # [run] time_limit stops it sooner
        return max(0.0, eta)

    def _render(self):
        t = Table.grid(padding=(0, 2))
        rate = self.evals / max(time.perf_counter() - self.t0, 1e-9)
        eta = self.eta()
        t.add_row(f"[bold]{self.status}[/]",
                  f"generation {max(self.gen, 0)}/{self.cfg.search.generations}",
                  f"batch {self.done}/{self.total}", f"{rate:.2f} eval/s", f"cache hits {self.hits}",
                  f"best {self.best:.4f}", "" if eta is None else f"eta {hms(eta)}")
        t.add_row("", f"[dim]{self.best_expr[:110]}[/]")
        return t

    def update(self, kind: str, info: dict) -> None:
        if kind == "config":
            self.cfg = info["config"]
        elif kind == "status":
            self.status = info["text"]
            if self.status == "searching":
                self.searching = time.perf_counter()
            if not self.live:
                self.console.print(info["text"], highlight=False)
        elif kind == "warning":
            warn(self.console, info["text"])
        elif kind == "evaluation":
            self.evals += 1
            self.done, self.total = info["done"], info["total"]
            self.gen = info["generation"]
        elif kind == "generation":
            r = info["report"]
            self.gen, self.hits = r.index, r.counters["canonical_hits"] + r.counters["mask_hits"]
            self.gen_seconds[r.index], self.gen_ended = r.seconds, time.perf_counter()
            if r.best >= self.best:
                self.best, self.best_expr = r.best, r.best_expression
            if not self.live:
                eta = self.eta()
                self.console.print(f"generation {r.index}/{self.cfg.search.generations}  best {r.best:.4f}  "
                                   f"mean {r.mean:.4f}  proxy runs {r.evaluations}  cache hits {r.cache_hits}  "
                                   f"{r.seconds:.1f} s{'' if eta is None else f'  eta {hms(eta)}'}  "
                                   f"{r.best_expression}", highlight=False, markup=False)
        if self.live:
            self.live.update(self._render())

    def summary(self, result) -> None:
        c = self.console
        tasks = list(self.cfg.proxy.tasks)
        t = Table(title=f"run {result.run_id}: top formulas (full proxy on the search's data order; fitness: "
                        f"{self.cfg.proxy.score} on val, geometric mean over tasks)")
        for col in ("ID", "fitness", *[f"{k} acc" for k in tasks], "kept FLOPs", "size", "formula (simplified)"):
            t.add_column(col)
        for f in result.finalists:
            r = f.record
            t.add_row(str(f.candidate_id), f"{r.fitness:.4f}", *[f"{r.tasks[k].accuracy:.4f}" for k in tasks],
                      f"{statistics_mean([x.kept_flops for x in r.tasks.values()]):.2f}", str(f.size), f.canonical)
        c.print(t)
        if result.baselines:
            b = result.baselines[0]
            seeded = set(self.cfg.search.seed_formulas())  # a formula the search bred that is a baseline's
            bred = [f.baseline for f in result.baselines if f.expression not in seeded]  # counts as that baseline
            c.print(f"best baseline on the same proxy: {b.baseline} ({b.expression}) fitness {b.record.fitness:.4f}; "
                    f"{counted(len(result.baselines) - len(bred), 'baseline')} seeded"
                    + (f", {', '.join(bred)} bred by the search" if bred else ""), highlight=False)
        if result.validation is not None:
            self._validation(result)
        k = result.counters
        c.print(f"proxy runs {k['evaluations']} ({k['full']} full fine-tunes, {k['screened_only']} candidates only "
                f"screened); cache hits: {k['canonical_hits']} same formula, {k['mask_hits']} same masks; "
                f"{k['invalid']} invalid", highlight=False)
        for text in result.warnings:
            warn(c, text)
        if (sec := result.seconds) and sec.get("search"):
            busy = sec["worker"] / sec["capacity"] if sec.get("capacity") else 0.0
            # a pool's workers run proxies while the driver works: the two shares may overlap
            c.print(f"search {sec['search']:.0f} s: the workers were busy {min(busy, 1):.0%} of it; the driver's "
                    f"own work took {1 - sec['proxy'] / sec['search']:.0%} (canonical forms "
                    f"{sec['canonical'] / sec['search']:.0%})", highlight=False)
        if result.stopped:
            c.print(f"[yellow]{escape(result.stopped)}[/]", highlight=False)
        if result.finalists:
            db = f" --db {self.db}" if self.db else ""
            best = result.finalists[0].candidate_id
            c.print(f"export the best: evoprune export {best}{db} -o metric_{best}.py "
                    f"(or -f torch-pruning | sympy | latex)\n"
                    f"details: evoprune metrics show {best}{db}    all: evoprune metrics top --run {result.run_id}{db}"
                    f"    report: evoprune report {result.run_id}{db} -o report/", highlight=False, markup=False)


    def _validation(self, result) -> None:
        """The finalists and the baselines on fresh data orders: mean +- 95% CI, the paired
        difference to the best baseline, and what it shows in words (the CIs alone where the
        search space held no baseline)."""
        v, c = result.validation, self.console
        by_id = {f.candidate_id: f for f in result.finalists + result.baselines}
        best = by_id[v.best_baseline] if v.best_baseline is not None else None
        title = f"validation on {len(v.seeds)} fresh data orders (never used by the search): fitness mean +- 95% CI"
        cols = ["ID", "formula", "fitness"]
        if best is not None:
            title += (f", and the paired difference to the best baseline, {best.baseline} (95% CIs for all evolved "
                      "formulas together)")
            cols += [f"- {best.baseline}", "verdict"]
        t = Table(title=title)
        for col in cols:
            t.add_column(col)
        rows = [f for f in result.finalists if v.of(f.candidate_id)]
        rows += [best] if best is not None and best not in rows else []
        for f in rows:
            r = v.of(f.candidate_id)
            cells = [str(f.candidate_id), (f.baseline + ": " if f.baseline else "") + f.canonical[:60], str(r.fitness)]
            if best is not None:
                cells += ["" if r.diff is None else f"{r.diff.mean:+.4f} ({r.diff.low:+.4f} to {r.diff.high:+.4f})",
                          r.verdict or "best baseline"]
            t.add_row(*cells)
        c.print(t)
        if best is not None:
            c.print(validation_sentence(v, result.finalists, best), highlight=False, markup=False)
        else:
            c.print("No seeded baseline is in this search space ([search] seeds, stats and ops left them all out): "
                    "nothing to compare the formulas with; `evoprune validate ID` compares them with L1 on "
                    "networks of your choice.", highlight=False, markup=False)


def validation_sentence(v, finalists, best) -> str:
    """What the validation shows, in words: a win only where the CI supports one."""
    evolved = [f for f in finalists if not f.baseline and v.of(f.candidate_id) and v.of(f.candidate_id).diff]
    if not evolved:
        return f"No evolved formula reached the finalists: the best is the baseline {best.baseline}."
    winners = [f for f in evolved if v.of(f.candidate_id).verdict == "beats"]
    top = max(winners or evolved, key=lambda f: v.of(f.candidate_id).diff.mean)
    d = v.of(top.candidate_id).diff
    span = (f"{d.mean:+.4f}, 95% CI {d.low:+.4f} to {d.high:+.4f} (Bonferroni over "
            f"{counted(len(evolved), 'formula')}), over {d.n} fresh data orders")
    if winners:
        return f"Candidate {top.candidate_id} beats the best baseline ({best.baseline}) beyond noise ({span})."
    return (f"No evolved formula beats the best baseline ({best.baseline}) beyond noise: the closest, candidate "
            f"{top.candidate_id}, {v.of(top.candidate_id).verdict} it ({span}).")


def statistics_mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
