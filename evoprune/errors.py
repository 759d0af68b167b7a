"""User-facing errors: the CLI prints these as one line and exits 2, without a traceback."""


class EvopruneError(Exception):
    """A mistake or missing resource the user can fix (bad flag, missing data, unknown name)."""


def one_line(e: BaseException, limit: int | None = None) -> str:
    """An exception for a one-line message: its type and the first line of its text (an empty
    text gives the type alone), the text cut at `limit` characters."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


class DataNotFound(EvopruneError):
    """A data set is not where we looked; the message says where and how to get it."""


class Diverged(EvopruneError):
    """Training's loss became inf or nan (a learning rate or a regularization too large for the
    model); nothing trained after it is kept: no cache entry, no checkpoint, no result. `what`
    says what happened, `advice` what to change where the user set it (a flag, a suite file)."""

    def __init__(self, what: str, advice: str = ""):
        self.what, self.advice = what, advice
        super().__init__(f"{what}; {advice}" if advice else what)


class UnknownName(EvopruneError):
    """A task, model, data set or metric name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str], hint: str | None = None):
        """`hint` replaces the list of known names in the message (which shows the first 12)."""
        self.kind, self.name, self.known = kind, name, known
        hint = hint or ", ".join(sorted(known)[:12]) + (" ..." if len(known) > 12 else "")
        super().__init__(f"unknown {kind} {name!r}; known: {hint}")
