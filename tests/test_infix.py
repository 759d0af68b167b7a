"""Infix formulas (primitives/infix.py): what a user types and what evoprune prints simplified
read back into the prefix tree, with the language's meanings; bad text is one ExpressionError."""
from __future__ import annotations

import random

import pytest
from deap import gp

from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import ExpressionError, canonical, canonical_hash, is_simplified, parse
from evoprune.primitives.infix import read_formula
from evoprune.primitives.pset import Vec, build_pset

from helpers import run


def test_printed_simplified_forms_read_back_to_the_same_formula():
    """For random formulas of the search's own grammar, the canonical (sympy) string reads back
    to a tree with the same canonical form; the one sympy rewrite outside the language (x*log(c)
    printed as log(c**x)) is refused in words that point to the prefix form."""
    pset, rng_state = build_pset(), random.getstate()
    random.seed(7)
    try:
        trees = [gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 5, Vec)) for _ in range(150)]
    finally:
        random.setstate(rng_state)
    same = refused = 0
    for tree in trees:
        node = parse(str(tree))
        if not is_simplified(node):
            continue
        text = canonical(node)
        try:
            back = read_formula(text)
        except ExpressionError as e:
            assert "exponent" in str(e) and "prefix" in str(e), (text, e)
            refused += 1
            continue
        assert canonical_hash(back) == canonical_hash(node), (str(node), text, canonical(back))
        same += 1
    assert same >= 120 and refused <= 3, (same, refused)


@pytest.mark.parametrize("typed, prefix", [
    ("w_l1 / (bn_abs_gamma + 0.1)", "div(w_l1, add(bn_abs_gamma, 0.1))"),
    ("w_l1/(bn_abs_gamma + 1/10)", "div(w_l1, add(bn_abs_gamma, 0.1))"),
    ("w_l1 - w_l2 - bn_gamma", "sub(sub(w_l1, w_l2), bn_gamma)"),
    ("w_l1 * w_l2 / bn_gamma", "div(mul(w_l1, w_l2), bn_gamma)"),
    ("-w_l1**2", "neg(square(w_l1))"),  # as in Python: the power binds tighter than the minus
    ("w_l1 ^ 2 + 2^3", "add(square(w_l1), 8.0)"),
    ("w_l1**(3/2)", "mul(sqrt(w_l1), w_l1)"),
    ("w_l1**(-1)", "div(1.0, w_l1)"),
    ("act_max**(1/4)", "sqrt(sqrt(act_max))"),
    ("w_l1 -0.5", "sub(w_l1, 0.5)"),
    ("zscore(w_l1) - 3*rank(bn_gamma)", "sub(zscore(w_l1), mul(3.0, rank(bn_gamma)))"),
    ("Max(w_l1, w_l2, bn_gamma)", "max(max(w_l1, w_l2), bn_gamma)"),
    ("Abs(w_mean) + pdiv(w_l1, w_l2)", "add(abs(w_mean), div(w_l1, w_l2))"),
    ("meannorm(bn_beta**2 + bn_gamma)", "mnorm(add(square(bn_beta), bn_gamma))"),
    ("log(Abs(w_mean) + 1/1000000)", "log(w_mean)"),  # sympy's spelling of our log
    ("log(w_l1 + 1/1000000)", "log(w_l1)"),
    ("log(w_l1 + 0.5)", "log(add(w_l1, 0.499999))"),  # log(|w_l1 + 0.499999| + 1e-6), sympy's log(w_l1 + 0.5)
    ("log(1/1000000 - w_mean)", "log(neg(w_mean))"),
    ("log(w_l1 - 0.5)", "log(sub(w_l1, 0.5))"),  # no constant added: as written
    ("log(add(abs(w_mean), 0.000001))", "log(add(abs(w_mean), 1e-06))"),  # the prefix form is exact
    ("w_l1/3", "div(w_l1, 3.0)"),
    ("w_l1*(1/3)", "mul(w_l1, div(1.0, 3.0))"),  # 1/3 is no float: kept exact, as sympy keeps it
    ("add(w_l1, -0.5)", "add(w_l1, -0.5)"),
])
def test_typed_forms_mean_what_the_language_says(typed, prefix):
    assert read_formula(typed) == parse(prefix)


def test_the_prefix_form_reads_exactly_as_before():
    for b in BASELINES.values():
        assert read_formula(b.expression) == parse(b.expression)


@pytest.mark.parametrize("text, words", [
    ("w_l1 + foo", "position 7: unknown name 'foo'"),
    ("w_l1 ** w_l2", "exponent must be a constant"),
    ("w_l1**(1/3)", "not 1/3"),
    ("w_l1**0", "not 0"),
    ("w_l1**(17/2)", "from -8 to 8"),
    ("(w_l1 + w_l2", "expected ')', found the end"),
    ("w_l1 + ", "ends too early"),
    ("1e40 * w_l1", "out of range"),
    ("1e999999999 * w_l1", "number out of range: 1e999999999"),  # refused before it is spelled out exactly
    ("w_l1 + 1e-999999999", "number out of range"),
    ("((((((1e30**8)**8)**8)**8)**8)**8) * w_l1", "constant arithmetic out of range"),
    ("0.0e-999999999 + w_l1 + foo", "unknown name 'foo'"),  # a zero is a constant: read on, to the problem
    ("w_l1 ^^ 2", "found '^'"),
    ("w_l1(2) + 1", "is a statistic, not an operator"),
    ("exp(w_l1) + 1", "unknown name 'exp'"),
    ("zscore(w_l1, w_l2) * 2", "'zscore' takes 1 argument(s), got 2"),
    ("w_l1 + w_l2 = 3", "unexpected character '='"),
    ("-" * 19_000 + "w_l1", "nested deeper than 64"),
    ("w_l1" + "+w_l1" * 3000, "nested deeper than 64 once in prefix form"),
])
def test_bad_formulas_are_one_expression_error(text, words):
    with pytest.raises(ExpressionError) as e:
        read_formula(text)
    assert words in str(e.value)


def test_random_text_is_an_expression_error_or_a_formula():
    rng = random.Random(3)
    alphabet = ["w_l1", "bn_gamma", "zscore", "Min", "log", "(", ")", ",", "+", "-", "*", "/", "**", "^", "1",
                "0", "1/1000000", "2.5e3", " ", "Abs", "foo", "."]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        try:
            node = read_formula(text)
        except ExpressionError:
            continue
        assert parse(str(node)) == node  # a formula: its prefix form reads back to it


def test_cli_takes_infix_where_it_takes_a_formula(tmp_path, capsys):
    rc, out, err = run(capsys, "primitives", "check", "w_l1 / (bn_abs_gamma + 0.1)")
    assert rc == 0 and "expression   div(w_l1, add(bn_abs_gamma, 0.1))" in out, err
    rc, out, err = run(capsys, "export", "expr:w_l1 / (bn_abs_gamma + 1/10)", "-o", str(tmp_path / "m.py"))
    assert rc == 0 and "Prefix form: div(w_l1, add(bn_abs_gamma, 0.1))" in (tmp_path / "m.py").read_text(), err
    rc, out, err = run(capsys, "primitives", "check", "w_l1 ** w_l2")
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prune_folders_of_infix_formulas_keep_their_operators():
    from evoprune.cli import _slug

    assert _slug("expr:w_l1 / (bn_abs_gamma + 0.1)") == "expr-div-w-l1-add-bn-abs-gamma-0.1"
    assert _slug("expr:w_l1 * (bn_abs_gamma + 0.1)") == "expr-mul-w-l1-add-bn-abs-gamma-0.1"
    assert _slug("expr:mul(w_l1, add(bn_abs_gamma, 2))") == "expr-mul-w-l1-add-bn-abs-gamma-2"  # as given
