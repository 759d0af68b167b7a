"""The one grammar users name a metric with, on every command that takes one:

    ID              a candidate of a search (`evoprune metrics top`), e.g. 27
    NAME            a promoted metric (`evoprune metrics promote ID NAME`)
    baseline:NAME   a built-in metric (`evoprune primitives list`)
    expr:EXPR       a formula written out, in prefix form, e.g. expr:div(w_l1, add(bn_abs_gamma, 0.1)),
                    or infix, e.g. expr:'w_l1 / (bn_abs_gamma + 0.1)' (primitives/infix.py)
"""
from __future__ import annotations

from dataclasses import dataclass

from evoprune.errors import EvopruneError

MAX_ID = 2 ** 63 - 1  # database IDs are signed 64-bit integers


@dataclass(frozen=True)
class MetricRef:
    kind: str  # id | name | baseline | expr
    value: str

    @classmethod
    def parse(cls, text: str) -> "MetricRef":
        text = text.strip()
        for prefix in ("baseline", "expr"):
            if text.startswith(prefix + ":"):
                return cls(prefix, text.split(":", 1)[1].strip())
        if text.isascii() and text.isdigit():
            if int(text) > MAX_ID:
                raise EvopruneError(f"no candidate with ID {text} (IDs are below 2^63)")
            return cls("id", str(int(text)))
        if not text:
            raise EvopruneError("empty metric reference: give an ID, a NAME, baseline:NAME or expr:EXPRESSION")
        return cls("name", text)

    @property
    def in_database(self) -> bool:
        return self.kind in ("id", "name")


@dataclass(frozen=True)
class MetricSource:
    name: str  # a label (docstrings, file names)
    expression: str
    origin: str  # where it came from, in words
    candidate_id: int | None = None  # the candidate it names, for ID and NAME


def resolve(ref: str | MetricRef, db: str | None = None) -> MetricSource:
    """The formula a reference names; expressions are parsed (one clear message when malformed)."""
    from evoprune.primitives.baselines import get_baseline
    from evoprune.primitives.expr import parse
    from evoprune.primitives.infix import read_formula

    r = ref if isinstance(ref, MetricRef) else MetricRef.parse(ref)
    if r.kind == "expr":  # prefix as given; infix (as typed, or as printed simplified) in prefix form
        try:
            parse(r.value)
            text = r.value
        except EvopruneError:
            text = str(read_formula(r.value))  # or its error
        return MetricSource("custom", text, "an expression given on the command line")
    if r.kind == "baseline":
        b = get_baseline(r.value)
        return MetricSource(b.name, b.expression, f"baseline {b.name}: {b.description}")
    from evoprune.db import queries
    from evoprune.db.store import connect

    engine = connect(db, create=False)
    if r.kind == "id":
        c = queries.candidate(engine, int(r.value))
        return MetricSource(f"candidate_{r.value}", c["expression"], f"candidate {r.value} of run {c['run']} "
                            f"(fitness {c['fitness']:.4f}, {c['stage']})", c["id"])
    m = queries.metric_by_name(engine, r.value)
    return MetricSource(r.value, m["expression"], f"promoted metric {r.value!r} (candidate {m['candidate']})",
                        m["candidate"])
