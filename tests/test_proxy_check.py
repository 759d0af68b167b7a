"""`evoprune proxy check` on digits: finite figures, a verdict, JSON and a plot."""
from __future__ import annotations

import json
import math

import pytest

from evoprune.evolve.config import Config, SearchConfig
from evoprune.evolve.proxy_check import bootstrap_tau, kendall_tau, metric_set
from evoprune.primitives.expr import parse

from helpers import run

SMALL = """
[proxy]
tasks = ["digits-cnn"]
finetune_steps = 3
recalibrate_images = 128
stat_images = 128
"""


def test_proxy_check_on_digits(digits_pretrained, cache_dir, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL)
    rc, out, err = run(capsys, "proxy", "check", "--config", cfg, "--random", "2", "--reference-seeds", "2",
                       "--cache-dir", cache_dir, "--device", "cpu", "--json", "--plot", tmp_path / "p.png")
    assert rc == 0, err
    res = json.loads(out)
    assert len(res["metrics"]) >= 12 and res["orders"] == 5 and res["reference_steps"] == 30
    assert sum(not m["baseline"] for m in res["metrics"]) >= 2
    for m in res["metrics"]:
        assert len(m["fitness"]) == 5 and len(m["reference"]) == 2
        assert all(0 < f <= 1 for f in m["fitness"] + m["reference"])  # every metric ranks the filters
        assert len(m["accuracy"]) == 5 and all(0 < a <= 1 for a in m["accuracy"] + m["reference_accuracy"])
    for key in ("noise", "spread", "gap", "tau"):
        assert math.isfinite(res[key]), key
    lo, hi = res["tau_ci"]
    assert -1 <= lo <= res["tau"] + 1e-9 and res["tau"] - 1e-9 <= hi <= 1
    acc = res["by_accuracy"]  # the same fine-tunes scored as the first default did
    assert math.isfinite(acc["noise"]) and acc["gap"] >= 0 and -1 <= acc["tau"] <= 1
    assert res["verdict"].startswith(("The proxy tells", "The proxy's noise", "The seeded baselines"))
    assert "Kendall tau" in res["verdict"] and (tmp_path / "p.png").stat().st_size > 10_000


def test_kendall_tau_and_its_interval():
    a = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert kendall_tau(a, a) == pytest.approx(1.0) and kendall_tau(a, a[::-1]) == pytest.approx(-1.0)
    lo, hi = bootstrap_tau(a, [0.1, 0.3, 0.2, 0.4, 0.6, 0.5])
    assert -1 <= lo < hi <= 1


def test_a_users_seed_formula_is_ranked_beside_the_baselines():
    cfg = Config(search=SearchConfig(seeds=("l1", "expr:w_l1 / bn_gamma", "bn_scale")))
    got = metric_set(cfg, n_random=0, seed=0, valid=lambda node: True)
    assert got[:3] == [("l1", "w_l1", True), ("expr:w_l1 / bn_gamma", "div(w_l1, bn_gamma)", False),
                       ("bn_scale", "bn_abs_gamma", True)]
    assert len(got) >= 12  # random formulas make up the rest


def test_a_seeded_metric_that_cannot_rank_every_task_is_left_out():
    """BN scale on a network without BN scored 0 by proxy and reference alike: a tie at the
    bottom that raised tau and lowered the median baseline. It is left out, and said."""
    cfg = Config(search=SearchConfig(seeds=("l1", "bn_scale", "fpgm")))
    left: list[str] = []
    got = metric_set(cfg, n_random=0, seed=0, valid=lambda node: "bn_abs_gamma" not in node.stats(), left_out=left)
    assert [g[0] for g in got[:2]] == ["l1", "fpgm"] and left == ["bn_scale"]
    assert len(got) >= 12 and all("bn_abs_gamma" not in parse(e).stats() for _, e, _ in got)


def test_fewer_than_five_orders_are_read_as_rough():
    """`--orders` says 5 or more for a verdict: with fewer the verdict says its noise is rough."""
    from evoprune.evolve.proxy_check import ProxyCheck, verdict

    c = ProxyCheck(tasks=["t"], orders=3, finetune_steps=15, reference_steps=150, reference_seeds=3, metrics=[],
                   noise=0.001, spread=0.05, gap=0.05, tau=0.8, tau_ci=(0.5, 1.0), seconds=1.0)
    assert verdict(c).startswith("The proxy tells metrics apart") and "3 data orders are too few" in verdict(c)
    assert "too few" not in verdict(ProxyCheck(**{**c.__dict__, "orders": 5}))


def test_the_check_on_ray_workers_gives_the_figures_of_this_process(ray_session, digits_pretrained, cache_dir,
                                                                     tmp_path, capsys):
    """[run] workers used to be ignored by the check (the CIFAR config's took 66 minutes in one
    process): it now runs on Ray workers as the search does, each data order named by its jobs,
    and gives the same figures (one torch thread here, as the actors use)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL + "[run]\nthreads = 1\n")
    got = {}
    for workers in ("0", "2"):
        rc, out, err = run(capsys, "proxy", "check", "--config", cfg, "--orders", "2", "--random", "1",
                           "--reference-seeds", "1", "--reference-factor", "2", "--cache-dir", cache_dir,
                           "--device", "cpu", "--json", "--plot", tmp_path / "p.png", "--workers", workers)
        assert rc == 0, err
        got[workers] = {m["name"]: (m["fitness"], m["reference"]) for m in json.loads(out)["metrics"]}
    assert got["2"] == got["0"] and len(got["0"]) >= 12
