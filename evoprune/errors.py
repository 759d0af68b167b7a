"""User-facing errors: the CLI prints these as one line and exits 2, without a traceback."""


class EvopruneError(Exception):
    """A mistake or missing resource the user can fix (bad flag, missing data, unknown name)."""


class DataNotFound(EvopruneError):
    """A data set is not where we looked; the message says where and how to get it."""


class UnknownName(EvopruneError):
    """A task, model, data set or metric name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        hint = ", ".join(sorted(known)[:12]) + (" ..." if len(known) > 12 else "")
        super().__init__(f"unknown {kind} {name!r}; known: {hint}")
