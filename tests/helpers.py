"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""
from __future__ import annotations

import sqlite3
import time

from evoprune.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """The CLI as a user runs it, in this process: (exit status, stdout, stderr)."""
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def wait_for(db, sql: str, timeout: float = 300) -> None:
    """Poll the SQLite file `db` (a search another process is writing) until `sql`'s first value
    is true. The file is opened read-only, so a poll never creates it before its writer does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                if c.execute(sql).fetchone()[0]:
                    return
        except sqlite3.OperationalError:  # not there yet, or its tables are not
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {sql}")
