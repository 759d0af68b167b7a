"""Progress in a log (not a terminal): a line every `log_every` steps, or every `log_seconds`
when steps are slow, each with an ETA, and one at the end."""
from __future__ import annotations

import io
import time

from rich.console import Console

from evoprune.progress import progress


def test_a_log_gets_a_line_when_steps_are_slow():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with progress("tpp", 10_000, console, True, fields={"loss": ".3f"}, log_every=5_000, log_seconds=0.05) as update:
        update(20, loss=1.0)  # neither 5,000 steps nor 0.05 s since the start: no line
        time.sleep(0.06)
        update(40, loss=0.9)  # 0.06 s: a line, with an ETA
        update(60, loss=0.8)
        update(10_000, loss=0.1)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("tpp 40/10000  loss 0.900  eta ") and len(lines) == 2
    assert lines[1] == "tpp 10000/10000  loss 0.100"


def test_hms():
    from evoprune.progress import hms

    assert [hms(x) for x in (0, 59.4, 65, 3599, 3600, 7384, -3)] == ["0:00", "0:59", "1:05", "59:59", "1:00:00",
                                                                     "2:03:04", "0:00"]


def test_a_search_shows_the_time_left_from_the_generations_after_its_first():
    """The first generation scores the whole population and the baselines: the estimate uses the
    later ones once there are any, less the time the one under way has had."""
    from evoprune.evolve.config import Config
    from evoprune.evolve.engine import GenerationReport
    from evoprune.evolve.progress import SearchDisplay

    buf = io.StringIO()
    cfg = Config.from_dict({"search": {"generations": 4}})
    d = SearchDisplay(Console(file=buf, force_terminal=False, width=300), cfg)
    assert d.eta() is None

    def ended(g, seconds):
        counters = {"canonical_hits": 0, "mask_hits": 0}
        d.update("generation", {"report": GenerationReport(g, 0.5, "w_l1", 0.4, 10, 0, seconds, counters)})

    ended(0, 100.0)
    assert 399 < d.eta() <= 400  # 4 left, at the only time known
    ended(1, 10.0)
    ended(2, 20.0)
    assert 29 < d.eta() <= 30  # 2 left at 15 s, not 100
    d.gen_ended -= 12  # 12 s into generation 3
    assert 17 < d.eta() <= 18
    ended(3, 15.0)
    ended(4, 15.0)
    assert d.eta() is None
    lines = buf.getvalue().splitlines()
    assert "eta 6:40" in lines[0] and "eta 0:30" in lines[2] and "eta" not in lines[4]


def test_a_resumed_call_paces_itself_by_its_first_generation():
    """Only generation 0 is left out of the pace: a call resumed at generation 5 has ordinary
    generations from its first (the time limit and the ETA both use `pace`)."""
    from evoprune.evolve.engine import pace

    assert pace({0: 100.0}) == 100.0
    assert pace({0: 100.0, 1: 10.0, 2: 20.0}) == 15.0
    assert pace({5: 12.0}) == 12.0
    assert pace({5: 12.0, 6: 18.0}) == 15.0
