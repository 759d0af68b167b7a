"""The model zoo: every model runs on its input size; local weight files load."""
from __future__ import annotations

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
    with pytest.raises(UnknownName, match="or torchvision:ARCH"):
        build_model("resnet21", 10, 3)
    with pytest.raises(UnknownName, match="unknown torchvision classification model 'resnet21'"):
        build_model("torchvision:resnet21", 10, 3)
    assert build_model("torchvision:resnet18", 7, 3).fc.out_features == 7
    with pytest.raises(EvopruneError, match="weights file not found"):
        build_model("resnet50", 1000, 3, weights="/nonexistent/r50.pth")
    with pytest.raises(EvopruneError, match="bad options"):
        build_model("vgg11", 10, 3, shortcut="A")
