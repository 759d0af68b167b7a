"""`evoprune prune` end to end: TPP, surgery, retraining, report and database row; resume after
a kill mid-retraining; clear errors; coupled channel groups; two-process DDP on an image folder."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

from evoprune.allocators import uniform
from evoprune.data import iterate, load_dataset
from evoprune.db import queries, store
from evoprune.errors import EvopruneError
from evoprune.models import build_model
from evoprune.primitives.layers import discover, structure
from evoprune.train import accuracy
from evoprune.transfer.prune import PruneConfig, choose_groups
from evoprune.transfer.surgery import channel_groups, surgery, zero_pruned

from helpers import image_folder, run

FAST_TPP = ["--reg-step", "0.05", "--update-every", "2", "--stabilize-iters", "20"]


def cli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evoprune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def test_prune_digits_with_tpp_reports_and_records(searched, cache_dir, tmp_path, capsys):
    src, _ = searched
    db = tmp_path / "copy.db"
    with sqlite3.connect(src) as a, sqlite3.connect(db) as b:
        a.backup(b)  # a private copy: other tests read the original
    l1 = next(r for r in queries.top(store.connect(str(db)), limit=100) if r["baseline"] == "l1")
    out = tmp_path / "out"
    rc, text, err = run(capsys, "prune", "--task", "digits-cnn", "--metric", str(l1["id"]), "--ratio", "0.5",
                        *FAST_TPP, "--epochs", "3", "--out", str(out), "--cache-dir", str(cache_dir),
                        "--db", str(db), "--device", "cpu")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["expression"] == "w_l1" and rep["test_acc"]["pretrained"] > 0.95
    assert rep["layers"] == {"features.0": [16, 32], "features.3": [16, 32], "features.7": [32, 64],
                             "features.10": [32, 64]}
    assert rep["equivalence_max_diff"] < 1e-5
    assert rep["params"][1] < 0.3 * rep["params"][0] and rep["speedup"] > 3
    assert rep["test_acc"]["retrained"] > 0.9  # a quarter of the network relearns digits in 3 epochs
    assert not (out / "checkpoint.pt").exists()
    model = torch.load(out / "pruned_model.pt", weights_only=False)  # the whole model, as Torch-Pruning saves
    ds = load_dataset("digits")
    assert accuracy(model, ds, ds.test) == pytest.approx(rep["test_acc"]["retrained"], abs=1e-9)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 16, 32, 32]
    # recorded as a transfer evaluation of that candidate
    assert rep["recorded"]["candidate"] == l1["id"]
    evals = queries.candidate(store.connect(str(db)), l1["id"])["evaluations"]
    transfer = [e for e in evals if e["stage"] == "transfer"]
    assert len(transfer) == 1 and transfer[0]["accuracy"] == rep["test_acc"]["retrained"]
    assert "retrained" in text and "stored  evaluation" in text
    # the same folder again: refused, and nothing in it changes
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = run(capsys, "prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5",
                     "--out", str(out), "--cache-dir", str(cache_dir))
    assert rc == 2 and "already holds a prune run" in err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def _checkpoint_epoch(path: Path) -> tuple[str, int] | None:
    try:
        c = torch.load(path, weights_only=True)
        return c["phase"], c["epoch"]
    except Exception:  # not there yet, or being replaced
        return None


def test_resume_after_kill_mid_retraining_matches_an_uninterrupted_run(digits_pretrained, cache_dir, tmp_path):
    args = ["prune", "--task", "digits-cnn", "--metric", "baseline:bn_scale", "--ratio", "0.6", *FAST_TPP,
            "--epochs", "30", "--batch-size", "16", "--cache-dir", str(cache_dir), "--device", "cpu",
            "--no-record"]
    env = {"OMP_NUM_THREADS": "1"}
    full = cli(*args, "--out", str(tmp_path / "full"), env=env)
    assert full.wait(timeout=600) == 0, full.stdout.read()
    out = tmp_path / "killed"
    p = cli(*args, "--out", str(out), env=env)
    seen = None
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        seen = _checkpoint_epoch(out / "checkpoint.pt")
        if seen is not None and seen[0] == "retrain" and seen[1] >= 2:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-retraining"
    assert not (out / "report.json").exists()
    config = json.loads((out / "config.json").read_text())  # as a run started before this setting existed
    del config["approximate_cut"]
    (out / "config.json").write_text(json.dumps(config))
    resumed = cli(*args, "--out", str(out), "--resume", env=env)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "tpp " not in log  # TPP and surgery are not redone
    a = torch.load(tmp_path / "full" / "pruned_model.pt", weights_only=False).state_dict()
    b = torch.load(out / "pruned_model.pt", weights_only=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "full", out))
    assert ra["test_acc"] == rb["test_acc"]


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.5", "--flops-reduction", "0.3"], "exactly one of --ratio"),
    ([], "exactly one of --ratio"),
    (["--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["--ratio", "0.5", "--scope", "everything"], "scope must be one of"),
    (["--ratio", "0.5", "--allocator", "flops"], "--flops-reduction goes with --allocator flops"),
    (["--ratio", "0.5", "--reg-step", "0"], "reg_step must be > 0"),
    (["--ratio", "0.5", "--schedule", "linear"], "schedule must be one of"),
    (["--ratio", "0.5", "--metric", "expr:div(w_l1,"], "position"),
    (["--ratio", "0.5", "--metric", "baseline:nope"], "unknown baseline"),
    (["--ratio", "0.5", "--metric", "999", "--db", "{tmp}/none.db"], "no database"),
    (["--ratio", "0.5", "--task", "nope"], "unknown task"),
    (["--ratio", "0.5", "--resume", "--out", "{tmp}/nothing"], "no prune run"),
])
def test_bad_flags_are_one_line(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flag, value in (("--task", "digits-cnn"), ("--metric", "baseline:l1")):
        if flag not in args:
            args += [flag, value]
    rc, _, err = run(capsys, "prune", *args, "--cache-dir", str(tmp_path))
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_flops_target_beyond_reach_is_refused(digits_pretrained, cache_dir, tmp_path, capsys):
    # only the last conv pruned: it holds about a tenth of the MACs
    rc, _, err = run(capsys, "prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--flops-reduction",
                     "0.5", *[x for n in ("0", "3", "7") for x in ("--skip", f"features.{n}")], *FAST_TPP,
                     "--epochs", "1", "--cache-dir", str(cache_dir), "--out", str(tmp_path / "o"))
    said = " ".join(err.split())
    assert rc == 2 and "pruning this 1 layer removes at most" in said, err
    most = float(said.split("removes at most ")[1].split("%")[0])
    ask = int(said.split("not 50%; ask for ")[1].split("%")[0])
    assert most < 50 and ask <= most < ask + 1.1 and "% or less" in said, err  # what can be asked, not the request


def test_coupled_groups_prune_together_on_option_b_and_are_refused_on_option_a(shared_data):
    ds = load_dataset("cifar10", shared_data)
    x, _ = next(iterate(ds, ds.train, batch_size=32))
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, shortcut="B").eval()
    s = structure(model, x[:2])
    cfg = PruneConfig(task="t", metric="m", expression="w_l1", scope="coupled", skip=("layer3.*",))
    groups = choose_groups(model, x[:2], s, cfg)
    tied = [g for g in groups if len(g) > 1]
    assert ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"] in tied
    assert not any(n.startswith("layer3") for g in groups for n in g)  # skipped, and their partners
    # one mask per group, from the group's mean rank; zero then cut: same outputs
    w = {n: m.weight.detach().flatten(1).abs().sum(1) for n, m in model.named_modules() if n in s.macs}
    keys = uniform({g[0]: sum(w[n] for n in g) for g in groups}, 0.5)
    masks = {n: keys[g[0]] for g in groups for n in g}
    zero_pruned(model, masks, s.bn_of)
    with torch.no_grad():
        masked = model(x)
    surgery(model, masks, x[:2], coupled=True)
    with torch.no_grad():
        assert (model(x) - masked).abs().max().item() < 1e-5
    assert model.conv1.out_channels == 8 and model.layer1[0].conv2.out_channels == 8
    with pytest.raises(EvopruneError, match="one mask"):
        bad = dict(masks)
        bad["conv1"] = ~bad["conv1"]
        fresh = build_model("resnet20", 10, 3, shortcut="B").eval()
        surgery(fresh, {k: v for k, v in bad.items() if k in dict(fresh.named_modules())}, x[:2], coupled=True)
    a = build_model("resnet20", 10, 3).eval()  # option A: Torch-Pruning cannot see through the zero-pad
    with pytest.raises(EvopruneError, match="use --scope in-block"):
        choose_groups(a, x[:2], structure(a, x[:2]), replace(cfg, skip=()))
    names = [i.name for i in discover(a, x[:2])]
    assert len(channel_groups(a, x[:2], names)) == 10  # 9 in-block convs + one (wrongly) tied stream


def test_iterate_shards_are_disjoint_and_cover_the_order():
    ds = load_dataset("digits")
    full = torch.cat([y for _, y in iterate(ds, ds.train, batch_size=50, shuffle=True, seed=3)])
    parts = [torch.cat([y for _, y in iterate(ds, ds.train, batch_size=25, shuffle=True, seed=3, shard=(r, 2))])
             for r in range(2)]
    n = len(full) - len(full) % 2
    assert len(parts[0]) == len(parts[1]) == n // 2
    assert torch.equal(torch.stack(parts, 1).flatten(), full[:n])


def test_two_process_ddp_on_an_image_folder(shared_data, tmp_path):
    folder = image_folder(tmp_path / "images", shared_data)
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[tiny-folder]\ndataset = "imagefolder:{folder}?size=32"\nmodel = "resnet18"\n'
                     'recipe = { epochs = 1, batch_size = 16, lr = 0.05 }\n')
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "evoprune", "prune", "--task", "tiny-folder", "--tasks-file", str(tasks),
                        "--metric", "baseline:l1", "--ratio", "0.5", "--reg-step", "0.1", "--update-every", "1",
                        "--stabilize-iters", "4", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-record"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("retrained") == 1  # one process reports
    rep = json.loads((out / "report.json").read_text())
    assert rep["processes"] == 2 and rep["equivalence_max_diff"] < 1e-4
    model = torch.load(out / "pruned_model.pt", weights_only=False)
    assert model.layer1[0].conv1.out_channels == 32 and model.layer4[1].conv1.out_channels == 256
    # retraining that diverges stops both processes with the one line (none is left waiting on the other)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "evoprune", "prune", "--task", "tiny-folder", "--tasks-file", str(tasks),
                        "--metric", "baseline:l1", "--ratio", "0.5", "--no-tpp", "--lr", "1e9", "--epochs", "1",
                        "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "hot"),
                        "--cache-dir", str(tmp_path / "cache"), "--no-record"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "retraining the pruned model diverged" in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "hot" / "pruned_model.pt").exists()


class _Stop(Exception):
    pass


def test_resume_mid_tpp_continues_the_regularization(digits_pretrained, cache_dir, tmp_path, monkeypatch):
    import evoprune.transfer.prune as P
    from evoprune.tasks import Recipe
    from evoprune.transfer.tpp import TPPConfig, TPPRegularizer

    cfg = PruneConfig(task="digits-cnn", metric="baseline:l1", expression="w_l1", ratio=0.5,
                      tpp=TPPConfig(reg_step=0.05, update_every=2, stabilize_iters=20),
                      retrain=Recipe(epochs=2, lr=0.01, schedule="step"))
    kw = dict(cache_dir=cache_dir, device="cpu", record=False, show_progress=False)
    monkeypatch.setattr(P, "TPP_SAVE_EVERY_S", 0.0)  # a checkpoint after every pass
    full = P.prune(cfg, out=tmp_path / "full", **kw)
    step = TPPRegularizer.step

    def stop_at_35(self):
        step(self)
        if self.iteration == 35:
            raise _Stop

    monkeypatch.setattr(TPPRegularizer, "step", stop_at_35)
    with pytest.raises(_Stop):
        P.prune(cfg, out=tmp_path / "cut", **kw)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["phase"] == "tpp" and 0 < saved["iteration"] < 35
    monkeypatch.setattr(TPPRegularizer, "step", step)
    resumed = P.prune(cfg, out=tmp_path / "cut", resume=True, **kw)
    assert resumed["test_acc"] == full["test_acc"]
    a = torch.load(tmp_path / "full" / "pruned_model.pt", weights_only=False).state_dict()
    b = torch.load(tmp_path / "cut" / "pruned_model.pt", weights_only=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_digits_defaults_fit_the_task_and_tpp_still_zeroes_the_pruned_filters(digits_pretrained, cache_dir,
                                                                                tmp_path, capsys):
    """The task's own transfer recipe (not TPP's 101,000 CIFAR iterations): TPP drives the pruned
    filters to ~0, so surgery costs no accuracy."""
    out = tmp_path / "defaults"
    rc, text, err = run(capsys, "prune", "--task", "digits-cnn", "--metric", "baseline:l1", "--ratio", "0.5",
                        "--epochs", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu",
                        "--no-record")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["tpp"]["reg_step"] == 0.002 and rep["config"]["retrain"]["epochs"] == 1
    assert rep["schedule"].startswith("TPP 1000 iterations") and "schedule TPP 1000 iterations" in text
    norms = rep["tpp_norms"]
    assert norms["pruned"] < 1e-3 * norms["kept"] and norms["pruned_bn"] < 1e-3, norms
    acc = rep["test_acc"]
    assert acc["pruned"] >= acc["pretrained"] - 0.01, acc


def _prune_on_image_folder(model: str, shared_data, tmp_path, capsys, *args, epochs: int = 1,
                           target: tuple[str, ...] = ("--ratio", "0.5")):
    """`evoprune prune` (L1, half the filters unless `target` says otherwise, no TPP, one epoch) of
    `model` pretrained for `epochs` on a 32x32 image folder of 3 CIFAR-10 classes: (rc, stdout,
    stderr, output folder)."""
    folder = image_folder(tmp_path / "images", shared_data, classes=3, train=16, val=6)
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[t]\ndataset = "imagefolder:{folder}?size=32"\nmodel = "{model}"\n'
                     f'recipe = {{ epochs = {epochs}, batch_size = 16, lr = 0.05 }}\n')
    out = tmp_path / "out"
    rc, text, err = run(capsys, "prune", "--task", "t", "--tasks-file", str(tasks), "--metric", "baseline:l1",
                        *target, "--no-tpp", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-record", *args)
    return rc, text, err, out


def test_a_group_norm_over_pruned_channels_is_named_in_the_refusal_and_skip_keeps_its_writers_whole(
        shared_data, tmp_path, capsys):
    """A GroupNorm over a concatenation of two pruned convs: its groups would lose channels unevenly
    (and their statistics change), which is refused in one line that names the GroupNorm and
    `--skip`; skipping its writers prunes the rest exactly."""
    model = "import:user_nets:group_norm_over_branches"
    rc, text, err, out = _prune_on_image_folder(model, shared_data, tmp_path, capsys)
    assert rc == 2 and "the GroupNorm gn reads the channels of a with others (a concatenation)" in err \
        and "--skip GLOB" in err and "Traceback" not in err, err
    rc, text, err, out = _prune_on_image_folder(model, shared_data, tmp_path / "skip", capsys, "--skip", "a",
                                                "--skip", "b")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["layers"]) == ["c", "d"] and rep["equivalence_max_diff"] < 1e-5 and rep["exact_cut"]
    # nor can an approximate cut: the GroupNorm's groups cannot be kept equal across the two convs it reads
    rc, text, err, out = _prune_on_image_folder(model, shared_data, tmp_path / "approx", capsys, "--approximate-cut")
    assert rc == 2 and "the GroupNorm gn reads the channels of a with others (a concatenation)" in err, err


def test_a_group_norm_network_is_cut_only_approximately_and_with_its_groups_kept_equal(shared_data, tmp_path, capsys):
    """A ResNet with a GroupNorm (4 groups) after every conv: no cut is its masked self, so it is
    refused unless `--approximate-cut`, which prunes each group alike (the GroupNorms keep their 4
    groups, of 2 channels fewer each), reports how far the cut model's outputs moved and retrains."""
    model = "import:user_nets:gn_resnet"
    rc, text, err, out = _prune_on_image_folder(model, shared_data, tmp_path, capsys)
    assert rc == 2 and "blocks.0.gn1" in err and "--approximate-cut" in err, err
    rc, text, err, out = _prune_on_image_folder(model, shared_data, tmp_path / "approx", capsys, "--approximate-cut")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["exact_cut"] is False and rep["equivalence_max_diff"] > 1e-4
    assert "an approximate cut (--approximate-cut)" in text + err and "after an approximate cut" in text
    assert rep["layers"] == {"blocks.0.conv1": [8, 16], "blocks.1.conv1": [8, 16]}
    pruned = torch.load(out / "pruned_model.pt", weights_only=False)
    assert [(m.num_groups, m.num_channels) for m in (pruned.blocks[0].gn1, pruned.blocks[1].gn1)] == [(4, 8), (4, 8)]
    for block in pruned.blocks:  # aligned: each group of 4 channels kept the same 2 positions
        assert block.conv2.in_channels == 8



def test_a_cut_that_is_not_the_masked_model_is_refused_before_tpp_trains(shared_data, tmp_path, capsys, monkeypatch):
    """TPP runs for hours before surgery: the cut is checked on a copy first, so a model it would
    refuse after TPP is refused before TPP starts."""
    import evoprune.transfer.prune as prune_mod

    monkeypatch.setattr(prune_mod, "regularize", lambda *a: pytest.fail("TPP started"))
    rc, text, err, out = _prune_on_image_folder("import:user_nets:gn_resnet", shared_data, tmp_path, capsys, "--tpp")
    assert rc == 2 and err.startswith("error: surgery before TPP changed the model's outputs") \
        and "(stem.1, blocks.0.gn1" in err, err


@pytest.mark.parametrize("args", [(), ("--allocator", "global")])
def test_mobilenet_v2_is_cut_exactly(args, shared_data, tmp_path, capsys):
    """MobileNetV2: a pruned expand channel goes through a depthwise conv, which surgery cuts with
    it. The masked model zeroes that depthwise channel and its BN too (else the BN's shift reaches
    the projection conv as a constant, and the cut model computes something else), so the cut
    model computes what the masked one does without re-estimating any statistics."""
    rc, text, err, out = _prune_on_image_folder("mobilenet_v2", shared_data, tmp_path, capsys, *args, epochs=2)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["bn_recalibrated"] is False and rep["equivalence_max_diff"] < 1e-4
    assert rep["macs_kept"] < 0.7


def test_a_constant_a_pruned_channel_leaves_is_checked_with_bn_statistics_re_estimated(shared_data, tmp_path,
                                                                                       capsys, monkeypatch):
    """The safety net under that: were a pruned channel to reach later layers as a constant (here:
    the depthwise convs left unmasked on purpose), the eval-mode check fails on the pretrained
    statistics and passes once both models' are re-estimated on the same images, compared in
    float64 (in float32 the next BN's cancellation of the constant loses digits); the cut model
    keeps them, and the report says so."""
    from evoprune.primitives.layers import Structure

    monkeypatch.setattr(Structure, "with_followers", lambda self, masks: masks)
    rc, text, err, out = _prune_on_image_folder("mobilenet_v2", shared_data, tmp_path, capsys, epochs=2)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["bn_recalibrated"] is True and rep["equivalence_max_diff"] < 1e-8
    assert "BN statistics are re-estimated" in err + text


def test_efficientnet_is_cut_with_its_squeeze_excitation_and_meets_a_flops_target(shared_data, tmp_path, capsys):
    """EfficientNet-B0, coupled: an expand conv's channels run through a depthwise conv into a
    squeeze-excitation block and, multiplied by its gate, into the projection conv. With the
    depthwise channel left unmasked its BN shift fed the squeeze layer, the check failed (max diff
    0.5 to 8) and the model was refused; and the FLOPs target counts the depthwise convs and the
    projection convs' inputs, so 40% fewer MACs asked is about 40% removed (it was 44%; 82% on
    MobileNetV2)."""
    rc, text, err, out = _prune_on_image_folder("torchvision:efficientnet_b0", shared_data, tmp_path, capsys,
                                                "--scope", "coupled", "--allocator", "flops",
                                                target=("--flops-reduction", "0.4"))
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["bn_recalibrated"] is False  # the first check passed (relative to this model's large outputs)
    assert 0.56 < rep["macs_kept"] <= 0.62, rep["macs_kept"]  # the whole model's, stem and classifier included


@pytest.mark.parametrize("arch,args,expect", [
    ("mobilenet_v3_small", (), "cut"),  # squeeze-excitation blocks, hardswish
    ("regnet_x_400mf", (), "cut"),  # grouped convs: cut in aligned positions, with the layers feeding them
    ("googlenet", (), "cut"),  # Inception branches: their last convs write slices of a concatenation
    ("densenet121", (), "cut"),  # every layer's output is concatenated, then normalized with the others
    ("shufflenet_v2_x0_5", (), "Torch-Pruning cannot trace"),  # channel shuffle
    ("vit_b_16", (), "cannot run on"),  # needs 224x224 images
    ("efficientnet_b99", (), "unknown torchvision classification model 'efficientnet_b99'"),
])
def test_any_torchvision_model_by_name_is_cut_or_refused_in_one_line(arch, args, expect, shared_data, tmp_path,
                                                                      capsys):
    rc, text, err, out = _prune_on_image_folder(f"torchvision:{arch}", shared_data, tmp_path, capsys, *args)
    if expect != "cut":
        assert rc == 2 and expect in err and "Traceback" not in err, err
        return
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    # float32 rounding relative to the outputs' size (a briefly trained RegNet's logits reach 1e4)
    assert rep["macs_kept"] < 0.8 and rep["equivalence_max_diff"] < 1e-5 * max(1, rep["equivalence_output_scale"])
    if arch in ("googlenet", "densenet121"):  # masked = cut as they are: DenseNet's BNs over the
        assert rep["bn_recalibrated"] is False  # concatenations zero the pruned channels too
    if arch.startswith("regnet"):  # the grouped convs keep their groups, with half the channels in each

        def grouped(model):
            return {n: (m.groups, m.in_channels, m.out_channels) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Conv2d) and 1 < m.groups != m.in_channels}

        before = grouped(torchvision.models.get_model(arch, num_classes=3))
        after = grouped(torch.load(out / "pruned_model.pt", weights_only=False))
        assert before and after.keys() == before.keys()
        assert all(after[n] == (g, i // 2, o // 2) for n, (g, i, o) in before.items()), (before, after)
