"""The process group: joined once per training process, left at its end.

DeepSpeed's launcher sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every
worker; a single process on the DeepSpeed engine (ZeRO or offload on one GPU) gets a one-process
group on a free loopback port. The plain engine needs no group.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from chatft.train.op_builds import clear_stale_locks


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(uses_deepspeed: bool) -> tuple[int, int]:
    """``(rank, world_size)`` after joining the process group the launcher set up (or a
    one-process group for DeepSpeed); ``(0, 1)`` without DeepSpeed."""
    if not uses_deepspeed:
        return 0, 1
    if os.environ.get("LOCAL_RANK", "0") == "0":
        clear_stale_locks()  # before DeepSpeed loads its first compiled op
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Leave the process group at the end of a process's training (without it, torch warns
    at exit that resources may leak)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
