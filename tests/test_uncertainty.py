"""evoprune.uncertainty: the CIs and verdicts every 'beats' in evoprune rests on."""
from __future__ import annotations

import math

import pytest

from evoprune.uncertainty import against_best, estimate, paired, verdict


def test_a_t_interval_and_its_verdicts():
    e = estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.std == 1.0 and e.half == pytest.approx(4.302653 / math.sqrt(3))
    assert verdict(paired([1.3, 1.35, 1.4], [1.0, 1.0, 1.0])) == "beats"
    assert verdict(paired([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])) == "ties"  # +0.2, but a half-width of 0.25
    assert verdict(paired([0.7, 0.65, 0.6], [1.0, 1.0, 1.0])) == "loses to"
    assert verdict(paired([1.1, 0.9, 1.0], [1.0, 1.0, 1.0])) == "ties"
    one = estimate([0.5])  # one value: nothing is known of its spread, whatever the bounds
    assert math.isinf(one.low) and math.isinf(one.high) and verdict(paired([1.0], [0.0])) == "ties"


def test_floor_and_bounds():
    same = paired([0.51, 0.61], [0.50, 0.60])  # the same difference twice: a spread of 0
    assert same.low == pytest.approx(same.high) and verdict(same) == "beats"
    floored = paired([0.51, 0.61], [0.50, 0.60], floor=0.01)
    assert verdict(floored) == "ties" and floored.std == pytest.approx(0, abs=1e-12)  # std stays the sample's
    wide = estimate([0.1, 0.9], bounds=(0.0, 1.0))
    assert (wide.low, wide.high) == (0.0, 1.0) and wide.mean == 0.5


def test_against_best_keeps_fitness_cis_in_range_and_corrects_for_several_finalists():
    scores = {1: {0: 0.50, 1: 0.52, 2: 0.51}, 2: {0: 0.40, 1: 0.41, 2: 0.42},  # baselines
              10: {0: 0.90, 1: 0.10, 2: 0.95}, 11: {0: 0.53, 1: 0.55, 2: 0.54}, 12: {0: 0.52, 1: 0.53, 2: 0.53}}
    best, out = against_best(scores, {1, 2})
    assert best == 1 and out[1].verdict == "" and out[2].verdict == "loses to"
    assert 0.0 <= out[10].fitness.low and out[10].fitness.high <= 1.0  # a t-interval would pass 1
    assert -1.0 <= out[10].diff.low and out[10].diff.high <= 1.0
    assert out[11].verdict == "beats"  # +0.03 on every order
    # three evolved formulas: each difference's CI is at 1 - 0.05 / 3, wider than a single 95% one
    alone = paired([0.52, 0.53, 0.53], [0.50, 0.52, 0.51])
    assert out[12].diff.half > alone.half
