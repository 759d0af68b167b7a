"""The expression language by property: round trips, sympy = torch, protected operators, garbage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoprune.primitives import runtime as rt
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.collect import StatTable
from evoprune.primitives.expr import (ExpressionError, Node, canonical, canonical_hash, check_scores, const,
                                      evaluate, parse, rank_signature, scores_by_layer, strip_monotone, to_latex,
                                      to_sympy, to_torch_source)
from evoprune.primitives.ops import LAMBDIFY_MODULES, OPS
from evoprune.primitives.stats import STATS

STAT_NAMES = sorted(STATS)
# constants as the search makes them (three significant digits, 1e-3..10) and a margin around:
# 0 or |v| >= 1e-4 (a 1e-130 underflows to 0 in float32 and is no constant anyone writes)
finite_consts = st.floats(-20, 20, allow_nan=False, allow_infinity=False).map(
    lambda v: float(f"{v:.4g}")).filter(lambda v: v == 0 or abs(v) >= 1e-4)


def trees(max_leaves: int = 12):
    leaves = st.one_of(st.sampled_from(STAT_NAMES).map(Node), finite_consts.map(const))

    def extend(children):
        ops = st.sampled_from(sorted(OPS))
        return ops.flatmap(lambda o: st.tuples(*[children] * OPS[o].arity).map(lambda a, o=o: Node(o, a)))

    return st.recursive(leaves, extend, max_leaves=max_leaves)


def random_table(seed: int, widths=(5, 8, 3), classes: int = 4, dtype=torch.float64) -> StatTable:
    """Random statistics, distinct per filter; non-negative where the statistic is."""
    g = torch.Generator().manual_seed(seed)
    layers = [f"layer{i}" for i in range(len(widths))]
    values = {}
    for s in STAT_NAMES:
        values[s] = {}
        for name, w in zip(layers, widths):
            shape = (classes, w) if STATS[s].per_class else (w,)
            v = torch.rand(shape, generator=g, dtype=dtype) * 4 + 0.05
            values[s][name] = v if STATS[s].nonneg else v - 2
    return StatTable(layers, list(widths), values)


def sympy_scores(node: Node, table: StatTable, layer: str) -> np.ndarray:
    expr = to_sympy(node)
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    fn = sympy.lambdify(syms, expr, modules=LAMBDIFY_MODULES)
    vals = fn(*[table.values[s.name][layer].numpy() for s in syms])
    vals = np.asarray(vals, dtype=np.float64)
    w = table.widths[table.layers.index(layer)]
    if vals.ndim == 2:
        vals = vals.mean(0)
    return np.broadcast_to(vals, (w,))


@given(trees())
@settings(max_examples=300, deadline=None)
def test_parse_print_round_trip(tree):
    assert parse(str(tree)) == tree


@given(trees(max_leaves=8), st.integers(0, 10_000))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sympy_evaluation_equals_torch(tree, seed):
    table = random_table(seed)
    scores = evaluate(tree, table)
    for layer, got in scores_by_layer(scores, table).items():
        want = sympy_scores(tree, table, layer)
        if np.all(np.abs(want) < 1e29):  # past that torch clamps at 1e30 and sympy does not
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9 * max(1, np.abs(want).max()))


extreme = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(st.lists(extreme, min_size=2, max_size=40), st.lists(extreme, min_size=2, max_size=40))
@settings(max_examples=300, deadline=None)
def test_protected_operators_stay_finite(xs, ys):
    n = min(len(xs), len(ys))
    a, b = torch.tensor(xs[:n], dtype=torch.float32), torch.tensor(ys[:n], dtype=torch.float32)
    for op in OPS.values():
        out = op.torch(a) if op.arity == 1 else op.torch(a, b)
        assert torch.isfinite(out).all(), (op.name, a, b, out)


def test_protected_operator_semantics():
    z = torch.tensor([0.0, 1e-9, -1e-9, 2.0])
    assert torch.equal(rt.pdiv(torch.ones(4), z), torch.tensor([1e6, 1e6, -1e6, 0.5]))
    assert torch.allclose(rt.plog(torch.tensor([0.0, -math.e])), torch.tensor([math.log(1e-6), 1.0]), atol=1e-5)
    assert torch.equal(rt.psqrt(torch.tensor([-4.0, 9.0])), torch.tensor([2.0, 3.0]))
    assert torch.equal(rt.rank(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(rt.rank(torch.tensor([2.0, 1.0, 2.0, 5.0, 9.0])), torch.tensor([0.375, 0.0, 0.375, 0.75, 1.0]))
    assert torch.equal(rt.rank(torch.full((4,), 7.0)), torch.full((4,), 0.5))


grammar_chars = st.text(alphabet="add(mul,w_l1 0.5-e)sqrtxyz_9.,()", max_size=60)


@given(st.one_of(st.text(max_size=80), grammar_chars))
@settings(max_examples=500, deadline=None)
def test_parser_rejects_garbage_with_its_own_error(text):
    try:
        node = parse(text)
    except ExpressionError as e:
        assert 0 <= e.position <= len(text)
    else:
        assert parse(str(node)) == node


@pytest.mark.parametrize("text, pos, words", [
    ("add(w_l1, foo)", 10, "unknown name 'foo'"),
    ("add(w_l1)", 0, "takes 2 argument(s), got 1"),
    ("w_l1(3)", 4, "is a statistic"),
    ("mul(w_l1, 2.0", 13, "missing ')'"),
    ("sqrt w_l1", 4, "needs 1 argument"),
    ("add(w_l1, 1) )", 13, "unexpected ')'"),
    ("add(w_l1; 1)", 8, "unexpected character ';'"),
    ("", 0, "empty"),
    ("1e999", 0, "out of range"),
    ("neg(" * 100 + "w_l1" + ")" * 100, 256, "nested deeper"),
    ("neg(" * 64, 256, "ends too early"),  # unclosed, at the depth limit: once an IndexError
    ("add(w_l1, 1e39)", 10, "out of range"),  # beyond float32: inf in the evaluation, finite in sympy
    ("mul(w_l1, 1e-40)", 10, "out of range"),  # 0 in float32, a scale in sympy
    ("add(w_l1, \u0661)", 10, "unexpected character"),  # Arabic-Indic one: ASCII digits only
    ("add(w_l1, \uff11)", 10, "unexpected character"),  # fullwidth one
])
def test_parse_errors_name_the_position(text, pos, words):
    with pytest.raises(ExpressionError) as e:
        parse(text)
    assert e.value.position == pos and words in str(e.value)


def test_no_eval_of_python_names():
    for text in ["__import__('os')", "exec(1)", "eval", "lambda", "w_l1.__class__"]:
        with pytest.raises(ExpressionError):
            parse(text)


def test_invalid_scores_are_reported():
    table = random_table(0)
    assert check_scores(evaluate(parse("w_l1"), table), table).ok
    v = check_scores(evaluate(parse("mul(w_l1, 0.0)"), table), table)
    assert not v.ok and "constant" in v.reason
    v = check_scores(evaluate(parse("layer_width"), table), table)  # random per filter in this table
    assert v.ok
    bad = evaluate(parse("w_l1"), table)
    bad[0, 0] = float("nan")
    assert check_scores(bad, table).reason == "non-finite scores"


def test_canonical_form_dedupes_equal_formulas():
    a, b = parse("add(w_l1, w_l2)"), parse("add(w_l2, w_l1)")
    assert canonical(a) == canonical(b) and canonical_hash(a) == canonical_hash(b)
    assert canonical(parse("sub(mul(2.0, w_l1), w_l1)")) == canonical(parse("w_l1"))
    assert canonical(parse("abs(w_l1)")) == "w_l1"  # w_l1 is known to be non-negative
    assert canonical(parse("abs(w_mean)")) != "w_mean"
    assert canonical_hash(parse("w_l1")) != canonical_hash(parse("w_l2"))


def test_rank_equivalent_expressions_are_detected():
    table = random_table(3)
    base = evaluate(parse("w_l2"), table)
    for text in ["sqrt(w_l2)", "mul(3.0, w_l2)", "zscore(w_l2)", "add(log(w_l2), 5.0)", "rank(square(w_l2))"]:
        node = parse(text)
        assert strip_monotone(node) == (parse("w_l2"), False), text
        assert rank_signature(evaluate(node, table), table) == rank_signature(base, table), text
    assert strip_monotone(parse("neg(w_l2)")) == (parse("w_l2"), True)
    assert strip_monotone(parse("sqrt(w_mean)"))[0] == parse("sqrt(w_mean)")  # w_mean can be negative
    assert strip_monotone(parse("sqrt(cls_var_in)"))[0] == parse("sqrt(cls_var_in)")  # averaged over classes after
    assert rank_signature(evaluate(parse("w_l1"), table), table) != rank_signature(base, table)
    # zscore is per layer: it keeps layer orderings but not the global one
    assert rank_signature(evaluate(parse("zscore(w_l2)"), table), table, "global") != \
        rank_signature(base, table, "global")


def test_latex_and_torch_source_of_the_baselines(tmp_path):
    import importlib.util
    import inspect

    table = random_table(5)
    # the generated source runs against the runtime module's own source, as an export will
    mod_src = inspect.getsource(rt) + "\n\ndef score(S):\n    return {}\n"
    for b in BASELINES.values():
        node = b.node
        assert to_latex(node)
        src = mod_src.replace("return {}", "return " + to_torch_source(node))
        path = tmp_path / f"m_{b.name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        for i, layer in enumerate(table.layers):
            got = m.score(table.layer(layer))
            got = got.mean(0) if got.dim() == 2 else got
            want = scores_by_layer(evaluate(node, table), table)[layer]
            assert torch.allclose(got.expand_as(want).to(want.dtype), want, rtol=1e-6), b.name


def test_latex_of_a_protected_division_raised_to_a_power():
    # sympy hands our functions an `exp` when the call is raised to a power (once a TypeError)
    tex = to_latex(parse("square(div(neg(w_linf), sqrt(min(bn_abs_gamma, min(bn_beta, bn_var)))))"))
    assert tex.startswith(r"\left(\frac{") and tex.endswith("^{2}")
    assert to_latex(parse("square(zscore(w_l1))")).endswith("^{2}")


@pytest.mark.parametrize("text", [
    "log(" * 60 + "w_l1" + ")" * 60,  # sympy's automatic evaluation alone took seconds per level
    "zscore(" * 60 + "w_l1" + ")" * 60,
    "abs(sub(" * 30 + "w_l1" + ", w_l2))" * 30,
    "add(" * 9 + "w_l1" + "".join(f", mul(bn_var, {i}.5))" for i in range(9)),
])
def test_simplification_is_bounded_with_an_exact_fallback(text):
    import time

    from evoprune.primitives.expr import CANON_SECONDS, is_simplified

    node = parse(text)
    t0 = time.perf_counter()
    key, tex = canonical_hash(node), to_latex(node)
    assert time.perf_counter() - t0 < CANON_SECONDS + 3
    assert tex and len(key) == 16
    if not is_simplified(node):  # the fallback key is the formula itself, never another formula's
        assert canonical(node) == str(node) and canonical_hash(node) != canonical_hash(parse("w_l1"))


def test_a_bushy_tree_is_not_simplified_at_all():
    import time

    from evoprune.primitives.expr import CANON_MAX_SIZE, is_simplified

    leaves = [f"mul(w_l1, {i}.0)" for i in range(200)]
    while len(leaves) > 1:
        leaves = [f"add({a}, {b})" if b else a for a, b in zip(leaves[::2], leaves[1::2] + [""])]
    node = parse(leaves[0])
    assert node.size > CANON_MAX_SIZE and len(leaves[0]) > 4000
    t0 = time.perf_counter()
    assert not is_simplified(node) and canonical(node) == str(node)
    assert time.perf_counter() - t0 < 1


def test_the_time_limit_holds_when_its_first_alarm_is_dropped():
    """A finalizer run by the garbage collector drops the exception a signal handler raises in it:
    the alarm repeats until one gets through."""
    import time

    from evoprune.primitives.expr import _OutOfTime, _time_limit

    t0 = time.monotonic()
    with pytest.raises(_OutOfTime):
        with _time_limit(0.1):
            try:
                while time.monotonic() - t0 < 5:
                    pass
            except _OutOfTime:  # what a finalizer does with it
                pass
            while time.monotonic() - t0 < 5:  # without a second alarm this ends, and pytest.raises fails
                pass
    assert time.monotonic() - t0 < 3
