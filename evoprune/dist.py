"""Multi-process training (PyTorch DDP) when launched by `torchrun`; a no-op otherwise.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup` then joins the process group (NCCL on
GPUs, gloo on CPUs) and pins each process to its GPU. Every helper here degrades to the
single-process answer when no group exists, so the same code runs both ways.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from evoprune.errors import EvopruneError


_solo = 0  # > 0 inside `alone()`


def active() -> bool:
    return _solo == 0 and dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def alone():
    """Code that one process runs by itself (e.g. training a missing pretrained model while the
    others wait): within it every helper answers as in a single-process run."""
    global _solo
    _solo += 1
    try:
        yield
    finally:
        _solo -= 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard() -> tuple[int, int]:
    """(rank, world) for `evoprune.data.iterate(shard=...)`."""
    return rank(), world()


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise EvopruneError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return device


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` inside DistributedDataParallel when several processes train it, else itself."""
    if not active() or world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the processes."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj):
    """Rank 0's `obj` on every process (pickled: only for our own tensors and dicts)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """`fn()` run by rank 0 alone, its result given to every process; an EvopruneError it raises
    is raised on every process (so the others do not wait for a result that never comes): the
    error itself in one process, its text as an EvopruneError in the others (an error's own
    class may not rebuild from its text)."""
    result, error = None, None
    if is_main():
        try:
            with alone():
                result = fn()
        except EvopruneError as e:
            if not active():
                raise
            error = str(e)
    result, error = broadcast((result, error))
    if error is not None:
        raise EvopruneError(error)
    return result


def barrier() -> None:
    if active():
        dist.barrier()
