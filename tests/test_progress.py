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
