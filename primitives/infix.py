"""Formulas as people write them, and as evoprune prints them simplified: infix arithmetic over
the same statistics and operators, read into the prefix tree of `expr.py`.

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := "-" unary | power
    power  := atom (("**" | "^") unary)?
    atom   := NUMBER | STAT | NAME "(" expr ("," expr)* ")" | "(" expr ")"

What a user types and what sympy prints (`evoprune metrics show`, "simplified") both read back:
the operators of the language by name (`zscore(w_l1)`, `div(a, b)`, the prefix form is a part of
this grammar) and sympy's names for them (`Abs`, `Min`, `Max` with two or more arguments,
`pdiv`, `meannorm`). Meanings are the language's, which the grammar documents: `a / b` is the
protected division `div`, `sqrt(a)` is sqrt(|a|), `log(a)` is log(|a| + 1e-6), and sympy's
spellings of that last one read back as it: `log(Abs(a) + 1/1000000)` is `log(a)`, and a
constant c > 1e-6 added inside a log is what sympy merged with the 1e-6 (`log(w_l1 + 1/2)` is
`log(add(w_l1, 0.499999))`: log(w_l1 + 1/2) for w_l1 >= 0). A power's exponent must be a
constant up to 8 in size whose fraction is halves, quarters ... down to sixteenths (`x**2`,
`x**(3/2)`, `x**(1/4)`, `x**(-1)`); it becomes `square`, `mul`, nested `sqrt` and `div`.
Constant arithmetic is folded exactly (`1/10` is 0.1) and bounded (a number is range-checked
before it is spelled out; a folded one has at most 4096 bits), so a printed form reads back to
a formula with the same canonical form, and no text makes the reader slow.

Like `expr.parse`, this never evaluates text: a whitelist of names, a hand-written parser, one
ExpressionError with the position of the problem.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from evoprune.primitives.expr import CONST_RANGE, MAX_DEPTH, MAX_LENGTH, ExpressionError, Node, const, parse, tokens
from evoprune.primitives.ops import EPS, OPS
from evoprune.primitives.stats import STATS

# ASCII only, as expr._TOKEN; numbers carry no sign here (a minus is an operator)
_TOKEN = re.compile(r"\s*(?:(?P<num>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>\*\*|[-+*/^(),]))")
ALIASES = {"Abs": "abs", "pdiv": "div", "meannorm": "mnorm"}  # sympy's names for our operators
VARIADIC = {"Min": "min", "Max": "max"}  # sympy's n-ary spelling of binary ones
MAX_POWER = 8
MAX_ROOT = 16  # x**(1/16): four square roots deep
MAX_FOLD_BITS = 4096
_EPS = Fraction(1, round(1 / EPS))


def read_formula(text: str) -> Node:
    """What a user typed, in either form: the prefix form exactly as `expr.parse` reads it (the
    form stored in the database), else this infix grammar. When both fail, the infix reader's
    error where the text holds an infix operator the prefix reader stopped at, or where the infix
    reader read as far or further; else the prefix reader's."""
    try:
        return parse(text)
    except ExpressionError as prefix_error:
        if not isinstance(text, str):
            raise
        try:
            return read_infix(text)
        except ExpressionError as infix_error:
            # infix was meant where the prefix reader stopped at an infix operator, or read less far
            at = prefix_error.position
            if (prefix_error.reason.startswith("unexpected character") and text[at:at + 1] in tuple("+-*/^")
                    or infix_error.position >= at):
                raise
            raise prefix_error from None


def read_infix(text: str) -> Node:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH, text[:80])
    p = _Parser(text)
    if not p.toks:
        raise ExpressionError("empty expression", 0, text)
    value = p.expr(1)
    if p.i != len(p.toks):
        kind, val, pos = p.toks[p.i]
        raise ExpressionError(f"unexpected {val!r} after a complete expression", pos, text)
    node = _node(value, text, 0)
    if _depth(node) > MAX_DEPTH:  # a long chain of + or * is as deep as it is long in prefix form
        raise ExpressionError(f"nested deeper than {MAX_DEPTH} once in prefix form (a chain of "
                              f"{MAX_DEPTH} or more operations)", len(text), text)
    return node


def _depth(node: Node) -> int:
    """Node.depth without recursion (an infix chain can be thousands of levels deep)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((a, d + 1) for a in n.args)
    return deepest


# A parsed value is a Fraction (a constant, kept exact while it folds), a Node or a _Sum.
def _node(v, text: str, pos: int) -> Node:
    if isinstance(v, _Sum):
        return v.node
    if isinstance(v, Node):
        return v
    f = float(v)
    lo, hi = CONST_RANGE
    if not (f == 0 or lo <= abs(f) <= hi):
        raise ExpressionError(f"constant {f:g} out of range (0, or between {lo:g} and {hi:g} in size)", pos, text)
    if Fraction(repr(f)) != v and max(abs(v.numerator), v.denominator) < 2 ** 53:
        return Node("div", (const(v.numerator), const(v.denominator)))  # 1/3 stays exact, as sympy keeps it
    return const(f)


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, list(tokens(text, _TOKEN)), 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def pos(self) -> int:
        return self.toks[self.i][2] if self.i < len(self.toks) else len(self.text)

    def fail(self, message: str, pos: int | None = None):
        raise ExpressionError(message, self.pos() if pos is None else pos, self.text)

    def take(self, want: str) -> None:
        if self.peek() != want:
            found = "the end" if self.peek() is None else repr(self.peek())
            self.fail(f"expected {want!r}, found {found}")
        self.i += 1

    def expr(self, depth: int):
        if depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH}")
        return self._chain(("+", "-"), lambda: self._chain(("*", "/"), lambda: self.unary(depth)))

    def _chain(self, ops: tuple[str, ...], operand):
        """operand (op operand)*, left to right: the terms of a sum, the factors of a product."""
        left = operand()
        while self.peek() in ops:
            op, at = self.peek(), self.pos()
            self.i += 1
            left = self._binary(op, left, operand(), at)
        return left

    def unary(self, depth: int):
        if depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH}")
        if self.peek() == "-":
            at = self.pos()
            self.i += 1
            v = self.unary(depth + 1)
            return -v if isinstance(v, Fraction) else Node("neg", (_node(v, self.text, at),))
        if self.peek() == "+":
            self.i += 1
            return self.unary(depth + 1)
        return self.power(depth)

    def power(self, depth: int):
        base = self.atom(depth)
        if self.peek() in ("**", "^"):
            at = self.pos()
            self.i += 1
            return self._power(base, self.unary(depth + 1), at)
        return base

    def atom(self, depth: int):
        if self.i >= len(self.toks):
            self.fail("expression ends too early")
        kind, val, pos = self.toks[self.i]
        if kind == "num":
            self.i += 1
            f, lo, hi = float(val), *CONST_RANGE
            mantissa = val.lower().split("e")[0]
            if not (lo <= abs(f) <= hi or f == 0 and not mantissa.strip("0.")):  # also before Fraction,
                # which would spell out 10**exponent: "1e999999999" takes minutes and gigabytes
                self.fail(f"number out of range: {val} (constants are 0 or between {lo:g} and {hi:g} in size: "
                          "evaluation is float32, clamped at 1e30)", pos)
            return Fraction(val) if f else Fraction(0)  # exact: "0.1" is 1/10, as sympy holds it
        if val == "(":
            self.i += 1
            inner = self.expr(depth + 1)
            self.take(")")
            return inner
        if kind != "name":
            self.fail(f"expected a name, a number or '(', found {val!r}")
        self.i += 1
        if val in STATS:
            if self.peek() == "(":
                self.fail(f"{val!r} is a statistic, not an operator")
            return Node(val)
        name = ALIASES.get(val, VARIADIC.get(val, val))
        if name not in OPS:
            self.fail(f"unknown name {val!r} (see `evoprune primitives list`)", pos)
        if self.peek() != "(":
            self.fail(f"operator {val!r} needs its argument(s) in parentheses")
        self.i += 1
        args = [self.expr(depth + 1)]
        while self.peek() == ",":
            self.i += 1
            args.append(self.expr(depth + 1))
        self.take(")")
        if val in VARIADIC and len(args) >= 2:
            node = _node(args[0], self.text, pos)
            for a in args[1:]:
                node = Node(name, (node, _node(a, self.text, pos)))
            return node
        if len(args) != OPS[name].arity:
            self.fail(f"{val!r} takes {OPS[name].arity} argument(s), got {len(args)}", pos)
        if name == "log" and (inner := _sympy_log_argument(args[0])) is not None:
            args = [inner]
        return Node(name, tuple(_node(a, self.text, pos) for a in args))

    def _folded(self, v: Fraction, at: int) -> Fraction:
        """A folded constant, bounded: (1e30**8)**8 ... would grow to millions of digits."""
        if max(abs(v.numerator), v.denominator).bit_length() > MAX_FOLD_BITS:
            self.fail(f"constant arithmetic out of range (beyond 2^{MAX_FOLD_BITS} in a numerator or denominator)", at)
        return v

    def _binary(self, op: str, a, b, at: int):
        if isinstance(a, Fraction) and isinstance(b, Fraction) and not (op == "/" and b == 0):
            return self._folded(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b, at)
        name = {"+": "add", "-": "sub", "*": "mul", "/": "div"}[op]
        node = Node(name, (_node(a, self.text, at), _node(b, self.text, at)))
        if op == "+" and isinstance(a, Fraction) != isinstance(b, Fraction):
            c, other = (a, b) if isinstance(a, Fraction) else (b, a)
            return _Sum(node, _node(other, self.text, at), c, False)
        if op == "-" and isinstance(a, Fraction) and not isinstance(b, Fraction):
            return _Sum(node, _node(b, self.text, at), a, True)
        return node

    def _power(self, base, exp, at: int):
        if not isinstance(exp, Fraction):
            self.fail("a power's exponent must be a constant (x**2, x**(1/2), x**(-1)); a printed form with a "
                      "formula in an exponent (sympy writes x*log(c) as log(c**x)) reads back from its prefix "
                      "form, the 'expression' of `evoprune metrics show`", at)
        if isinstance(base, Fraction) and exp.denominator == 1 and abs(exp) <= MAX_POWER and (base or exp > 0):
            return self._folded(base ** exp, at)
        q = exp.denominator
        if q & (q - 1) or q > MAX_ROOT or not 0 < abs(exp) <= MAX_POWER:
            self.fail(f"a power must be a constant from -{MAX_POWER} to {MAX_POWER}, not 0, whole or a sum of "
                      f"halves, quarters ... (square roots of square roots), not {exp}", at)
        b = _node(base, self.text, at)
        whole, frac = divmod(abs(exp), 1)
        factors, root = [], b
        while frac:  # frac's binary digits: x**(1/2), x**(1/4) ... are nested square roots
            root, frac = Node("sqrt", (root,)), frac * 2
            if frac >= 1:
                factors.append(root)
                frac -= 1
        factors += [Node("square", (b,))] * int(whole // 2) + ([b] if whole % 2 else [])
        node = factors[0]
        for f in factors[1:]:
            node = Node("mul", (node, f))
        return Node("div", (const(1.0), node)) if exp < 0 else node


@dataclass(frozen=True)
class _Sum:
    """`a + c`, `c + a` or `c - a` written infix with a constant c (its tree is `node`): how sympy
    prints the argument of our log, log(|x| + 1e-6), told apart from a sum written `add(...)`."""

    node: Node
    other: Node  # a
    addend: Fraction  # c
    minus: bool  # c - a


def _sympy_log_argument(arg):
    """log's argument as the language reads it, where `arg` is how sympy prints the argument of
    our log(u) = log(|u| + 1e-6): `Abs(u) + 1/1000000`; `w + c` with c > 1e-6 where sympy knew
    u = w + c - 1e-6 to be >= 0 (it drops the Abs and merges the constants); `c - w` likewise; a
    constant c, u = c - 1e-6. None: no such sum; `log(arg)` as written."""
    if isinstance(arg, Fraction):
        return arg - _EPS if arg > _EPS else None
    if not isinstance(arg, _Sum) or arg.addend < _EPS:
        return None
    rest = arg.addend - _EPS
    if not rest:
        if arg.minus:
            return Node("neg", (arg.other,))
        return arg.other.args[0] if arg.other.name == "abs" else arg.other
    c = _node(rest, "", 0)
    return Node("sub", (c, arg.other)) if arg.minus else Node("add", (arg.other, c))
