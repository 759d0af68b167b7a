"""Memory layout per conv for training on the CPU.

oneDNN vectorizes NCHW convs over 16 output channels at a time (AVX-512), so a conv with fewer
on a large feature map wastes most of each vector; in channels_last it runs much faster (a cut
ResNet-20's 16-to-7 and 7-to-7 convs on 32x32 maps: forward and backward 1.2x to 2x faster,
conversions included), while wider convs and smaller maps gain nothing or lose. The layers
around a conv (BN above all) are much slower in channels_last with few channels, so a whole
model is not converted: `channels_last_convs` picks the convs the rule covers and
`use_channels_last` runs each of them in channels_last, converting at its boundary (input in,
output back to NCHW). The rule depends only on shapes, never on timings, so a run stays
reproducible; the function is the same up to floating-point order.
benchmarks/pruned_training.py measures what it saves: 5 to 7% of a cut ResNet-20 training step on
the 2-core CPU (the rest of the step is BN, ReLUs and the full-width residual stream).
"""
from __future__ import annotations

import torch
from torch import nn

CL = torch.channels_last
NARROW = 16  # fewer output channels than one AVX-512 vector of floats
LARGE = 32 * 32  # pixels of the input map from which channels_last pays for its conversions


def _to_cl(module: nn.Module, args: tuple):
    return (args[0].contiguous(memory_format=CL), *args[1:])


def _to_nchw(module: nn.Module, args: tuple, out):
    return out.contiguous()


def use_channels_last(conv: nn.Conv2d) -> None:
    """Run `conv` in channels_last: its weight is stored so, its input converted on the way in
    and its output converted back to NCHW on the way out (the rest of the model is untouched)."""
    with torch.no_grad():
        conv.weight.data = conv.weight.data.contiguous(memory_format=CL)
    conv.register_forward_pre_hook(_to_cl)
    conv.register_forward_hook(_to_nchw)


def conv_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape (without the batch dimension) of each 2-d conv `example` reaches, in the
    order they run."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen: dict[str, tuple[int, ...]] = {}

    def hook(module, args):
        seen.setdefault(names[module], tuple(args[0].shape[1:]))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def channels_last_convs(model: nn.Module, inputs: dict[str, tuple[int, ...]]) -> list[str]:
    """The convs of `model` worth running in channels_last on the CPU: plain 2-d convs with fewer
    than `NARROW` output channels reading a map of at least `LARGE` pixels. `inputs` is what
    `conv_inputs` gives for the model, or for the model it was cut from (cutting channels keeps
    the maps), so a caller pruning many copies of one model traces it once. None on another
    device than the CPU (a GPU has its own kernels)."""
    modules = dict(model.named_modules())
    return [name for name, shape in inputs.items()
            if type(conv := modules.get(name)) is nn.Conv2d and conv.weight.device.type == "cpu"
            and conv.groups == 1 and shape[1] * shape[2] >= LARGE and conv.out_channels < NARROW]
