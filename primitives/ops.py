"""One table from operator name to everything known about it: its torch function (the
runtime), its sympy form, its numpy twin, and the facts the ranking analysis uses (sign of
the result, monotonicity, how a constant argument commutes with a ranking).

The evaluator, the sympy and LaTeX printers, the code generator, `is_nonneg` and
`strip_monotone` all read this table: adding an operator is one entry here (and its function
in runtime.py). The numpy twins exist only so that sympy's lambdify can evaluate our custom
functions (protected division and the per-layer normalizers); tests check them against torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy

from evoprune.primitives import runtime as rt

EPS = rt.EPS
_EPS = sympy.Rational(1, round(1 / EPS))  # exact in sympy


# --------------------------------------------------------------------------- sympy functions
class pdiv(sympy.Function):
    """Protected division: a / b with |b| kept >= EPS. Opaque to simplification unless b is a
    constant, where it is exactly a / b (or a / +-EPS for a constant nearer zero than EPS)."""

    @classmethod
    def eval(cls, a, b):  # safe: sympy's automatic-evaluation hook, not Python's eval
        if b.is_number:  # a constant denominator: the protection is decided now, exactly
            bv = float(b.evalf())
            return a / b if abs(bv) >= EPS else a / (-_EPS if bv < 0 else _EPS)

    def _eval_is_nonnegative(self):
        a, b = self.args
        if a.is_nonnegative and b.is_nonnegative:
            return True

    def _latex(self, printer, exp=None):  # sympy passes exp when the call is raised to a power
        a, b = (printer._print(x) for x in self.args)
        tex = rf"\frac{{{a}}}{{{b}}}"
        return tex if exp is None else rf"\left({tex}\right)^{{{exp}}}"


class _Normalizer(sympy.Function):
    """A per-layer normalizer: opaque to simplification; of a constant it has a constant's value."""

    nargs = 1
    tex = ""
    of_number = staticmethod(lambda c: None)

    @classmethod
    def eval(cls, x):  # safe: sympy's automatic-evaluation hook
        if x.is_number:  # any closed-form constant (2, 1/20, sqrt(2)): every filter scores the same
            return cls.of_number(x)

    def _latex(self, printer, exp=None):
        tex = rf"\operatorname{{{self.tex}}}\left({printer._print(self.args[0])}\right)"
        return tex if exp is None else rf"{tex}^{{{exp}}}"


class zscore(_Normalizer):
    tex = "z"
    of_number = staticmethod(lambda c: sympy.Integer(0))


class rank(_Normalizer):
    tex = "rank"
    of_number = staticmethod(lambda c: sympy.Rational(1, 2))  # all tied: the average rank


class meannorm(_Normalizer):  # not "mnorm": sympy would evaluate it with mpmath's matrix norm
    tex = "mnorm"
    of_number = staticmethod(lambda c: c / (abs(c) + _EPS))


# --------------------------------------------------------------------------- numpy twins
def _np_pdiv(a, b):
    b = np.asarray(b, dtype=np.float64)
    safe = np.where(np.abs(b) < EPS, np.where(b < 0, -EPS, EPS), b)
    return np.asarray(a) / safe


def _np_zscore(x):
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))  # a scalar is a layer of equal scores
    mu = x.mean(-1, keepdims=True)
    d = x - mu
    d = np.where(np.abs(d) <= 16 * np.finfo(x.dtype).eps * np.abs(mu), 0.0, d)  # as the runtime does
    return d / (np.sqrt((d ** 2).mean(-1, keepdims=True)) + EPS)


def _np_rank(x):
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    srt = np.sort(x, axis=-1)
    flat_s, flat_x = srt.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1])
    r = np.stack([(np.searchsorted(s, v, "left") + np.searchsorted(s, v, "right") - 1) / 2
                  for s, v in zip(flat_s, flat_x)]).reshape(x.shape)
    return r / max(x.shape[-1] - 1, 1)


def _np_mnorm(x):
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    return x / (np.abs(x).mean(-1, keepdims=True) + EPS)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Op:
    name: str  # in the expression grammar
    arity: int
    description: str
    torch: Callable  # runtime function (generated code calls it by its __name__)
    sympy: Callable  # args -> sympy expression
    sympy_class: type | None = None  # a sympy Function of our own (printing it back needs its name)
    numpy: Callable | None = None  # numpy twin of sympy_class, for lambdify
    normalizer: bool = False  # per-layer: takes the padding mask
    monotone: str = ""  # unary ops: "inc" (everywhere), "inc+" (on x >= 0), "dec"
    nonneg: str = ""  # the result is >= 0: "always", "all" (when every argument is), "any" (when one is)
    affine: str = ""  # binary ops whose constant argument keeps a layer's ranking: "shift" (adds a
    #                   constant) or "scale" (multiplies by one; a negative one reverses the order)
    const_sides: tuple[int, ...] = ()  # which argument may be that constant
    latex: str = ""  # LaTeX of the call, {0} and {1} the arguments' (formulas sympy does not simplify)


OPS: dict[str, Op] = {o.name: o for o in [
    Op("add", 2, "a + b", rt.add, lambda a, b: a + b, nonneg="all", affine="shift", const_sides=(1, 0),
       latex="{0} + {1}"),
    Op("sub", 2, "a - b", rt.sub, lambda a, b: a - b, affine="shift", const_sides=(1,),
       latex=r"{0} - \left({1}\right)"),
    Op("mul", 2, "a * b", rt.mul, lambda a, b: a * b, nonneg="all", affine="scale", const_sides=(1, 0),
       latex=r"\left({0}\right) \cdot \left({1}\right)"),
    Op("div", 2, "protected a / b (|b| kept >= 1e-6)", rt.pdiv, lambda a, b: pdiv(a, b), pdiv, _np_pdiv,
       nonneg="all", affine="scale", const_sides=(1,), latex=r"\frac{{{0}}}{{{1}}}"),
    Op("abs", 1, "|a|", rt.pabs, lambda a: sympy.Abs(a), monotone="inc+", nonneg="always",
       latex=r"\left|{0}\right|"),
    Op("sqrt", 1, "sqrt(|a|)", rt.psqrt, lambda a: sympy.sqrt(sympy.Abs(a)), monotone="inc+", nonneg="always",
       latex=r"\sqrt{{\left|{0}\right|}}"),
    Op("log", 1, "log(|a| + 1e-6)", rt.plog, lambda a: sympy.log(sympy.Abs(a) + _EPS), monotone="inc+",
       latex=r"\log\left(\left|{0}\right| + 10^{{-6}}\right)"),
    Op("square", 1, "a^2", rt.square, lambda a: a ** 2, monotone="inc+", nonneg="always",
       latex=r"\left({0}\right)^{{2}}"),
    Op("neg", 1, "-a", rt.neg, lambda a: -a, monotone="dec", latex=r"-\left({0}\right)"),
    Op("min", 2, "elementwise minimum", rt.pmin, lambda a, b: sympy.Min(a, b), nonneg="all",
       latex=r"\min\left({0}, {1}\right)"),
    Op("max", 2, "elementwise maximum", rt.pmax, lambda a, b: sympy.Max(a, b), nonneg="any",
       latex=r"\max\left({0}, {1}\right)"),
    Op("zscore", 1, "per layer: (a - mean) / std", rt.zscore, lambda a: zscore(a), zscore, _np_zscore,
       normalizer=True, monotone="inc", latex=r"\operatorname{{z}}\left({0}\right)"),
    Op("rank", 1, "per layer: rank of each filter in [0, 1]", rt.rank, lambda a: rank(a), rank, _np_rank,
       normalizer=True, monotone="inc", nonneg="always", latex=r"\operatorname{{rank}}\left({0}\right)"),
    Op("mnorm", 1, "per layer: a / mean |a|", rt.mnorm, lambda a: meannorm(a), meannorm, _np_mnorm,
       normalizer=True, monotone="inc", latex=r"\operatorname{{mnorm}}\left({0}\right)"),
]}

# sympy's lambdify evaluates our own sympy functions with their numpy twins
LAMBDIFY_MODULES = [{o.sympy_class.__name__: o.numpy for o in OPS.values() if o.sympy_class}, "numpy"]
