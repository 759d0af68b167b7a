"""The search: recovering a hidden formula, a Ray worker killed mid-run, a driver killed and
resumed, malformed configs."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import pytest
from scipy.stats import ConstantInputWarning, spearmanr

from evoprune.cli import main
from evoprune.db import queries, store
from evoprune.errors import EvopruneError
from evoprune.evolve.config import Config, ProxyConfig, RunConfig, SearchConfig, load_config
from evoprune.evolve.engine import Search
from evoprune.evolve.service import StoreRecorder
from evoprune.masks import TaskMasks, mask_hash
from evoprune.primitives.expr import check_scores, evaluate, parse, scores_by_layer
from evoprune.primitives.stats import STATS
from evoprune.records import FitnessRecord, TaskResult
from evoprune.workers.evaluator import RayEvaluator, WorkerSpec

from helpers import wait_for

TINY_PROXY = ProxyConfig(tasks=("digits-cnn",), finetune_steps=3, recalibrate_images=128, stat_images=128)


@pytest.fixture(scope="module")
def digits_ctx(digits_pretrained, cache_dir):
    """The driver's masks for the digits task (statistics on the CPU)."""
    return {"digits-cnn": TaskMasks.load("digits-cnn", TINY_PROXY.allocation, list(STATS), stat_images=128, seed=0,
                                         cache_dir=cache_dir)}


class HiddenFormulaFitness:
    """An evaluator whose optimum is known: fitness = mean over layers of the Spearman
    correlation between the candidate's scores and a hidden formula's, on the real statistics
    of the pretrained digits CNN, mapped to [0, 1]."""

    def __init__(self, ctx: TaskMasks, hidden: str):
        self.table = ctx.table
        self.target = scores_by_layer(evaluate(parse(hidden), self.table), self.table)

    def correlation(self, expression: str) -> float:
        scores = evaluate(parse(expression), self.table)
        if not check_scores(scores, self.table).ok:
            return -1.0
        got = scores_by_layer(scores, self.table)
        with warnings.catch_warnings():  # a formula constant within a layer: nan, counted as 0 below
            warnings.simplefilter("ignore", ConstantInputWarning)
            rs = [spearmanr(got[k].numpy(), self.target[k].numpy()).statistic for k in self.target]
        return float(sum(0.0 if r != r else r for r in rs) / len(rs))

    def run(self, jobs):
        for job in jobs:
            f = (self.correlation(job.expression) + 1) / 2
            yield job, FitnessRecord(job.expression, job.stage, f, True,
                                     tasks={"digits-cnn": TaskResult(f, 1.0, 1.0, 0.0, mask_hash(job.masks["digits-cnn"]))})

    def close(self):
        pass


def test_formulas_of_the_users_own_seed_the_search(digits_ctx, tmp_path):
    """`seeds` takes `expr:FORMULA` (prefix or infix) beside baseline names: each enters the
    initial population once, in prefix form, and is scored and stored as any candidate is."""
    cfg = Config(search=SearchConfig(population=6, generations=0, seed=3, seeds=(
        "l1", "expr:w_l1 / (bn_abs_gamma + 0.1)", "expr:div(w_l1, add(bn_abs_gamma, 0.1))", "expr:w_l2 ^ 2")),
        proxy=replace(TINY_PROXY, screen=False))
    assert cfg.search.seed_formulas() == ["w_l1", "div(w_l1, add(bn_abs_gamma, 0.1))",
                                          "div(w_l1, add(bn_abs_gamma, 0.1))", "square(w_l2)"]
    fitness = HiddenFormulaFitness(digits_ctx["digits-cnn"], "w_l1")
    search = Search(cfg, fitness, digits_ctx, StoreRecorder.new_run(store.connect(f"sqlite:///{tmp_path / 'r.db'}"),
                                                                    cfg))
    pop = [str(i) for i in search.run()]
    assert pop[:3] == ["w_l1", "div(w_l1, add(bn_abs_gamma, 0.1))", "square(w_l2)"] and len(pop) == 6
    assert search.records[search._canonical("square(w_l2)")[1]].fitness > 0.9  # ranks as w_l2, near w_l1


def test_engine_recovers_a_hidden_formula(digits_ctx, tmp_path):
    hidden = "mul(w_l2, bn_abs_gamma)"
    cfg = Config(search=SearchConfig(population=40, generations=12, seed=1, seeds=(), parsimony=0.001,
                                     stats=("w_l1", "w_l2", "bn_abs_gamma", "bn_beta", "act_mean", "w_std"),
                                     ops=("add", "sub", "mul", "div", "sqrt", "square")),
                 proxy=replace(TINY_PROXY, ratio=0.5, screen=False))
    fitness = HiddenFormulaFitness(digits_ctx["digits-cnn"], hidden)
    engine = store.connect(f"sqlite:///{tmp_path / 'r.db'}")
    search = Search(cfg, fitness, digits_ctx, StoreRecorder.new_run(engine, cfg))
    pop = search.run()
    best = max(pop, key=lambda i: (i.raw, -len(i)))
    assert fitness.correlation(str(best)) > 0.999, str(best)
    assert search.history[-1].best > 0.9995 and search.history[0].best < search.history[-1].best
    # each generation's line pairs the best fitness with that formula (not the hall of fame's first,
    # which parsimony ranks: a smaller formula of lower fitness)
    for rep in search.history:
        assert search.records[search._canonical(rep.best_expression)[1]].fitness == rep.best, rep


class SlowFitness(HiddenFormulaFitness):
    """Takes 20 ms a job, as a proxy run would take longer: the helpers work meanwhile."""

    def run(self, jobs):
        for job, rec in super().run(jobs):
            time.sleep(0.02)
            yield job, rec


def test_helpers_making_forms_ahead_give_the_same_search(digits_ctx, monkeypatch):
    """An in-process search whose canonical forms a helper makes while the jobs run gives the
    generations of the driver alone, and the driver made only some of the forms."""
    from evoprune.evolve import canon

    made_here = []
    real = canon._forms
    monkeypatch.setattr(canon, "_forms", lambda chunk: made_here.extend(chunk) or real(chunk))
    runs = {}
    for processes in (1, 2):
        made_here.clear()
        cfg = Config(search=SearchConfig(population=24, generations=4, seed=5, seeds=("l1", "bn_scale")),
                     proxy=replace(TINY_PROXY, screen=False), run=RunConfig(simplify_processes=processes))
        search = Search(cfg, SlowFitness(digits_ctx["digits-cnn"], "mul(w_l2, bn_abs_gamma)"), digits_ctx)
        try:
            assert search.simplifier.wait() == processes - 1
            pop = search.run()
        finally:
            search.close()
        runs[processes] = ([str(i) for i in pop], [(r.best, r.mean, r.evaluations, r.cache_hits)
                                                   for r in search.history])
        if processes == 2:
            assert len(made_here) < len(search.canon) / 2, (len(made_here), len(search.canon))
    assert runs[1] == runs[2]


def test_racing_stores_the_screen_of_a_promoted_candidate_beside_its_full_result(digits_ctx, tmp_path):
    """With racing, each candidate is screened and the best share fully fine-tuned: a promoted
    one keeps its screen result beside the full one (how the screen ranked it), a screened-only
    one has its screen, and each is stored once at its best stage."""
    cfg = Config(search=SearchConfig(population=12, generations=2, seed=2, seeds=("l1", "bn_scale")),
                 proxy=replace(TINY_PROXY, screen=True, promote=0.34))
    engine = store.connect(f"sqlite:///{tmp_path / 'r.db'}")
    search = Search(cfg, HiddenFormulaFitness(digits_ctx["digits-cnn"], "w_l1"), digits_ctx,
                    StoreRecorder.new_run(engine, cfg))
    search.run()
    cands = [c for c in store.candidates(engine, 1) if c.valid]
    stages = {c.id: sorted(e.stage for e in c.evaluations) for c in cands}
    assert all(stages[c.id] == ["screen"] for c in cands if c.stage == "screen")
    raced = {c.mask_key() for c in cands if stages[c.id] == ["full", "screen"]}
    assert len(raced) == search.counters.full > 0  # each fully fine-tuned set of masks, with its screen
    # a formula whose masks an earlier one had takes that result (its full one) without a run
    assert all(stages[c.id] == ["full", "screen"] or (stages[c.id] == ["full"] and c.mask_key() in raced)
               for c in cands if c.stage == "full")


def test_ray_worker_killed_mid_run_loses_and_repeats_nothing(ray_session, digits_ctx, cache_dir, tmp_path):
    cfg = Config(search=SearchConfig(population=10, generations=1, seed=0, seeds=("l1", "bn_scale", "fpgm")),
                 proxy=TINY_PROXY)
    spec = WorkerSpec(proxy=cfg.proxy, cache_dir=str(cache_dir))
    evaluator = RayEvaluator(spec, workers=2)
    victims = evaluator.pids()
    killed = []

    def kill_one(kind, info):
        if kind == "evaluation" and not killed:
            os.kill(victims[0], signal.SIGKILL)  # a real worker process, killed while others are in flight
            killed.append(victims[0])

    engine = store.connect(f"sqlite:///{tmp_path / 'ray.db'}")
    recorder = StoreRecorder.new_run(engine, cfg)
    search = Search(cfg, evaluator, digits_ctx, recorder, kill_one)
    pop = search.run()
    evaluator.close()
    assert killed and evaluator.restarts >= 1
    assert all(ind.fitness.valid for ind in pop)
    cands = store.candidates(engine, recorder.run_id)
    for c in cands:
        stages = [(e.task, e.stage) for e in c.evaluations]
        assert len(stages) == len(set(stages)), c.expression  # each stage counted once
        if c.valid:
            assert c.evaluations, c.expression  # none lost
    assert not any("worker died" in c.reason for c in cands)


CONFIG = """
[search]
population = 8
generations = {generations}
seed = 3
seeds = ["l1", "bn_scale"]

[proxy]
tasks = ["digits-cnn"]
finetune_steps = 20
recalibrate_images = 128
stat_images = 128
"""


def _evolve(args, cache_dir, **kw):
    return subprocess.Popen([sys.executable, "-m", "evoprune.cli", "evolve", "--cache-dir", str(cache_dir),
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def _final_population(db):
    with sqlite3.connect(db) as c:
        (pop,) = c.execute('SELECT population FROM generations ORDER BY run_id, "index" DESC LIMIT 1').fetchone()
        status = c.execute("SELECT status FROM runs").fetchone()[0]
    return pop, status


def test_driver_killed_between_generations_resumes_to_the_same_population(digits_pretrained, cache_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(generations=4))
    straight = _evolve(["--config", str(cfg), "--db", str(tmp_path / "a.db")], cache_dir)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    want, status = _final_population(tmp_path / "a.db")
    assert status == "finished"

    db = tmp_path / "b.db"
    victim = _evolve(["--config", str(cfg), "--db", str(db)], cache_dir)
    wait_for(db, "SELECT count(*) >= 2 FROM generations")
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    with sqlite3.connect(db) as c:
        done = c.execute('SELECT max("index") FROM generations').fetchone()[0]
        assert c.execute("SELECT status FROM runs").fetchone()[0] == "running"  # killed, not finished
    assert done < 4
    resumed = _evolve(["--resume", "1", "--db", str(db)], cache_dir)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    got, status = _final_population(db)
    assert status == "finished" and got == want


@pytest.mark.parametrize("text, words", [
    ("[search]\npopulaton = 10\n", "unknown keys ['populaton']"),
    ("[search]\npopulation = 'ten'\n", "population must be a int"),
    ("[search]\npopulation = 2\n", "population must be >= 4"),
    ("[proxy]\nratio = 1.5\n", "ratio must be in (0, 1)"),
    ("[proxy]\ntasks = 'digits-cnn'\n", "tasks must be a list"),
    ("[proxy]\nallocator = 'best'\n", "allocator must be one of"),
    ("[search]\nseeds = ['l7']\n", "seeds: unknown ['l7']"),
    ("[serach]\n", "unknown tables ['serach']"),
    ("[search\n", "not valid TOML"),
    ("[search]\nmutation_weights = ['a', 'b', 'c', 'd']\n", "mutation_weights[0] must be a float"),
    ("[search]\nmutation_weights = [inf, 0, 0, 0]\n", "must be a finite number"),
    ("[search]\nops = { add = 1 }\n", "ops must be a list"),
    ("[search]\nseeds = [['l1']]\n", "seeds[0] must be a str"),
    ("[search]\nseeds = ['expr:w_l1 + foo']\n", "seeds: 'expr:w_l1 + foo': position 7: unknown name 'foo'"),
    ("[search]\nseeds = ['expr:bn_gamma * w_l1']\nstats = ['w_l1']\n", "uses ['bn_gamma'], which this search"),
    ("[search]\nseeds = ['expr:w_l1**8']\nmax_size = 5\n", "max_height is 8 and max_size 5"),
    ("[search]\npopulation = 9223372036854775807\n", "population must be <= 10000"),
    ("[search]\ninit_min_depth = 500\ninit_max_depth = 500\nmax_height = 501\n", "max_height must be <= 17"),
    ("[search]\nparsimony = inf\n", "must be a finite number"),
    ("[proxy]\nlr = inf\n", "must be a finite number"),
    ("[proxy]\nlr = 1e9\n", "lr must be in (0, 10]"),
    ("[proxy]\nweight_decay = nan\n", "must be a finite number"),
    ("[run]\ndevice = 'tpu'\n", "device must be auto, cpu, cuda or cuda:N"),
    ("[run]\ntime_limit = '2d'\n", "[run] time_limit must be a duration such as 90m, 2h, 1h30m or 45s, got '2d'"),
    ("[run]\ntime_limit = 3600\n", "[run] time_limit must be a str"),
    ("[run]\ntime_limit = '0m'\n", "time_limit must be more than 0 and at most a year"),
])
def test_malformed_config_is_refused_with_one_clear_line(text, words, tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(EvopruneError, match=None) as e:
        load_config(f)
    assert words in str(e.value) and str(f) in str(e.value)
    rc = main(["evolve", "--config", str(f), "--db", str(tmp_path / "x.db")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and words in err
    assert not (tmp_path / "x.db").exists()  # nothing was started


@pytest.mark.parametrize("kind", ["directory", "binary", "latin-1", "utf-16", "symlink-loop"])
def test_unreadable_config_files_are_one_clear_line(kind, tmp_path, capsys):
    f = tmp_path / "c.toml"
    if kind == "directory":
        f.mkdir()
    elif kind == "binary":
        f.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1":
        f.write_bytes("[search]\n# r\xe9sum\xe9\npopulation = 8\n".encode("latin-1"))
    elif kind == "utf-16":
        f.write_bytes("[search]\npopulation = 8\n".encode("utf-16"))
    else:
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        f = tmp_path / "loop"
    rc = main(["evolve", "--config", str(f), "--db", str(tmp_path / "x.db")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: config file") and err.count("\n") == 1, err
    assert not (tmp_path / "x.db").exists()


def test_unknown_task_or_bad_batch_is_refused_before_a_database_exists(tmp_path, capsys, digits_pretrained,
                                                                       cache_dir):
    for text, words in [("[proxy]\ntasks = ['digits-cnnn']\n", "unknown task 'digits-cnnn'"),
                        ("[proxy]\nbatch_size = 60000\n", "larger than the train split of digits-cnn")]:
        f = tmp_path / "c.toml"
        f.write_text(text)
        rc = main(["evolve", "--config", str(f), "--db", str(tmp_path / "x.db"), "--cache-dir", str(cache_dir)])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.db").exists()


def test_statistics_that_rank_no_filter_of_a_task_are_refused_before_a_run_exists(tmp_path, capsys,
                                                                                   digits_pretrained, cache_dir):
    """BN statistics alone on a network without BN (or a per-layer constant such as layer_flops)
    make every formula invalid: the search ran to its end with empty tables. Now one line."""
    f = tmp_path / "c.toml"
    f.write_text('[search]\nstats = ["layer_flops"]\npopulation = 4\ngenerations = 1\n'
                 '[proxy]\ntasks = ["digits-cnn"]\nfinetune_steps = 3\n')
    rc = main(["evolve", "--config", str(f), "--db", str(tmp_path / "x.db"), "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "[search] stats: none of them can rank the filters of digits-cnn (layer_flops: constant scores" in err
    assert queries.runs(store.connect(f"sqlite:///{tmp_path / 'x.db'}")) == []  # no run was stored


def test_a_search_without_baselines_still_shows_its_validation(tmp_path, capsys, digits_pretrained, cache_dir):
    """stats that leave every seeded baseline out: the validation ran and was not shown at all."""
    f = tmp_path / "c.toml"
    f.write_text('[search]\nstats = ["act_mean", "w_std"]\npopulation = 4\ngenerations = 0\nvalidation_orders = 2\n'
                 '[proxy]\ntasks = ["digits-cnn"]\nfinetune_steps = 3\nrecalibrate_images = 128\n'
                 'stat_images = 128\n')
    rc = main(["evolve", "--config", str(f), "--db", str(tmp_path / "x.db"), "--cache-dir", str(cache_dir),
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "validation on 2 fresh data orders" in out and " +- " in out
    assert "No seeded baseline is in this search space" in out
    # the HTML report called every formula "best baseline" of an empty name
    assert main(["report", "1", "--db", str(tmp_path / "x.db"), "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "No seeded baseline is in this run's search space" in page and "best baseline ()" not in page


def test_missing_config_and_unknown_run(tmp_path, capsys):
    assert main(["evolve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    store.connect(f"sqlite:///{tmp_path / 'e.db'}")
    assert main(["evolve", "--resume", "7", "--db", str(tmp_path / "e.db")]) == 2
    assert "no run with ID 7" in capsys.readouterr().err


def test_default_search_from_the_cli(digits_pretrained, cache_dir, tmp_path, capsys):
    rc = main(["evolve", "--generations", "1", "--db", str(tmp_path / "d.db"), "--cache-dir", str(cache_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "top formulas" in out and "best baseline on the same proxy" in out and "generation 1/1" in out
    assert "export the best: evoprune export " in out
    busy, driver = re.search(r"the workers were busy (\d+)% of it; the driver's own work took (\d+)%", out).groups()
    assert 95 <= int(busy) + int(driver) <= 101, out  # in this process the two take turns


def test_bad_workers_flag(tmp_path, capsys):
    assert main(["evolve", "--workers", "many", "--db", str(tmp_path / "w.db")]) == 2
    err = capsys.readouterr().err
    assert "--workers takes a number or 'auto'" in err and err.count("\n") == 1
    assert main(["evolve", "--time-limit", "soon", "--db", str(tmp_path / "w.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --time-limit must be a duration such as 90m") and err.count("\n") == 1
    assert not (tmp_path / "w.db").exists()


def test_durations():
    from evoprune.evolve.config import duration_s

    assert [duration_s(t, "x") for t in ("90m", "2h", "1h30m", "45s", "3600", "1.5h", " 2H ", "0.5s")] == \
        [5400, 7200, 5400, 45, 3600, 5400, 7200, 0.5]
    for bad in ("", "h", "2d", "1m1h", "-5", "1e3", "0", "9" * 400 + "h"):
        with pytest.raises(EvopruneError, match="^x must be"):
            duration_s(bad, "x")


def _generation_rows(db):
    with sqlite3.connect(db) as c:
        return c.execute('SELECT "index", evaluations, cache_hits, population FROM generations '
                         'ORDER BY "index"').fetchall()


def test_a_resumed_run_makes_the_cache_decisions_of_an_uninterrupted_one(digits_pretrained, cache_dir, tmp_path):
    from evoprune.evolve.service import run_search

    cfg = Config(search=SearchConfig(population=10, generations=3, seed=4, seeds=("l1", "l2", "bn_scale")),
                 proxy=TINY_PROXY)
    cfg = replace(cfg, run=replace(cfg.run, cache_dir=str(cache_dir), device="cpu"))
    run_search(cfg, db_url=str(tmp_path / "straight.db"))

    def stop_after_generation_1(kind, info):
        if kind == "generation" and info["report"].index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, db_url=str(tmp_path / "cut.db"), on_progress=stop_after_generation_1)
    with sqlite3.connect(tmp_path / "cut.db") as c:
        assert c.execute("SELECT status FROM runs").fetchone()[0] == "interrupted"
    run_search(cfg, db_url=str(tmp_path / "cut.db"), resume=1)
    straight, resumed = _generation_rows(tmp_path / "straight.db"), _generation_rows(tmp_path / "cut.db")
    assert [r[0] for r in resumed] == [0, 1, 2, 3]
    # the same proxy runs and the same cache hits in every generation, and the same populations
    assert resumed == straight
    # [run] time_limit: a planned stop after a generation, with the summary made; --resume goes on
    timed = replace(cfg, run=replace(cfg.run, time_limit="0.001s"), search=replace(cfg.search, validation_orders=2))
    result = run_search(timed, db_url=str(tmp_path / "timed.db"))
    assert result.stopped.startswith("stopped at the time limit (0.001s) after generation 0 of 3; `evoprune evolve "
                                     "--resume 1` continues it")
    assert result.finalists and result.validation is not None and len(result.validation.seeds) == 2
    with sqlite3.connect(tmp_path / "timed.db") as c:
        assert c.execute("SELECT status, note FROM runs").fetchone() == ("interrupted", result.stopped)
    from evoprune.db import queries

    assert queries.runs(store.connect(f"sqlite:///{tmp_path / 'timed.db'}"))[0]["note"] == result.stopped  # `runs`
    assert not run_search(cfg, db_url=str(tmp_path / "timed.db"), resume=1).stopped  # this call sets no limit
    assert _generation_rows(tmp_path / "timed.db") == straight
    with sqlite3.connect(tmp_path / "timed.db") as c:
        assert c.execute("SELECT status FROM runs").fetchone()[0] == "finished"
    # a finished run extended (--resume --generations) is the run started with that many: its first
    # summary fine-tuned candidates its generations only screened, which the generations that follow
    # do not see (they once did: a formula bred again got its full fitness, not its screen fitness)
    short = replace(cfg, search=replace(cfg.search, generations=1, validation_orders=0))
    run_search(short, db_url=str(tmp_path / "extended.db"))
    with sqlite3.connect(tmp_path / "extended.db") as c:
        summary = c.execute("SELECT COUNT(*) FROM evaluations WHERE summary").fetchone()[0]
    assert summary > 0  # the summary fine-tuned some
    extended = run_search(short, db_url=str(tmp_path / "extended.db"), resume=1, generations=3)
    assert _generation_rows(tmp_path / "extended.db") == straight
    whole = run_search(replace(cfg, search=replace(cfg.search, validation_orders=0)),
                       db_url=str(tmp_path / "whole.db"))
    assert [(f.canonical, f.record.fitness) for f in extended.finalists + extended.baselines] == \
        [(f.canonical, f.record.fitness) for f in whole.finalists + whole.baselines]


def test_resume_takes_generations_and_extends_a_finished_run(digits_pretrained, cache_dir, tmp_path, capsys):
    """`--generations` with `--resume` was silently dropped (the stored settings won). It now sets
    the run's number of generations: more extends a finished run, fewer than it completed is
    refused in one line, and nothing stored changes on a refusal."""
    from evoprune.evolve.service import run_search

    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text('[search]\npopulation = 6\ngenerations = 1\nseeds = ["l1", "fpgm"]\nvalidation_orders = 0\n'
                        '[proxy]\ntasks = ["digits-cnn"]\nfinetune_steps = 3\nrecalibrate_images = 128\n'
                        'stat_images = 128\n')
    db = tmp_path / "g.db"
    common = ["--db", str(db), "--cache-dir", str(cache_dir), "--device", "cpu"]
    assert main(["evolve", "--config", str(cfg_file), *common]) == 0
    capsys.readouterr()
    for extra in ([], ["--generations", "1"]):
        assert main(["evolve", "--resume", "1", *extra, *common]) == 2
        err = capsys.readouterr().err
        assert err == "error: run 1 already finished (it ran 1 generation; --generations more than that extends " \
                      "it); or start a new search\n", err
    assert main(["evolve", "--resume", "1", "--generations", "-1", *common]) == 2
    assert "--generations must be in [0, 100000], got -1" in capsys.readouterr().err
    # a config file asking for other settings than the run has is refused, not silently ignored
    other = tmp_path / "other.toml"
    other.write_text(cfg_file.read_text().replace("finetune_steps = 3", "finetune_steps = 4")
                     .replace("generations = 1", "generations = 3"))
    assert main(["evolve", "--resume", "1", "--config", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume 1: the config asks for other settings than the run has: search.generations "
                          "3 (the run's: 1), proxy.finetune_steps 4 (the run's: 3); a run keeps its own"), err
    assert main(["evolve", "--resume", "1", "--config", str(other), "--generations", "3", *common]) == 2
    assert "proxy.finetune_steps 4 (the run's: 3)" in capsys.readouterr().err
    assert main(["evolve", "--resume", "1", "--config", str(cfg_file), "--generations", "3", *common]) == 0
    assert "generation 3/3" in capsys.readouterr().out
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT status, json_extract(config, '$.search.generations') FROM runs").fetchone() == \
            ("finished", 3)
    assert [r[0] for r in _generation_rows(db)] == [0, 1, 2, 3]
    # an interrupted run cannot be cut below what it completed
    cfg = Config(search=SearchConfig(population=6, generations=3, seed=0, seeds=("l1",), validation_orders=0),
                 proxy=TINY_PROXY)
    cfg = replace(cfg, run=replace(cfg.run, cache_dir=str(cache_dir), device="cpu"))

    def stop_after_generation_2(kind, info):
        if kind == "generation" and info["report"].index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, db_url=str(tmp_path / "i.db"), on_progress=stop_after_generation_2)
    with pytest.raises(EvopruneError, match="run 1 has completed 2 generations: --generations must be at least 2"):
        run_search(cfg, db_url=str(tmp_path / "i.db"), resume=1, generations=1)
    with sqlite3.connect(tmp_path / "i.db") as c:
        assert c.execute("SELECT status, json_extract(config, '$.search.generations') FROM runs").fetchone() == \
            ("interrupted", 3)
    run_search(cfg, db_url=str(tmp_path / "i.db"), resume=1, generations=2)  # stop at what it completed
    with sqlite3.connect(tmp_path / "i.db") as c:
        assert c.execute("SELECT status, json_extract(config, '$.search.generations') FROM runs").fetchone() == \
            ("finished", 2)


def test_a_gpu_share_no_node_can_give_is_refused_before_a_run_is_stored(ray_session, digits_pretrained, cache_dir,
                                                                         tmp_path, capsys):
    """An actor asking for more GPUs than any node has would wait for one forever; an actor
    asking for none on a GPU cluster used to train on the CPU (Ray hides the GPUs from it)."""
    from helpers import run

    cfg = tmp_path / "c.toml"
    cfg.write_text('[search]\npopulation = 4\ngenerations = 1\n[proxy]\ntasks = ["digits-cnn"]\n'
                   f'[run]\nworkers = 2\ngpus_per_worker = 1\ncache_dir = "{cache_dir}"\n')
    db = tmp_path / "e.db"
    rc, _, err = run(capsys, "evolve", "--config", cfg, "--db", db)
    assert rc == 2 and "[run] gpus_per_worker 1: no node of this cluster has that many GPUs" in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    # --device cuda names the workers' device: a CPU driver (a GPU cluster's usual head node) is no
    # reason to refuse it; a cluster without a GPU is (here: Ray hides GPUs from a share of 0)
    cfg.write_text(cfg.read_text().replace("gpus_per_worker = 1\n", ""))
    rc, _, err = run(capsys, "evolve", "--config", cfg, "--db", db, "--device", "cuda")
    assert rc == 2 and "no CUDA device is visible" not in err, err
    assert "device cuda on Ray workers needs [run] gpus_per_worker above 0" in err and "no GPU" in err, err
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone() == (0,)
