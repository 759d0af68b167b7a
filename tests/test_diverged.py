"""Training that diverges (a learning rate or a regularization too large) stops with one line
and keeps nothing it produced: no cached model, no cut, no checkpoint, no result; a network
whose outputs are not finite scores 0, never nan."""
from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from evoprune.errors import Diverged
from evoprune.pretrain import pretrained
from evoprune.tasks import get_task
from evoprune.train import classified_right, true_class_prob

from helpers import run

HOT = """
[digits-hot]
dataset = "digits"
model = "cnn"
recipe = {{ epochs = 3, batch_size = 64, lr = {lr} }}
"""


def _tasks(tmp_path, lr: float):
    path = tmp_path / f"tasks-{lr:g}.toml"
    path.write_text(HOT.format(lr=lr))
    return path


def _said(capsys) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_pretraining_that_diverges_is_one_line_and_caches_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    rc, _, err = run(capsys, "pretrain", "digits-hot", "--tasks-file", str(_tasks(tmp_path, 1e4)),
                     "--cache-dir", str(cache), "--device", "cpu")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "pretraining digits-hot diverged: the training loss is nan" in lines[0]
    assert "lower `lr` in the task's recipe" in lines[0]
    assert not list(cache.glob("*.pt"))  # the folder may exist (made before training), a model may not


def test_a_cached_model_holding_nan_is_trained_again_and_a_weak_one_is_flagged(tmp_path, capsys):
    tasks, cache = _tasks(tmp_path, 3.0), tmp_path / "cache"
    pre = pretrained(get_task("digits-hot", tasks), cache_dir=cache, device="cpu")
    # lr 3 trains without diverging but to near chance: kept, and said so
    assert not pre.cached and pre.meta["test_acc"] < 0.2
    assert "is near chance (10.0% for 10 classes)" in _said(capsys)
    # a cache entry with nan in its weights (an older evoprune cached a diverged pretraining) but
    # an intact sha256: not used, trained again
    state = torch.load(pre.path, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = math.nan
    torch.save(state, pre.path)
    meta_path = pre.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(pre.path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    again = pretrained(get_task("digits-hot", tasks), cache_dir=cache, device="cpu")
    assert not again.cached and f"holds inf or nan in {name}" in _said(capsys)
    assert all(t.isfinite().all() for t in again.model.state_dict().values() if t.is_floating_point())
    # loaded from the cache (by a later command: a new process), the weak model is flagged again, once
    import evoprune.pretrain as pretrain_module

    pretrain_module._WARNED.clear()
    for _ in range(2):
        assert pretrained(get_task("digits-hot", tasks), cache_dir=cache, device="cpu").cached
    assert _said(capsys).count("is near chance") == 1


@pytest.mark.parametrize("args, message", [
    (["--tpp-lr", "1000", "--reg-step", "0.05", "--update-every", "1", "--stabilize-iters", "20"],
     "TPP diverged: the loss is nan at iteration"),
    (["--no-tpp", "--lr", "1e9", "--epochs", "2"], "retraining the pruned model diverged: the training loss is nan"),
])
def test_prune_that_diverges_stops_with_one_line_and_no_model(args, message, digits_pretrained, cache_dir, tmp_path,
                                                                capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5", *args,
                     "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu", "--no-record")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert "start again with another --out" in lines[0]
    assert not (out / "pruned_model.pt").exists() and not (out / "report.json").exists()
    if (out / "checkpoint.pt").exists():  # what is kept was saved before the divergence
        ck = torch.load(out / "checkpoint.pt", weights_only=False)
        assert all(t.isfinite().all() for t in ck["model"].values() if t.is_floating_point())


def test_non_finite_logits_are_wrong_with_probability_zero():
    nan, inf = math.nan, math.inf
    out = torch.tensor([[1.0, 2.0, 0.0], [nan, 0.0, 0.0], [inf, 0.0, 0.0], [0.0, 0.0, 9.0]])
    y = torch.tensor([1, 0, 0, 2])
    assert classified_right(out, y).tolist() == [True, False, False, True]
    p = true_class_prob(out, y)
    assert p[1] == 0 and p[2] == 0 and p[0] == pytest.approx(math.exp(2) / (math.exp(1) + math.exp(2) + 1))
    # the batched proxy's [K, N, classes] logits, per candidate
    stacked = torch.stack([out, out.nan_to_num(0.0, 0.0, 0.0)])
    assert classified_right(stacked, y).sum(1).tolist() == [2, 4]  # a finite row of zeros: argmax is class 0
    assert true_class_prob(stacked, y).isfinite().all()


def test_diverged_keeps_what_and_advice_across_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(Diverged("TPP diverged: the loss is nan", "lower --tpp-lr")))
    assert (e.what, e.advice, str(e)) == ("TPP diverged: the loss is nan", "lower --tpp-lr",
                                          "TPP diverged: the loss is nan; lower --tpp-lr")


def test_a_suite_run_that_diverges_is_advised_in_the_suites_terms(digits_pretrained, cache_dir, tmp_path, capsys):
    suite = tmp_path / "suite.toml"
    suite.write_text('name = "hot"\nseeds = 1\nbaselines = ["l1"]\n[defaults]\ntpp = false\n'
                     'retrain = { epochs = 1, lr = 1e9 }\n[[case]]\ntask = "digits-cnn"\nratio = 0.5\n')
    rc, _, err = run(capsys, "validate", "expr:w_l2", "--suite", suite, "--out", tmp_path / "o", "--cache-dir",
                     cache_dir, "--device", "cpu", "--no-record")
    said = " ".join(err.split())
    assert rc == 2 and "suite case 1 (digits-cnn" in said and "retraining the pruned model diverged" in said, err
    assert "in the suite file" in said and "--lr" not in said
    assert not (tmp_path / "o" / "results.jsonl").exists() or not (tmp_path / "o" / "results.jsonl").read_text()


LEAKY = """
from torch import nn


def net(num_classes, in_channels=1):  # no BN: SGD at a large lr drives it to inf
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, num_classes))
"""


def test_a_search_whose_proxy_diverges_says_so_and_stores_it(tmp_path, monkeypatch, capsys):
    """A `[proxy] lr` too large for a network without BN: the fine-tunes end with non-finite
    outputs (scored as wrong) and near chance; the search says both after generation 0 and in its
    summary, and the database marks the diverged evaluations."""
    import sqlite3

    (tmp_path / "leaky_nets.py").write_text(LEAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    tasks = tmp_path / "tasks.toml"
    tasks.write_text('[digits-leaky]\ndataset = "digits"\nmodel = "import:leaky_nets:net"\n'
                     'recipe = { epochs = 30, lr = 0.1 }\n')
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[search]\npopulation = 6\ngenerations = 1\nseeds = ["l1", "fpgm"]\nvalidation_orders = 0\n'
                   f'[proxy]\ntasks = ["digits-leaky"]\nlr = 10\n'
                   f'[run]\ntasks_file = "{tasks}"\ncache_dir = "{tmp_path / "c"}"\n')
    db = tmp_path / "e.db"
    rc, out, err = run(capsys, "evolve", "--config", cfg, "--db", db, "--device", "cpu")
    said = " ".join((out + err).split())
    assert rc == 0, err
    assert said.count("every network the full proxy scored ends near chance accuracy on val: digits-leaky") == 2
    assert "before pruning" in said and "[proxy] lr 10" in said
    n = int(said.split(" proxy runs of ")[0].rsplit("warning: ", 1)[1])
    assert n >= 1 and "diverged (outputs not finite on val" in said
    with sqlite3.connect(db) as c:
        (cid, stored), = c.execute("SELECT candidate_id, count(*) FROM evaluations WHERE diverged LIMIT 1")
    assert stored >= 1
    rc, out, _ = run(capsys, "metrics", "show", str(cid), "--db", db, "--json")
    assert rc == 0 and any(e["diverged"] for e in json.loads(out)["evaluations"])


def test_proxy_warnings_name_the_tasks_near_chance_and_spare_a_weak_pretrained_model():
    from evoprune.evolve.config import Config
    from evoprune.evolve.service import Floor, proxy_warnings
    from evoprune.records import FitnessRecord, TaskResult

    cfg = Config.from_dict({"proxy": {"tasks": ["a", "b"], "allocator": "flops", "flops_reduction": 0.6}})

    def rec(a, b, stage="full"):
        return FitnessRecord("w_l1", stage, 0.1, True, "", {"a": TaskResult(a, 0.5, 0.5, 0.1, "m"),
                                                             "b": TaskResult(b, 0.5, 0.5, 0.1, "m")})

    floors = {"a": Floor(10, 0.95), "b": Floor(100, 0.7)}
    assert proxy_warnings([rec(0.15, 0.5), rec(0.9, 0.1)], floors, 0, 2, cfg) == []  # each task has a good one
    (w,) = proxy_warnings([rec(0.15, 0.5), rec(0.19, 0.1), rec(0.9, 0.1, "screen")], floors, 0, 3, cfg)
    assert "a at best 19.0% (chance 10.0%, 95.0% before pruning)" in w and "b at" not in w
    assert "flops_reduction 0.6" in w  # the allocator's own target, not the unused ratio
    # a pretrained model itself near chance was warned of when loaded: not blamed on the proxy
    assert proxy_warnings([rec(0.15, 0.5)], {"a": Floor(10, 0.12), "b": Floor(100, 0.7)}, 0, 1, cfg) == []
    (w,) = proxy_warnings([rec(0.9, 0.5)], floors, 3, 10, cfg)
    assert w.startswith("3 proxy runs of 10 diverged") and "lower [proxy] lr (0.01)" in w


def test_proxy_check_warns_of_a_proxy_that_leaves_every_network_near_chance(digits_pretrained, cache_dir, tmp_path,
                                                                            capsys):
    cfg = tmp_path / "hot.toml"
    cfg.write_text('[proxy]\ntasks = ["digits-cnn"]\nlr = 5\n')
    args = ["proxy", "check", "--config", cfg, "--cache-dir", cache_dir, "--device", "cpu", "--orders", "2",
            "--random", "0", "--reference-seeds", "1", "--reference-factor", "2", "--plot", tmp_path / "p.png"]
    rc, out, err = run(capsys, *args)
    said = " ".join(out.split())
    assert rc == 0, err
    assert "warning: every network the full proxy scored ends near chance accuracy on val: digits-cnn at best" in said
    assert re.search(r"\(chance 10\.0%, (9\d|100)\.\d% before pruning\)", said), said
    assert "[proxy] lr 5," in said and "proxy check` measures" not in said  # said within the check itself
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0 and "near chance" in json.loads(out)["warnings"][0]
