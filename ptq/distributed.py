"""Data-parallel helpers over ``torch.distributed`` (launched with torchrun): who this process is, which share of
the work is its own, and collectives that turn a dead peer into a clear error.

No state is kept here: every function asks torch.distributed. Without an initialised process group everything
degrades to one process (rank 0 of 1) and the collectives are no-ops, so callers need no second code path.
Collectives on CUDA tensors go through NCCL, on CPU tensors through gloo (``init_from_env`` picks the backend from
the work device).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch

from ptq.errors import PtqError


class PeerFailure(PtqError):
    """A collective failed: another rank died or stopped answering."""


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files."""
    return rank() == 0


def my_share(n: int) -> list[int]:
    """The indices of ``range(n)`` this rank handles: round robin (rank r takes r, r + world, ...)."""
    return list(range(rank(), n, world_size()))


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # gloo / NCCL report a dead peer as a RuntimeError subclass (DistBackendError)
        raise PeerFailure(f"rank {rank()} of {world_size()}: {what} failed, most likely because another rank died "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err


def all_reduce_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; returns ``t``."""
    if active():
        import torch.distributed as dist

        _collective(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int, what: str) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s ``t``; returns ``t``."""
    if active():
        import torch.distributed as dist

        _collective(what, dist.broadcast, t, src=src)
    return t


def broadcast_object(obj: Any, src: int, what: str) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(what, dist.broadcast_object_list, box, src=src)
    return box[0]


def all_gather_object(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    _collective(what, dist.all_gather_object, out, obj)
    return out


def barrier(what: str) -> None:
    if active():
        import torch.distributed as dist

        _collective(what, dist.barrier)


def launched_by_torchrun() -> bool:
    """torchrun (or another launcher speaking its protocol) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group_from_env(device: str | torch.device | None, timeout_s: float = 1800.0) -> Iterator[bool]:
    """Initialise the default process group from torchrun's environment for the duration (NCCL when the work
    device is CUDA, else gloo; each rank takes GPU ``LOCAL_RANK``), and destroy it afterwards. Yields whether a
    group is active. Does nothing when not launched by torchrun or when a group already exists (the caller's)."""
    import torch.distributed as dist

    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        yield active()
        return
    cuda = (torch.device(device).type == "cuda") if device is not None else torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PtqError(f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} "
                           "GPUs; use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield True
        # A rank that tears its group down while another still works (rank 0 writes the output) can abort
        # inside gloo ("terminate called without an active exception"): leave together. Not after an error,
        # where the peers may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()
