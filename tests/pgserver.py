"""A private PostgreSQL server for tests: initdb in a temporary folder, listening on 127.0.0.1
at a free port, run as the `postgres` system user (PostgreSQL refuses root), stopped at the end."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> str | None:
    """Why a server cannot be started here, or None."""
    if not (PG_BIN / "initdb").exists() and not shutil.which("initdb"):
        return "PostgreSQL is not installed (initdb not found)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'evoprune[postgres]')"
    if os.geteuid() == 0:
        try:
            subprocess.run(["id", "postgres"], check=True, capture_output=True)
        except subprocess.CalledProcessError:
            return "running as root without a postgres user to run the server as"
    return None


def _bin(name: str) -> str:
    return str(PG_BIN / name) if (PG_BIN / name).exists() else shutil.which(name)


class Server:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="evoprune-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> "Server":
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        data = self.dir / "data"
        self._run(_bin("initdb"), "-D", str(data), "-U", "evoprune", "--auth=trust", "-E", "UTF8")
        self._run(_bin("pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        return self

    def create_db(self, name: str) -> str:
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "evoprune", name)
        return f"postgresql+psycopg://evoprune@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
