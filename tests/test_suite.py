"""`evoprune validate`: a metric against itself ties; a killed suite resumes to the same table;
bad suites are refused before any work; transfer results are stored; runs on Ray workers."""
from __future__ import annotations

import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import pytest

from evoprune.db import queries, store
from evoprune.uncertainty import verdict

from helpers import image_folder, run

TINY = """
name = "tiny"
seeds = 2
baselines = ["l1"]

[defaults]
tpp = false
retrain = {{ epochs = 2 }}

[[case]]
task = "digits-cnn"
ratio = {ratio}
"""


def _suite(tmp_path, ratio=0.7, text=None):
    f = tmp_path / "suite.toml"
    f.write_text(text if text is not None else TINY.format(ratio=ratio))
    return f


def test_a_metric_against_itself_ties_with_a_zero_difference(digits_pretrained, cache_dir, tmp_path, capsys):
    rc, out, err = run(capsys, "validate", "expr:w_l1", "--suite", _suite(tmp_path), "--out", tmp_path / "o",
                       "--cache-dir", cache_dir, "--device", "cpu", "--no-record", "--json")
    assert rc == 0, err
    res = json.loads(out)
    (mine,) = [c for c in res["cases"] if c["metric"] == "expr:w_l1"]
    assert mine["vs l1"] == 0.0 and mine["vs l1 low"] <= 0.0 <= mine["vs l1 high"]
    assert mine["vs l1 verdict"] == "ties" and mine["seeds"] == 2
    assert res["wins_ties_losses"]["expr:w_l1"]["baseline:l1"] == [0, 1, 0]
    (pooled,) = res["overall"]["comparisons"]
    assert (pooled["metric"], pooled["baseline"], pooled["diff"], pooled["pairs"]) == ("expr:w_l1", "baseline:l1",
                                                                                      0.0, 2)
    assert pooled["verdict"] == "ties" and res["overall"]["level"] == 0.95
    assert len(res["runs"]) == 4 and (tmp_path / "o" / "suite.png").stat().st_size > 10_000


def test_a_suite_folder_takes_other_metrics_and_seeds_and_redoes_nothing(digits_pretrained, cache_dir, tmp_path,
                                                                          capsys):
    """A suite stopped by a metric it cannot use, or asked for one metric more, used to be
    refused in its folder ("another suite or other metrics"), so every run was redone elsewhere.
    The same cases continue it; other cases are refused; a candidate ID that names another
    formula (another database) is refused rather than given the old runs."""
    from evoprune.records import CandidateRecord, FitnessRecord, TaskResult

    def db_with(expression):
        url = f"sqlite:///{tmp_path / (expression + '.db')}"
        engine = store.connect(url)
        rec = FitnessRecord(expression, "full", 0.5, True, "", {"digits-cnn": TaskResult(0.5, 0.5, 0.5, 0.1, "m")},
                            0.1, "w")
        store.record_candidates(engine, store.create_run(engine, {"proxy": {"tasks": ["digits-cnn"]}}, 0, "t"),
                                [CandidateRecord(expression, expression, "h", 1, 1, (), 0, rec)])
        return url

    l2, l1 = db_with("w_l2"), db_with("w_l1")
    common = ["--suite", _suite(tmp_path), "--out", tmp_path / "o", "--cache-dir", cache_dir, "--device", "cpu",
              "--no-record", "--json"]
    rc, out, err = run(capsys, "validate", "1", "--db", l2, *common)
    assert rc == 0, err
    results = tmp_path / "o" / "results.jsonl"
    first = results.read_text()
    assert len(first.splitlines()) == 4
    rc, out, err = run(capsys, "validate", "1", "expr:fpgm_dist", "--seeds", "3", "--db", l2, *common)
    assert rc == 0, err
    lines = results.read_text().splitlines()
    assert results.read_text().startswith(first) and len(lines) == 9  # 1, l1: a third seed; fpgm: three
    assert {c["metric"] for c in json.loads(out)["cases"]} == {"1", "expr:fpgm_dist", "baseline:l1"}
    rc, out, err = run(capsys, "validate", "1", "--db", l1, *common)
    assert rc == 2 and "run c00-1-s0 in --out pruned with 'w_l2', but its metric now names 'w_l1'" in err
    other = tmp_path / "other.toml"
    other.write_text(TINY.format(ratio=0.6))
    rc, out, err = run(capsys, "validate", "1", "--db", l2, *common[:1], other, *common[2:])
    assert rc == 2 and "holds a suite with other cases" in err
    assert results.read_text().splitlines() == lines  # nothing stored changed


def _validate(*args, cache_dir):
    return subprocess.Popen([sys.executable, "-m", "evoprune", "validate", "expr:bn_abs_gamma", *map(str, args),
                             "--cache-dir", str(cache_dir), "--device", "cpu", "--no-record", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_suite_resumes_to_the_table_of_an_uninterrupted_one(digits_pretrained, cache_dir, tmp_path):
    suite = _suite(tmp_path)
    straight = _validate("--suite", suite, "--out", tmp_path / "a", cache_dir=cache_dir)
    want, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err
    victim = _validate("--suite", suite, "--out", tmp_path / "b", cache_dir=cache_dir)
    results = tmp_path / "b" / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 1:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the suite ended before it could be killed"
    assert results.read_text().count("\n") < 4
    resumed = _validate("--suite", suite, "--out", tmp_path / "b", cache_dir=cache_dir)
    got, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads(got)["cases"] == json.loads(want)["cases"]
    assert len((tmp_path / "b" / "results.jsonl").read_text().splitlines()) == 4  # each run once


@pytest.mark.parametrize("text, args, words", [
    (TINY.format(ratio=1.2), [], "ratio must be a number in (0, 1)"),
    (TINY.format(ratio=0.5).replace("digits-cnn", "digits-cnnn"), [], "unknown task 'digits-cnnn'"),
    (TINY.format(ratio=0.5), ["baseline:l7"], "unknown baseline 'l7'"),
    (TINY.format(ratio=0.5).replace('["l1"]', '["l9"]'), [], "unknown baselines ['l9']"),
    (TINY.format(ratio=0.5).replace("[[case]]", "[[cases]]"), [], "unknown keys ['cases']"),
    ('name = "x"\n', [], "no [[case]] tables"),
    (TINY.format(ratio=0.5) + "tpp = 3\n", [], "tpp must be true or false"),
    (TINY.format(ratio=0.5) + 'approximate_cut = "yes"\n', [], "approximate_cut must be true or false"),
    (TINY.format(ratio=0.5).replace("ratio = 0.5", "ratio = 0.5\nflops_reduction = 0.5"), [], "exactly one of"),
])
def test_bad_suites_are_refused_in_one_line_before_any_work(text, args, words, tmp_path, capsys):
    rc, _, err = run(capsys, "validate", *(args or ["expr:w_l1"]), "--suite", _suite(tmp_path, text=text),
                     "--out", tmp_path / "o", "--no-record")
    assert rc == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_transfer_results_are_stored_and_cases_run_on_ray(ray_session, searched, cache_dir, tmp_path, capsys):
    src, _ = searched
    db = tmp_path / "copy.db"
    with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
        a.backup(b)
    bn = next(r for r in queries.top(store.connect(str(db)), limit=100) if r["baseline"] == "bn_scale")
    rc, out, err = run(capsys, "validate", str(bn["id"]), "--suite", _suite(tmp_path), "--out", tmp_path / "o",
                       "--cache-dir", cache_dir, "--device", "cpu", "--db", db, "--workers", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert {r["host"] for r in res["runs"]} and len(res["runs"]) == 4
    evals = [e for e in queries.candidate(store.connect(str(db)), bn["id"])["evaluations"] if e["stage"] == "transfer"]
    assert len(evals) == 2  # one per seed of the metric's own runs
    with sqlite3.connect(db) as c:
        seeds = sorted(r[0] for r in c.execute("SELECT seed FROM evaluations WHERE stage = 'transfer' AND "
                                                 "candidate_id = ?", (bn["id"],)))
    assert seeds == [0, 1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_case_that_cannot_be_cut_is_named_and_the_runs_before_it_are_kept(workers, digits_pretrained, cache_dir,
                                                                            shared_data, tmp_path, capsys, request):
    if workers != "0":
        request.getfixturevalue("ray_session")  # the session's one Ray
    folder = image_folder(tmp_path / "images", shared_data, classes=3, train=16, val=6)
    tasks = tmp_path / "tasks.toml"  # Torch-Pruning cannot trace ShuffleNetV2's channel shuffle
    tasks.write_text(f'[shuffle]\ndataset = "imagefolder:{folder}?size=32"\nmodel = "torchvision:shufflenet_v2_x0_5"\n'
                     'recipe = { epochs = 1, batch_size = 16 }\n')
    text = TINY.format(ratio=0.5).replace("seeds = 2", "seeds = 1") + '\n[[case]]\ntask = "shuffle"\nratio = 0.5\n'
    rc, _, err = run(capsys, "validate", "expr:w_l2", "--suite", _suite(tmp_path, text=text), "--out", tmp_path / "o",
                     "--tasks-file", tasks, "--cache-dir", cache_dir, "--db", tmp_path / "e.db", "--device", "cpu",
                     "--workers", workers)
    assert rc == 2 and "suite case 2 (shuffle" in err and "Torch-Pruning cannot trace" in err, err
    if workers != "0":
        return  # on Ray the first case's runs may still be under way when the second fails
    rows = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert {(r["case"], r["metric"]) for r in rows} == {(0, "expr:w_l2"), (0, "baseline:l1")}
    assert {r["classes"] for r in rows} == {10}  # digits: what near_chance_cases judges by


def test_a_case_where_every_metric_ends_near_chance_is_called_noise():
    from evoprune.transfer.suite import near_chance_cases

    def row(case, metric, test, classes=10):
        return {"case": case, "case_label": f"c{case}", "metric": metric, "test": test, "classes": classes}

    rows = [row(0, "a", 0.15), row(0, "a", 0.17), row(0, "b", 0.19),  # best mean 0.19 < min(0.2, 0.2)
            row(1, "a", 0.15), row(1, "b", 0.45),  # one metric does well: the case tells them apart
            row(2, "a", 0.02, 100), row(2, "b", 0.015, 100),  # 100 classes: near is below 2%
            row(3, "a", 0.1, None)]  # an older report: not judged
    (w,) = near_chance_cases(rows)
    assert w.startswith("case 1 (c0): every metric ends near chance accuracy (best mean 19.0%, chance 10.0%)")
    assert near_chance_cases([row(2, "a", 0.019, 100)])[0].startswith("case 3 (c2)")


def test_a_difference_of_the_same_images_on_every_seed_is_not_a_win_of_zero_width():
    """Test accuracy moves in steps of one image: two seeds that both beat L1 by the same two of
    359 images have a sample spread of 0, and a t-interval of width 0 called that a win (seen on a
    digits suite). The CI credits at least one image of spread, and stays inside [-1, 1]."""
    from evoprune.transfer.suite import summarize

    def row(metric, seed, test, images=359):
        return {"case": 0, "case_label": "c0", "metric": metric, "seed": seed, "test": test, "macs_kept": 0.5,
                "test_images": images}

    two = 2 / 359
    rows = [row("m", 0, 0.90 + two), row("m", 1, 0.80 + two), row("baseline:l1", 0, 0.90), row("baseline:l1", 1, 0.80)]
    (base, mine), _ = summarize(rows, ["l1"])
    d = mine.diffs["baseline:l1"]
    assert d.mean == pytest.approx(two) and d.std == pytest.approx(0, abs=1e-12)
    assert mine.verdicts["baseline:l1"] == "ties" and d.low < 0 < d.high
    five = [row("m", s, 0.5 + two) for s in range(5)] + [row("baseline:l1", s, 0.5) for s in range(5)]
    (_, mine5), _ = summarize(five, ["l1"])  # five seeds of the same two images: beyond one image's noise
    assert mine5.verdicts["baseline:l1"] == "beats"
    old = [{k: v for k, v in r.items() if k != "test_images"} for r in rows]  # reports that did not say: as before
    assert summarize(old, ["l1"])[0][1].verdicts["baseline:l1"] == "beats"
    wide = [row("m", 0, 0.95), row("m", 1, 0.10), row("baseline:l1", 0, 0.10), row("baseline:l1", 1, 0.90)]
    (_, w), _ = summarize(wide, ["l1"])
    assert w.diffs["baseline:l1"].low == -1.0 and w.diffs["baseline:l1"].high == 1.0  # not -1,100% .. +1,100%
    assert 0.0 <= w.test.low and w.test.high <= 1.0


def test_the_overall_difference_pools_cases_and_holds_for_every_comparison_together():
    """One headline per (metric asked, baseline): the paired difference over every (case, seed)
    both ran, at a Bonferroni level over those comparisons; baselines among themselves are not
    in the family, and a case where one side is n/a is left out of its pairs."""
    from evoprune.transfer.suite import overall, summarize

    def row(case, metric, seed, test):
        return {"case": case, "case_label": f"c{case}", "metric": metric, "seed": seed, "test": test,
                "macs_kept": 0.5, "test_images": 1000}

    gains = {0: (0.012, 0.008), 1: (0.011, 0.013), 2: (0.009, 0.012)}  # small, steady: a tie per case
    rows = [r for c, g in gains.items() for s in (0, 1) for r in (row(c, "m", s, 0.7 + g[s]),
                                                                 row(c, "baseline:l1", s, 0.7 - 0.01 * s))]
    rows += [row(c, "baseline:fpgm", s, 0.71) for c in (1, 2) for s in (0, 1)]
    rows.append({"case": 0, "case_label": "c0", "metric": "baseline:fpgm", "seed": 0, "unusable": "why"})
    level, got = overall(rows, ["m"], ["l1", "fpgm"])
    assert level == pytest.approx(1 - 0.05 / 2) and set(got) == {"m"}
    vs_l1, vs_fpgm = got["m"]["baseline:l1"], got["m"]["baseline:fpgm"]
    assert vs_l1.n == 6 and vs_fpgm.n == 4  # fpgm is n/a on case 0
    assert vs_l1.mean == pytest.approx(statistics.fmean(g[s] + 0.01 * s for g in gains.values() for s in (0, 1)))
    per_case, _ = summarize(rows, ["l1", "fpgm"])
    assert {c.verdicts["baseline:l1"] for c in per_case if c.metric == "m"} == {"ties"}  # two seeds a case
    assert verdict(vs_l1) == "beats"  # six pairs together: beyond noise even at 97.5%
    assert overall(rows, ["baseline:l1"], ["l1"])[1] == {}  # a baseline against itself is no comparison


def test_the_table_states_each_cases_schedule_first_and_no_ci_for_one_seed(digits_pretrained, cache_dir, tmp_path,
                                                                           capsys):
    """A run's length is its schedule (the task's TPP can be 100,000 iterations): it is said before
    the first run; one seed gives a difference without an interval, said in words, not +-inf."""
    rc, out, err = run(capsys, "validate", "expr:w_l2", "--suite", _suite(tmp_path), "--seeds", "1", "--out",
                       tmp_path / "o", "--cache-dir", cache_dir, "--device", "cpu", "--no-record")
    assert rc == 0, err
    lines = err.splitlines()  # (stderr may also hold Ray's own log lines from earlier tests)
    said = [i for i, line in enumerate(lines) if line.startswith("case 1 (digits-cnn ratio 0.7 no-TPP): no TPP; "
                                                                 "retraining 2 epochs")]
    ran = [i for i, line in enumerate(lines) if line.startswith("validate 1/")]
    assert said and (not ran or said[0] < ran[0]), err
    assert "(no CI: one seed)" in out and "inf" not in out


def test_json_of_one_seed_is_strict_json(digits_pretrained, cache_dir, tmp_path, capsys):
    """One seed has no CI: its bounds are null in --json, not Python's bare -Infinity, which jq
    and JavaScript refuse."""
    rc, out, err = run(capsys, "validate", "expr:w_l2", "--suite", _suite(tmp_path), "--seeds", "1", "--out",
                       tmp_path / "o", "--cache-dir", cache_dir, "--device", "cpu", "--no-record", "--json")
    assert rc == 0, err

    def refuse(constant):
        raise AssertionError(f"{constant} in --json output")

    res = json.loads(out, parse_constant=refuse)
    (mine,) = [c for c in res["cases"] if c["metric"] == "expr:w_l2"]
    assert mine["vs l1 low"] is None and mine["vs l1 high"] is None and mine["vs l1"] is not None


NO_BN = """
from torch import nn


def net(num_classes, in_channels=1):  # no BN: BN scale cannot rank its filters
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def test_a_metric_a_case_cannot_use_is_na_there_and_the_suite_goes_on(digits_pretrained, cache_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """BN scale on a network without BN: it used to stop the suite at that run (error, exit 2),
    leaving every later case undone. It is n/a on that case (each seed's row says why, no run is
    made for the second seed), compared nowhere there, and the other cases run as usual."""
    (tmp_path / "nobn_nets.py").write_text(NO_BN)
    monkeypatch.syspath_prepend(str(tmp_path))
    tasks = tmp_path / "tasks.toml"
    tasks.write_text('[digits-nobn]\ndataset = "digits"\nmodel = "import:nobn_nets:net"\n'
                     'recipe = { epochs = 15 }\n')
    text = TINY.format(ratio=0.5).replace('["l1"]', '["l1", "bn_scale"]').replace("digits-cnn", "digits-nobn") + \
        '\n[[case]]\ntask = "digits-cnn"\nratio = 0.5\n'
    args = ["validate", "expr:w_l2", "--suite", _suite(tmp_path, text=text), "--out", tmp_path / "o", "--tasks-file",
            tasks, "--cache-dir", cache_dir, "--device", "cpu", "--no-record"]
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    res = json.loads(out)
    (na,) = res["not_applicable"]
    assert (na["case"], na["metric"]) == (0, "baseline:bn_scale") and "cannot rank the filters" in na["reason"]
    assert {(r["case"], r["metric"]) for r in res["runs"]} == {(0, "expr:w_l2"), (0, "baseline:l1"),
                                                                (1, "expr:w_l2"), (1, "baseline:l1"),
                                                                (1, "baseline:bn_scale")}
    assert len(res["runs"]) == 10 and not (tmp_path / "o" / "runs" / "c00-baseline-bn_scale-s1").exists()
    cases = {(c["case"], c["metric"]): c for c in res["cases"]}  # numbered from 1, as the table shows them
    assert "vs bn_scale verdict" in cases[(2, "expr:w_l2")] and "vs l1 verdict" in cases[(1, "expr:w_l2")]
    assert "vs bn_scale verdict" not in cases[(1, "expr:w_l2")] and (1, "baseline:bn_scale") not in cases
    assert sum(res["wins_ties_losses"]["expr:w_l2"]["baseline:bn_scale"]) == 1  # case 2 alone
    assert sum(res["wins_ties_losses"]["expr:w_l2"]["baseline:l1"]) == 2
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 12 and sum("unusable" in line for line in lines) == 2  # both seeds, one reason
    rc, out, err = run(capsys, *args)  # the same command again: nothing reruns, the table says n/a
    assert rc == 0, err
    said = " ".join(out.split())
    assert "n/a: case 1 (digits-nobn" in said and "baseline:bn_scale: metric baseline:bn_scale cannot rank" in said
    assert (tmp_path / "o" / "results.jsonl").read_text().splitlines() == lines
    rc, out, err = run(capsys, *args, "--csv")
    assert rc == 0 and out.splitlines()[0].endswith(",not_applicable"), err
    assert out.splitlines()[-1].startswith("1,digits-nobn ratio 0.5 no-TPP,baseline:bn_scale,,")
    results = tmp_path / "o" / "results.jsonl"
    with results.open("a") as f:  # killed while writing a row: the line is cut short, without its newline
        f.write(lines[3][:30])
    rc, out, err = run(capsys, *args)
    assert rc == 0 and results.read_text().splitlines() == lines, err
    results.write_text("\n".join([*lines[:3], "{oops", *lines[4:]]) + "\n")
    damaged = results.read_text()
    rc, out, err = run(capsys, *args)
    assert rc == 2 and "results.jsonl line 4 is unreadable" in err and err.count("\n") == 1, err
    assert results.read_text() == damaged  # refused, nothing rewritten
    results.write_text("\n".join([*lines[:3], *lines[4:]]) + "\n")  # that run's row gone: its report is read
    report = tmp_path / "o" / "runs" / json.loads(lines[3])["key"] / "report.json"
    report.write_text(report.read_text()[:-20])
    rc, out, err = run(capsys, *args)
    assert rc == 2 and f"{report} is unreadable (JSONDecodeError" in err and err.count("error:") == 1, err
    assert "Traceback" not in err


def test_a_metric_no_case_can_use_is_na_on_ray_too(ray_session, digits_pretrained, cache_dir, tmp_path, capsys):
    """On Ray workers the reason comes back as the worker's error: n/a, not a stop."""
    rc, out, err = run(capsys, "validate", "expr:sub(w_l1, w_l1)", "--suite", _suite(tmp_path), "--out",
                       tmp_path / "o", "--cache-dir", cache_dir, "--device", "cpu", "--no-record", "--workers", "2",
                       "--json")
    assert rc == 0, err
    res = json.loads(out)
    (na,) = res["not_applicable"]
    assert na["metric"] == "expr:sub(w_l1, w_l1)" and "constant scores" in na["reason"]
    assert {(r["metric"], r["seed"]) for r in res["runs"]} == {("baseline:l1", 0), ("baseline:l1", 1)}
    assert [c["metric"] for c in res["cases"]] == ["baseline:l1"] and res["plot"]
    (model,) = {r["pretrained"] for r in res["runs"]}  # one pretrained model (pretrained first, once)
    assert len(model) == 64 and res["warnings"] == []


def test_a_case_whose_runs_started_from_different_pretrained_models_is_warned_of():
    from evoprune.transfer.suite import mixed_pretrained

    def row(case, seed, model):
        return {"case": case, "case_label": f"c{case}", "metric": "m", "seed": seed, "test": 0.9, "pretrained": model}

    rows = [row(0, 0, "a"), row(0, 1, "a"), row(1, 0, "a"), row(1, 1, "b"), row(2, 0, None)]
    (w,) = mixed_pretrained(rows)
    assert w.startswith("case 2 (c1): its runs started from 2 different pretrained models")


def test_each_run_on_ray_asks_for_a_gpu_where_the_cluster_has_them():
    """Ray hides the GPUs from a task that asks for none: a suite on a GPU cluster ran every prune
    run on the CPU. A run now asks for one GPU where the cluster has any (unless told otherwise),
    and a share no node can give, or a device its share rules out, is refused before any work."""
    from evoprune.errors import EvopruneError
    from evoprune.workers.evaluator import gpu_share

    assert gpu_share(None, "auto", [0.0, 8.0], "--g") == (1.0, "cuda")
    assert gpu_share(None, "auto", [0.0], "--g") == (0.0, "cpu")
    assert gpu_share(None, "cpu", [8.0], "--g") == (0.0, "cpu")
    assert gpu_share(0.25, "cuda", [1.0], "--g") == (0.25, "cuda")
    # N at once on fewer GPUs: an even share, so that none waits for a GPU that never frees
    assert gpu_share(None, "auto", [1.0], "--g", workers=2) == (0.5, "cuda")
    assert gpu_share(None, "auto", [1.0, 0.0], "--g", workers=3) == (0.3333, "cuda")
    assert gpu_share(None, "auto", [4.0, 4.0], "--g", workers=3) == (1.0, "cuda")
    for asked, device, nodes, words in [(2.0, "auto", [1.0, 1.0], "--g 2: no node of this cluster has that many"),
                                        (None, "cuda", [], "needs --g above 0"),
                                        (0.0, "cuda:1", [4.0], "Ray hides the GPUs"),
                                        (1.0, "cpu", [4.0], "a GPU it does not use")]:
        with pytest.raises(EvopruneError, match=words):
            gpu_share(asked, device, nodes, "--g")


def test_a_gpu_share_this_cluster_cannot_give_is_refused_before_any_work(ray_session, tmp_path, capsys):
    for extra, words in [(["--workers", "2", "--gpus-per-run", "1"], "no node of this cluster has that many GPUs"),
                         (["--gpus-per-run", "1"], "give --workers N as well")]:
        rc, _, err = run(capsys, "validate", "expr:w_l1", "--suite", _suite(tmp_path), "--out", tmp_path / "o",
                         "--no-record", *extra)
        assert rc == 2 and words in err and err.count("error:") == 1, err
        assert not (tmp_path / "o").exists()


def test_a_case_may_accept_an_approximate_cut_and_its_label_says_so(tmp_path):
    from evoprune.transfer.suite import configs, load_suite

    suite = load_suite(_suite(tmp_path, text=TINY.format(ratio=0.5) + "approximate_cut = true\n"))
    plan = configs(suite, ["expr:w_l1"])
    assert plan and all(cfg.approximate_cut for _, cfg in plan.values())
    assert suite.cases[0].label.endswith("no-TPP approximate cut")
    plain = configs(load_suite(_suite(tmp_path, text=TINY.format(ratio=0.5))), ["expr:w_l1"])
    assert not any(cfg.approximate_cut for _, cfg in plain.values())
