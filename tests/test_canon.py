"""Canonical forms made by helper processes: the same forms, the same children, and a helper
that dies costs only speed."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from deap import gp

from evoprune.errors import EvopruneError
from evoprune.evolve import canon
from evoprune.evolve.canon import Simplifier, auto_processes, form
from evoprune.evolve.config import Config, RunConfig, SearchConfig
from evoprune.evolve.engine import Search
from evoprune.primitives.pset import Vec, build_pset

from helpers import wait_for


def _formulas(n: int, seed: int) -> list[str]:
    pset, rng_state = build_pset(), random.getstate()
    random.seed(seed)
    try:
        return [str(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 4, Vec))) for _ in range(n)]
    finally:
        random.setstate(rng_state)


@pytest.fixture
def simplifier():
    s = Simplifier(2)
    yield s
    s.close()


def test_helpers_make_the_forms_one_process_makes(simplifier, monkeypatch):
    assert simplifier.wait() == 1
    texts = _formulas(60, seed=3)
    by_driver = []
    real = canon._forms
    monkeypatch.setattr(canon, "_forms", lambda chunk: by_driver.extend(chunk) or real(chunk))
    got = simplifier(texts + texts[:5])  # repeats are made once
    assert got == {t: form(t) for t in texts}
    assert 0 < len(by_driver) < len(set(texts))  # the helper made the rest


def test_a_helper_that_dies_costs_only_speed(simplifier):
    assert simplifier.wait() == 1
    helper = simplifier._helpers[0]
    helper.proc.kill()
    helper.proc.wait()
    texts = _formulas(20, seed=4)
    assert simplifier(texts) == {t: form(t) for t in texts}
    assert simplifier._helpers == []  # dropped; the driver goes on alone
    assert simplifier(texts[:3]) == {t: form(t) for t in texts[:3]}


def test_forms_started_ahead_are_made_while_the_driver_does_something_else(simplifier, monkeypatch):
    """`ahead` returns at once; the helper makes the forms meanwhile (here while the driver
    sleeps, as it would wait for a proxy run); a call then only collects them, and returns the
    other forms made ahead with them."""
    assert simplifier.wait() == 1
    texts = _formulas(12, seed=6)
    t0 = time.perf_counter()
    simplifier.ahead(texts)
    assert time.perf_counter() - t0 < 0.5
    by_driver = []
    real = canon._forms
    monkeypatch.setattr(canon, "_forms", lambda chunk: by_driver.extend(chunk) or real(chunk))
    deadline = time.monotonic() + 60
    while simplifier._helpers[0].busy or simplifier._queue:  # the helper's share, then the rest on the next poll
        assert time.monotonic() < deadline
        time.sleep(0.05)
        simplifier._poll(0)
    assert simplifier(texts[:3]) == {t: form(t) for t in texts}
    assert by_driver == []
    assert simplifier(texts[:3]) == {t: form(t) for t in texts[:3]}  # asked again: made again


def test_the_driver_makes_what_no_helper_has_started(simplifier, monkeypatch):
    """Asked for a form that waits in the queue behind others, the driver makes it itself
    rather than wait; a helper killed while holding forms started ahead costs only speed."""
    assert simplifier.wait() == 1
    texts = _formulas(30, seed=7)
    simplifier.ahead(texts)
    helper = simplifier._helpers[0]
    assert list(helper.busy) + list(simplifier._queue) == texts
    last = texts[-1]
    assert last in simplifier._queue
    assert simplifier([last])[last] == form(last)
    assert last not in simplifier._queue
    helper.proc.kill()
    helper.proc.wait()
    assert simplifier(texts) == {t: form(t) for t in texts}
    assert simplifier._helpers == []


def test_a_source_checkout_in_the_working_directory_does_not_shadow_the_helpers(tmp_path, monkeypatch):
    """Run from a folder holding an `evoprune/` package of its own (a clone's root, the Docker
    image's /opt/evoprune under a non-editable install), the helpers still import the installed one."""
    (tmp_path / "evoprune").mkdir()
    (tmp_path / "evoprune" / "__init__.py").write_text("raise ImportError('the checkout, not the package')\n")
    monkeypatch.chdir(tmp_path)
    s = Simplifier(2)
    try:
        assert s.wait() == 1
    finally:
        s.close()


def test_close_ends_the_helpers():
    s = Simplifier(2)
    procs = [h.proc for h in s._helpers]
    assert procs and all(p.poll() is None for p in procs)
    s.close()
    assert all(p.poll() is not None for p in procs)
    assert Simplifier(1)._helpers == []  # 1: the driver alone


def test_auto_is_half_the_cpus_up_to_4():
    assert [auto_processes(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 4]


def _reference_offspring(search: Search, pop: list, taken: set[str]) -> list:
    """The loop before children were bred ahead: breed one, simplify it, retry on a copy."""
    s = search.cfg.search
    kids = []
    while len(kids) < s.population - s.elites:
        for _ in range(s.unique_retries + 1):
            child = search._breed(pop)
            h = form(str(child))[1]
            if h not in taken:
                break
        taken.add(h)
        kids.append(child)
    return kids


@pytest.mark.parametrize("processes,chunk", [(1, 0), (2, 0), (1, 1), (2, 3)])
def test_bred_ahead_children_are_the_one_at_a_time_ones(processes, chunk):
    """The same children and the same random state after them, with and without helpers, in one
    chunk or drawn one at a time (as a pool of workers draws them, with the caller using `random`
    in between), as breeding and simplifying one child at a time; a population of few distinct
    formulas makes copies (retries) frequent."""
    cfg = Config(search=SearchConfig(population=24, seeds=(), unique_retries=3),
                 run=RunConfig(simplify_processes=processes))
    search = Search(cfg, None, {t: None for t in cfg.proxy.tasks})
    try:
        random.seed(11)
        distinct = search.initial_population()[:4]
        pop = [search.toolbox.clone(distinct[i % 4]) for i in range(24)]
        for i, ind in enumerate(pop):
            ind.raw = i % 4 / 4
            ind.fitness.values = (ind.raw,)
        for generation in range(3):
            state = random.getstate()
            elites = {form(str(e))[1] for e in pop[:2]}
            got = []
            for child in search.children(pop, set(elites), chunk):
                got.append(child)
                after = random.getstate()  # as the last child leaves it
                random.random()  # the caller's own draws do not move the children's stream
            random.setstate(state)
            want = _reference_offspring(search, pop, set(elites))
            assert [str(k) for k in got] == [str(k) for k in want]
            assert after == random.getstate()
            pop = pop[:2] + got
            for i, ind in enumerate(pop):
                ind.raw = (i * 7 % 5) / 5
                ind.fitness.values = (ind.raw,)
    finally:
        search.close()


def test_simplify_processes_is_checked():
    with pytest.raises(EvopruneError, match=r"simplify_processes must be in \[0, 256\]"):
        replace(RunConfig(), simplify_processes=-1)


def test_ctrl_c_ends_the_search_and_its_helpers(digits_pretrained, cache_dir, tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the run is marked interrupted (and
    resumable), the command says so and exits 130, and no helper outlives the driver."""
    cfg, db = tmp_path / "c.toml", tmp_path / "r.db"
    cfg.write_text("[search]\npopulation = 12\ngenerations = 30\nseeds = ['l1', 'bn_scale']\n"
                   "[proxy]\ntasks = ['digits-cnn']\nfinetune_steps = 2\n[run]\nsimplify_processes = 2\n")
    driver = subprocess.Popen([sys.executable, "-m", "evoprune", "evolve", "--config", str(cfg), "--db", str(db),
                               "--cache-dir", str(cache_dir), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    try:
        wait_for(db, "SELECT count(*) FROM generations")
        helpers = _children(driver.pid, "evoprune.evolve.canon")
        assert len(helpers) == 1
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130 and "aborted" in err, (out, err)
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT status, note FROM runs").fetchone() == ("interrupted",
                                                                         "interrupted; resume with --resume")
    time.sleep(0.5)
    for pid in helpers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def _children(pid: int, word: str) -> list[int]:
    """The processes whose parent is `pid` and whose command line holds `word` (from /proc)."""
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid \
                    and word in open(f"/proc/{d}/cmdline").read().replace("\0", " "):
                found.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return found


def test_a_helper_that_answers_nonsense_is_dropped(monkeypatch):
    """A helper whose answers are not forms (here a program that says it is ready, then talks
    nonsense) costs only speed: the driver makes its chunks."""
    monkeypatch.setattr(canon._Helper, "command", ("-c", "import sys\nprint('ready', flush=True)\n"
                                                   "for line in sys.stdin: print('[1, 2', flush=True)"))
    s = Simplifier(2)
    try:
        assert s.wait() == 1
        texts = _formulas(12, seed=5)
        assert s(texts) == {t: form(t) for t in texts}
        assert s._helpers == []
    finally:
        s.close()
