"""Hostile input and damaged state, case by case: one clear line (exit 2) or correct behaviour,
bounded work, and nothing touched that was not ours to touch. (Malformed configs are in
test_search.py, expressions in test_expr.py, damaged caches in test_pretrain.py; the seeded
fuzz corpus in test_fuzz.py.)"""
from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from evoprune.db import store
from evoprune.errors import EvopruneError
from helpers import run

TINY = """
[search]
population = 6
generations = 1
seed = 11
seeds = ["l1", "bn_scale"]
validation_orders = 0

[proxy]
tasks = ["digits-cnn"]
finetune_steps = 120
recalibrate_images = 128
stat_images = 128
screen = false
"""


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evolve(*args, cache_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evoprune", "evolve", "--cache-dir", str(cache_dir), "--device",
                             "cpu", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _population(db):
    with sqlite3.connect(db) as c:
        return c.execute('SELECT population FROM generations ORDER BY "index" DESC LIMIT 1').fetchone()[0]


def test_killed_in_generation_0_resumes_from_the_start(digits_pretrained, cache_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY)
    straight = _evolve("--config", cfg, "--db", tmp_path / "a.db", cache_dir=cache_dir)
    assert straight.wait(timeout=600) == 0, straight.stdout.read()
    db = tmp_path / "b.db"
    victim = _evolve("--config", cfg, "--db", db, cache_dir=cache_dir)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once its run is stored, before generation 0 completes
        try:  # read-only: a poll must not create the file before the search does
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                runs = c.execute("SELECT count(*) FROM runs").fetchone()[0]
                gens = c.execute("SELECT count(*) FROM generations").fetchone()[0]
        except sqlite3.OperationalError:
            runs = gens = 0
        if runs and not gens:
            victim.send_signal(signal.SIGKILL)
            break
        assert not gens, "generation 0 finished before the kill: make the proxy slower"
        time.sleep(0.01)
    victim.wait(timeout=60)
    rc, out, _ = run(capsys, "runs", "--db", db, "--json")
    assert rc == 0 and json.loads(out)[0]["status"].startswith("interrupted")  # its driver is gone
    rc, out, err = run(capsys, "evolve", "--resume", "1", "--db", db, "--cache-dir", cache_dir, "--device", "cpu")
    assert rc == 0, err
    assert "generation 1/1" in out and "generation 1/8" not in out  # the stored run's settings
    assert _population(db) == _population(tmp_path / "a.db")
    rc, out, _ = run(capsys, "runs", "--db", db, "--json")
    assert json.loads(out)[0]["status"] == "finished"


def test_a_run_is_resumed_by_one_driver_at_a_time(tmp_path):
    engine = store.connect(str(tmp_path / "r.db"))
    run_id = store.create_run(engine, {}, 0, "test")  # its driver: this process, alive
    with pytest.raises(EvopruneError, match="is still running"):
        store.claim_run(engine, run_id)
    store.set_status(engine, run_id, store.RunStatus.finished)
    with pytest.raises(EvopruneError, match="already finished"):
        store.claim_run(engine, run_id)


def test_a_foreign_sqlite_file_stays_byte_identical(tmp_path, capsys):
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE notes (text TEXT)")
        c.execute("INSERT INTO notes VALUES ('mine')")
    before = _sha(path)
    for args in (["runs"], ["metrics", "top"], ["evolve", "--generations", "0"]):
        rc, _, err = run(capsys, *args, "--db", path)
        assert rc == 2 and "database of something else" in err
    assert _sha(path) == before
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # never switched to WAL


@pytest.mark.parametrize("damage, words", [
    ("newer", "written by a newer evoprune"),
    ("utf8", "the database cannot be used: Could not decode to UTF-8"),
    ("url", "bad database URL"),
    ("memory", "in-memory database"),
    ("empty", "holds no evoprune database"),
])
def test_damaged_databases_are_one_line(damage, words, searched, tmp_path, capsys):
    src, _ = searched
    db = tmp_path / "d.db"
    with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
        a.backup(b)
    url = str(db)
    if damage == "newer":
        with sqlite3.connect(db) as c:
            c.execute("UPDATE alembic_version SET version_num = '0999'")
    elif damage == "utf8":
        with sqlite3.connect(db) as c:
            c.execute("UPDATE runs SET config = CAST(X'80FF' AS TEXT)")
    elif damage == "url":
        url = "postgresql+psycopg://u@localhost:abc/db"
    elif damage == "memory":
        url = "sqlite://"
    else:
        db.write_bytes(b"")
    before = db.read_bytes()
    rc, _, err = run(capsys, "runs", "--db", url)
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert db.read_bytes() == before


def test_an_in_memory_database_is_refused_before_a_search(capsys, tmp_path):
    rc, _, err = run(capsys, "evolve", "--db", "sqlite://", "--generations", "0")
    assert rc == 2 and "lost when evoprune exits" in err


@pytest.mark.parametrize("args, words", [
    (["metrics", "show", "99999999999999999999"], "is not an ID in this database"),
    (["metrics", "show", "\u0661"], "is not an ID"),
    (["metrics", "compare", "1", "99999999999999999999"], "is not an ID in this database"),
    (["report", "99999999999999999999"], "is not an ID in this database"),
    (["export", "99999999999999999999"], "IDs are below 2^63"),
    (["prune", "--task", "digits-cnn", "--metric", "99999999999999999999", "--ratio", "0.5"], "IDs are below 2^63"),
    (["export", "baseline:l1", "-o", "/nonexistent/dir/x.py"], "cannot write /nonexistent/dir/x.py"),
    (["export", "baseline:l1", "-o", "{tmp}"], "is a folder"),
    (["prune", "--task", "digits-cnn", "--metric", "expr:1.0", "--ratio", "0.5"], "a constant ranks no filters"),
    (["prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5", "--out", "{tmp}/file"],
     "is a file, not a folder"),
    (["prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5", "--device", "tpu"],
     "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5", "--device", "cuda:99"],
     "--device cuda:99"),
    (["primitives", "check", "-1"], "put -- before it"),
    (["primitives", "check", "-w_l1"], "to pass an expression that starts with '-', put -- before it: `... -- -w_l1`"),
    (["primitives", "check", "add(w_l1, \u0661)"], "unexpected character"),
])
def test_command_line_values(args, words, searched, tmp_path, capsys):
    db, _ = searched
    (tmp_path / "file").write_text("a file")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc, _, err = run(capsys, *args, *(["--db", str(db)] if args[0] != "primitives" else []))
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "a file"
