"""Each statistic against a direct computation on the pretrained digits CNN; Torch-Pruning
agreement; every zoo model; determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from scipy.stats import spearmanr
from torch import nn

from evoprune.data import iterate, load_dataset
from evoprune.errors import EvopruneError
from evoprune.models import MODELS, build_model
from evoprune.primitives.collect import collect_stats, task_stats
from evoprune.primitives.stats import STATS, Cost

from helpers import randomize_bn

N = 256


@pytest.fixture(scope="module")
def digits(digits_pretrained):
    pre = digits_pretrained
    x, y = next(iterate(pre.data, pre.data.train, batch_size=N, shuffle=True, seed=0))
    table = task_stats(pre, n_images=N, seed=0)
    return pre.model, x, y, table


def _bn_outputs(model, x, grads=False):
    """Every BN's output on x (kept for autograd when grads=True)."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, i, o, name=name):
                if grads:
                    o.retain_grad()
                outs[name] = o
            hooks.append(m.register_forward_hook(hook))
    logits = model(x)
    for h in hooks:
        h.remove()
    return outs, logits


def test_every_statistic_is_finite_with_one_value_per_filter(digits):
    model, _, y, table = digits
    assert table.layers == ["features.0", "features.3", "features.7", "features.10"]
    assert table.widths == [32, 32, 64, 64]
    k = len(torch.unique(y))
    for s, spec in STATS.items():
        for layer, w in zip(table.layers, table.widths):
            v = table.values[s][layer]
            assert v.shape == ((k, w) if spec.per_class else (w,)), s
            assert torch.isfinite(v).all(), s
            if spec.nonneg:
                assert (v >= 0).all(), s


def test_weight_gram_bn_and_layer_statistics_match_direct_computation(digits):
    model, _, _, table = digits
    convs = [model.features[i] for i in (0, 3, 7, 10)]
    bns = [model.features[i + 1] for i in (0, 3, 7, 10)]
    macs = [8 * 8 * 32 * 1 * 9, 8 * 8 * 32 * 32 * 9, 4 * 4 * 64 * 32 * 9, 4 * 4 * 64 * 64 * 9]
    for i, (layer, conv, bn) in enumerate(zip(table.layers, convs, bns)):
        W = conv.weight.detach().double().numpy().reshape(conv.out_channels, -1)
        nxt = (convs[i + 1].weight if i < 3 else model.fc.weight).detach().double().numpy()
        G = W @ W.T
        cos = np.abs(G / np.outer(np.linalg.norm(W, axis=1), np.linalg.norm(W, axis=1)))
        np.fill_diagonal(cos, 0)
        dist = np.sqrt(((W[:, None, :] - W[None, :, :]) ** 2).sum(-1))
        want = {
            "w_l1": np.abs(W).sum(1), "w_l2": np.sqrt((W ** 2).sum(1)), "w_linf": np.abs(W).max(1),
            "w_mean": W.mean(1), "w_std": W.std(1),
            "w_out_l2": np.sqrt((nxt.reshape(nxt.shape[0], conv.out_channels, -1) ** 2).sum((0, 2))),
            "gram_diag": np.diag(G), "gram_offdiag": np.abs(G).sum(1) - np.abs(np.diag(G)),
            "cos_mean": cos.sum(1) / (W.shape[0] - 1), "cos_max": cos.max(1), "fpgm_dist": dist.sum(1),
            "bn_gamma": bn.weight.detach().numpy(), "bn_beta": bn.bias.detach().numpy(),
            "bn_abs_gamma": np.abs(bn.weight.detach().numpy()), "bn_mean": bn.running_mean.numpy(),
            "bn_var": bn.running_var.numpy(),
            "layer_depth": np.full(W.shape[0], i / 3), "layer_width": np.full(W.shape[0], W.shape[0]),
            "layer_flops": np.full(W.shape[0], macs[i] / sum(macs)),
        }
        for s, v in want.items():
            np.testing.assert_allclose(table.values[s][layer].numpy(), v, rtol=2e-4, atol=1e-5, err_msg=s)


def test_spectral_statistics_match_numpy_svd(digits):
    model, _, _, table = digits
    for layer, idx in zip(table.layers, (0, 3, 7, 10)):
        W = model.features[idx].weight.detach().double().numpy().reshape(table.widths[table.layers.index(layer)], -1)
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        tail = np.sqrt(np.cumsum((S ** 2)[::-1])[::-1])
        r = max(1, int(np.argmax(tail < 0.1 * tail[0])) if (tail < 0.1 * tail[0]).any() else len(S))
        lev = (U[:, :r] ** 2).sum(1)
        res = np.linalg.norm(W - W @ Vt[:r].T @ Vt[:r], axis=1)
        np.testing.assert_allclose(table.values["spec_leverage"][layer].numpy(), lev, atol=1e-4)
        np.testing.assert_allclose(table.values["spec_residual"][layer].numpy(), res, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(table.values["layer_rank"][layer].numpy()[0], r / W.shape[0], atol=1e-6)


def test_activation_and_class_statistics_match_direct_computation(digits):
    model, x, y, table = digits
    with torch.no_grad():
        outs, _ = _bn_outputs(model.eval(), x)
    for layer, bn_name in zip(table.layers, ["features.1", "features.4", "features.8", "features.11"]):
        a = F.relu(outs[bn_name]).double()
        r = a.mean((2, 3))  # per-image responses [N, C]
        want = {"act_mean": a.mean((0, 2, 3)), "act_var": a.var((0, 2, 3), unbiased=False),
                "act_l1": a.sum((2, 3)).mean(0), "act_zero_frac": (a == 0).double().mean((0, 2, 3)),
                "act_max": a.amax((0, 2, 3))}
        for s, v in want.items():
            np.testing.assert_allclose(table.values[s][layer].numpy(), v.numpy(), rtol=1e-4, atol=1e-6, err_msg=s)
        for k_i, k in enumerate(torch.unique(y)):
            p, q = r[y == k], r[y != k]
            for s, v in {"cls_mean_in": p.mean(0), "cls_mean_out": q.mean(0), "cls_var_in": p.var(0, unbiased=False),
                         "cls_var_out": q.var(0, unbiased=False)}.items():
                np.testing.assert_allclose(table.values[s][layer][k_i].numpy(), v.numpy(), rtol=1e-4, atol=1e-7)
            assert table.values["cls_n_in"][layer][k_i, 0] == len(p)


def test_gradient_statistics_match_autograd(digits):
    model, x, y, table = digits
    model.zero_grad()
    outs, logits = _bn_outputs(model.eval(), x, grads=True)
    F.cross_entropy(logits, y).backward()
    for layer, conv_i, bn_name in zip(table.layers, (0, 3, 7, 10), ["features.1", "features.4", "features.8",
                                                                      "features.11"]):
        conv = model.features[conv_i]
        tw = (conv.weight * conv.weight.grad).abs().flatten(1).sum(1)
        o = outs[bn_name]
        ta = (F.relu(o) * o.grad).mean((2, 3)).abs().mean(0)
        np.testing.assert_allclose(table.values["taylor_w"][layer].numpy(), tw.detach().numpy(), rtol=1e-3, atol=1e-9)
        np.testing.assert_allclose(table.values["taylor_act"][layer].numpy(), ta.detach().numpy(), rtol=1e-3,
                                   atol=1e-12)
    model.zero_grad(set_to_none=True)


def test_pfp_sensitivity_matches_brute_force(digits):
    model, x, _, table = digits
    captured = {}
    h = model.features[7].register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0].detach()))
    with torch.no_grad():
        model(x[:64])
    h.remove()
    a = captured["x"].double()  # input of features.7 = maxpool(relu(bn(features.3)))
    W = model.features[7].weight.detach().double()
    patches = F.unfold(a, 3, padding=1).view(len(a), 32, 9, -1)  # [N, C, k, P]
    best = torch.zeros(32, dtype=torch.double)
    for part in (W.clamp(min=0), (-W).clamp(min=0)):
        contrib = torch.einsum("ock,nckp->ncop", part.view(64, 32, 9), patches)  # [N, C, O, P]
        total = contrib.sum(1, keepdim=True)
        ratio = torch.where(total > 1e-12, contrib / total.clamp_min(1e-12), torch.zeros(()).double())
        best = torch.maximum(best, ratio.permute(1, 0, 2, 3).reshape(32, -1).amax(1))
    np.testing.assert_allclose(table.values["pfp_sens"]["features.3"].numpy(), best.numpy(), rtol=1e-4, atol=1e-6)


def _tp_scores(model, conv, importance, x):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:2])
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
    return importance(group).detach()


def test_scores_agree_with_torch_pruning_importances(digits):
    model, x, y, table = digits
    for layer, idx in zip(table.layers, (0, 3, 7, 10)):
        conv = model.features[idx]
        checks = {"w_l1": tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None),
                  "w_l2": tp.importance.MagnitudeImportance(p=2, group_reduction="first", normalizer=None),
                  "bn_abs_gamma": tp.importance.BNScaleImportance(group_reduction="first", normalizer=None)}
        for s, imp in checks.items():
            ours = table.values[s][layer].numpy()
            theirs = _tp_scores(model, conv, imp, x).numpy()
            assert spearmanr(ours, theirs).statistic == pytest.approx(1.0), (s, layer)
        model.zero_grad()
        F.cross_entropy(model.eval()(x), y).backward()  # Taylor reads .grad of the same batch
        theirs = _tp_scores(model, conv, tp.importance.TaylorImportance(group_reduction="first", normalizer=None), x)
        np.testing.assert_allclose(table.values["taylor_w"][layer].numpy(), theirs.numpy(), rtol=1e-3, atol=1e-9)
        model.zero_grad(set_to_none=True)


def test_fpgm_agrees_with_torch_pruning_where_the_quantity_is_the_same(digits_pretrained):
    """Torch-Pruning's FPGM measures distances between |w|^p; on non-negative weights with p=1
    that is the distance between the filters themselves, which is FPGM as the paper defines it."""
    import copy

    model = copy.deepcopy(digits_pretrained.model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
    x, _ = next(iterate(digits_pretrained.data, digits_pretrained.data.train, batch_size=8))
    table = collect_stats(model, [(x, torch.zeros(8, dtype=torch.long))], ["fpgm_dist"])
    for layer, idx in zip(table.layers, (0, 3, 7, 10)):
        theirs = _tp_scores(model, model.features[idx], tp.importance.FPGMImportance(p=1, group_reduction="first",
                                                                                      normalizer=None), x)
        np.testing.assert_allclose(table.values["fpgm_dist"][layer].numpy(), theirs.numpy(), rtol=1e-4)


def _real_images(name: str, shared_data) -> tuple[torch.Tensor, torch.Tensor]:
    spec = MODELS[name]
    grey = name in ("cnn", "lenet5")
    ds = load_dataset("mnist" if grey else "cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=4))
    if spec.input_size != x.shape[-1]:
        x = F.interpolate(x, size=spec.input_size, mode="bilinear", align_corners=False)
    return x, y


@pytest.mark.parametrize("name", list(MODELS))
def test_collect_all_statistics_on_every_zoo_model(name, shared_data):
    x, y = _real_images(name, shared_data)
    torch.manual_seed(0)
    model = build_model(name, 10, x.shape[1])
    table = collect_stats(model, [(x, y)], max_images=4, pfp_images=2)
    assert len(table.layers) >= 4
    for s in STATS:
        for layer in table.layers:
            assert torch.isfinite(table.values[s][layer]).all(), (name, s, layer)


def test_collection_is_deterministic_and_lazy(digits_pretrained):
    pre = digits_pretrained
    a = task_stats(pre, n_images=128, seed=3)
    b = task_stats(pre, n_images=128, seed=3)
    for s in STATS:
        for layer in a.layers:
            assert torch.equal(a.values[s][layer], b.values[s][layer]), s
    weights_only = [s for s, spec in STATS.items() if spec.cost == Cost.WEIGHTS]
    lazy = task_stats(pre, weights_only, n_images=128)
    assert lazy.meta["images"] == 0 and set(lazy.names) == set(weights_only)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_collection_on_gpu_matches_cpu(digits_pretrained):
    pre = digits_pretrained
    cpu = task_stats(pre, n_images=128, seed=2)
    gpu = task_stats(pre, n_images=128, seed=2, device="cuda")
    pre.model.cpu()
    for s in STATS:
        for layer in cpu.layers:
            np.testing.assert_allclose(gpu.values[s][layer].numpy(), cpu.values[s][layer].numpy(),
                                       rtol=2e-3, atol=1e-5, err_msg=s)


# ---------------------------------------------------------------- one network written two ways
# A statistic describes the function a layer computes, not how its module is written: the same
# network built from different modules must give the same values (layers found in order).
class _ToLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _ToFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def _pointwise(channels_last: bool, cin: int, cout: int) -> list[nn.Module]:
    return [_ToLast(), nn.Linear(cin, cout), _ToFirst()] if channels_last else [nn.Conv2d(cin, cout, 1)]


def _net(channels_last: bool = False, groups: int = 1, dense_groups: bool = False, inplace: bool = False):
    """conv-BN-ReLU6, a pointwise pair (1x1 convs, or linear layers on channels-last maps as in
    ConvNeXt), a grouped 3x3 conv-BN-ReLU6 (or the same as a dense conv), a conv, a classifier."""
    g = 1 if dense_groups else groups
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=inplace),
              *_pointwise(channels_last, 8, 12), nn.ReLU(inplace=inplace), *_pointwise(channels_last, 12, 8),
              nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=g), nn.BatchNorm2d(8), nn.ReLU6(inplace=inplace),
              nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    return nn.Sequential(*layers)


def _copy_weights(src: nn.Module, dst: nn.Module, groups: int) -> None:
    """dst computes what src computes: a linear layer's weight as a 1x1 conv's, a grouped conv's
    as the block-diagonal weight of a dense one."""
    with torch.no_grad():
        for a, b in zip([m for m in src.modules() if hasattr(m, "weight")],
                        [m for m in dst.modules() if hasattr(m, "weight")]):
            w = a.weight
            if isinstance(b, nn.Conv2d) and w.dim() == 2:
                w = w[:, :, None, None]
            elif isinstance(b, nn.Conv2d) and b.groups == 1 and a.groups > 1:
                dense = torch.zeros_like(b.weight)
                per_in, per_out = w.shape[1], w.shape[0] // a.groups
                for i in range(a.groups):
                    dense[i * per_out:(i + 1) * per_out, i * per_in:(i + 1) * per_in] = w[i * per_out:(i + 1) * per_out]
                w = dense
            b.weight.copy_(w)
            b.bias.copy_(a.bias)
            for buf in ("running_mean", "running_var"):
                if hasattr(a, buf):
                    getattr(b, buf).copy_(getattr(a, buf))


def _two_ways(made, way, groups, shared_data):
    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=24, shuffle=True, seed=1))
    y = y % 4
    torch.manual_seed(0)
    a = randomize_bn(made())
    b = way()
    _copy_weights(a, b, groups)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    return collect_stats(a, [(x, y)]), collect_stats(b, [(x, y)])


def _assert_same(ta, tb, pairs, names):
    for la, lb in pairs:
        for s in names:
            torch.testing.assert_close(ta.values[s][la], tb.values[s][lb], rtol=2e-4, atol=1e-5,
                                       msg=lambda m, s=s, la=la: f"{s} on {la}: {m}")


def test_linear_layers_on_channels_last_maps_give_the_statistics_of_1x1_convs(shared_data):
    ta, tb = _two_ways(lambda: _net(channels_last=True), lambda: _net(), 1, shared_data)
    assert len(ta.layers) == len(tb.layers) == 5
    _assert_same(ta, tb, zip(ta.layers, tb.layers), list(STATS))


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_consumer_gives_the_statistics_of_its_dense_block_diagonal_twin(groups, shared_data):
    """Its producer and the layers around it must see what a dense conv with zeros outside the
    groups gives them; a grouped conv that is not depthwise (2 groups) is prunable itself, and its
    filters' statistics are its dense twin's (relations between filters read them as they act on
    the whole input: two groups' filters are orthogonal), except the mean and spread of a filter's
    own weights (the twin's zeros dilute them). A depthwise conv (8) follows its producer. The layers have in-place
    activations (gradients are read through hooks on their inputs)."""
    ta, tb = _two_ways(lambda: _net(groups=groups, inplace=True), lambda: _net(groups=groups, dense_groups=True),
                       groups, shared_data)
    assert len(ta.layers) == (5 if groups == 2 else 4) and len(tb.layers) == 5
    same = [s for s in STATS if s not in ("layer_depth", "layer_flops")]  # the dense twin has one layer more
    _assert_same(ta, tb, [(ta.layers[i], tb.layers[i]) for i in (0, 1, 2)] + [(ta.layers[-1], tb.layers[4])], same)
    if groups == 2:
        _assert_same(ta, tb, [(ta.layers[3], tb.layers[3])], [s for s in same if s not in ("w_mean", "w_std")])


@pytest.mark.parametrize("model", [nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),  # only the output layer
                                   nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(248, 10))])
def test_a_model_without_prunable_layers_is_told_so(model):
    x = torch.randn(4, 1, 64) if isinstance(model[0], nn.Conv1d) else torch.randn(4, 1, 8, 8)
    with pytest.raises(EvopruneError, match="no prunable layers"):
        collect_stats(model, [(x, torch.arange(4))], ["w_l1", "act_mean"])
