"""Numbers that claim something carry their uncertainty: means with 95% confidence intervals,
paired differences, and the words for what a difference shows (beats, ties, loses)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float  # 95% CI (Student's t over the samples)
    high: float
    n: int
    std: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.half:.4f}" if self.n > 1 else f"{self.mean:.4f}"

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2


def t_quantile(n: int, level: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1)) if n > 1 else float("inf")


def estimate(values: list[float], level: float = 0.95, *, floor: float = 0.0,
             bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """Mean and its CI; one value has an infinite interval (nothing is known of its spread).
    `floor`: the smallest spread the CI credits. A measurement that moves in steps (test
    accuracy: one image) cannot show a spread below its step: two seeds that both differ by
    the same two images have a sample spread of 0 and, without a floor, a CI of width 0 that
    would call the difference real. `bounds`: where the quantity can lie (an accuracy in
    [0, 1], a difference of two in [-1, 1]); a CI of 2 or more values is cut to them. `std` is the sample's own."""
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, -math.inf, math.inf, 1, float("nan"))
    sd = statistics.stdev(values)
    half = t_quantile(n, level) * max(sd, floor) / math.sqrt(n)
    return Estimate(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), n, sd)


def paired(a: list[float], b: list[float], level: float = 0.95, **kw) -> Estimate:
    """The mean of a - b over paired samples (the same data order, seed or case), with its CI
    (`floor`, `bounds`: as for `estimate`)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different sizes: {len(a)} and {len(b)}")
    return estimate([x - y for x, y in zip(a, b)], level, **kw)


MARKS = {"beats": "+", "ties": "=", "loses to": "-"}  # a verdict in one character, for tables
VERDICTS = tuple(MARKS)  # in the order of a count of wins, ties and losses


def verdict(diff: Estimate) -> str:
    """beats / loses when the CI of the difference excludes 0, else ties."""
    if diff.n > 1 and diff.low > 0:
        return "beats"
    if diff.n > 1 and diff.high < 0:
        return "loses to"
    return "ties"


@dataclass(frozen=True)
class Comparison:
    """One formula's validation: its fitness over fresh data orders and its paired difference
    to the best baseline (the baseline with the highest mean over the same orders)."""

    fitness: Estimate
    diff: Estimate | None  # None for the best baseline itself
    verdict: str  # beats | ties | loses to | "" (the best baseline)


def family_level(k: int, level: float = 0.95) -> float:
    """The per-comparison confidence that keeps `level` for all k comparisons together
    (Bonferroni): with 5 finalists each compared at 95%, one false win in four runs."""
    return 1 - (1 - level) / max(1, k)


def against_best(scores: dict[int, dict[int, float]], baselines: set[int]) -> tuple[int | None, dict[int, Comparison]]:
    """`scores`: candidate ID -> {data order: fitness}. Returns the best baseline's ID and every
    candidate's comparison with it, paired over the orders both were scored on. Fitness CIs are
    95%; the differences of the evolved formulas (not baselines) are 95% for all of them
    together (Bonferroni), so that "beats" is not a chance win among several finalists."""
    base = [b for b in baselines if scores.get(b)]
    level = family_level(len([c for c in scores if c not in baselines and scores[c]]))
    best = max(base, key=lambda b: (statistics.fmean(scores[b].values()), -b), default=None)
    out = {}
    for cid, by_seed in scores.items():
        if not by_seed:
            continue
        fit = estimate([by_seed[s] for s in sorted(by_seed)], bounds=(0.0, 1.0))  # a fitness is in [0, 1]
        if best is None or cid == best:
            out[cid] = Comparison(fit, None, "")
            continue
        common = sorted(set(by_seed) & set(scores[best]))
        diff = paired([by_seed[s] for s in common], [scores[best][s] for s in common],
                      0.95 if cid in baselines else level, bounds=(-1.0, 1.0))
        out[cid] = Comparison(fit, diff, verdict(diff))
    return best, out
