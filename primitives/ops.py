"""One table from operator name to its torch function, sympy form and numpy twin.

The evaluator, the sympy printer, the LaTeX printer and the code generator all read this
table. The numpy twins exist only so that sympy's lambdify can evaluate our custom functions
(protected division and the per-layer normalizers); tests check them against torch.
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

    def _latex(self, printer):
        a, b = (printer._print(x) for x in self.args)
        return rf"\frac{{{a}}}{{{b}}}"


class _Normalizer(sympy.Function):
    """A per-layer normalizer: opaque to simplification; of a constant it has a constant's value."""

    nargs = 1
    tex = ""
    of_number = staticmethod(lambda c: None)

    @classmethod
    def eval(cls, x):  # safe: sympy's automatic-evaluation hook
        if x.is_number:  # any closed-form constant (2, 1/20, sqrt(2)): every filter scores the same
            return cls.of_number(x)

    def _latex(self, printer):
        return rf"\operatorname{{{self.tex}}}\left({printer._print(self.args[0])}\right)"


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


LAMBDIFY_MODULES = [{"pdiv": _np_pdiv, "zscore": _np_zscore, "rank": _np_rank, "meannorm": _np_mnorm}, "numpy"]


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Op:
    name: str  # in the expression grammar
    arity: int
    description: str
    torch: Callable  # runtime function
    sympy: Callable  # args -> sympy expression
    normalizer: bool = False  # per-layer: takes the padding mask
    monotone: str = ""  # unary ops: "inc" (everywhere), "inc+" (on x >= 0), "dec"


OPS: dict[str, Op] = {o.name: o for o in [
    Op("add", 2, "a + b", rt.add, lambda a, b: a + b),
    Op("sub", 2, "a - b", rt.sub, lambda a, b: a - b),
    Op("mul", 2, "a * b", rt.mul, lambda a, b: a * b),
    Op("div", 2, "protected a / b (|b| kept >= 1e-6)", rt.pdiv, lambda a, b: pdiv(a, b)),
    Op("abs", 1, "|a|", rt.pabs, lambda a: sympy.Abs(a), monotone="inc+"),
    Op("sqrt", 1, "sqrt(|a|)", rt.psqrt, lambda a: sympy.sqrt(sympy.Abs(a)), monotone="inc+"),
    Op("log", 1, "log(|a| + 1e-6)", rt.plog, lambda a: sympy.log(sympy.Abs(a) + _EPS), monotone="inc+"),
    Op("square", 1, "a^2", rt.square, lambda a: a ** 2, monotone="inc+"),
    Op("neg", 1, "-a", rt.neg, lambda a: -a, monotone="dec"),
    Op("min", 2, "elementwise minimum", rt.pmin, lambda a, b: sympy.Min(a, b)),
    Op("max", 2, "elementwise maximum", rt.pmax, lambda a, b: sympy.Max(a, b)),
    Op("zscore", 1, "per layer: (a - mean) / std", rt.zscore, lambda a: zscore(a), normalizer=True, monotone="inc"),
    Op("rank", 1, "per layer: rank of each filter in [0, 1]", rt.rank, lambda a: rank(a), normalizer=True,
       monotone="inc"),
    Op("mnorm", 1, "per layer: a / mean |a|", rt.mnorm, lambda a: meannorm(a), normalizer=True, monotone="inc"),
]}
