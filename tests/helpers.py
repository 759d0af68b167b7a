"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from evoprune.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """The CLI as a user runs it, in this process: (exit status, stdout, stderr)."""
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def wait_for(db, sql: str, timeout: float = 300) -> None:
    """Poll the SQLite file `db` (a search another process is writing) until `sql`'s first value
    is true. The file is opened read-only, so a poll never creates it before its writer does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                if c.execute(sql).fetchone()[0]:
                    return
        except sqlite3.OperationalError:  # not there yet, or its tables are not
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {sql}")


def randomize_bn(model):
    """BN statistics and affine parameters that are not the identity (so a pruned channel's shift
    or scale would show), in eval mode: `model`."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def image_folder(root: Path, shared_data: Path, classes: int = 3, train: int = 24, val: int = 8) -> Path:
    """An ImageNet-style tree of real CIFAR-10 images: ROOT/train/classC/*.png, ROOT/val/..."""
    from PIL import Image

    from evoprune.data import load_dataset

    ds = load_dataset("cifar10", shared_data)
    for split, n, src in (("train", train, ds.train), ("val", val, ds.test)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in (src.y == c).nonzero().flatten()[:n].tolist():
                Image.fromarray(src.x[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def measured_macs(model, layers: list[str], x) -> int:
    """Multiply-accumulates of the named layers on `x`, per image, as their forward hooks see them."""
    import torch

    mods, total = dict(model.named_modules()), [0]
    hooks = [mods[n].register_forward_hook(lambda mod, i, o: total.__setitem__(
        0, total[0] + o.numel() // len(x) * mod.weight[0].numel())) for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]
