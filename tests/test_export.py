"""Exports: the Python module in a fresh interpreter without evoprune reproduces the engine's
scores exactly; the Torch-Pruning importance drives a physical prune of a CIFAR ResNet-20."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch_pruning as tp
from torch import nn

from evoprune.data import iterate, load_dataset
from evoprune.export import MetricSource, export
from evoprune.models import build_model
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.collect import collect_stats
from evoprune.primitives.expr import evaluate, parse, scores_by_layer

from helpers import run

FORMULAS = {
    "evolved": "div(w_l1, add(zscore(act_mean), 3.0))",
    "classwise": BASELINES["etpf_b"].expression,
    "gradients": "mul(rank(taylor_w), sqrt(taylor_act))",
    "pfp": "add(pfp_sens, mul(0.1, mnorm(w_out_l2)))",
    "spectral": "max(spec_leverage, neg(log(spec_residual)))",
}


def test_python_export_runs_without_evoprune_and_matches_the_engine(digits_pretrained, tmp_path):
    pre = digits_pretrained
    model = nn.Sequential(OrderedDict(features=pre.model.features, pool=pre.model.pool, flatten=nn.Flatten(),
                                      fc=pre.model.fc)).eval()  # torch classes only: loads without evoprune
    x, y = next(iterate(pre.data, pre.data.train, batch_size=128, shuffle=True, seed=5))
    torch.save(model, tmp_path / "model.pt")
    torch.save((x, y), tmp_path / "batch.pt")
    for name, expr in FORMULAS.items():
        (tmp_path / f"m_{name}.py").write_text(export(MetricSource(name, expr, "test"), "python", max_images=128))
    script = textwrap.dedent(f"""
        import sys, importlib
        sys.modules["evoprune"] = None  # any import of evoprune now fails
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # as this process: the same float order (SVD)
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        x, y = torch.load({str(tmp_path / 'batch.pt')!r})
        out = {{n: importlib.import_module("m_" + n).score(model, [(x, y)]) for n in {list(FORMULAS)!r}}}
        torch.save(out, {str(tmp_path / 'scores.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "scores.pt")
    for name, expr in FORMULAS.items():
        node = parse(expr)
        table = collect_stats(model, [(x, y)], node.stats(), max_images=128)
        want = scores_by_layer(evaluate(node, table), table)
        assert list(got[name]) == list(want) == ["features.0", "features.3", "features.7", "features.10"]
        for layer in want:
            assert torch.equal(got[name][layer], want[layer]), (name, layer)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_torch_pruning_export_prunes_a_cifar_resnet20(shortcut, shared_data, tmp_path):
    path = tmp_path / f"imp_{shortcut}.py"
    path.write_text(export(MetricSource("evolved", FORMULAS["evolved"], "test"), "torch-pruning", max_images=64))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # as `import` would: its dataclasses look their module up there
    spec.loader.exec_module(mod)
    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=64))
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, shortcut=shortcut).eval()
    before = sum(p.numel() for p in model.parameters())
    scores = mod.score(model, [(x, y)], max_images=64)  # the whole model's, before any cut
    stem = model.conv1.weight.detach().clone()
    inner = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("conv1")
             and name != "conv1"}
    imp = mod.EvopruneImportance(model, [(x, y)])
    ignored = [model.fc]
    if shortcut == "A":  # Torch-Pruning cannot follow channels through a zero-padding shortcut:
        # prune only the convs inside blocks, as TPP's scripts do
        ignored += [model.conv1] + [b.conv2 for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    pruner = tp.pruner.MetaPruner(model, x[:2], importance=imp, pruning_ratio=0.5, ignored_layers=ignored)
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    assert after < (0.75 if shortcut == "A" else 0.5) * before
    assert model.layer1[0].conv1.out_channels == 8 and model.layer3[0].conv1.out_channels == 32
    if shortcut == "A":  # the stream is kept, so each block's first conv keeps its input channels
        modules = dict(model.named_modules())
        for name, w in inner.items():  # one-shot, as the search ranks: each keeps its best half
            keep = torch.topk(scores[name], len(w) // 2).indices.sort().values
            assert torch.equal(modules[name].weight.detach(), w[keep]), name
    else:  # the first stage's stream, written by the stem and every block's second conv, is ranked
        # as `evoprune prune --scope coupled` ranks it: by the mean of the writers' per-layer ranks
        writers = ["conv1"] + [f"layer1.{i}.conv2" for i in range(3)]
        mean_rank = torch.stack([mod.rank(scores[n].double()) for n in writers]).mean(0)
        kept = [int((stem == row).all((1, 2, 3)).nonzero()) for row in model.conv1.weight.detach()]
        dropped = sorted(set(range(16)) - set(kept))
        assert len(kept) == 8 and mean_rank[kept].min() >= mean_rank[dropped].max()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()


def test_export_by_id_name_and_baseline(searched, tmp_path, capsys):
    db, result = searched
    best = result.finalists[0]
    rc, out, _ = run(capsys, "export", str(best.candidate_id), "--db", str(db), "-f", "sympy")
    assert rc == 0 and out.strip() == best.canonical
    run(capsys, "metrics", "promote", str(best.candidate_id), "exported", "--db", str(db))
    target = tmp_path / "exported.py"
    rc, out, _ = run(capsys, "export", "exported", "--db", str(db), "-o", str(target))
    assert rc == 0 and "EXPRESSION = " in target.read_text() and "import evoprune" not in target.read_text()
    rc, out, _ = run(capsys, "export", "baseline:fisher", "-f", "latex")
    assert rc == 0 and r"\mu_P" in out
    for args, words in [(("export", "424242", "--db", str(db)), "no candidate with ID 424242"),
                        (("export", "baseline:l7"), "unknown baseline 'l7'"),
                        (("export", "baseline:l1", "-f", "onnx"), "unknown format 'onnx'")]:
        rc, _, err = run(capsys, *args)
        assert rc == 2 and words in err, args


def test_an_export_loads_by_importlib_by_import_and_as_a_script(tmp_path):
    """The plain importlib recipe (no sys.modules registration) once failed on a dataclass under
    `from __future__ import annotations`."""
    path = tmp_path / "c.py"
    path.write_text(export(MetricSource("c", "square(cls_var_out)", "test"), "python"))
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("c", {str(path)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # not registered in sys.modules first
        assert "c" not in sys.modules and mod.EXPRESSION == "square(cls_var_out)"
        sys.path.insert(0, {str(tmp_path)!r})
        import c
        assert c.STATISTICS == ["cls_var_out"]
    """)
    for args in ([sys.executable, "-c", script], [sys.executable, str(path)]):
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cls_var_out**2" in proc.stdout  # the script prints what the metric is
