"""`evoprune report RUN -o DIR`: an HTML page with PNG plots of one search run.

Plots: fitness over generations (best, mean, median) with population diversity; the Pareto
front of fitness against formula size over every scored formula; the top formulas rendered
from their LaTeX. Everything is read from the database; nothing is recomputed.
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from evoprune.db import queries  # noqa: E402
from evoprune.db.models import Generation  # noqa: E402
from evoprune.errors import EvopruneError  # noqa: E402
from evoprune.primitives.expr import parse, to_latex  # noqa: E402


def _generations(engine, run: int) -> list[Generation]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Generation).where(Generation.run_id == run).order_by(Generation.index)))


def fitness_label(engine, run: int) -> str:
    """What the run's fitness is, from its stored settings: `[proxy] score` (runs stored before it
    existed scored accuracy) on the validation split, over its tasks."""
    from evoprune.db.models import Run

    with Session(engine) as s:
        proxy = (s.get(Run, run).config or {}).get("proxy", {})
    what = {"probability": "true-class probability", "accuracy": "accuracy"}.get(proxy.get("score", "accuracy"),
                                                                                  proxy.get("score"))
    n = len(proxy.get("tasks", []))
    return f"fitness: {what} on val" + (f", geometric mean over {n} tasks" if n > 1 else "")


def _fitness_plot(gens: list[Generation], path: Path, label: str = "") -> None:
    from matplotlib.ticker import MaxNLocator

    idx = [g.index for g in gens]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(idx, [g.best for g in gens], "o-", label="best")
    ax.plot(idx, [g.mean for g in gens], "s--", label="mean")
    ax.plot(idx, [g.median for g in gens], "^:", label="median")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations are whole
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(idx, [g.diversity for g in gens], color="grey", alpha=0.6, label="diversity")
    ax2.set_ylabel("distinct formulas / population", color="grey")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    ax.set_title("fitness over generations" + (f"\n{label}" if label else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pareto_plot(everything: list[dict], front: list[dict], path: Path, what: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for stage, color, label in (("screen", "lightgrey", "screened only (no fine-tune)"),
                                ("full", "tab:blue", "fine-tuned (full proxy)")):
        pts = [r for r in everything if r["stage"] == stage]
        ax.scatter([r["size"] for r in pts], [r["fitness"] for r in pts], s=12, alpha=0.5, color=color, label=label)
    base = [r for r in everything if r["baseline"] and r["stage"] == "full"]
    ax.scatter([r["size"] for r in base], [r["fitness"] for r in base], marker="D", s=30, color="tab:orange",
               label="seeded baselines")
    right = max((r["size"] for r in everything), default=1)
    for k, r in enumerate(sorted(base, key=lambda r: (r["size"], -r["fitness"]))):
        left = r["size"] > 0.8 * right  # near the right edge the name goes to the left of its point
        ax.annotate(r["baseline"], (r["size"], r["fitness"]), fontsize=7, textcoords="offset points",
                    xytext=(-12 if left else 12, -10 * (k % 4)), ha="right" if left else "left",
                    # staggered: baselines of one size sit close together
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="grey"))  # each name tied to its point
    ax.step([r["size"] for r in front], [r["fitness"] for r in front], where="post", color="tab:red",
            marker="o", markerfacecolor="none", label="Pareto front")  # markers: a front of one point shows
    ax.set_xlabel("formula size (nodes)")
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("fitness against size" + (f"\n{what}" if what else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _formula_png(latex: str, path: Path) -> bool:
    """Render with matplotlib's mathtext; False where it does not support the LaTeX."""
    tex = latex.replace(r"\operatorname", r"\mathrm")
    fig = plt.figure(figsize=(0.01, 0.01), dpi=150)
    fig.text(0, 0, f"${tex}$", fontsize=14)
    try:
        fig.savefig(path, bbox_inches="tight", pad_inches=0.05, transparent=False)
        return True
    except (ValueError, RuntimeError):
        return False
    finally:
        plt.close(fig)


def _validation_html(engine, run: int, everything: list[dict]) -> str:
    """The finalists and baselines on fresh data orders, if the run was validated; the paired
    differences to the best baseline where its search space had one."""
    checked = queries.validation(engine, run)
    if not checked:
        return "<p>Not validated on fresh data orders (the run stopped before, or ran with no validation).</p>"
    best = next(iter(checked.values()))["best_baseline"]
    n = next(iter(checked.values()))["val_orders"]
    by_id = {r["id"]: r for r in everything}
    rows = []
    for cid, v in sorted(checked.items(), key=lambda kv: -kv[1]["val_fitness"]):
        r = by_id.get(cid, {})
        formula = [f"<code>{html.escape(r.get('canonical', ''))}</code>",
                   f"{v['val_fitness']:.4f} ({v['val_low']:.4f} to {v['val_high']:.4f})"]
        cells = [str(cid)] + ([html.escape(r.get("baseline", "")), *formula, "" if v["diff"] is None else
                               f"{v['diff']:+.4f} ({v['diff_low']:+.4f} to {v['diff_high']:+.4f})",
                               html.escape(v["verdict"])] if best else formula)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = ["ID", "baseline", "formula", "fitness", f"- {html.escape(best)}", "verdict"] if best else \
        ["ID", "formula", "fitness"]
    table = "<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + f"</tr>{''.join(rows)}</table>"
    if not best:  # no seeded baseline in the run's search space: the fitness CIs alone
        return (f"<p>{n} data orders the search never used; fitness mean with its 95% CI. No seeded baseline is in "
                f"this run's search space, so there is nothing to compare with.</p>{table}")
    return (f"<p>{n} data orders the search never used; fitness mean with its 95% CI, and the paired difference to "
            f"the best baseline ({html.escape(best)}) with its CI. A formula beats it only when that CI lies above "
            f"0.</p>{table}")


def build_report(engine, run: int, out_dir: str | Path, top: int = 5) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = next((r for r in queries.runs(engine) if r["id"] == run), None)
    if info is None:
        raise EvopruneError(f"no run with ID {run}")
    gens = _generations(engine, run)
    if not gens:
        raise EvopruneError(f"run {run} has no completed generation yet")
    label = fitness_label(engine, run)
    _fitness_plot(gens, out / "fitness.png", label)
    everything = queries.top(engine, run, limit=10 ** 6)
    _pareto_plot(everything, queries.pareto(engine, run), out / "pareto.png", label)
    full, seen = [], set()
    for r in everything:  # one formula per set of masks: the others prune the same filters
        if r["stage"] == "full" and r["masks"] not in seen:
            seen.add(r["masks"])
            full.append(r)
    rows = []
    for i, r in enumerate(full[:top]):
        latex = to_latex(parse(r["expression"]))
        img = f"formula{i + 1}.png"
        shown = (f'<img src="{img}" alt="formula {i + 1}">' if _formula_png(latex, out / img) else "")
        accs = ", ".join(f"{k[4:]} {v:.4f}" for k, v in r.items() if k.startswith("acc:"))
        rows.append(f"<tr><td>{r['id']}</td><td>{r['fitness']:.4f}</td><td>{html.escape(accs)}</td>"
                    f"<td>{r['size']}</td><td>{shown}<br><code>{html.escape(latex)}</code><br>"
                    f"<small><code>{html.escape(r['expression'])}</code></small></td></tr>")
    base = "".join(f"<tr><td>{r['id']}</td><td>{html.escape(r['baseline'])}</td><td>{r['fitness']:.4f}</td>"
                   f"<td>{r['stage']}</td><td><code>{html.escape(r['expression'])}</code></td></tr>"
                   for r in sorted((r for r in everything if r["baseline"]), key=lambda r: -r["fitness"]))
    page = _PAGE.format(run=run, status=info["status"], tasks=html.escape(info["tasks"]), started=info["started"],
                        ended=info["ended"] or "-", gens=len(gens), cands=info["candidates"],
                        best=f"{info['best_fitness']:.4f}" if info["best_fitness"] is not None else "-",
                        what=html.escape(label),
                        rows="".join(rows), base=base, validation=_validation_html(engine, run, everything))
    (out / "index.html").write_text(page)
    return out / "index.html"


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>evoprune run {run}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1000px; color: #222 }}
table {{ border-collapse: collapse; margin: 1em 0 }} td, th {{ border: 1px solid #ccc; padding: 4px 8px;
vertical-align: top }} th {{ background: #f3f3f3 }} code {{ font-size: 90% }} img {{ max-width: 100% }}
</style></head><body>
<h1>evoprune run {run}</h1>
<p>status <b>{status}</b>; tasks <b>{tasks}</b>; started {started}, ended {ended};
{gens} generations, {cands} distinct formulas scored; best fitness {best}; {what}.</p>
<h2>Fitness over generations</h2><img src="fitness.png" alt="fitness over generations">
<h2>Fitness against size</h2><img src="pareto.png" alt="Pareto front">
<h2>Top formulas (full proxy; one per set of pruned filters)</h2>
<table><tr><th>ID</th><th>fitness</th><th>per task</th><th>size</th><th>formula</th></tr>{rows}</table>
<h2>Validation on fresh data orders</h2>{validation}
<h2>Seeded baselines</h2>
<table><tr><th>ID</th><th>baseline</th><th>fitness</th><th>stage</th><th>expression</th></tr>{base}</table>
<p><small>Fitness is the geometric mean over tasks of the validation score (accuracy, or the true
class's probability) after the proxy (prune, recalibrate BN, fine-tune briefly).
Export a formula with <code>evoprune export ID</code>.</small></p>
</body></html>
"""
