"""The command line, run as a user runs it: exit codes and one-line errors."""
from __future__ import annotations

import subprocess
import sys

from helpers import run


def test_version_and_listings(capsys):
    rc, out, _ = run(capsys, "version")
    assert rc == 0 and "evoprune 0.1.0" in out and "torch" in out
    for args, word in [(("models", "list"), "resnet56"), (("tasks", "list"), "digits-cnn"),
                       (("data", "list"), "cifar10")]:
        rc, out, _ = run(capsys, *args)
        assert rc == 0 and word in out


def test_every_command_has_help(capsys):
    for args in [(), ("data",), ("data", "check"), ("data", "list"), ("models", "list"), ("tasks", "list"),
                 ("pretrain",), ("evolve",), ("prune",), ("version",)]:
        rc, out, _ = run(capsys, *args, "--help")
        assert rc == 0 and "Usage:" in out, args


def test_data_check_reports_splits(capsys, shared_data):
    rc, out, _ = run(capsys, "data", "check", "cifar10", "--data-root", str(shared_data))
    assert rc == 0 and str(shared_data / "cifar-10-batches-py") in out and "test 1017" in out


def test_missing_data_set_is_one_clear_line(capsys, tmp_path):
    rc, _, err = run(capsys, "data", "check", "mnist", "--data-root", str(tmp_path))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: mnist: no IDX files at " + str(tmp_path))
    assert "Traceback" not in err


def test_unknown_task_and_bad_usage(capsys):
    rc, _, err = run(capsys, "pretrain", "cifar11-resnet20")
    assert rc == 2 and err.startswith("error: unknown task 'cifar11-resnet20'") and err.count("\n") == 1
    rc, _, err = run(capsys, "pretrain", "digits-cnn", "--epochs", "3")
    assert rc == 2 and "No such option: --epochs" in err
    rc, _, err = run(capsys, "pretrain")
    assert rc == 2 and "Missing argument" in err


def test_pretrain_from_a_tasks_file(capsys, tmp_path):
    tasks = tmp_path / "tasks.toml"
    tasks.write_text('[tiny]\ndataset = "digits"\nmodel = "cnn"\nrecipe = { epochs = 1 }\n')
    args = ("pretrain", "tiny", "--tasks-file", str(tasks), "--cache-dir", str(tmp_path / "c"), "--device", "cpu")
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and "trained in" in out
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and "loaded from cache" in out
    config = tmp_path / "search.toml"  # a search on the file's task, as `evoprune evolve --tasks-file` runs it
    config.write_text('[search]\npopulation = 4\ngenerations = 1\n\n[proxy]\ntasks = ["tiny"]\nfinetune_steps = 2\n')
    common = ("--tasks-file", str(tasks), "--cache-dir", str(tmp_path / "c"), "--db", str(tmp_path / "e.db"))
    rc, out, err = run(capsys, "evolve", "--config", str(config), "--workers", "0", *common)
    assert rc == 0 and "top formulas" in out, err
    rc, _, err = run(capsys, "evolve", "--config", str(config), "--tasks-file", str(tmp_path / "none.toml"),
                     "--db", str(tmp_path / "e.db"))
    assert rc == 2 and err.startswith("error:") and "none.toml" in err and err.count("\n") == 1


def test_installed_console_script():
    exe = subprocess.run([sys.executable, "-m", "evoprune.cli", "data", "check", "nowhere"],
                         capture_output=True, text=True)
    assert exe.returncode == 2 and exe.stderr.startswith("error: unknown data set 'nowhere'")
    assert "Traceback" not in exe.stderr
