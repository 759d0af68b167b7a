"""Progress of long work, with an ETA: a live bar on a terminal, plain lines in a log.

    with progress("retrain", 120, console, show, fields={"loss": ".3f", "val": ".2%"}) as update:
        update(epoch, loss=..., val=...)

On a terminal the bar shows done/total, the fields, the time spent and the time left; in a
log file (CI, `ray submit`, a pipe) one line is printed once `log_every` steps or
`log_seconds` seconds have passed since the last one, and at the end.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

Update = Callable[..., None]  # update(completed, **fields)


def counted(n: int, noun: str, plural: str = "") -> str:
    """'1 baseline', '3 baselines', '1 loss', '2 losses' (`plural` where "s" is not it)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def warn(console: Console, text: str) -> None:
    """One `warning: ...` line in yellow (the text is shown as is, never read as markup)."""
    console.print(f"[yellow]warning: {escape(text)}[/]", highlight=False)


def hms(seconds: float) -> str:
    """'4:05' under an hour, '2:04:05' from one on."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _eta(done: int, total: int, elapsed: float) -> str:
    if done <= 0 or done >= total:
        return ""
    return f"  eta {hms(elapsed / done * (total - done))}"


@contextlib.contextmanager
def progress(label: str, total: int, console: Console | None, show: bool, *, fields: dict[str, str] | None = None,
             log_every: int = 1, log_seconds: float = 30.0) -> Iterator[Update]:
    """An `update(completed, **values)` callback; `fields` maps a value's name to its format spec."""
    fields = fields or {}
    console = console or Console(stderr=True)
    if not show:
        yield lambda completed, **values: None
        return
    if not console.is_terminal:
        t0 = time.perf_counter()
        last = [0, t0]  # the step and the time of the last line

        def log(completed: int, **values) -> None:
            now = time.perf_counter()
            if completed - last[0] >= log_every or completed >= total or (completed > last[0]
                                                                          and now - last[1] >= log_seconds):
                last[:] = completed, now
                shown = "  ".join(f"{k} {format(values[k], spec)}" for k, spec in fields.items() if k in values)
                console.print(f"{label} {completed}/{total}  {shown}{_eta(completed, total, now - t0)}",
                              highlight=False)
        yield log
        return
    text = "  ".join(f"{k} {{task.fields[{k}]:{spec}}}" for k, spec in fields.items())
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(text),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console) as prog:
        bar = prog.add_task(label, total=total, **{k: "" if spec.endswith("s") else float("nan")
                                                   for k, spec in fields.items()})

        def update(completed: int, **values) -> None:
            prog.update(bar, completed=completed, **values)
        yield update


@contextlib.contextmanager
def epoch_progress(label: str, total: int, console: Console | None, show: bool):
    """An `on_epoch(epoch, loss, val)` callback for `evoprune.train.train`."""
    with progress(label, total, console, show, fields={"loss": ".3f", "val": ".2%"}) as update:
        yield lambda e, loss, val: update(e, loss=loss, val=val)
