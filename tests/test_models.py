"""The model zoo: every model runs on its input size; local weight files load."""
from __future__ import annotations

import json

import pytest
import torch

from evoprune.errors import EvopruneError, UnknownName
from evoprune.models import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_zoo_model_runs_forward(name):
    spec = MODELS[name]
    cin = 1 if name in ("cnn", "lenet5") else 3
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=cin).eval()
    with torch.no_grad():
        out = model(torch.randn(2, cin, spec.input_size, spec.input_size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_cifar_resnet20_has_the_papers_size():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # counted by hand for option A: stem 432+32; stage 1: 6 convs 16x16x9 + 6 BN = 13824+192;
    # stage 2: 16x32x9 + 5 convs 32x32x9 + BN = 50688+384; stage 3: 202752+768; fc 650
    assert n(build_model("resnet20", 10, 3)) == 269722  # 0.27M, He et al. (2016) Table 6
    assert n(build_model("resnet56", 10, 3)) == 853018  # 0.85M
    # option B adds two 1x1 projections with BN: 16x32 + 64 and 32x64 + 128
    assert n(build_model("resnet20", 10, 3, shortcut="B")) == 269722 + 512 + 64 + 2048 + 128


def test_torchvision_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    src = build_model("resnet18", 1000, 3)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    dst = build_model("resnet18", 1000, 3, weights=str(tmp_path / "r18.pth"))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    # another head size: the backbone loads, the classifier keeps its fresh init
    ten = build_model("resnet18", 10, 3, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(ten.conv1.weight, src.conv1.weight) and ten.fc.out_features == 10


def test_bad_model_requests():
    with pytest.raises(UnknownName, match="torchvision:ARCH for any torchvision classifier, or import:MODULE:CALL"):
        build_model("resnet21", 10, 3)
    with pytest.raises(UnknownName, match="unknown torchvision classification model 'resnet21'"):
        build_model("torchvision:resnet21", 10, 3)
    assert build_model("torchvision:resnet18", 7, 3).fc.out_features == 7
    with pytest.raises(EvopruneError, match="weights file not found"):
        build_model("resnet50", 1000, 3, weights="/nonexistent/r50.pth")
    with pytest.raises(EvopruneError, match="bad options"):
        build_model("vgg11", 10, 3, shortcut="A")


USER_NETS = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def build_net(num_classes, in_channels=1, width=16):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(2 * width), nn.ReLU(), Block(2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def no_classes(width=3):
    return nn.Linear(width, 2)


def not_a_module(num_classes):
    return "a string"


def broken(num_classes):
    raise RuntimeError("my bug")
"""


def test_a_users_own_model_by_import(tmp_path, monkeypatch, capsys):
    """`import:MODULE:CALLABLE`: the user's network through pretrain and prune (the file's
    content is part of the cache key), and one error line for each way of naming it wrong."""
    from evoprune.tasks import get_task

    from helpers import run

    (tmp_path / "usernets_a.py").write_text(USER_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("import:usernets_a:build_net", 10, 1, width=8)
    assert model[-1].out_features == 10 and model[0].out_channels == 8
    tasks = tmp_path / "tasks.toml"
    tasks.write_text('[mine]\ndataset = "digits"\nmodel = "import:usernets_a:build_net"\n'
                     'model_args = { width = 8 }\nrecipe = { epochs = 3 }\n')
    key = get_task("mine", str(tasks)).cache_key("data")
    rc, out, err = run(capsys, "prune", "--task", "mine", "--tasks-file", tasks, "--cache-dir", tmp_path / "c",
                       "--metric", "baseline:l1", "--ratio", "0.5", "--no-tpp", "--epochs", "1",
                       "--out", tmp_path / "p", "--device", "cpu")
    assert rc == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["layers"] == {"3.conv1": [4, 8], "7.conv1": [8, 16]}  # the convs inside blocks, halved
    (tmp_path / "s.toml").write_text(f'[search]\npopulation = 4\ngenerations = 1\nseeds = ["l1", "fpgm"]\n'
                                     f'validation_orders = 0\n[proxy]\ntasks = ["mine"]\nfinetune_steps = 2\n'
                                     f'[run]\ntasks_file = "{tasks}"\ncache_dir = "{tmp_path / "c"}"\n')
    rc, out, err = run(capsys, "evolve", "--config", tmp_path / "s.toml", "--db", tmp_path / "e.db", "--device", "cpu")
    assert rc == 0 and "best baseline on the same proxy" in out, err
    with (tmp_path / "usernets_a.py").open("a") as f:
        f.write("\n# edited\n")
    assert get_task("mine", str(tasks)).cache_key("data") != key  # edited code: trained anew

    for name, words in [("import:usernets_a", "expected import:MODULE:CALLABLE"),
                        ("import:no_such_module_x:f", r"cannot import no_such_module_x \(ModuleNotFoundError"),
                        ("import:usernets_a:nothing", "usernets_a has no callable 'nothing'"),
                        ("import:usernets_a:no_classes", "must take num_classes"),
                        ("import:usernets_a:not_a_module", "returned str, not a torch.nn.Module"),
                        ("import:usernets_a:broken", "raised RuntimeError: my bug")]:
        with pytest.raises(EvopruneError, match=words):
            build_model(name, 10, 1)
    with pytest.raises(EvopruneError, match="bad options for model 'import:usernets_a:build_net'"):
        build_model("import:usernets_a:build_net", 10, 1, depth=3)
    tasks.write_text('[mine]\ndataset = "digits"\nmodel = "import:usernets_a:nothing"\n')
    rc, out, err = run(capsys, "tasks", "list", "--tasks-file", tasks)
    assert rc == 2 and err.startswith("error: task 'mine' in ") and "has no callable 'nothing'" in err
