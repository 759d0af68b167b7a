"""The typed primitive set for DEAP, and conversion between DEAP trees and our Nodes.

Nothing here runs at import time: `build_pset` is idempotent and called by the driver and by
every worker. Trees travel as strings in our grammar and are rebuilt with our parser; DEAP's
`gp.compile` and `PrimitiveTree.from_string` (both call eval) are never used.
"""
from __future__ import annotations

import random
from typing import Iterable

from deap import gp

from evoprune.primitives.expr import Node, parse
from evoprune.primitives.ops import OPS
from evoprune.primitives.stats import STATS

EPHEMERAL = "evoprune_const"


class Vec:
    """The one type of the search: a value per filter (statistics, operators, broadcast constants)."""


def draw_constant() -> float:
    """A positive constant, log-uniform on [1e-3, 10], three significant digits (ridge-like
    terms such as ETPF's 0.05; `neg` makes negatives). Module level, so trees pickle."""
    return float(f"{10 ** random.uniform(-3, 1):.3g}")


def build_pset(stats: Iterable[str] | None = None, ops: Iterable[str] | None = None,
               constants: bool = True) -> gp.PrimitiveSetTyped:
    pset = gp.PrimitiveSetTyped("metric", [], Vec)
    for name in ops if ops is not None else OPS:
        op = OPS[name]
        pset.addPrimitive(op.torch, [Vec] * op.arity, Vec, name=name)
    for name in stats if stats is not None else STATS:
        pset.addTerminal(name, Vec, name=name)
    if constants:
        pset.addEphemeralConstant(EPHEMERAL, draw_constant, Vec)
    return pset


def _ephemeral_class(pset: gp.PrimitiveSetTyped):
    return next((t for t in pset.terminals[Vec] if isinstance(t, gp.MetaEphemeral)), None)


def to_deap(node: Node, pset: gp.PrimitiveSetTyped) -> gp.PrimitiveTree:
    """Our tree as a DEAP PrimitiveTree over `pset` (a name the pset lacks is an error)."""
    eph = _ephemeral_class(pset)
    out = []
    for n in node.walk():
        if n.is_const:
            if eph is None:
                raise ValueError("this primitive set has no constants")
            e = eph.__new__(eph)  # its __init__ would draw a random value (and move the RNG)
            e.value = n.value
            out.append(e)
        elif n.name in pset.mapping:
            out.append(pset.mapping[n.name])
        else:
            raise ValueError(f"{n.name!r} is not in this primitive set")
    return gp.PrimitiveTree(out)


def from_deap(tree: gp.PrimitiveTree) -> Node:
    return parse(str(tree))
