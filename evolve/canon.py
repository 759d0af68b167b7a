"""Canonical forms of many new formulas at once, the driver and helper processes together.

The search keys its caches and its no-copies rule on each formula's canonical form (sympy's
simplify, `primitives.expr.canonical`): 3-5 ms for the median fresh formula, 50-80 ms at the
95th percentile (benchmarks/proxy_profile.py). The driver makes them between generations, while
every worker waits, so with a fast proxy (a GPU; the digits tasks on a CPU) they are a good part
of a search's wall time. `Simplifier` makes a batch of them in parallel: the engine breeds a
generation's children ahead (`Search.offspring`) and asks for all their forms at once.

Helpers are plain subprocesses (`python -P -m evoprune.evolve.canon`, one JSON line per batch in
and out), not multiprocessing's: they never re-import the user's main module, and a driver
that runs Ray or torch threads is never forked. They start in the background when the
`Simplifier` is made (sympy and torch take a couple of seconds to import) and the driver works
through the batch alongside them, so a helper that is not ready yet, or dies, only costs speed:
the driver makes what is left itself. The forms are the ones one process makes (the same
function), so a search gives the same run with or without helpers.
"""
from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
import weakref
from collections import deque

from evoprune.primitives.expr import CANON_SECONDS, canonical, canonical_hash, parse


def form(text: str) -> tuple[str, str]:
    """(canonical string, canonical hash) of one formula."""
    node = parse(text)
    return canonical(node), canonical_hash(node)


def _forms(texts: list[str]) -> list[tuple[str, str]]:
    return [form(t) for t in texts]


class _Helper:
    # after the interpreter; -P: the working directory is not put on sys.path, so a source
    # checkout's evoprune/ folder there (a clone, the Docker image's /opt/evoprune) cannot shadow
    # the installed package
    command = ("-P", "-m", "evoprune.evolve.canon")

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, *self.command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                                     env=env)
        self.ready = False
        self.chunk: list[str] | None = None  # what it is working on

    def send(self, chunk: list[str]) -> bool:
        try:
            self.proc.stdin.write(json.dumps(chunk) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.chunk = chunk
        return True

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # its loop ends on end of input
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _stop_all(helpers: list[_Helper]) -> None:
    for h in helpers:
        h.stop()
    helpers.clear()


def auto_processes(cpus: int | None = None) -> int:
    """Half the CPUs, at most 4: on 2 cores a helper gains little (1.2x on a search's batches,
    benchmarks/RESULTS.md: each process warms sympy's caches on its own, and a helper takes
    seconds of CPU to start), so the driver works alone there."""
    return max(1, min(4, (cpus or os.cpu_count() or 1) // 2))


class Simplifier:
    """Canonical forms of formulas, `processes` at a time: the driver and `processes - 1` helper
    processes (at most one process per CPU; 1: the driver alone; 0: `auto_processes`). `close`
    ends the helpers (so does the object's end)."""

    def __init__(self, processes: int):
        self.processes = max(1, min(processes or auto_processes(), os.cpu_count() or 1))
        self._helpers: list[_Helper] = []
        for _ in range(self.processes - 1):
            try:
                self._helpers.append(_Helper())
            except (OSError, ValueError):  # no interpreter to start (embedded Python): the driver alone
                break
        self._finalizer = weakref.finalize(self, _stop_all, self._helpers)

    def __call__(self, texts: list[str]) -> dict[str, tuple[str, str]]:
        texts = list(dict.fromkeys(texts))
        if not self._helpers or len(texts) < 2:
            return {t: form(t) for t in texts}
        # a few chunks per process: the slow formulas spread over the processes, little overhead
        size = max(1, math.ceil(len(texts) / (4 * self.processes)))
        queue = deque(texts[i: i + size] for i in range(0, len(texts), size))
        out: dict[str, tuple[str, str]] = {}
        with selectors.DefaultSelector() as sel:
            for h in self._helpers:
                sel.register(h.proc.stdout, selectors.EVENT_READ, h)
            while queue or any(h.chunk for h in self._helpers):
                if not queue:  # only the helpers' chunks are left: wait for them (a hung one is dropped)
                    events = sel.select(timeout=CANON_SECONDS * size + 30)
                    if not events:
                        for h in [h for h in self._helpers if h.chunk]:
                            self._drop(h, sel, queue)
                        continue
                else:
                    events = sel.select(timeout=0)
                for key, _ in events:
                    self._hear(key.data, sel, queue, out)
                for h in list(self._helpers):
                    if h.ready and h.chunk is None and queue:
                        chunk = queue.popleft()
                        if not h.send(chunk):
                            queue.appendleft(chunk)
                            self._drop(h, sel, queue)
                if queue:  # the driver's own share
                    chunk = queue.popleft()
                    out.update(zip(chunk, _forms(chunk)))
        return out

    def _hear(self, h: _Helper, sel, queue: deque, out: dict) -> None:
        line = h.proc.stdout.readline()
        if not line:  # it died (killed, out of memory): its chunk goes back to the queue
            self._drop(h, sel, queue)
        elif not h.ready:
            h.ready = line.strip() == "ready"
        else:
            try:
                forms = [tuple(f) for f in json.loads(line)]
                if len(forms) != len(h.chunk) or not all(len(f) == 2 and all(isinstance(x, str) for x in f)
                                                         for f in forms):
                    raise ValueError(line)
            except (ValueError, TypeError):  # not an answer: the helper is dropped, the driver makes its chunk
                self._drop(h, sel, queue)
                return
            out.update(zip(h.chunk, forms))
            h.chunk = None

    def _drop(self, h: _Helper, sel, queue: deque) -> None:
        if h.chunk:
            queue.append(h.chunk)
        sel.unregister(h.proc.stdout)
        self._helpers.remove(h)
        h.proc.kill()
        h.proc.wait()

    def wait(self, timeout: float = 60.0) -> int:
        """Wait up to `timeout` s for the helpers to be ready (benchmarks, tests); returns how many are."""
        with selectors.DefaultSelector() as sel:
            for h in self._helpers:
                if not h.ready:
                    sel.register(h.proc.stdout, selectors.EVENT_READ, h)
            deadline = time.monotonic() + timeout
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(timeout=left):
                    self._hear(key.data, sel, deque(), {})
                    if key.data.ready:
                        sel.unregister(key.fileobj)
        return sum(h.ready for h in self._helpers)

    def close(self) -> None:
        self._finalizer()


def _serve() -> None:
    """A helper: one JSON list of formulas per input line, one JSON list of forms per output line.
    Ctrl-C in the terminal reaches the whole process group: the driver decides, and ends its
    helpers by closing their input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what a library prints never enters the answers
    sys.stdout = sys.stderr
    answers.write("ready\n")
    for line in sys.stdin:
        answers.write(json.dumps(_forms(json.loads(line))) + "\n")


if __name__ == "__main__":
    _serve()
