"""The pruned proxy (surgery on every layer that can be cut, tied convs narrowed) and the masked proxy compute the
same fitness for the same masks, up to floating-point order: accuracy within one validation
image, the probability score within 1e-3 (docs/architecture.md gives the tolerance)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from evoprune.masks import TaskMasks
from evoprune.primitives.expr import parse
from evoprune.workers.proxy import ProxyConfig, TaskContext

FORMULAS = ["w_l1", "fpgm_dist", "div(w_l2, add(act_mean, 0.1))"]


def _agree(task, proxy, **kw):
    masker = TaskMasks.load(task, proxy.allocation, ["w_l1", "w_l2", "fpgm_dist", "act_mean"], stat_images=128,
                            seed=0, **kw)
    results = {}
    for train in ("masked", "pruned"):
        ctx = TaskContext(task, replace(proxy, train=train), **kw)
        results[train] = [ctx.run(masker(parse(f)), "full") for f in FORMULAS]
        if train == "pruned":
            assert ctx.independent and ctx.narrows  # something was cut; tied convs compute only kept filters
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
