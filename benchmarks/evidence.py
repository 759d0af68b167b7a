"""The evidence (issue #15): real searches, their winners validated on networks the searches
never saw, and whether the proxy predicted the transfer.

    python benchmarks/evidence.py --budget cpu|gpu|smoke [--data-root ../shared/data]
                                  [--cache-dir DIR] [--out evidence/BUDGET] [--device auto]

1. The searches: the default digits search (configs/digits.toml) and the reference work's
   two-task fitness (configs/cifar10.toml: CIFAR-10 ResNet-20 + MNIST CNN), each at the budget's
   size (gpu: the configs as written; cpu: the CIFAR search shrunk to finish in minutes on a
   2-core CPU; smoke: a tiny digits search, to test this script). Settings, seeds, candidates
   evaluated, wall time and machine are recorded.
2. Validation: the top 3 distinct evolved formulas of each search and every baseline on a
   transfer suite (gpu: configs/suite.toml, VGG-11 on CIFAR-10 and LeNet-5 on MNIST; cpu:
   configs/suite-cpu.toml, LeNet-5 on MNIST): test top-1 mean +- std per case, the paired
   difference to the suite's best baseline with its 95% CI (Bonferroni over the formulas),
   wins/ties/losses per formula, with and without TPP, FLOPs-matched cases (2x and 4x).
3. Proxy fidelity: Kendall's tau (bootstrap 95% CI over the metrics) between each search's proxy
   ranking of those metrics and the suite's ranking (mean test top-1 over its cases).
4. The tables (markdown) on stdout and in OUT/evidence.md, everything in OUT/evidence.json, the
   plot in OUT/suite.png. A formula is promoted (`evoprune metrics promote`, in OUT/evidence.db)
   only when it beats the suite's best baseline beyond its CI.

Everything resumes: the searches are skipped when OUT/evidence.json already holds them, and the
suite continues where it stopped (OUT/suite/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVOLVED_PER_SEARCH = 3


def _searches(budget: str):
    """(name, config) of each search at this budget."""
    from evoprune.evolve.config import load_config

    digits = load_config(ROOT / "configs" / "digits.toml")
    cifar = load_config(ROOT / "configs" / "cifar10.toml")
    if budget == "smoke":
        s = replace(digits.search, population=8, generations=1, validation_orders=2)
        p = replace(digits.proxy, tasks=("digits-cnn",), finetune_steps=5)
        return [("digits-smoke", replace(digits, search=s, proxy=p))]
    if budget == "cpu":  # the CIFAR search at a size a 2-core CPU finishes in about 15 minutes
        cifar = replace(cifar, search=replace(cifar.search, population=16, generations=4, validation_orders=2),
                        run=replace(cifar.run, workers=0))
    return [("digits", digits), ("cifar10+mnist", cifar)]


def _suite(budget: str):
    from evoprune.transfer.suite import Case, Suite, load_suite

    if budget == "smoke":  # machinery only: a network the smoke search used, two baselines, 1 epoch
        settings = {"ratio": 0.6, "allocator": "uniform", "scope": "in-block", "retrain": {"epochs": 1},
                    "tpp_settings": {"reg_step": 0.05, "update_every": 1, "stabilize_iters": 5, "lr": 0.01}}
        return Suite("smoke", 2, ["l1", "bn_scale"], [Case(0, "digits-cnn", settings),
                                                       Case(1, "digits-cnn", {**settings, "tpp": False})])
    suite = load_suite(ROOT / "configs" / ("suite-cpu.toml" if budget == "cpu" else "suite.toml"))
    from evoprune.primitives.baselines import BASELINES

    return replace(suite, baselines=list(BASELINES))  # every baseline, not only the suite's three


def _machine(device: str) -> str:
    import torch

    from evoprune.train import describe_device

    return f"{describe_device(device)}, torch {torch.__version__}"


# --------------------------------------------------------------------------- 1. the searches
def run_searches(budget: str, args, state: dict, db_url: str) -> None:
    from evoprune.evolve.service import run_search

    for name, cfg in _searches(budget):
        if name in state["searches"]:
            continue
        cfg = replace(cfg, run=replace(cfg.run, device=args.device, data_root=args.data_root or "",
                                       cache_dir=args.cache_dir or ""))
        print(f"search {name}: population {cfg.search.population}, generations {cfg.search.generations}, "
              f"tasks {', '.join(cfg.proxy.tasks)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        res = run_search(cfg, db_url=db_url, top=6 if budget == "cpu" else 10)
        seconds = time.perf_counter() - t0
        evolved = [f for f in res.finalists if not f.baseline][:EVOLVED_PER_SEARCH]
        val = res.validation
        best_base = max(res.baselines, key=lambda b: b.record.fitness)
        state["searches"][name] = {
            "run": res.run_id, "seed": cfg.search.seed, "population": cfg.search.population,
            "generations": cfg.search.generations, "tasks": list(cfg.proxy.tasks), "ratio": cfg.proxy.ratio,
            "finetune_steps": cfg.proxy.finetune_steps, "score": cfg.proxy.score, "seconds": seconds,
            "proxy_runs": res.counters["evaluations"],
            "individuals": cfg.search.population * (cfg.search.generations + 1),
            "best_per_generation": [h.best for h in res.history],
            "best_baseline": {"name": best_base.baseline, "fitness": best_base.record.fitness},
            "evolved": [{"id": f.candidate_id, "expression": f.expression, "canonical": f.canonical,
                         "fitness": f.record.fitness,
                         "validation": _validation(val, f.candidate_id)} for f in evolved],
            "config": json.loads(cfg.to_json()),
        }
        _save(args.out, state)


def _validation(val, cid: int) -> dict | None:
    c = val.of(cid) if val else None
    if c is None:
        return None
    d = c.diff
    return {"mean": c.fitness.mean, "low": c.fitness.low, "high": c.fitness.high, "orders": c.fitness.n,
            "diff": d.mean if d else None, "diff_low": d.low if d else None, "diff_high": d.high if d else None,
            "verdict": c.verdict}


# --------------------------------------------------------------------------- 2. the suite
def run_validation(budget: str, args, state: dict, db_url: str) -> list[dict]:
    from evoprune.progress import progress
    from evoprune.transfer.suite import (
        metric_list,
        mixed_pretrained,
        near_chance_cases,
        not_applicable,
        plot,
        run_suite,
        shown,
        usable,
    )

    suite = _suite(budget)
    metrics = [str(e["id"]) for s in state["searches"].values() for e in s["evolved"]]
    n = len(suite.cases) * suite.seeds * len(metric_list(suite, metrics, db_url))
    print(f"suite {suite.name}: {len(suite.cases)} cases x {suite.seeds} seeds x "
          f"{n // (len(suite.cases) * suite.seeds)} metrics = {n} prune runs", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with progress("validate", n, None, True, fields={"last": "s"}) as update:
        rows = run_suite(suite, metrics, out=args.out / "suite", db=db_url, data_root=args.data_root,
                         cache_dir=args.cache_dir, device=args.device, workers=args.workers, record=True,
                         on_result=lambda row, done, total: update(done, last=f"{row['key']} {shown(row)}"))
    state["suite"] = {"name": suite.name, "seeds": suite.seeds, "cases": [c.label for c in suite.cases],
                      "baselines": suite.baselines, "seconds_this_call": time.perf_counter() - t0,
                      "runs": len(usable(rows)), "not_applicable": not_applicable(rows),
                      "warnings": near_chance_cases(rows) + mixed_pretrained(rows)}
    rows = usable(rows)  # a metric a case's network cannot use (BN scale, no BN) has no result there
    drawn = {f"baseline:{b}" for b in ("l1", "bn_scale", "fpgm")} | set(metrics)
    plot([r for r in rows if r["metric"] in drawn], args.out / "suite.png")
    return rows


def compare(rows: list[dict], evolved: list[str], baselines: list[str]) -> dict:
    """Per metric: mean test top-1 over every case and seed; the suite's best baseline (highest
    such mean); each metric's paired difference to it over (case, seed), with a CI that holds
    for all evolved formulas together; per case, the verdict against it."""
    from evoprune.transfer.suite import one_image
    from evoprune.uncertainty import VERDICTS, estimate, family_level, paired, verdict

    by = {}
    for r in rows:
        by.setdefault(r["metric"], {})[(r["case"], r["seed"])] = r["test"]
    refs = [f"baseline:{b}" for b in baselines if f"baseline:{b}" in by]
    every = set().union(*by.values())  # the best baseline is one applied on every (case, seed)
    refs = [m for m in refs if set(by[m]) == every] or refs
    best = max(refs, key=lambda m: (statistics.fmean(by[m].values()), m))
    level = family_level(len(evolved))
    step = one_image(rows)  # a spread below one test image is not known to be smaller (uncertainty.estimate)
    out = {"best_baseline": best, "level": level, "metrics": {}}
    cases = sorted({c for m in by.values() for c, _ in m})
    for m, tests in by.items():
        common = sorted(set(tests) & set(by[best]))
        entry = {"mean": statistics.fmean(tests.values()), "evolved": m in evolved, "per_case": {}}
        if m != best:
            d = paired([tests[k] for k in common], [by[best][k] for k in common], level if m in evolved else 0.95,
                       floor=step, bounds=(-1.0, 1.0))
            entry.update(diff=d.mean, diff_low=d.low, diff_high=d.high, verdict=verdict(d))
            wtl = [0, 0, 0]
            for c in cases:
                ks = [k for k in common if k[0] == c]
                if not ks:  # n/a there (this metric or the best baseline cannot rank the case's filters)
                    continue
                mine = [tests[k] for k in ks]
                dc, spread = paired(mine, [by[best][k] for k in ks], floor=step, bounds=(-1.0, 1.0)), estimate(mine)
                v = verdict(dc)
                wtl[VERDICTS.index(v)] += 1
                entry["per_case"][c] = {"mean": spread.mean, "std": spread.std, "diff": dc.mean,
                                        "low": dc.low, "high": dc.high, "verdict": v}
            entry["wins_ties_losses"] = wtl
        else:
            for c in cases:
                vals = [tests[k] for k in common if k[0] == c]
                if not vals:
                    continue
                entry["per_case"][c] = {"mean": statistics.fmean(vals),
                                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        out["metrics"][m] = entry
    return out


# --------------------------------------------------------------------------- 3. proxy fidelity
def fidelity(budget: str, args, state: dict, comparison: dict) -> None:
    from evoprune.evolve.config import Config
    from evoprune.evolve.proxy_check import bootstrap_tau, kendall_tau, score_metrics
    from evoprune.primitives.baselines import BASELINES
    from evoprune.train import pick_device

    device = str(pick_device(args.device))
    exprs = {f"baseline:{b}": BASELINES[b].expression for b in BASELINES}
    for s in state["searches"].values():
        exprs.update({str(e["id"]): e["expression"] for e in s["evolved"]})
    names = [m for m in comparison["metrics"] if m in exprs]
    for name, s in state["searches"].items():
        if "fidelity" in s:
            continue
        cfg = Config.from_dict(s["config"], f"search {name}")
        cfg = replace(cfg, run=replace(cfg.run, device=args.device, data_root=args.data_root or "",
                                       cache_dir=args.cache_dir or ""))
        proxy = replace(cfg.proxy, screen=False)
        scores = score_metrics(cfg, proxy, [(m, exprs[m], m.startswith("baseline:")) for m in names], device)
        a = [scores[m][0] for m in names]
        b = [comparison["metrics"][m]["mean"] for m in names]
        lo, hi = bootstrap_tau(a, b)
        s["fidelity"] = {"metrics": names, "proxy": a, "suite": b, "tau": kendall_tau(a, b), "low": lo, "high": hi}
        _save(args.out, state)


# --------------------------------------------------------------------------- 4. the tables
def _pct(x: float) -> str:
    return f"{x:.2%}"


def tables(state: dict) -> str:
    from evoprune.primitives.expr import parse, to_latex

    c = state["comparison"]
    best = c["best_baseline"]
    lines = [f"Machine: {state['machine']}; {state['date']}; budget `{state['budget']}`.", "",
             "| search | tasks | population x generations | seed | individuals | proxy runs | seconds "
             "| best seeded baseline | best evolved (search fitness) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in state["searches"].items():
        ev = s["evolved"][0]["fitness"] if s["evolved"] else float("nan")
        lines.append(f"| {name} | {', '.join(s['tasks'])} | {s['population']} x {s['generations'] + 1} | {s['seed']} "
                     f"| {s['individuals']} | {s['proxy_runs']} | {s['seconds']:.0f} | {s['best_baseline']['name']} "
                     f"{s['best_baseline']['fitness']:.4f} | {ev:.4f} |")
    lines += ["", "Evolved formulas (the top 3 with distinct masks of each search):", "",
              "| id | search | formula | LaTeX | search fitness | on fresh orders vs the run's best baseline |",
              "|---|---|---|---|---|---|"]
    for name, s in state["searches"].items():
        for e in s["evolved"]:
            v = e["validation"]
            fresh = "" if not v or v["diff"] is None else \
                f"{v['verdict']}: {v['diff']:+.4f} ({v['diff_low']:+.4f} to {v['diff_high']:+.4f})"
            lines.append(f"| {e['id']} | {name} | `{e['expression']}` | ${to_latex(parse(e['expression']))}$ "
                         f"| {e['fitness']:.4f} | {fresh} |")
    suite = state["suite"]
    lines += ["", f"Suite `{suite['name']}` ({suite['seeds']} seeds per case; cases: "
              f"{'; '.join(f'{i + 1}. {label}' for i, label in enumerate(suite['cases']))}). Test top-1 mean over "
              f"every case and seed; the paired difference to the suite's best baseline (`{best}`) over (case, seed) "
              f"with its CI ({c['level']:.1%} for the evolved formulas: 95% for all of them together); "
              "wins/ties/losses: per case, against the same baseline (95% CI over seeds).", "",
              "| metric | mean test top-1 | vs " + best.removeprefix("baseline:") + " | CI | verdict | W/T/L |",
              "|---|---|---|---|---|---|"]
    ranked = sorted(c["metrics"].items(), key=lambda kv: -kv[1]["mean"])
    for m, e in ranked:
        name = m if m.startswith("baseline:") else f"**evolved {m}**"
        if m == best:
            lines.append(f"| {name} | {_pct(e['mean'])} | (best baseline) | | | |")
            continue
        w, t, l_ = e["wins_ties_losses"]
        lines.append(f"| {name} | {_pct(e['mean'])} | {e['diff']:+.2%} | {e['diff_low']:+.2%} to {e['diff_high']:+.2%} "
                     f"| {e['verdict']} | {w}/{t}/{l_} |")
    cases = suite["cases"]
    shown = [m for m, e in ranked if e["evolved"]] + [best] + \
        [m for m in ("baseline:l1", "baseline:bn_scale") if m != best and m in c["metrics"]]
    lines += ["", "Per case, test top-1 mean +- std over seeds (evolved formulas, the best baseline, L1, BN scale):",
              "", "| case | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for i, label in enumerate(cases):
        cells = []
        for m in shown:
            pc = c["metrics"][m]["per_case"].get(i) or c["metrics"][m]["per_case"].get(str(i))
            if pc is None:
                cells.append("n/a")
                continue
            mark = "" if m == best else {"beats": " (+)", "ties": "", "loses to": " (-)"}[pc["verdict"]]
            cells.append(f"{pc['mean']:.2%} +- {pc['std']:.2%}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n in suite.get("not_applicable", []):
        lines.append(f"\nn/a: case {n['case'] + 1} ({n['case_label']}), {n['metric']}: {n['reason']}; its mean "
                     "above is over the other cases, and it is compared on those alone.")
    for w in suite.get("warnings", []):  # as validate says them: near-chance cases, mixed pretrained models
        lines.append(f"\nwarning: {w}")
    lines += ["", "Proxy fidelity: Kendall's tau between each search's proxy ranking of these metrics (its own data "
              "order, full proxy) and the suite's ranking (bootstrap 95% CI over the metrics):", "",
              "| search | metrics | tau | 95% CI |", "|---|---|---|---|"]
    for name, s in state["searches"].items():
        f = s.get("fidelity")
        if f:
            lines.append(f"| {name} | {len(f['metrics'])} | {f['tau']:.2f} | {f['low']:.2f} to {f['high']:.2f} |")
    if state.get("promoted"):
        lines += ["", f"Promoted: {state['promoted']}."]
    else:
        lines += ["", "No evolved formula beat the suite's best baseline beyond its CI: none promoted."]
    return "\n".join(lines)


def promote(state: dict, db_url: str) -> None:
    from evoprune.db import queries, store

    c = state["comparison"]
    winners = [(e["diff_low"], m) for m, e in c["metrics"].items() if e["evolved"] and e.get("verdict") == "beats"]
    if not winners or state.get("promoted"):
        return
    _, cid = max(winners)
    name = f"evidence-{state['budget']}-{cid}"
    queries.promote(store.connect(db_url), int(cid), name)
    state["promoted"] = f"candidate {cid} as `{name}`"


def _save(out: Path, state: dict) -> None:
    (out / "evidence.json").write_text(json.dumps(state, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", choices=("smoke", "cpu", "gpu"), default="cpu")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0, help="Ray workers for the suite's prune runs (0: here)")
    args = ap.parse_args(argv)
    args.out = (args.out or Path("evidence") / args.budget).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "evidence.json"
    state = json.loads(path.read_text()) if path.exists() else {"budget": args.budget, "searches": {}}
    if state["budget"] != args.budget:
        sys.exit(f"error: {args.out} holds a {state['budget']} run; use another --out")
    from evoprune.train import pick_device

    state["machine"] = _machine(str(pick_device(args.device)))
    state["date"] = dt.date.today().isoformat()
    db_url = f"sqlite:///{args.out / 'evidence.db'}"
    run_searches(args.budget, args, state, db_url)
    rows = run_validation(args.budget, args, state, db_url)
    evolved = [str(e["id"]) for s in state["searches"].values() for e in s["evolved"]]
    state["comparison"] = compare(rows, evolved, state["suite"]["baselines"])
    _save(args.out, state)
    fidelity(args.budget, args, state, state["comparison"])
    promote(state, db_url)
    text = tables(state)
    (args.out / "evidence.md").write_text(text + "\n")
    _save(args.out, state)
    print(text)
    return state


if __name__ == "__main__":
    main()
