"""Per-conv channels_last (transfer/layout.py): the same function and gradients as NCHW; the
convs it picks depend on shapes alone (a run stays reproducible); nothing on a GPU model."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from evoprune.models import build_model
from evoprune.primitives.layers import structure
from evoprune.transfer.layout import channels_last_convs, conv_inputs, use_channels_last
from evoprune.transfer.surgery import independent_layers, narrow_tied, surgery, zero_pruned


def _resnet20(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", 10, 3)


def test_conv_inputs_name_every_conv_with_its_input_shape():
    model = _resnet20()
    seen = conv_inputs(model, torch.randn(2, 3, 32, 32))
    assert list(seen) == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]  # in run order
    assert seen["conv1"] == (3, 32, 32) and seen["layer2.0.conv1"] == (16, 32, 32)
    assert seen["layer3.2.conv2"] == (64, 8, 8)
    assert model.training  # the mode is restored


def test_channels_last_convs_compute_the_same_outputs_and_gradients():
    a = _resnet20()
    b = copy.deepcopy(a)
    for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"):
        use_channels_last(b.get_submodule(name))
    assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for train in (False, True):
        a.train(train), b.train(train)
        oa, ob = a(x), b(x)
        assert ob.is_contiguous() and torch.allclose(oa, ob, atol=1e-5), train
    F.cross_entropy(oa, y).backward()
    F.cross_entropy(ob, y).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), n
    for m in (a, b):  # an SGD step keeps the layout and the function
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9).step()
    a.eval(), b.eval()
    assert torch.allclose(a(x), b(x), atol=1e-4)


def test_the_narrow_convs_on_large_maps_are_picked():
    """A ResNet-20 cut to 40% of its filters (as the pruned proxy does): the convs reading 32x32
    maps with fewer than 16 filters left, the stem among them; nothing on 16x16 or 8x8 maps."""
    model = _resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    inputs = conv_inputs(model, x)
    assert channels_last_convs(model, inputs) == []  # full width: every conv has 16 filters or more
    s = structure(model, x)
    inside = independent_layers(model, x, list(s.macs))
    masks = {n: torch.arange(w) < round(0.4 * w) for n, w in s.out_channels.items()}
    zero_pruned(model, masks, s.bn_of)
    surgery(model, {n: m for n, m in masks.items() if n in inside}, x)
    narrow_tied(model, {n: m for n, m in masks.items() if n not in inside}, s.bn_of)
    assert conv_inputs(model, x) == {n: (model.get_submodule(n).in_channels, *shape[1:])
                                     for n, shape in inputs.items()}  # cutting channels keeps the maps
    picked = channels_last_convs(model, inputs)  # the uncut model's trace serves its cut copies
    assert picked == ["conv1"] + [f"layer1.{b}.conv{i}" for b in range(3) for i in (1, 2)] + ["layer2.0.conv1"]
    assert channels_last_convs(copy.deepcopy(model), inputs) == picked  # shapes alone decide


def test_a_gpu_model_is_left_alone():
    model = _resnet20()
    inputs = conv_inputs(model, torch.randn(2, 3, 32, 32))
    model.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)  # narrow on a 32x32 map: picked on the CPU
    assert channels_last_convs(model, inputs) == ["conv1"]
    # any device but the CPU: nothing is picked
    assert channels_last_convs(model.to("meta"), inputs) == []
