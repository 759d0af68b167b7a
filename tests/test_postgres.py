"""PostgreSQL for real: a private server started by the test session, two searches writing at
once, every query command, and evolve honouring $EVOPRUNE_DB."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pgserver
from helpers import run

pytestmark = pytest.mark.skipif(pgserver.available() is not None, reason=pgserver.available() or "")

CONFIG = """
[search]
population = 6
generations = 1
seed = {seed}
seeds = ["l1", "bn_scale"]
validation_orders = 2

[proxy]
tasks = ["digits-cnn"]
finetune_steps = 5
recalibrate_images = 128
stat_images = 128
"""


@pytest.fixture(scope="module")
def server():
    s = pgserver.Server().start()
    yield s
    s.stop()


def test_two_searches_write_at_once_and_every_query_reads(server, digits_pretrained, cache_dir, tmp_path, capsys):
    url = server.create_db("together")
    procs = []
    for seed in (1, 2):
        cfg = tmp_path / f"c{seed}.toml"
        cfg.write_text(CONFIG.format(seed=seed))
        env = {**os.environ, "EVOPRUNE_DB": url}  # evolve honours $EVOPRUNE_DB
        procs.append(subprocess.Popen([sys.executable, "-m", "evoprune", "evolve", "--config", str(cfg),
                                       "--cache-dir", str(cache_dir), "--device", "cpu"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out
    rc, out, err = run(capsys, "runs", "--db", url, "--json")
    runs = json.loads(out)
    assert rc == 0 and sorted(r["seed"] for r in runs) == [1, 2] and all(r["status"] == "finished" for r in runs)
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--json", "--limit", "100")
    rows = json.loads(out)
    assert rc == 0 and {r["run"] for r in rows} == {1, 2}
    best = rows[0]["id"]
    for args in (["metrics", "show", str(best)], ["metrics", "pareto", "1"], ["metrics", "compare", str(best)],
                 ["metrics", "top", "--run", "2", "--task", "digits-cnn"], ["export", str(best), "-f", "sympy"]):
        rc, out, err = run(capsys, *args, "--db", url)
        assert rc == 0, (args, err)
    rc, out, _ = run(capsys, "metrics", "compare", str(best), "--db", url, "--json")
    assert rc == 0 and any("verdict" in r for r in json.loads(out))  # validation stored and read back
    rc, _, err = run(capsys, "metrics", "promote", str(best), "pg-best", "--db", url)
    assert rc == 0, err
    rc, out, _ = run(capsys, "report", "1", "--db", url, "-o", str(tmp_path / "rep"))
    assert rc == 0 and (tmp_path / "rep" / "index.html").exists()


def test_a_missing_server_is_one_line(capsys):
    rc, _, err = run(capsys, "runs", "--db", "postgresql+psycopg://evoprune@127.0.0.1:1/nothing")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
