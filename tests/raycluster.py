"""A two-node Ray cluster on loopback for tests: a head on 127.0.0.2 and a worker on 127.0.0.3
(Ray rewrites 127.0.0.1 to the machine's outward address), in a temporary directory of its
own, so that stopping it touches no other Ray on the machine (`ray stop` would stop them all)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def _free_port(lo: int) -> int:
    for port in range(lo, lo + 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.2", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


class Cluster:
    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="ept", dir="/tmp"))  # short: Ray's socket paths are limited
        self.port = _free_port(26400)
        self.client_port = _free_port(20100)  # outside the worker port range 10002-19999
        self.address = f"{HEAD}:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        if not (self.env.get("RAY_AUTH_TOKEN") or self.env.get("RAY_AUTH_TOKEN_PATH")):
            # token auth needs a token before `ray start` (a local ray.init would make one, but a
            # fresh machine may start a cluster first): Ray's own command makes ~/.ray/auth_token
            # if it is missing, where the nodes and the drivers that connect all find it
            subprocess.run([_ray(), "get-auth-token", "--generate"], check=True, env=self.env,
                           capture_output=True, timeout=60)

    def start(self) -> "Cluster":
        self._run("--head", f"--node-ip-address={HEAD}", f"--port={self.port}", "--include-dashboard=false",
                  f"--ray-client-server-port={self.client_port}")
        self.start_worker()
        return self

    def start_worker(self) -> None:
        self._run(f"--address={self.address}", f"--node-ip-address={WORKER}")
        deadline = time.time() + 60
        while time.time() < deadline and len(self.nodes()) < 2:
            time.sleep(0.5)

    def _run(self, *args: str) -> None:
        subprocess.run([_ray(), "start", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={self.tmp}", *args],
                       check=True, env=self.env, capture_output=True, timeout=120)

    def nodes(self) -> list[str]:
        out = subprocess.run([_ray(), "status", f"--address={self.address}"], env=self.env, capture_output=True,
                             text=True, timeout=60).stdout
        return [line for line in out.splitlines() if line.strip().startswith("1 node_")]

    def pids(self, ip: str | None = None) -> list[int]:
        """Processes of this cluster (of one node when `ip` is given), with their children."""
        mine = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.tmp) in cmd and (ip is None or f"ip_address={ip}" in cmd or f"ip-address={ip}" in cmd):
                mine.append(int(p.name))
        if ip is None:  # the client server does not name the temp dir: find it by its open logs (not the drivers)
            mine += [p for p in holding(str(self.tmp)) if b"evoprune" not in _cmdline(p)]
        return sorted(set(mine) | {c for pid in mine for c in _descendants(pid)})

    def kill(self, ip: str | None = None) -> list[int]:
        pids = self.pids(ip)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def holding(prefix: str) -> list[int]:
    """The processes with a file open under prefix: every process of a Ray cluster keeps its
    log files in the cluster's temp dir open (some rename themselves, so their command lines
    do not name it)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix) for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out
