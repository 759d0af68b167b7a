"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""
from __future__ import annotations

from evoprune.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """The CLI as a user runs it, in this process: (exit status, stdout, stderr)."""
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err
