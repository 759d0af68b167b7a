"""Evaluators: score a batch of jobs (masks per task, stage) and yield results as they finish.

The engine sees one interface, `run(jobs) -> iterator of (job, FitnessRecord)`:
  InProcessEvaluator  in the driver's process (tests, debugging, a laptop)
  RayEvaluator        a pool of Ray actors, each holding its tasks' models and data
                      (loaded once; the masks come with each job); results stream back through ray.wait; an evaluation past
                      its timeout gets the worst fitness and its actor is replaced; a job whose
                      actor died is resubmitted, so nothing is lost or counted twice.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from evoprune.records import FitnessRecord, invalid
from evoprune.workers.proxy import Job, ProxyConfig, TaskContext, evaluate_job

MAX_ATTEMPTS = 3  # a job whose worker died this often is recorded as invalid


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its task contexts (plain data: it travels to Ray actors)."""

    proxy: ProxyConfig
    data_root: str | None = None
    cache_dir: str | None = None
    tasks_file: str | None = None
    device: str = "cpu"

    def contexts(self) -> dict[str, TaskContext]:
        return {t: TaskContext(t, self.proxy, data_root=self.data_root, cache_dir=self.cache_dir, device=self.device,
                               tasks_file=self.tasks_file) for t in self.proxy.tasks}


class InProcessEvaluator:
    def __init__(self, spec: WorkerSpec, contexts: dict[str, TaskContext] | None = None):
        self.spec = spec
        self.contexts = contexts or spec.contexts()

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, FitnessRecord]]:
        for job in jobs:
            yield job, evaluate_job(self.contexts, job, worker=f"local-{os.getpid()}")

    def close(self) -> None:
        pass


def init_ray(num_cpus: int | None = None) -> None:
    """Join a running cluster (RAY_ADDRESS set, or `ray start` on this machine), else start a
    local instance; a Ray already initialised in this process is reused."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    try:
        ray.init(address="auto", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


class _Actor:
    """The body of a Ray actor: task contexts built once, then one evaluation per call."""

    def __init__(self, spec: WorkerSpec):
        import torch

        torch.set_num_threads(1)  # one actor per CPU slot: no oversubscription
        self.spec = spec
        self.contexts = spec.contexts()
        self.name = f"ray-{os.getpid()}"

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, job: Job) -> dict:
        return evaluate_job(self.contexts, job, worker=self.name).to_dict()


class RayEvaluator:
    def __init__(self, spec: WorkerSpec, workers: int, gpus_per_worker: float = 0.0, num_cpus: int | None = None):
        import ray

        init_ray(num_cpus)
        self.ray = ray
        self.spec = spec
        self.actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=0)(_Actor)
        self.actors = [self._new_actor() for _ in range(workers)]
        self.restarts = 0

    def _new_actor(self):
        return self.actor_cls.remote(self.spec)

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def run(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, FitnessRecord]]:
        ray = self.ray
        queue = [(j, 1) for j in jobs]
        idle = list(range(len(self.actors)))
        flight: dict = {}  # object ref -> (job, attempt, actor index, start time)
        timeout = self.spec.proxy.timeout_s
        while queue or flight:
            while queue and idle:
                job, attempt = queue.pop(0)
                i = idle.pop(0)
                ref = self.actors[i].evaluate.remote(job)
                flight[ref] = (job, attempt, i, time.monotonic())
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=1.0)
            for ref in ready:
                job, attempt, i, _ = flight.pop(ref)
                try:
                    rec = FitnessRecord.from_dict(ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    self._replace(i)
                    if attempt < MAX_ATTEMPTS:
                        queue.insert(0, (job, attempt + 1))
                    else:
                        yield job, invalid(job.expression, f"worker died {attempt} times", job.stage)
                    idle.append(i)
                    continue
                except ray.exceptions.RayTaskError as e:
                    rec = invalid(job.expression, f"error: {str(e).splitlines()[-1][:200]}", job.stage)
                idle.append(i)
                yield job, rec
            now = time.monotonic()
            for ref, (job, attempt, i, t0) in list(flight.items()):
                if now - t0 > timeout:
                    flight.pop(ref)
                    self._replace(i, kill=True)
                    idle.append(i)
                    yield job, invalid(job.expression, f"timeout after {timeout:.0f} s", job.stage)

    def _replace(self, i: int, kill: bool = False) -> None:
        if kill:
            self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new_actor()
        self.restarts += 1

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
