"""The DEAP primitive set: idempotent, picklable, and round trips with our grammar."""
from __future__ import annotations

import pickle
import random

from deap import gp

from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import parse
from evoprune.primitives.pset import Vec, build_pset, from_deap, to_deap


def test_build_is_idempotent_and_trees_round_trip():
    pset = build_pset()
    build_pset()  # a worker building it again must not clash with DEAP's global ephemeral classes
    random.seed(0)
    for _ in range(300):
        tree = gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 5, type_=Vec))
        node = from_deap(tree)
        assert str(to_deap(node, pset)) == str(tree)
        assert parse(str(tree)) == node


def test_trees_with_constants_pickle_and_mutate():
    pset = build_pset()
    random.seed(1)
    tree = to_deap(parse("add(mul(w_l1, 0.5), div(bn_abs_gamma, 0.05))"), pset)
    again = pickle.loads(pickle.dumps(tree))
    assert str(again) == str(tree)
    (mutated,) = gp.mutEphemeral(gp.PrimitiveTree(tree), mode="all")
    assert str(mutated) != str(tree) and from_deap(mutated).stats() == ["w_l1", "bn_abs_gamma"]


def test_baselines_seed_the_search():
    pset = build_pset()
    for b in BASELINES.values():
        assert from_deap(to_deap(b.node, pset)) == b.node


def test_restricted_sets_reject_foreign_names():
    pset = build_pset(stats=["w_l1", "w_l2"], ops=["add", "mul"], constants=False)
    assert str(to_deap(parse("add(w_l1, mul(w_l2, w_l1))"), pset)) == "add(w_l1, mul(w_l2, w_l1))"
    for text in ["sqrt(w_l1)", "add(w_l1, bn_gamma)", "add(w_l1, 0.5)"]:
        try:
            to_deap(parse(text), pset)
        except ValueError:
            continue
        raise AssertionError(text)
