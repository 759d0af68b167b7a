"""The model zoo: small CNNs, CIFAR ResNets and VGGs, torchvision ImageNet models.

CIFAR ResNet-20/32/56/110 follow He et al. (2016, section 4.2): three stages of n basic blocks
with 16/32/64 filters. Shortcuts that change shape use option A by default (parameter-free:
subsample by the stride and zero-pad the new channels, as in the paper's CIFAR experiments and
the ~0.27M-parameter ResNet-20 people compare against) or option B (1x1 conv + BN projection)
with `shortcut="B"`. Option A leaves the residual channels uncoupled to any extra conv, which is
what TPP's scripts rely on when they prune only the convs inside blocks.

Every ReLU is its own module, so forward hooks see post-activation outputs.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from evoprune.errors import EvopruneError, UnknownName, one_line


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers for small grey images (8x8 digits, 28x28 MNIST)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 32, 64, 64)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, w1), *conv_bn_relu(w1, w2), nn.MaxPool2d(2),
            *conv_bn_relu(w2, w3), *conv_bn_relu(w3, w4), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class LeNet5(nn.Module):
    """LeNet-5 (with BN) as in the reference work's MNIST task; pads inputs smaller than 32."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        if x.shape[-1] < 32:
            p = (32 - x.shape[-1]) // 2
            x = F.pad(x, (p, 32 - x.shape[-1] - p, p, 32 - x.shape[-2] - p))
        return self.classifier(self.features(x))


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad `extra` channels (no parameters)."""

    def __init__(self, extra: int, stride: int):
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cout - cin, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        add_into = getattr(self.bn2, "add_into", None)  # a narrowed bn2 (transfer/surgery.py: Widen)
        return self.relu2(add_into(out, self.shortcut(x)) if add_into else self.bn2(out) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, CIFAR-10 section)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A",
                 width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise EvopruneError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise EvopruneError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            layer = [BasicBlock(cin if i == 0 else cout, cout, 2 if (i == 0 and stage > 0) else 1, shortcut)
                     for i in range(n)]
            blocks.append(nn.Sequential(*layer))
            cin = cout
        self.layer1, self.layer2, self.layer3 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG-11/16/19 with BN for 32x32 inputs: conv stack, global pool, one linear classifier."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a state dict from a local file; returns the keys skipped for a shape mismatch
    (a classifier head for another number of classes), which keep their fresh initialisation."""
    p = Path(path)
    if not p.is_file():
        raise EvopruneError(f"weights file not found: {p.resolve()}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvopruneError(f"cannot read weights file {p}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unknown or len(missing) > len(skipped) + 2:
        raise EvopruneError(f"weights file {p} does not fit this model: {len(unknown)} unexpected keys "
                            f"(e.g. {unknown[:3]}), {len(missing)} missing (e.g. {missing[:3]})")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def _torchvision(arch: str):
    def build(num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise EvopruneError(f"{arch} expects 3-channel images, got {in_channels}")
        # GoogLeNet and Inception-v3 return auxiliary logits in training mode unless told not to
        aux = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **aux)
        if weights:
            load_weights(model, weights)
        return model

    return build


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[..., nn.Module]
    input_size: int  # the image side it is designed for (any size works for most)


MODELS: dict[str, ModelSpec] = {
    s.name: s for s in [
        ModelSpec("cnn", "4-layer conv-BN-ReLU CNN for small grey images", SmallCNN, 8),
        ModelSpec("lenet5", "LeNet-5 with BN (MNIST)", LeNet5, 28),
        *[ModelSpec(f"resnet{d}", f"CIFAR ResNet-{d} (He et al.; shortcut A default, B option)",
                    lambda d=d, **kw: CifarResNet(depth=d, **kw), 32) for d in (8, 20, 32, 56, 110)],
        *[ModelSpec(f"vgg{d}", f"CIFAR VGG-{d} with BN", lambda d=d, **kw: CifarVGG(depth=d, **kw), 32)
          for d in (11, 16, 19)],
        *[ModelSpec(a, f"torchvision {a} (weights from a local file: weights=PATH)", _torchvision(a), 224)
          for a in ("resnet18", "resnet34", "resnet50", "mobilenet_v2")],
    ]
}


TORCHVISION = "torchvision:"  # any torchvision classification model: torchvision:efficientnet_b0
IMPORT = "import:"  # the user's own: import:MODULE:CALLABLE, a callable that returns an nn.Module


def _import(name: str) -> tuple[Callable[..., nn.Module], str]:
    """The callable `import:MODULE:CALLABLE` names, and its module's file (the current directory
    is searched last, as `python -m` would search it first)."""
    module_name, _, attr = name[len(IMPORT):].partition(":")
    if not module_name or not attr:
        raise EvopruneError(f"model {name!r}: expected import:MODULE:CALLABLE, e.g. import:mynets:build_net")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error of theirs, said in one line
        raise EvopruneError(f"model {name!r}: cannot import {module_name} ({one_line(e, 200)}); it must be "
                            "importable here and on every Ray node (pip install it, set PYTHONPATH, or run "
                            "evoprune in its folder)") from None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise EvopruneError(f"model {name!r}: {module_name} has no callable {attr!r}")
    return obj, getattr(module, "__file__", None) or ""


def _imported(name: str) -> ModelSpec:
    factory, source = _import(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not (var_kw or "num_classes" in params):
        raise EvopruneError(f"model {name!r}: the callable must take num_classes (and may take in_channels and "
                            "the task's model_args)")

    def build(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
        given = {"num_classes": num_classes}
        if var_kw or "in_channels" in params:
            given["in_channels"] = in_channels
        try:
            model = factory(**given, **kwargs)
        except TypeError:
            raise  # its options: build_model says so
        except Exception as e:
            raise EvopruneError(f"model {name!r} raised {one_line(e, 200)}") from None
        if not isinstance(model, nn.Module):
            raise EvopruneError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return ModelSpec(name, f"imported from {source or name}", build, 0)


def model_source_hash(name: str) -> str:
    """For an imported model, a hash of its module's file (edit the code: the cache misses);
    '' for the zoo and torchvision, whose code comes with evoprune and torch."""
    if not name.startswith(IMPORT):
        return ""
    _, source = _import(name)
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def model_spec(name: str) -> ModelSpec:
    """A zoo model, `torchvision:ARCH` for any of torchvision's classification models, or
    `import:MODULE:CALLABLE` for the user's own."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith(IMPORT):
        return _imported(name)
    if name.startswith(TORCHVISION):
        import torchvision

        arch = name[len(TORCHVISION):]
        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise UnknownName("torchvision classification model", arch, known)
        return ModelSpec(name, f"torchvision {arch}", _torchvision(arch), 299 if arch == "inception_v3" else 224)
    raise UnknownName("model", name, list(MODELS), hint=f"{', '.join(MODELS)}, {TORCHVISION}ARCH for any "
                      f"torchvision classifier, or {IMPORT}MODULE:CALLABLE for your own")  # every form, uncut


def build_model(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    spec = model_spec(name)
    try:
        return spec.build(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:
        raise EvopruneError(f"bad options for model {name!r}: {e}") from None
