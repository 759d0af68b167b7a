"""`evoprune export`: a metric as a standalone Python module, a Torch-Pruning importance,
a sympy expression or LaTeX.

The Python module carries evoprune's own statistic collector and operator runtime (their
source, with the package's imports taken out by `ast`), so it needs only torch, and computes
scores exactly as the search did. The formula part is generated from the parsed tree.
"""
from __future__ import annotations

import ast
import inspect

from evoprune import __version__
from evoprune.errors import EvopruneError
from evoprune.metricref import MetricSource
from evoprune.primitives import collect, layers, runtime, stats
from evoprune.primitives.expr import Node, canonical, parse, to_latex, to_torch_source

FORMATS = ("python", "torch-pruning", "sympy", "latex")
_LIBRARY = (runtime, layers, stats, collect)  # in dependency order
_LEAVE_OUT = {"task_stats"}  # needs evoprune's data sets


def _library_source() -> str:
    """The runtime and the collector, without evoprune imports, as one torch-only block."""
    parts, defined = [], {}
    for mod in _LIBRARY:
        tree = ast.parse(inspect.getsource(mod))
        body = []
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("evoprune", "__future__"):
                continue
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in _LEAVE_OUT:
                continue
            _drop_signature_annotations(node)
            body.append(node)
            for name in _top_level_names(node):
                if name in defined and defined[name] != mod.__name__:  # one namespace: a clash changes results
                    raise RuntimeError(f"export: {name!r} is defined in both {defined[name]} and {mod.__name__}")
                defined[name] = mod.__name__
        tree.body = body
        parts.append(f"# ---- from evoprune.{mod.__name__.split('.', 1)[1]} ----\n{ast.unparse(tree)}")
    return "\n\n\n".join(parts)


def _drop_signature_annotations(tree: ast.AST) -> None:
    """Remove the annotations of function signatures. The export has no `from __future__ import
    annotations`: with it, a dataclass looks its module up in sys.modules to read string
    annotations, which fails when the file is loaded by spec_from_file_location + exec_module
    without registering it. Without it, annotations are evaluated: those of signatures may name
    things defined later, so they go; those of dataclass fields stay (they are what a dataclass
    is made of) and must name things defined before them."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None


def _top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


_HEADER = '''r"""evoprune metric {name}: {canonical}

{origin}; exported by evoprune {version}.
Prefix form: {expression}
LaTeX: {latex}

Needs only torch. Higher scores keep the filter:

    import {module}
    scores = {module}.score(model, loader)  # {{layer name: Tensor[C_out]}}

`loader` yields (images, labels) batches, normalized as the model expects (labels are used
by class-conditional and gradient statistics); {max_images} images are used by default.
Statistics: {stats}.
"""


class EvopruneError(Exception):
    pass

'''

_FOOTER = '''

EXPRESSION = {expression!r}
STATISTICS = {stats!r}
MAX_IMAGES = {max_images}


def scores_of(T):
    """The formula over a StatTable: [L, C_max], as the search evaluated it."""
    return finish({padded}, T.mask)


def score(model, loader, *, max_images=MAX_IMAGES, device="cpu"):
    """{{layer name: Tensor[C_out]}} for every prunable layer of `model`."""
    T = collect_stats(model, loader, STATISTICS, max_images=max_images, device=device)
    s = scores_of(T)
    return {{name: s[i, :w].clone() for i, (name, w) in enumerate(zip(T.layers, T.widths))}}


if __name__ == "__main__":  # `python this_file.py`: what the metric is and how to use it
    print(__doc__)
'''

_TORCH_PRUNING = '''

import torch_pruning as tp


class EvopruneImportance(tp.importance.Importance):
    """This metric as a Torch-Pruning importance:

        imp = EvopruneImportance(model, loader)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5)
        pruner.step()

    Scores are computed from `loader` once for the whole model, on first use, as the search
    scored it: every layer ranked on the network before any of them is cut (one-shot). They are
    computed again, on the model as it is then, when a layer's width has changed since
    (iterative pruning: the next `pruner.step()`). A layer the metric does not cover (a
    depthwise conv, the output layer) falls back to the L2 norm of its filters.
    """

    def __init__(self, model, loader, max_images=MAX_IMAGES, device="cpu"):
        self.model, self.loader, self.max_images, self.device = model, loader, max_images, device
        self._by_module = None

    def _scores(self, module):
        s = None if self._by_module is None else self._by_module.get(module)
        if self._by_module is None or (s is not None and len(s) != module.weight.shape[0]):
            modules = dict(self.model.named_modules())
            self._by_module = {{modules[n]: s for n, s in score(self.model, self.loader, max_images=self.max_images,
                                                              device=self.device).items()}}
        return self._by_module.get(module)

    def __call__(self, group):
        """Scores of the group's channels. Where several layers write them (a residual stream),
        the mean of their per-layer ranks, as `evoprune prune --scope coupled` ranks them."""
        dep, idxs = group[0].dep, group[0].idxs
        module = dep.target.module
        writers = []
        for i, (d, ix) in enumerate(group):
            s = self._scores(d.target.module) if d.pruning_fn in _OUT_CHANNELS else None
            if s is not None and None not in group[i].root_idxs:
                writers.append((rank(s.double())[torch.as_tensor(ix, dtype=torch.long)], group[i].root_idxs))
        if len(writers) > 1:
            ranks = torch.zeros(len(idxs), dtype=torch.float64)
            for r, root in writers:
                ranks.scatter_add_(0, torch.as_tensor(root, dtype=torch.long), r)
            return (ranks / len(writers)).float().to(module.weight.device)
        s = self._scores(module)
        if s is None:
            w = module.weight.detach()
            s = (w.transpose(0, 1) if getattr(module, "transposed", False) else w).flatten(1).norm(dim=1)
        return s[torch.as_tensor(idxs, dtype=torch.long)].to(module.weight.device)


_OUT_CHANNELS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
'''


def python_module(src: MetricSource, max_images: int = 256, torch_pruning: bool = False) -> str:
    node: Node = parse(src.expression)  # never pasted: parsed, then printed from the tree
    module = src.name.replace("-", "_").replace(".", "_")
    head = _HEADER.format(name=src.name, canonical=canonical(node), origin=src.origin, version=__version__,
                          expression=str(node), latex=to_latex(node), module=module, max_images=max_images,
                          stats=", ".join(node.stats()) or "none")
    foot = _FOOTER.format(expression=str(node), stats=node.stats(), max_images=max_images,
                          padded=to_torch_source(node, padded=True))
    code = head + _library_source() + foot + (_TORCH_PRUNING.format() if torch_pruning else "")
    compile(code, f"<export {src.name}>", "exec")  # syntax check only; nothing is run
    return code


def export(src: MetricSource, fmt: str, max_images: int = 256) -> str:
    if fmt not in FORMATS:
        raise EvopruneError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    node = parse(src.expression)
    if fmt == "sympy":
        return f"{canonical(node)}\n"
    if fmt == "latex":
        return f"{to_latex(node)}\n"
    return python_module(src, max_images, torch_pruning=fmt == "torch-pruning")
