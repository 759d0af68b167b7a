"""The expression language: one string form (DEAP's prefix form), our own parser, printers.

    expr   := NUMBER | STAT | OP "(" expr ("," expr)* ")"

`parse` accepts only whitelisted names (statistics and operators of the given arity) and
finite numbers; it never evaluates anything. A tree prints back to the same grammar, to sympy
(protected operators keep their exact semantics), to LaTeX and to torch source, and evaluates
vectorized over a StatTable: all layers at once, padded to [L, C_max].
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch
from torch import Tensor

from evoprune.errors import EvopruneError
from evoprune.primitives import runtime as rt
from evoprune.primitives.ops import OPS
from evoprune.primitives.stats import STATS

MAX_LENGTH = 20_000  # characters
MAX_DEPTH = 64
CONST_RANGE = (1e-30, 1e30)  # |constant| (or 0): float32 holds it, and the runtime's clamp (1e30) leaves it be
CANON_MAX_SIZE = 120  # nodes: larger formulas are not simplified (sympy's time grows fast with size)
CANON_SECONDS = 5.0  # time budget of one simplification (main thread); past it, the unsimplified key


class ExpressionError(EvopruneError):
    """A malformed expression; `position` is the 0-based character offset of the problem."""

    def __init__(self, message: str, position: int, text: str = ""):
        self.position, self.text, self.reason = position, text, message
        super().__init__(f"position {position}: {message}")

    def caret(self) -> str:
        return f"{self.text}\n{' ' * self.position}^"


@dataclass(frozen=True)
class Node:
    name: str  # operator or statistic name; "" for a constant
    args: tuple["Node", ...] = ()
    value: float = 0.0  # constants only

    @property
    def is_const(self) -> bool:
        return self.name == ""

    def __str__(self) -> str:
        if self.is_const:
            return repr(float(self.value))
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(map(str, self.args))})"

    def walk(self):
        yield self
        for a in self.args:
            yield from a.walk()

    @property
    def size(self) -> int:
        return sum(1 for _ in self.walk())

    @property
    def depth(self) -> int:
        return 1 + max((a.depth for a in self.args), default=0)

    def stats(self) -> list[str]:
        """The statistics this expression reads, in first-use order."""
        return list(dict.fromkeys(n.name for n in self.walk() if n.name in STATS))


def const(v: float) -> Node:
    return Node("", (), float(v))


# --------------------------------------------------------------------------- parsing
# ASCII digits only: \d would read Arabic-Indic and other Unicode digits as numbers
_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[(),]))")


def tokens(text: str, grammar: re.Pattern = _TOKEN):
    """(kind, text, position) of each token `grammar`'s named groups match (infix.py has its own)."""
    pos = 0
    while pos < len(text):
        m = grammar.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                return
            bad = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise ExpressionError(f"unexpected character {text[bad]!r}", bad, text)
        kind = m.lastgroup
        yield kind, m.group(kind), m.start(kind)
        pos = m.end()


def parse(text: str) -> Node:
    """Parse one expression; raise ExpressionError (never another exception) on bad input."""
    if not isinstance(text, str):
        raise ExpressionError("an expression must be a string", 0, "")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH, text[:80])
    toks = list(tokens(text))
    if not toks:
        raise ExpressionError("empty expression", 0, text)
    node, i = _parse_at(toks, 0, text, 1)
    if i != len(toks):
        raise ExpressionError(f"unexpected {toks[i][1]!r} after a complete expression", toks[i][2], text)
    return node


def _parse_at(toks, i, text, depth) -> tuple[Node, int]:
    if i >= len(toks):
        raise ExpressionError("expression ends too early", len(text), text)
    if depth > MAX_DEPTH:
        raise ExpressionError(f"nested deeper than {MAX_DEPTH}", toks[i][2], text)
    kind, val, pos = toks[i]
    if kind == "num":
        v = float(val)
        lo, hi = CONST_RANGE
        if not (v == 0 or lo <= abs(v) <= hi):  # NaN fails too
            raise ExpressionError(f"number out of range: {val} (constants are 0 or between {lo:g} and {hi:g} in "
                                  "size: evaluation is float32, clamped at 1e30)", pos, text)
        return const(v), i + 1
    if kind == "punct":
        raise ExpressionError(f"expected a name or a number, found {val!r}", pos, text)
    if val in STATS:
        if i + 1 < len(toks) and toks[i + 1][1] == "(":
            raise ExpressionError(f"{val!r} is a statistic, not an operator", toks[i + 1][2], text)
        return Node(val), i + 1
    if val not in OPS:
        raise ExpressionError(f"unknown name {val!r} (see `evoprune primitives list`)", pos, text)
    op = OPS[val]
    if i + 1 >= len(toks) or toks[i + 1][1] != "(":
        raise ExpressionError(f"operator {val!r} needs {op.arity} argument(s) in parentheses", pos + len(val), text)
    args, j = [], i + 2
    while True:
        arg, j = _parse_at(toks, j, text, depth + 1)
        args.append(arg)
        if j >= len(toks):
            raise ExpressionError(f"missing ')' for {val!r}", len(text), text)
        if toks[j][1] == ")":
            break
        if toks[j][1] != ",":
            raise ExpressionError(f"expected ',' or ')', found {toks[j][1]!r}", toks[j][2], text)
        j += 1
    if len(args) != op.arity:
        raise ExpressionError(f"{val!r} takes {op.arity} argument(s), got {len(args)}", pos, text)
    return Node(val, tuple(args)), j + 1


# --------------------------------------------------------------------------- evaluation
def evaluate(node: Node, table) -> Tensor:
    """Scores of every filter of every layer: [L, C_max] (padding where table.mask is False).

    Class-conditional statistics give [K, L, C_max]; the result is then averaged over classes.
    (ETPF summed; the mean differs by the constant K, so rankings are the same, and a part of
    the formula that does not depend on the class keeps its value, which keeps the sympy form
    exact when simplification removes a class-conditional term.)
    """
    return rt.finish(_eval(node, table), table.mask)


def _eval(node: Node, table):
    if node.is_const:
        return torch.tensor(node.value, dtype=table.dtype)
    if node.name in STATS:
        return table.padded(node.name)
    op = OPS[node.name]
    args = [_eval(a, table) for a in node.args]
    if op.normalizer:
        return op.torch(rt.full(args[0], table.mask), table.mask)
    return op.torch(*args)


def scores_by_layer(scores: Tensor, table) -> dict[str, Tensor]:
    return {name: scores[i, :w].clone() for i, (name, w) in enumerate(zip(table.layers, table.widths))}


@dataclass(frozen=True)
class Validity:
    ok: bool
    reason: str = ""
    constant_layers: tuple[str, ...] = ()


def check_scores(scores: Tensor, table) -> Validity:
    """NaN/inf anywhere, or scores that cannot rank filters (constant in every layer): invalid."""
    m = table.mask
    if not torch.isfinite(scores[m]).all():
        return Validity(False, "non-finite scores")
    lo = torch.where(m, scores, torch.inf).amin(1)
    hi = torch.where(m, scores, -torch.inf).amax(1)
    flat = (hi - lo) <= 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    const_layers = tuple(n for n, f, w in zip(table.layers, flat.tolist(), table.widths) if f and w > 1)
    if len(const_layers) == sum(w > 1 for w in table.widths):
        return Validity(False, "constant scores: ranks no filters", const_layers)
    return Validity(True, "", const_layers)


def rank_signature(scores: Tensor, table, scope: str = "layer") -> str:
    """A hash of the filter ordering: equal signatures => equal masks for every pruning ratio
    (per layer when scope="layer", across layers for a global ranking when scope="global")."""
    h = hashlib.sha256(scope.encode())
    if scope == "global":
        h.update(torch.argsort(scores[table.mask], stable=True).numpy().tobytes())
    else:
        for i, w in enumerate(table.widths):
            h.update(torch.argsort(scores[i, :w], stable=True).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- sympy, LaTeX
@lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True, nonnegative=True) if STATS[name].nonneg else sympy.Symbol(name, real=True)


def to_sympy(node: Node) -> sympy.Expr:
    """The exact formula: constants become the rationals their shortest decimal spells
    (0.05 -> 1/20), so that 2.0*x - x simplifies to x."""
    if node.is_const:
        return sympy.Rational(repr(node.value))
    if node.name in STATS:
        return symbol(node.name)
    return OPS[node.name].sympy(*(to_sympy(a) for a in node.args))


class _OutOfTime(BaseException):  # not an Exception: sympy's own `except Exception` must not swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _OutOfTime in the block after `seconds` (SIGALRM: main thread only; elsewhere the
    size bound alone applies). A timer someone else set keeps running: if it is due sooner it
    is left alone, else it is set again, less the time spent here, when the block ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer_left <= seconds:
        yield
        return

    active = [True]

    def on_alarm(signum, frame):
        if active[0]:
            raise _OutOfTime

    t0 = time.monotonic()
    old = signal.signal(signal.SIGALRM, on_alarm)
    # The alarm repeats: Python runs a signal handler at the next bytecode, which may be inside a
    # finalizer (__del__, a weakref callback, run by the garbage collector), where an exception is
    # printed and dropped; a one-shot alarm lost there left sympy unbounded (a test hung 15 min).
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - t0), 1e-3), outer_interval)


@lru_cache(maxsize=65536)
def _canonical(text: str) -> tuple[str, bool]:
    """(canonical string, simplified?). Formulas past CANON_MAX_SIZE nodes or CANON_SECONDS of
    sympy get their own prefix form instead: a key that is exact but misses equalities."""
    node = parse(text)
    if node.size > CANON_MAX_SIZE:
        return str(node), False
    try:
        with _time_limit(CANON_SECONDS):
            expr = to_sympy(node)
            try:
                expr = sympy.simplify(expr)
            except Exception:  # sympy gives up on some Min/Max/Abs combinations; keep the plain form
                pass
            return sympy.sstr(expr, order="lex"), True
    except (_OutOfTime, RecursionError):
        return str(node), False


def canonical(node: Node) -> str:
    """A sympy-simplified canonical string: equal for expressions equal as formulas (for a
    formula too large or too slow to simplify, its own prefix form)."""
    return _canonical(str(node))[0]


def is_simplified(node: Node) -> bool:
    return _canonical(str(node))[1]


def canonical_hash(node: Node) -> str:
    text, simplified = _canonical(str(node))
    return hashlib.sha256((text if simplified else "raw:" + text).encode()).hexdigest()[:16]


LATEX_NAMES = {"cls_mean_in": r"\mu_P", "cls_mean_out": r"\mu_Q", "cls_var_in": r"\sigma^2_P",
               "cls_var_out": r"\sigma^2_Q", "cls_n_in": "n_P", "cls_n_out": "n_Q"}


def _latex_name(stat: str) -> str:
    return LATEX_NAMES.get(stat, r"\mathrm{" + stat.replace("_", r"\_") + "}")


def _latex_tree(node: Node) -> str:
    """LaTeX straight from the tree (formulas sympy does not simplify)."""
    if node.is_const:
        return f"{node.value:.6g}"
    if node.name in STATS:
        return _latex_name(node.name)
    return OPS[node.name].latex.format(*(_latex_tree(a) for a in node.args))


def to_latex(node: Node, simplify: bool = True) -> str:
    """LaTeX of the (simplified) formula; class-conditional moments as ETPF writes them
    (P: images of class k, Q: the rest), other statistics by name."""
    if not is_simplified(node):
        return _latex_tree(node)
    expr = sympy.sympify(canonical(node), locals=_sympy_locals()) if simplify else to_sympy(node)
    exponents = {p.exp for p in expr.atoms(sympy.Pow)}  # sqrt stays sqrt, not x^0.5
    expr = expr.xreplace({r: sympy.Float(r, 6) for r in expr.atoms(sympy.Rational)
                          if not r.is_Integer and r not in exponents})
    names = {symbol(n): _latex_name(n) for n in node.stats()}
    return sympy.latex(expr, symbol_names=names)


@lru_cache(maxsize=1)
def _sympy_locals() -> dict:
    """Names a canonical string may contain: our statistics and our own sympy functions."""
    names = {n: symbol(n) for n in STATS}
    return {**names, **{o.sympy_class.__name__: o.sympy_class for o in OPS.values() if o.sympy_class}}


# --------------------------------------------------------------------------- torch source
def to_torch_source(node: Node, stats_var: str = "S", padded: bool = False) -> str:
    """A Python expression calling the functions of primitives/runtime.py: over `S[stat]`
    (one layer's tensors), or with padded=True over `T.padded(stat)` and the mask `T.mask` of a
    StatTable `T`, which is exactly what `evaluate` computes."""
    if node.is_const:
        return f"torch.tensor({node.value!r}, dtype=T.dtype)" if padded else f"torch.tensor({node.value!r})"
    if node.name in STATS:
        return f"T.padded({node.name!r})" if padded else f"{stats_var}[{node.name!r}]"
    op = OPS[node.name]
    args = [to_torch_source(a, stats_var, padded) for a in node.args]
    if padded and op.normalizer:
        args = [f"full({args[0]}, T.mask)", "T.mask"]
    return f"{op.torch.__name__}({', '.join(args)})"


# --------------------------------------------------------------------------- ranking structure
def is_nonneg(node: Node) -> bool:
    if node.is_const:
        return node.value >= 0
    if node.name in STATS:
        return STATS[node.name].nonneg
    rule = OPS[node.name].nonneg
    if rule == "all":
        return all(is_nonneg(a) for a in node.args)
    if rule == "any":
        return any(is_nonneg(a) for a in node.args)
    return rule == "always"


def is_per_class(node: Node) -> bool:
    return any(n.name in STATS and STATS[n.name].per_class for n in node.walk())


def strip_monotone(node: Node) -> tuple[Node, bool]:
    """Peel order-preserving (or reversing) wrappers off the root: within a layer the filters
    rank as the core ranks them, reversed when the flag is True. Used to skip re-evaluating
    e.g. sqrt(w_l2) or zscore(mul(w_l1, 2.0)) once w_l2 or w_l1 has been scored."""
    reversed_ = False
    while True:
        op = OPS.get(node.name)
        # scores of per-class terms are averaged over classes after evaluation, so only affine
        # wrappers (constants added or multiplied) commute with that sum
        if op and op.arity == 1 and not is_per_class(node.args[0]):
            a = node.args[0]
            if op.monotone == "inc" or (op.monotone == "inc+" and is_nonneg(a)):
                node = a
                continue
            if op.monotone == "dec":
                node, reversed_ = a, not reversed_
                continue
        if op and op.affine:
            side = next((i for i in op.const_sides if node.args[i].is_const), None)
            if side is not None:
                c, other = node.args[side].value, node.args[1 - side]
                if op.affine == "shift":
                    node = other
                    continue
                if abs(c) >= rt.EPS:  # a scale nearer 0 is a protected division's or a zero product's
                    node, reversed_ = other, reversed_ ^ (c < 0)
                    continue
        return node, reversed_
