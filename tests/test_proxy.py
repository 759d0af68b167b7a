"""The pruned proxy (surgery on every layer that can be cut, tied convs narrowed) and the masked proxy compute the
same fitness for the same masks, up to floating-point order: accuracy within one validation
image, the probability score within 1e-3 (docs/architecture.md gives the tolerance)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from evoprune.masks import TaskMasks
from evoprune.primitives.expr import parse
from evoprune.workers.proxy import ProxyConfig, TaskContext

from helpers import image_folder

FORMULAS = ["w_l1", "fpgm_dist", "div(w_l2, add(act_mean, 0.1))"]


def _agree(task, proxy, **kw):
    masker = TaskMasks.load(task, proxy.allocation, ["w_l1", "w_l2", "fpgm_dist", "act_mean"], stat_images=128,
                            seed=0, **kw)
    results = {}
    for train in ("masked", "pruned"):
        ctx = TaskContext(task, replace(proxy, train=train), **kw)
        results[train] = [ctx.run(masker(parse(f)), "full") for f in FORMULAS]
        if train == "pruned":
            assert ctx.independent and ctx.narrows and ctx.trains == "pruned"  # cut; tied convs narrowed
    n_val = len(ctx.data.val)
    for a, b in zip(results["masked"], results["pruned"]):
        assert abs(a.accuracy - b.accuracy) <= 1 / n_val + 1e-12
        assert abs(a.score - b.score) <= 1e-3
        assert a.mask == b.mask and a.kept_flops == b.kept_flops
    return results


@pytest.mark.parametrize("task", ["digits-cnn", "digits-resnet8"])
def test_pruned_and_masked_proxies_agree_on_digits(task, digits_pretrained, cache_dir):
    _agree(task, ProxyConfig(tasks=(task,), finetune_steps=10, recalibrate_images=256), cache_dir=cache_dir)


def test_pruned_and_masked_proxies_agree_on_a_cifar_resnet20(shared_data, tmp_path):
    tasks = tmp_path / "tasks.toml"  # random weights: the equivalence does not need a trained network
    tasks.write_text('[r20]\ndataset = "cifar10"\nmodel = "resnet20"\nrecipe = { epochs = 0 }\n')
    proxy = ProxyConfig(tasks=("r20",), ratio=0.6, finetune_steps=3, batch_size=64, recalibrate_images=128)
    _agree("r20", proxy, cache_dir=tmp_path / "cache", data_root=shared_data, tasks_file=tasks)


@pytest.mark.parametrize("arch, trains, compared_after", [
    ("mobilenet_v2", "masked", 2), ("resnet18", "pruned", 2),
    ("torchvision:regnet_x_400mf", "pruned", 2),  # grouped convs: cut in aligned positions
    # the layers writing into concatenations are cut (DenseNet's BNs over them zero what was pruned)
    ("torchvision:densenet121", "pruned", 0), ("torchvision:googlenet", "masked", 2),
    ("torchvision:shufflenet_v2_x0_5", "masked", 2)])  # Torch-Pruning refuses it
def test_proxy_runs_repeat_exactly_on_an_image_folder_and_the_pruned_proxy_checks_it_trains_alike(
        arch, trains, compared_after, shared_data, tmp_path):
    """Torchvision models on an image folder: a run's random crops and dropout come from its seed, so
    the same masks give the same fitness twice. MobileNetV2's cut network does not train as its masked
    one does (its classifier's dropout draws a mask over fewer features), which the pruned proxy finds
    out once per task and trains it masked (GoogLeNet's too: dropout reads its last concatenation);
    ResNet-18's does, and it is cut. RegNet is cut, its grouped convs in aligned positions;
    DenseNet, whose layers write slices of concatenations that BNs then normalize, is cut;
    ShuffleNetV2, whose channel shuffle Torch-Pruning cannot trace, trains masked.
    `compared_after`: fine-tune steps before the two proxies' scores are compared. DenseNet's float32
    fine-tune at batch 8 is chaotic (its last block's BNs normalize 8 values of 1x1 maps: the masked
    proxy alone moved by 0.03 between 1 and 2 threads), so its proxies are compared before training;
    its training is compared by the float64 check behind `trains`."""
    folder = image_folder(tmp_path / "images", shared_data, classes=3, train=16, val=6)
    tasks = tmp_path / "tasks.toml"  # random weights: the equivalence does not need a trained network
    tasks.write_text(f'[t]\ndataset = "imagefolder:{folder}?size=32"\nmodel = "{arch}"\nrecipe = {{ epochs = 0 }}\n')
    kw = dict(cache_dir=tmp_path / "cache", tasks_file=tasks)
    proxy = ProxyConfig(tasks=("t",), ratio=0.5, finetune_steps=2, batch_size=8, recalibrate_images=16)
    masks = TaskMasks.load("t", proxy.allocation, ["w_l1"], stat_images=16, seed=0, **kw)(parse("w_l1"))
    pruned = TaskContext("t", proxy, **kw)
    assert pruned.cfg.train == "pruned" and pruned.trains == trains
    a, b = pruned.run(masks, "full"), pruned.run(masks, "full")
    assert a.score == b.score and a.accuracy == b.accuracy
    if compared_after != proxy.finetune_steps:
        proxy = replace(proxy, finetune_steps=compared_after)
        a = TaskContext("t", proxy, **kw).run(masks, "full")
    c = TaskContext("t", replace(proxy, train="masked"), **kw).run(masks, "full")
    assert abs(a.score - c.score) <= (0 if trains == "masked" else 1e-3 if compared_after else 1e-5)
