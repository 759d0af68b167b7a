"""Canonical forms of new formulas, made by helper processes while the driver does its own work.

The search keys its caches and its no-copies rule on each formula's canonical form (sympy's
simplify, `primitives.expr.canonical`): 3-5 ms for the median fresh formula, 50-80 ms at the
95th percentile (benchmarks/proxy_profile.py). Made by the driver, they hold up the proxy runs:
with a fast proxy (a GPU; the digits tasks on a CPU) a good part of a search's wall time. The
engine breeds a generation's children ahead (`Search.children`) and hands their formulas to
`Simplifier.ahead`, which starts them on the helpers and returns; the driver then asks for each
child's form as it needs it, waiting only for that one (and making it itself when no helper
has started it), so the helpers work while the proxy runs, in the driver's process or on a pool.

Helpers are plain subprocesses (`python -P -m evoprune.evolve.canon`: a JSON list of formulas
per line in, one JSON form per line out as each is made), not multiprocessing's: they never
re-import the user's main module, and a driver that runs Ray or torch threads is never
forked. They start in the background when the `Simplifier` is made (sympy and torch take a
couple of seconds to import); a helper that is not ready yet, or dies, only costs speed: the
driver makes what is left itself. The forms are the ones one process makes (the same
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
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)  # its answers are read as bytes, whole lines at a time (`lines`)
        self.ready = False
        self.busy: deque[str] = deque()  # the formulas sent to it, in order, not answered yet
        self._partial = b""

    def send(self, texts: list[str]) -> bool:
        try:
            self.proc.stdin.write(json.dumps(texts) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.busy.extend(texts)
        return True

    def lines(self) -> list[str] | None:
        """The whole lines it has written since the last call; None once it has ended."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        *whole, self._partial = (self._partial + data).split(b"\n")
        return [line.decode() for line in whole]

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # its loop ends on end of input
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _stop_all(helpers: list[_Helper], sel: selectors.BaseSelector) -> None:
    for h in helpers:
        h.stop()
    helpers.clear()
    sel.close()


def auto_processes(cpus: int | None = None) -> int:
    """Half the CPUs, at most 4: on 2 cores a helper takes the CPU the proxy runs need (the same
    search's wall time with and without one, benchmarks/RESULTS.md) and seconds of CPU to start,
    so the driver works alone there."""
    return max(1, min(4, (cpus or os.cpu_count() or 1) // 2))


class Simplifier:
    """Canonical forms of formulas, `processes` at a time: the driver and `processes - 1` helper
    processes (at most one process per CPU; 1: the driver alone; 0: `auto_processes`). `close`
    ends the helpers (so does the object's end).

    `ahead(texts)` hands formulas the caller will ask for soon to the helpers and returns at
    once: they work while the driver does something else (a proxy run in its own process, a
    pool's results). A call then waits only for the forms it asks for, and makes itself any
    that no helper has started."""

    def __init__(self, processes: int):
        self.processes = max(1, min(processes or auto_processes(), os.cpu_count() or 1))
        self._helpers: list[_Helper] = []
        self._sel = selectors.DefaultSelector()
        self._queue: deque[str] = deque()  # asked for (ahead or now), not sent to a helper yet
        self._done: dict[str, tuple[str, str]] = {}  # made by a helper, not returned yet
        for _ in range(self.processes - 1):
            try:
                h = _Helper()
            except (OSError, ValueError):  # no interpreter to start (embedded Python): the driver alone
                break
            self._helpers.append(h)
            self._sel.register(h.fd, selectors.EVENT_READ, h)
        self._finalizer = weakref.finalize(self, _stop_all, self._helpers, self._sel)

    def ahead(self, texts: list[str]) -> None:
        """Start the forms of `texts` on the helpers, if there are any (else nothing: the driver
        makes each form when it is asked for)."""
        if self._helpers:
            self._enqueue(texts, urgent=False)
            self._poll(0)

    def __call__(self, texts: list[str]) -> dict[str, tuple[str, str]]:
        """The forms of `texts`, and of any other formula a helper has made since the last call."""
        texts = list(dict.fromkeys(texts))
        if self._helpers:
            self._enqueue(texts, urgent=True)
        while self._helpers:
            self._poll(0)
            missing = [t for t in texts if t not in self._done]
            started = self._started()
            if todo := next((t for t in missing if t not in started), None):
                if todo in self._queue:
                    self._queue.remove(todo)
                self._done[todo] = _forms([todo])[0]  # the driver's own share
            elif missing:  # only the helpers' formulas are left: wait for them (a hung one is dropped)
                behind = max(h.busy.index(t) + 1 for h in self._helpers for t in missing if t in h.busy)
                if not self._poll(CANON_SECONDS * behind + 30):
                    for h in [h for h in self._helpers if h.busy]:
                        self._drop(h)
            else:
                break
        out, self._done = self._done, {}
        if missing := [t for t in texts if t not in out]:  # the driver alone
            out.update(zip(missing, _forms(missing)))
        return out

    def _started(self) -> set[str]:
        """The formulas sent to a helper and not answered yet."""
        return {t for h in self._helpers for t in h.busy}

    def _enqueue(self, texts: list[str], urgent: bool) -> None:
        started = self._started()
        new = [t for t in dict.fromkeys(texts) if t not in self._done and t not in started]
        queued = set(self._queue)
        if urgent:  # to the front, in order
            for t in reversed(new):
                if t in queued:
                    self._queue.remove(t)
                self._queue.appendleft(t)
        else:
            self._queue.extend(t for t in new if t not in queued)

    def _poll(self, timeout: float) -> bool:
        """Read what the helpers have answered (waiting up to `timeout` s for something), then give
        each idle one a share of the queue; returns whether anything was heard."""
        heard = False
        if self._helpers:
            for key, _ in self._sel.select(timeout=timeout):
                heard = True
                self._hear(key.data)
        idle = [h for h in self._helpers if h.ready and not h.busy]
        for h in idle:
            if not self._queue:
                break
            # a share of what is queued: the slow formulas spread over the helpers, little overhead
            size = max(1, math.ceil(len(self._queue) / (2 * len(self._helpers))))
            texts = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            if not h.send(texts):
                self._queue.extendleft(reversed(texts))
                self._drop(h)
        return heard

    def _hear(self, h: _Helper) -> None:
        lines = h.lines()
        if lines is None:  # it died (killed, out of memory): what it had goes back to the queue
            self._drop(h)
            return
        for line in lines:
            if not h.ready:
                h.ready = line.strip() == "ready"
                continue
            try:
                f = json.loads(line)
                if not (h.busy and isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f)):
                    raise ValueError(line)
            except (ValueError, TypeError):  # not an answer: the helper is dropped, the driver makes its share
                self._drop(h)
                return
            self._done[h.busy.popleft()] = (f[0], f[1])

    def _drop(self, h: _Helper) -> None:
        if h not in self._helpers:
            return
        self._queue.extendleft(reversed(h.busy))
        h.busy.clear()
        self._sel.unregister(h.fd)
        self._helpers.remove(h)
        h.proc.kill()
        h.stop()

    def wait(self, timeout: float = 60.0) -> int:
        """Wait up to `timeout` s for the helpers to be ready (benchmarks, tests); returns how many are."""
        deadline = time.monotonic() + timeout
        while (not all(h.ready for h in self._helpers)) and (left := deadline - time.monotonic()) > 0:
            self._poll(left)
        return sum(h.ready for h in self._helpers)

    def close(self) -> None:
        self._finalizer()


def _serve() -> None:
    """A helper: one JSON list of formulas per input line; one JSON form per output line, each as
    it is made. Ctrl-C in the terminal reaches the whole process group: the driver decides, and
    ends its helpers by closing their input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what a library prints never enters the answers
    sys.stdout = sys.stderr
    answers.write("ready\n")
    for line in sys.stdin:
        for text in json.loads(line):
            answers.write(json.dumps(form(text)) + "\n")


if __name__ == "__main__":
    _serve()
