"""A seeded fuzz corpus of malformed configs, command lines and damaged files.

Every case must end, within a time bound, in exit 0 or in one `error:` line with exit 2 (a
traceback fails the test where it happens), and a file the command was told not to touch
(the database a query reads, a foreign or damaged file given as a database) stays
byte-identical. The corpus is drawn from a fixed seed, so a failure reproduces.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import signal
import sqlite3
from pathlib import Path

import pytest

from evoprune.cli import main
from evoprune.errors import EvopruneError
from evoprune.evolve.config import RunConfig, SearchConfig, load_config
from evoprune.workers.proxy import ProxyConfig

SEED = 20261123
BOUND_S = 30  # no single case may take longer


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_bound(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"


def check(capsys, args: list[str]) -> tuple[int, str]:
    """Run the CLI in this process; any exception but SystemExit fails the test here."""
    with time_bound(BOUND_S):
        rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    assert rc in (0, 2), (args, rc, cap.err[-500:])
    if rc == 2:
        assert cap.err.startswith("error: ") and cap.err.count("\n") == 1, (args, cap.err[-800:])
        assert "Traceback" not in cap.err and "weights_only=False" not in cap.err, (args, cap.err)
    return rc, cap.err


# --------------------------------------------------------------------------- configs
WEIRD = [0, 1, -1, 2, 7, 2 ** 63 - 1, -(2 ** 63), 0.0, -0.0, 0.5, 1.5, 1e308, -1e-308, float("inf"), float("-inf"),
         float("nan"), True, False, "", "x", "tpu", "digits-cnn", "l1", "cuda:99", "auto", [], [1], ["a"], [[1]],
         ["digits-cnn", "digits-cnn"], [0.1, 0.2, 0.3], [float("inf"), 0, 0, 0], {"a": 1}, {}]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
    if isinstance(v, (int, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"


def random_config(rng: random.Random) -> str:
    tables = {"search": list(SearchConfig.__dataclass_fields__), "proxy": list(ProxyConfig.__dataclass_fields__),
              "run": list(RunConfig.__dataclass_fields__)}
    lines = []
    for table, keys in tables.items():
        if rng.random() < 0.3:
            continue
        lines.append(f"[{table}]" if rng.random() > 0.05 else f"[{table}x]")
        for key in rng.sample(keys, rng.randint(1, 3)):
            name = key if rng.random() > 0.05 else key + "_"
            lines.append(f"{name} = {toml_value(rng.choice(WEIRD))}")
    if rng.random() < 0.1:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["[", "x =", "= 1", "[[search]]", "a.b.c = 1"]))
    return "\n".join(lines) + "\n"


def test_fuzzed_configs_never_end_in_a_traceback(tmp_path, capsys):
    rng = random.Random(SEED)
    db = tmp_path / "never.db"
    refused = 0
    for i in range(150):
        f = tmp_path / f"c{i}.toml"
        f.write_text(random_config(rng))
        try:
            load_config(f)
        except EvopruneError as e:
            refused += 1
            assert "\n" not in str(e) and str(f) in str(e), str(e)
            rc, _ = check(capsys, ["evolve", "--config", f, "--db", db])
            assert rc == 2
        assert not db.exists()  # a refused config writes nothing
    assert refused > 100  # the corpus mostly holds mistakes


# --------------------------------------------------------------------------- command lines
IDS = ["0", "1", "2", "-1", "99999999999999999999", "\u0661", "1e3", "abc", "", " 1", "007"]
EXPRS = ["w_l1", "div(w_l1,", "add(w_l1, 1e39)", "neg(" * 64, "square(div(neg(w_linf), sqrt(min(bn_abs_gamma, "
         "min(bn_beta, bn_var)))))", "1.0", "__import__('os')", "w_l1(3)", "zscore(" * 70 + "w_l1" + ")" * 70,
         "add(w_l1, \u0661)", "max(pfp_sens, spec_leverage)", "cls_var_out"]


def random_command(rng: random.Random, db: Path, out: Path) -> list:
    i, e = rng.choice(IDS), rng.choice(EXPRS)
    choices = [
        ["runs", "--db", db, rng.choice(["--json", "--csv", ""])],
        ["metrics", "top", "--db", db, "--limit", rng.choice(["0", "1", "-5", "x", "10"]), "--run", i],
        ["metrics", "top", "--db", db, "--task", rng.choice(["digits-cnn", "nope", ""])],
        ["metrics", "show", i, "--db", db, rng.choice(["--json", "--csv", ""])],
        ["metrics", "pareto", i, "--db", db],
        ["metrics", "compare", i, rng.choice(IDS), "--db", db],
        ["export", rng.choice([i, f"expr:{e}", "baseline:l1", "baseline:nope", "nope"]), "--db", db, "-f",
         rng.choice(["python", "sympy", "latex", "onnx"]), "-o", rng.choice([out / "m.py", out, "/nonexistent/x.py"])],
        ["report", i, "--db", db, "-o", out / "rep"],
        ["primitives", "check", rng.choice([e, f"baseline:{rng.choice(['l1', 'fisher', 'nope'])}", "-1"])],
        ["data", "check", rng.choice(["digits", "mnist", "imagefolder:", "imagefolder:/nowhere?size=3", "x"]),
         "--data-root", out / "nodata"],
        ["evolve", "--db", "sqlite://", "--workers", rng.choice(["0", "x", "-3"]), "--generations", i],
        ["evolve", "--resume", i, "--db", db],
        ["prune", "--task", rng.choice(["digits-cnn", "nope"]), "--metric", rng.choice([i, f"expr:{e}", "baseline:x"]),
         rng.choice(["--ratio", "--flops-reduction"]), rng.choice(["0.5", "1.5", "-1", "nan", "x"]),
         "--resume", "--out", out / "nothing-here", "--db", db],
    ]
    cmd = rng.choice(choices)
    return [a for a in cmd if a != ""]


@pytest.fixture
def query_db(searched, tmp_path) -> Path:
    src, _ = searched
    db = tmp_path / "q.db"
    with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
        a.backup(b)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def test_fuzzed_command_lines_never_end_in_a_traceback(query_db, cache_dir, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    out = tmp_path / "out"
    out.mkdir()
    before = sha(query_db)
    for _ in range(200):
        args = random_command(rng, query_db, out)
        check(capsys, args + (["--cache-dir", cache_dir] if args[0] in ("prune",) else []))
    assert sha(query_db) == before  # read, never written (no command above writes to it)


# --------------------------------------------------------------------------- damaged files
def damaged_databases(good: Path, where: Path, rng: random.Random) -> dict[str, Path]:
    raw = good.read_bytes()
    files = {
        "random bytes": bytes(rng.randrange(256) for _ in range(4096)),
        "empty": b"",
        "truncated": raw[: len(raw) // 3],
        "flipped header": bytes([raw[0] ^ 0xFF]) + raw[1:],
        "flipped middle": raw[: len(raw) // 2] + bytes(b ^ 0xA5 for b in raw[len(raw) // 2: len(raw) // 2 + 512])
        + raw[len(raw) // 2 + 512:],
        "text": b"not a database\n" * 50,
    }
    paths = {}
    for name, data in files.items():
        p = where / (name.replace(" ", "-") + ".db")
        p.write_bytes(data)
        paths[name] = p
    foreign = where / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        c.execute("INSERT INTO notes (text) VALUES ('mine')")
    paths["foreign"] = foreign
    newer = where / "newer.db"
    shutil.copy(good, newer)
    with sqlite3.connect(newer) as c:
        c.execute("UPDATE alembic_version SET version_num = '9999'")
    paths["newer"] = newer
    (where / "a-folder.db").mkdir()
    paths["folder"] = where / "a-folder.db"
    return paths


def test_damaged_and_foreign_databases_are_refused_untouched(query_db, tmp_path, capsys):
    rng = random.Random(SEED + 2)
    for name, path in damaged_databases(query_db, tmp_path, rng).items():
        before = sha(path)
        for args in (["runs"], ["metrics", "top"], ["metrics", "show", "1"], ["export", "1", "-f", "sympy"],
                     ["evolve", "--resume", "1"]):
            rc, err = check(capsys, [*args, "--db", path])
            if name in ("random bytes", "empty", "text", "foreign", "newer", "folder", "flipped header"):
                assert rc == 2, (name, args)
            if name in ("foreign", "random bytes", "text", "newer", "flipped header"):
                assert sha(path) == before, (name, args)  # not ours (or not readable): byte for byte untouched
        if name == "newer":
            assert "newer evoprune" in err


def test_damaged_prune_folders_are_refused_in_one_line(digits_pretrained, cache_dir, tmp_path, capsys):
    from evoprune.transfer.prune import prune_config

    cfg = prune_config(task="digits-cnn", metric="baseline:l1", ratio=0.5, tpp={}, retrain={})
    good = json.dumps(cfg.to_dict())
    import torch

    cases = {
        "config holds a list": ("config.json", "[]"),
        "config is not JSON": ("config.json", "{"),
        "random checkpoint": ("checkpoint.pt", bytes(random.Random(SEED).randrange(256) for _ in range(2048))),
        "foreign checkpoint": ("checkpoint.pt", {"weights": torch.zeros(3)}),
        "truncated masks": ("masks.pt", b"PK\x03\x04"),
    }
    for name, (file, content) in cases.items():
        d = tmp_path / name.replace(" ", "-")
        d.mkdir()
        (d / "config.json").write_text(good)
        if isinstance(content, dict):
            torch.save(content, d / file)
        elif isinstance(content, bytes):
            (d / file).write_bytes(content)
        else:
            (d / file).write_text(content)
        if file == "masks.pt":  # masks are read only after a checkpoint says the run got that far
            torch.save({"phase": "tpp", "epoch": 0, "iteration": 0, "tpp_seconds": 0.0, "base": None,
                        "after_tpp_test": None, "pruned_test": None, "equivalence_max_diff": None,
                        "tpp_norms": None, "model": {}, "opt": {}}, d / "checkpoint.pt")
        rc, err = check(capsys, ["prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5",
                                 "--out", d, "--resume", "--cache-dir", cache_dir, "--device", "cpu", "--no-record"])
        assert rc == 2, name
