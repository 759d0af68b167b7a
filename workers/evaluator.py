"""Evaluators: score a batch of jobs (masks per task, stage) and yield results as they finish.

The engine sees one interface, `run(jobs) -> iterator of (job, FitnessRecord)`:
  InProcessEvaluator  in the driver's process (tests, debugging, a laptop)
  RayEvaluator        a pool of Ray actors, each holding its tasks' models and data. The driver
                      loads both and ships them through Ray's object store, so every worker, on
                      any node, scores exactly the model and the data the driver scored (never
                      what a node's own cache or data root holds). Results stream back through
                      ray.wait.

Faults are never results. A job whose actor dies (its node lost, the process killed) or runs
past `[proxy] timeout_s` is run again on another actor; a job that fails MAX_ATTEMPTS times,
or a pool that cannot place a single actor for `[run] placement_timeout_s` (every node lost,
or the head), ends the evaluation with ClusterError: the run is then marked failed, to be
resumed, and nothing of the unfinished generation is stored.
"""
from __future__ import annotations

import itertools
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from evoprune.errors import EvopruneError, one_line
from evoprune.records import FitnessRecord
from evoprune.workers.proxy import Job, ProxyConfig, TaskContext, evaluate_job, evaluate_jobs

MAX_ATTEMPTS = 3  # a job that fails this often on healthy-looking workers stops the run
# calls in flight per actor: the actor starts the next as soon as it ends one (Ray queues them),
# so its round trip (a few ms: the masks there, the record back) overlaps its work
CALLS_PER_ACTOR = 2


class ClusterError(RuntimeError):
    """The cluster failed under the run (nodes or the head lost, workers crashing): not a result."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its task contexts (plain data: it travels to Ray actors).
    `pretrained`: task -> the driver's Pretrained (model and data); without it a worker loads
    them itself from `cache_dir` and `data_root`."""

    proxy: ProxyConfig
    data_root: str | None = None
    cache_dir: str | None = None
    tasks_file: str | None = None
    device: str = "cpu"
    threads: int = 0  # torch threads in an evaluating process (0: torch's default in-process, 1 per actor)
    pretrained: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def contexts(self, pretrained: dict[str, Any] | None = None) -> dict[str, TaskContext]:
        pre = pretrained if pretrained is not None else self.pretrained
        return {t: TaskContext(t, self.proxy, data_root=self.data_root, cache_dir=self.cache_dir, device=self.device,
                               tasks_file=self.tasks_file, pretrained=pre.get(t)) for t in self.proxy.tasks}


class InProcessEvaluator:
    concurrent = False  # the jobs run one after another in the caller's process
    size = 1

    def __init__(self, spec: WorkerSpec, contexts: dict[str, TaskContext] | None = None):
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.contexts = contexts or spec.contexts()
        self.name = f"local-{socket.gethostname()}-{os.getpid()}"

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, FitnessRecord]]:
        k, source = self.spec.proxy.batch_candidates, iter(jobs)
        if k <= 1:
            for job in source:
                yield job, evaluate_job(self.contexts, job, worker=self.name)
            return
        while chunk := list(itertools.islice(source, k)):
            yield from zip(chunk, evaluate_jobs(self.contexts, chunk, worker=self.name))

    def close(self) -> None:
        pass


def _cluster_file() -> str | None:
    """The address `ray start` recorded on this machine, if any."""
    try:
        with open("/tmp/ray/ray_current_cluster") as f:
            return f.read().strip() or None
    except OSError:
        return None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster asked for (`address`, else $RAY_ADDRESS, else one `ray start` runs on
    this machine) or, when none is, start a local Ray. A cluster asked for that cannot be
    reached is an error, never a silent local run. A Ray already initialised here is reused."""
    import ray

    if ray.is_initialized():
        return
    if address == "auto":
        address = _cluster_file()
        if not address:
            raise EvopruneError("--address auto: no Ray runs on this machine (`ray start` records its address in "
                                "/tmp/ray/ray_current_cluster); start one, or give its address")
    asked = address or os.environ.get("RAY_ADDRESS") or _cluster_file()
    if not asked:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        return
    where = "the address given" if address else "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else \
        "/tmp/ray/ray_current_cluster (written by `ray start` on this machine; `ray stop` clears it)"

    def refuse(why: str) -> EvopruneError:
        return EvopruneError(f"cannot join the Ray cluster at {asked} (from {where}): {why}; check that it runs, "
                             "and that this machine holds its token (~/.ray/auth_token or $RAY_AUTH_TOKEN, "
                             "with RAY_AUTH_MODE=token)")

    if not asked.startswith("ray://"):  # Ray would retry an address nothing listens on for minutes
        host, _, port = asked.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise refuse(f"nothing answers there ({e})") from None
    _token_auth_if_available()
    try:
        ray.init(address=asked, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise refuse(str(e).splitlines()[0][:200]) from None


def _token_auth_if_available() -> None:
    """Ray 2.60 clusters authenticate by token by default: a driver joining one must say so.
    With RAY_AUTH_MODE unset and a token on this machine (~/.ray/auth_token), turn token mode on
    for this process (Ray's own helper also refreshes its cached config; setting the variable
    after `import ray` alone is too late)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: it reads RAY_AUTH_MODE as it was at start-up
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class _Actor:
    """The body of a Ray actor: task contexts built once from the driver's models and data,
    then one evaluation per call."""

    def __init__(self, spec: WorkerSpec, pretrained: dict[str, Any]):
        import ray
        import torch

        torch.set_num_threads(spec.threads or 1)  # one actor per CPU slot: no oversubscription
        self.name = f"ray-{socket.gethostname()}-{ray.util.get_node_ip_address()}-{os.getpid()}"
        self.error: EvopruneError | None = None
        try:
            self.contexts = spec.contexts({t: _unpickled(ray, ref) for t, ref in pretrained.items()})
        except EvopruneError as e:  # the user's data or model (files missing on this node): said by
            self.error = e  # whoami as a task error, which the driver can read; not a dead actor

    def whoami(self) -> tuple[int, str]:
        if self.error is not None:
            raise self.error
        return os.getpid(), self.name

    def evaluate(self, jobs: list[Job]) -> list[dict]:
        """One job, or `[proxy] batch_candidates` of them trained together."""
        return [r.to_dict() for r in evaluate_jobs(self.contexts, jobs, worker=self.name)]


def node_gpus() -> list[float]:
    """The GPUs of each live node of the Ray this process has joined."""
    import ray

    return [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def gpu_share(asked: float | None, device: str, node_gpus: list[float], option: str,
              workers: int | None = None) -> tuple[float, str]:
    """The GPUs each Ray task or actor asks for and the device it runs on, given the GPUs of each
    node. Ray hides the GPUs from a task that asks for none (CUDA_VISIBLE_DEVICES=""), so on a
    GPU cluster one must ask for a share to use it: `asked` None means one GPU where the cluster
    has any (and the device is not cpu), else none; with `workers` of them wanted at once and
    fewer GPUs, an even share of the GPUs there are (2 on one GPU: half each), so that none waits
    for a GPU that never frees. `option` names the setting in messages."""
    most = max(node_gpus, default=0.0)
    if asked is None:
        asked = 0.0
        if most > 0 and device != "cpu":
            asked = min(1.0, math.floor(sum(node_gpus) / workers * 1e4) / 1e4) if workers else 1.0
    if asked and device == "cpu":
        raise EvopruneError(f"{option} {asked:g} with device cpu: each worker would hold a GPU it does not use")
    if not asked and device.startswith("cuda"):
        raise EvopruneError(f"device cuda on Ray workers needs {option} above 0 (Ray hides the GPUs from a worker "
                            "that asks for none)" + ("" if most else "; and this cluster has no GPU"))
    if asked > most:
        raise EvopruneError(f"{option} {asked:g}: no node of this cluster has that many GPUs (at most {most:g}); "
                            "a worker would wait for one forever")
    return asked, "cuda" if asked else "cpu"


def users_error(e: BaseException) -> EvopruneError | None:
    """The user's own mistake a Ray task or actor raised (`RayTaskError.cause`), else None: a
    crash or a lost node, which another worker may get past."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, EvopruneError) else None


def _unpickled(ray, ref):
    """The driver's model and data. Its classes are imported here: an `import:` model whose
    module this node lacks is the user's to install, said as such."""
    try:
        return ray.get(ref)
    except ray.exceptions.RaySystemError as e:
        last = str(e).strip().splitlines()[-1]
        if last.startswith(("ModuleNotFoundError", "ImportError")):
            raise EvopruneError(f"this node cannot load the task's model ({last}); an import: model's module "
                                "must be importable on every Ray node") from None
        raise


@dataclass
class _Slot:
    actor: Any
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    probe: Any = None  # the whoami() call that says the actor is up
    pid: int = 0
    calls: list = field(default_factory=list)  # refs of its calls in flight, in order: the first runs
    running_since: float = 0.0  # when its first call started (when sent, or when the one before ended)


class RayEvaluator:
    """A pool of `workers` Ray actors. Actors that die are replaced; replacements that cannot be
    placed (a node lost) leave the pool smaller, and the run goes on with the rest, saying so."""

    concurrent = True  # the jobs run in other processes while the driver works

    def __init__(self, spec: WorkerSpec, workers: int, gpus_per_worker: float = 0.0, num_cpus: int | None = None,
                 address: str | None = None, placement_timeout_s: float = 120.0,
                 on_status: Callable[[str], None] | None = None):
        import ray

        init_ray(address, num_cpus)
        self.ray = ray
        self.spec = spec
        self.size = workers
        self.placement_timeout_s = placement_timeout_s
        self.on_status = on_status or (lambda text: None)
        # the driver's models and data, put once in the object store: every actor gets those
        self.refs = {t: ray.put(p) for t, p in spec.pretrained.items()}
        self.spec_to_ship = WorkerSpec(spec.proxy, spec.data_root, spec.cache_dir, spec.tasks_file, spec.device,
                                       spec.threads)
        self.actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(_Actor)
        self.gcs = ray.get_runtime_context().gcs_address  # host:port of the head's GCS
        self.head_lost = False
        self.restarts = 0
        self.failed_starts = 0  # actors in a row that died before they answered their probe
        self.slots = [self._new_slot() for _ in range(workers)]

    def _new_slot(self) -> _Slot:
        actor = self.actor_cls.remote(self.spec_to_ship, self.refs)
        return _Slot(actor, probe=actor.whoami.remote())

    def pids(self) -> list[int]:
        self._wait_ready(all_of_them=True)
        return [s.pid for s in self.slots]

    def wait_ready(self) -> int:
        """Wait until an actor is up (an actor starts in seconds: torch, the task contexts);
        returns how many are. ClusterError when none is within the placement timeout."""
        self._wait_ready()
        return sum(s.ready for s in self.slots)

    def _wait_ready(self, all_of_them: bool = False) -> None:
        """Move actors whose probe answered into the ready set; drop the ones that failed to
        start. Raises ClusterError when none is ready for placement_timeout_s."""
        while True:
            starting = self._collect_probes(timeout=0.5)
            ready = [s for s in self.slots if s.ready]
            if ready and not (all_of_them and len(ready) < len(self.slots)):
                return
            waited = max((time.monotonic() - s.started for s in self.slots if not s.ready), default=0.0)
            self._check_head()
            if not self.slots or waited > self.placement_timeout_s:
                raise ClusterError(f"no Ray worker could be placed for {self.placement_timeout_s:.0f} s: the "
                                   "cluster lost its nodes or its head")
            if not starting:
                self.slots.append(self._new_slot())

    def _check_head(self) -> None:
        """Raise ClusterError at once when the head's GCS no longer answers: Ray's own calls would
        block on it (and Ray ends a driver that has lost its GCS for a minute)."""
        host, _, port = self.gcs.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                return
        except OSError as e:
            self.head_lost = True
            raise ClusterError(f"the Ray head is gone (its GCS at {self.gcs} does not answer: {e})") from None

    def _drop(self, slot: _Slot, replace: bool = True) -> None:
        """An actor that died or stalled goes; a new one is asked for (it starts when a node can
        take it; until then the pool is smaller)."""
        self._check_head()
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        if slot in self.slots:
            self.slots.remove(slot)
        if replace and len(self.slots) < self.size:
            self.slots.append(self._new_slot())
            self.restarts += 1
        ready = sum(s.ready for s in self.slots)
        if ready < self.size:
            self.on_status(f"{ready} of {self.size} Ray workers ready (a worker was lost; a replacement starts "
                           "when a node can take it)")

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, FitnessRecord]]:
        """Results as they come. `jobs` may be lazy (the engine makes each job as its candidate
        is bred): it is drawn as workers free up, and while every worker is busy one job at a time
        is drawn ahead, so the driver's work on the next jobs overlaps the workers' on these."""
        ray = self.ray
        source = iter(jobs)
        queue: list[tuple[Job, int]] = []  # (job, attempt): jobs drawn (or to retry), not yet sent
        flight: dict = {}  # object ref -> ([(job, attempt)], slot); each slot lists its own refs
        k = self.spec.proxy.batch_candidates  # jobs per call: trained together on the actor
        timeout = self.spec.proxy.timeout_s  # per evaluation: a call of n jobs gets n times it
        drawn_all = False

        def draw(n: int) -> None:  # up to n more jobs from the source into the queue
            nonlocal drawn_all
            while n > 0 and not drawn_all:
                job = next(source, None)
                if job is None:
                    drawn_all = True
                else:
                    queue.append((job, 1))
                    n -= 1

        while True:
            draw(k - len(queue))
            if not (queue or flight):
                return
            if queue and not any(s.ready for s in self.slots):
                self._wait_ready()  # every worker lost: wait for a replacement, up to the placement timeout
            for slot in [s for s in self.slots if s.ready] * CALLS_PER_ACTOR:
                if len(slot.calls) >= CALLS_PER_ACTOR:
                    continue
                draw(k - len(queue))
                if not queue:
                    break
                batch, queue = queue[:k], queue[k:]
                ref = slot.actor.evaluate.remote([j for j, _ in batch])
                flight[ref] = (batch, slot)
                if not slot.calls:
                    slot.running_since = time.monotonic()
                slot.calls.append(ref)
            if not flight:
                continue
            ahead = not drawn_all and len(queue) < k * len(self.slots)
            if ahead:  # every worker busy: make the next job meanwhile
                draw(1)
            done, _ = ray.wait(list(flight), num_returns=1, timeout=0 if ahead else 1.0)
            for ref in done:
                if ref not in flight:  # its actor was lost with an earlier call: retried already
                    continue
                batch, slot = flight.pop(ref)
                slot.calls.remove(ref)
                try:
                    recs = [FitnessRecord.from_dict(d) for d in ray.get(ref)]
                except Exception as e:  # the user's data or model; else the actor died or crashed
                    if mistake := users_error(e):
                        raise EvopruneError(f"{mistake} (evaluating {batch[0][0].expression!r} on a Ray "
                                            f"worker)") from None
                    self._lost(slot, flight, queue, batch, one_line(e, 200))
                    continue
                slot.running_since = time.monotonic()  # the actor's next call starts now
                yield from zip((j for j, _ in batch), recs)
            self._collect_probes(timeout=0)
            now = time.monotonic()
            for slot in [s for s in self.slots if s.calls]:  # each actor's running call, one per actor
                ref = slot.calls[0]
                batch = flight[ref][0]
                if now - slot.running_since > timeout * len(batch):  # stalled: its node may be gone silently
                    flight.pop(ref)
                    slot.calls.remove(ref)
                    self._lost(slot, flight, queue, batch, f"no answer after {timeout * len(batch):.0f} s")

    def _lost(self, slot: _Slot, flight: dict, queue: list, batch: list, why: str) -> None:
        """An actor failed `batch`: drop it, and run that and its other calls again elsewhere."""
        queued, slot.calls = slot.calls, []
        self._drop(slot)
        for ref in reversed(queued):  # waiting behind the failed call: not an attempt of theirs
            queue[:0] = flight.pop(ref)[0]
        for job, attempt in reversed(batch):
            self._retry(queue, job, attempt, why)

    def _collect_probes(self, timeout: float) -> bool:
        """Move actors whose probe answered within `timeout` into the ready set; drop the ones
        that failed to start. False when no actor was starting."""
        probes = {s.probe: s for s in self.slots if not s.ready}
        if not probes:
            return False
        done, _ = self.ray.wait(list(probes), num_returns=len(probes), timeout=timeout)
        for ref in done:
            slot = probes[ref]
            try:
                slot.pid = self.ray.get(ref)[0]
                slot.ready = True
                self.failed_starts = 0
            except Exception as e:  # the user's mistake (every replacement would fail alike), or it died
                if mistake := users_error(e):
                    raise EvopruneError(f"a Ray worker cannot start: {mistake}") from None
                self._failed_start(slot, e)
        return True

    def _failed_start(self, slot: _Slot, e: Exception) -> None:
        """Drop an actor that died starting; when actors keep dying at start and none comes up,
        the cause is not a lost node that a replacement can avoid: a cluster fault."""
        self.failed_starts += 1
        give_up = self.failed_starts >= MAX_ATTEMPTS * max(1, self.size)
        why = f"{self.failed_starts} Ray workers in a row died starting (last: {one_line(e, 200)})"
        if give_up and not any(s.ready for s in self.slots if s is not slot):
            raise ClusterError(why)
        self._drop(slot, replace=not give_up)
        if give_up:
            self.on_status(f"{why}: going on with {len(self.slots)} workers, without replacements")

    def _retry(self, queue: list, job: Job, attempt: int, why: str) -> None:
        if attempt >= MAX_ATTEMPTS:
            hint = ("if evaluations are this slow, raise [proxy] timeout_s; else the cluster is not healthy"
                    if why.startswith("no answer") else "the cluster is not healthy")
            raise ClusterError(f"candidate {job.expression!r} failed {attempt} times on Ray workers (last: {why}); "
                               + hint)
        self.on_status(f"re-running a candidate elsewhere ({why})")
        queue.insert(0, (job, attempt + 1))

    def close(self) -> None:
        if self.head_lost:  # nothing to ask a dead head; Ray's calls would only block
            self.slots = []
            return
        for s in self.slots:
            try:
                self.ray.kill(s.actor, no_restart=True)
            except Exception:
                pass
        self.slots = []
