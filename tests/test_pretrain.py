"""The pretraining cache: hit, miss, corruption; the digits task's accuracy."""
from __future__ import annotations

import json
import time

import pytest
import torch

from evoprune.errors import EvopruneError
from evoprune.pretrain import pretrained
from evoprune.tasks import Task, get_task, read_tasks_file

SHORT = """
[digits-short]
dataset = "digits"
model = "cnn"
model_args = { widths = [8, 8, 16, 16] }
recipe = { epochs = 2, batch_size = 128, lr = 0.05 }
"""


@pytest.fixture
def short_task(tmp_path) -> Task:
    f = tmp_path / "tasks.toml"
    f.write_text(SHORT)
    return read_tasks_file(f)["digits-short"]


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_digits_cnn_reaches_95_percent(digits_pretrained):
    assert digits_pretrained.meta["test_acc"] >= 0.95
    assert digits_pretrained.meta["val_acc"] >= 0.95


def test_cache_miss_then_hit(short_task, tmp_path):
    first = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    assert not first.cached and first.path.exists()
    t0 = time.perf_counter()
    second = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    assert second.cached and time.perf_counter() - t0 < 5
    assert _same_weights(first.model, second.model)
    assert second.meta["test_acc"] == first.meta["test_acc"]


def test_another_recipe_is_another_cache_entry(short_task, tmp_path):
    from dataclasses import replace

    a = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    b = pretrained(replace(short_task, recipe=replace(short_task.recipe, seed=1)), cache_dir=tmp_path, device="cpu")
    assert a.path != b.path and not b.cached


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "bad-meta"])
def test_corrupt_cache_is_detected_and_rebuilt(short_task, tmp_path, damage, capsys):
    first = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    pt, meta = first.path, first.path.with_suffix(".json")
    raw = bytearray(pt.read_bytes())
    if damage == "flip-bytes":
        raw[len(raw) // 2] ^= 0xFF
        pt.write_bytes(bytes(raw))
    elif damage == "truncate":
        pt.write_bytes(bytes(raw[:100]))
    else:
        meta.write_text("{ not json")
    again = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    assert not again.cached
    assert "cache file corrupt" in capsys.readouterr().err
    assert _same_weights(first.model, again.model)  # same recipe and seed: the same model
    assert json.loads(meta.read_text())["sha256"]
    assert pretrained(short_task, cache_dir=tmp_path, device="cpu").cached


@pytest.mark.parametrize("damage", ["meta-list", "meta-null", "pt-folder", "meta-folder"])
def test_cache_entries_of_the_wrong_kind_are_rebuilt(short_task, tmp_path, damage, capsys):
    first = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    pt, meta = first.path, first.path.with_suffix(".json")
    if damage in ("meta-list", "meta-null"):
        meta.write_text("[]" if damage == "meta-list" else "null")
    else:
        victim = pt if damage == "pt-folder" else meta
        victim.unlink()
        (victim / "inside").mkdir(parents=True)  # a folder where a file belongs: moved aside, not deleted
    again = pretrained(short_task, cache_dir=tmp_path, device="cpu")
    assert not again.cached and "cache file corrupt" in capsys.readouterr().err
    assert _same_weights(first.model, again.model) and pt.is_file() and meta.is_file()
    if damage.endswith("folder"):
        assert [p.name for p in tmp_path.glob("*.broken-*/inside")] == ["inside"]
    assert pretrained(short_task, cache_dir=tmp_path, device="cpu").cached


def test_bad_tasks_files(tmp_path):
    f = tmp_path / "t.toml"
    for text, msg in [("[x]\ndataset='digits'\nmodel='cnn'\nrecipe={epochs=-1}", "epochs must be >= 0"),
                      ("[x]\ndataset='digits'\nmodel='nope'", "unknown model"),
                      ("[x]\ndataset='digits'\nmodel='cnn'\nrecipe={lr_max=1}", "unknown recipe keys"),
                      ("[x\n", "not valid TOML"),
                      ("[x]\nmodel='cnn'", "'dataset'")]:
        f.write_text(text)
        with pytest.raises(EvopruneError, match=msg):
            read_tasks_file(f)


def test_builtin_tasks_are_valid():
    t = get_task("cifar10-resnet20")
    assert t.dataset == "cifar10" and t.model == "resnet20" and t.recipe.epochs > 0


def test_transfer_recipes_in_a_tasks_file(tmp_path):
    f = tmp_path / "t.toml"
    base = "[x]\ndataset='digits'\nmodel='cnn'\n"
    f.write_text(base + "transfer = { tpp = { reg_step = 0.01, update_every = 2 }, retrain = { epochs = 7 } }\n")
    t = read_tasks_file(f)["x"]
    tpp = t.transfer.tpp_config()
    assert (tpp.reg_step, tpp.update_every, tpp.stabilize_iters) == (0.01, 2, 1000)  # the rest: TPP's CIFAR
    assert (t.transfer.retrain.epochs, t.transfer.retrain.lr, t.transfer.retrain.schedule) == (7, 0.01, "step")
    assert get_task("cifar10-resnet20").transfer.tpp_config().total_iterations == 101_000  # the paper's
    for text, msg in [("transfer = { tpp = { reg_stp = 1 } }", "unknown transfer.tpp keys"),
                      ("transfer = { retrain = { epochs = -1 } }", "transfer.retrain: epochs must be >= 0"),
                      ("transfer = { tpp = { reg_step = 0 } }", "reg_step must be > 0"),
                      ("transfer = { foo = 1 }", "unknown transfer keys"),
                      ("transfer = 3", "transfer must be a table")]:
        f.write_text(base + text + "\n")
        with pytest.raises(EvopruneError, match=msg):
            read_tasks_file(f)
