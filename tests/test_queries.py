"""Queries over a real search's database: runs, top, show, pareto, compare, promote; a reader
while a writer inserts; clear errors for unknown IDs and files that are not databases."""
from __future__ import annotations

import csv
import io
import json
import threading

from evoprune.db import queries, store
from evoprune.records import CandidateRecord, FitnessRecord, TaskResult

from helpers import run


def test_runs_and_top_in_three_formats(searched, capsys):
    db, result = searched
    rc, out, _ = run(capsys, "runs", "--db", str(db), "--json")
    runs = json.loads(out)
    assert rc == 0 and runs[0]["id"] == result.run_id and runs[0]["status"] == "finished"
    assert runs[0]["generations"] == 2 and runs[0]["tasks"] == "digits-cnn"
    rc, out, _ = run(capsys, "metrics", "top", "--db", str(db), "--csv", "--limit", "3")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 3
    fits = [float(r["fitness"]) for r in rows]
    assert fits == sorted(fits, reverse=True) and rows[0]["stage"] == "full"
    rc, out, _ = run(capsys, "metrics", "top", "--db", str(db), "--task", "digits-cnn")
    assert rc == 0 and "acc:digits-cnn" in out


def test_show_pareto_compare_promote(searched, capsys):
    db, result = searched
    best = result.finalists[0]
    rc, out, _ = run(capsys, "metrics", "show", str(best.candidate_id), "--db", str(db), "--json")
    row = json.loads(out)
    assert rc == 0 and row["expression"] == best.expression and row["latex"]
    assert row["evaluations"] and all(e["task"] == "digits-cnn" for e in row["evaluations"])
    rc, out, _ = run(capsys, "metrics", "pareto", str(result.run_id), "--db", str(db), "--json")
    front = json.loads(out)
    sizes, fits = [r["size"] for r in front], [r["fitness"] for r in front]
    assert sizes == sorted(sizes) and fits == sorted(fits) and len(set(fits)) == len(fits)
    rc, out, _ = run(capsys, "metrics", "compare", str(best.candidate_id), "--db", str(db), "--json")
    rows = json.loads(out)
    assert rc == 0 and rows[0]["id"] == best.candidate_id and {"l1", "bn_scale", "fpgm"} <= {r["baseline"] for r in rows}
    rc, out, _ = run(capsys, "metrics", "show", str(best.candidate_id), "--db", str(db), "--csv")
    assert rc == 0 and out.startswith("candidate,expression,task,stage,accuracy")
    rc, out, _ = run(capsys, "metrics", "promote", str(best.candidate_id), "my-metric", "--db", str(db), "--json")
    assert rc == 0 and json.loads(out)[0]["name"] == "my-metric" and queries.metric_by_name(store.connect(f"sqlite:///{db}"), "my-metric")["expression"] == \
        best.expression
    rc, _, err = run(capsys, "metrics", "promote", str(best.candidate_id), "my-metric", "--db", str(db))
    assert rc == 2 and "already exists" in err


def test_unknown_ids_and_foreign_files(searched, tmp_path, capsys):
    db, _ = searched
    for args, words in [(("metrics", "show", "99999"), "no candidate with ID 99999"),
                        (("metrics", "pareto", "42"), "no run with ID 42"),
                        (("metrics", "top", "--run", "42"), "no run with ID 42"),
                        (("metrics", "top", "--task", "nope"), "no candidate was evaluated on task 'nope'")]:
        rc, _, err = run(capsys, *args, "--db", str(db))
        assert rc == 2 and words in err and err.count("\n") == 1, args
    text = tmp_path / "notes.db"
    text.write_text("not a database\n" * 100)
    rc, _, err = run(capsys, "runs", "--db", str(text))
    assert rc == 2 and "is not an evoprune database" in err
    assert text.read_text() == "not a database\n" * 100  # left untouched
    rc, _, err = run(capsys, "runs", "--db", str(tmp_path / "missing.db"))
    assert rc == 2 and "no database at" in err and not (tmp_path / "missing.db").exists()


def test_reader_never_sees_database_is_locked(tmp_path):
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    writer_engine, reader_engine = store.connect(url), store.connect(url)
    run_id = store.create_run(writer_engine, {"proxy": {"tasks": ["t"]}}, 0, "test")
    errors: list[Exception] = []
    done = threading.Event()

    def write():
        try:
            for i in range(150):
                rec = FitnessRecord(f"add(w_l1, {i}.0)", "full", i / 150, True, "",
                                    {"t": TaskResult(i / 150, 0.5, 0.5, 0.1, f"{i}")}, 0.1, "w")
                store.record_candidates(writer_engine, run_id, [CandidateRecord(
                    f"add(w_l1, {i}.0)", f"w_l1 + {i}", f"h{i}", 3, 2, (), 0, rec)])
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    reads = 0
    while not done.is_set():
        try:
            queries.top(reader_engine, run_id, limit=5)
            queries.runs(reader_engine)
            reads += 1
        except Exception as e:
            errors.append(e)
            break
    t.join()
    assert not errors, errors
    assert reads > 5 and len(queries.top(reader_engine, run_id, limit=1000)) == 150


def test_top_shows_one_formula_per_set_of_masks(tmp_path, capsys):
    """Formulas that prune the same filters score alike: `metrics top` lists the best ranked and
    simplest of them once, counting the others (a screened-only twin among them); --all lists each."""
    url = f"sqlite:///{tmp_path / 'twins.db'}"
    engine = store.connect(url)
    run_id = store.create_run(engine, {"proxy": {"tasks": ["t"]}}, 0, "test")

    def cand(expression, size, fitness, mask, stage="full"):
        rec = FitnessRecord(expression, stage, fitness, True, "", {"t": TaskResult(fitness, 0.5, 0.5, 0.1, mask)}, 0.1,
                            "w")
        return CandidateRecord(expression, expression, f"h-{expression}", size, 2, (), 0, rec)

    store.record_candidates(engine, run_id, [cand("mul(2.0, w_l1)", 3, 0.9, "m1"), cand("w_l1", 1, 0.9, "m1"),
                                             cand("w_l2", 1, 0.8, "m2"), cand("sqrt(w_l1)", 2, 0.95, "m1", "screen")])
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--json")
    rows = json.loads(out)
    assert rc == 0 and [(r["expression"], r["same_masks"]) for r in rows] == [("w_l1", 2), ("w_l2", 0)]
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--json", "--all")
    assert [r["expression"] for r in json.loads(out)] == ["w_l1", "mul(2.0, w_l1)", "w_l2", "sqrt(w_l1)"]
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--limit", "1")
    assert rc == 0 and "same_masks" in out and "w_l2" not in out
    other = store.create_run(engine, {"proxy": {"tasks": ["t"]}}, 1, "test")  # its own proxy settings
    store.record_candidates(engine, other, [cand("w_l1", 1, 0.7, "m1")])
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--json")
    assert [(r["run"], r["expression"], r["same_masks"]) for r in json.loads(out)] == [
        (run_id, "w_l1", 2), (run_id, "w_l2", 0), (other, "w_l1", 0)]
    rc, out, _ = run(capsys, "metrics", "top", "--db", url, "--json", "--task", "t", "--run", str(run_id))
    assert [(r["expression"], r["same_masks"]) for r in json.loads(out)] == [("w_l1", 2), ("w_l2", 0)]


def test_kept_flops_is_the_mean_over_the_tasks_as_the_summary_gives_it(tmp_path, capsys):
    """`metrics top` gave the smallest task's kept share (0.06 for a formula the search's summary
    showed at 0.15, the mean of 0.23 and 0.06): one number, one meaning."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    engine = store.connect(url)
    run_id = store.create_run(engine, {"proxy": {"tasks": ["a", "b"]}}, 0, "test")
    tasks = {"a": TaskResult(0.5, 0.2338, 0.3, 0.1, "m1"), "b": TaskResult(0.4, 0.0644, 0.1, 0.1, "m2")}
    rec = FitnessRecord("w_l1", "full", 0.45, True, "", tasks, 0.2, "w")
    store.record_candidates(engine, run_id, [CandidateRecord("w_l1", "w_l1", "h", 1, 1, (), 0, rec)])
    for cmd in (["top"], ["compare", "1"]):
        rc, out, _ = run(capsys, "metrics", *cmd, "--db", url, "--json")
        assert rc == 0 and json.loads(out)[0]["kept_flops"] == (0.2338 + 0.0644) / 2
