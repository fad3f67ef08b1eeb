"""The process group: joined once per training process, left at its end.

The launcher (DeepSpeed's, torchrun, srun via :mod:`chatft.job.cluster`) sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every worker; a single process on the
DeepSpeed engine (ZeRO or offload on one GPU) gets a one-process group on a free loopback
port. The plain engine needs no group.

``timeout_s`` (``--ddp_timeout``) bounds both the rendezvous and every collective operation, so
a missing process is an error that names who waited for whom at which address, never a silent
hang. On CPU, DeepSpeed's shared-memory all-reduce maps one ``/dev/shm`` buffer per process
and never removes it; every process unlinks its own buffer's name as soon as all have mapped
theirs, so nothing is left in ``/dev/shm`` however the run ends (kill -9 included).
"""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from chatft.errors import DistributedError
from chatft.train.op_builds import clear_stale_locks


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_message(error: Exception, rank: int, world: int, addr: str, port: str,
                       timeout_s: int) -> str:
    """What went wrong when process ``rank`` tried to join the group at ``addr:port``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if rank == 0:
        if "address already in use" in text.lower() or "EADDRINUSE" in text:
            return (f"cannot host the rendezvous: port {port} on {addr} is in use "
                    "(another run?); choose another --master_port on every node")
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        count = (f"{int(joined.group(1))} of {int(joined.group(2))} processes joined"
                 if joined else text)
        return (f"waited {timeout_s} s (--ddp_timeout) at {addr}:{port} for the "
                f"{world} processes of the run: {count}. Start `chatft train` on every node "
                "with the same --nnodes, --master_addr and --master_port (or check that the "
                "other nodes can reach this address)")
    return (f"could not reach the master (node 0) at {addr}:{port} within {timeout_s} s "
            f"(--ddp_timeout): {text}. Check --master_addr and --master_port, that node 0's "
            "`chatft train` is running, and that no firewall blocks the port")


def wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Wait until node 0's rendezvous port accepts connections, for at most ``timeout_s``.

    torch's own client retries just as long but logs every failed try with a C++ stack trace;
    this probe fails with one sentence naming the address and port it tried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(5.0, timeout_s)).close()
            return
        except socket.gaierror as e:
            raise DistributedError(f"cannot resolve the master address {addr!r} "
                                   f"(--master_addr): {e.strerror}") from None
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(rendezvous_message(
                    e, 1, 0, addr, str(port), int(timeout_s))) from None
            time.sleep(1.0)


def init_distributed(uses_deepspeed: bool, timeout_s: int = 1800) -> tuple[int, int]:
    """``(rank, world_size)`` after joining the process group the launcher set up (or a
    one-process group for DeepSpeed); ``(0, 1)`` without DeepSpeed. Errors name the
    address and what went wrong; the caller adds which process it was."""
    if not uses_deepspeed:
        return 0, 1
    if os.environ.get("LOCAL_RANK", "0") == "0":
        clear_stale_locks()  # before DeepSpeed loads its first compiled op
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        if rank > 0:
            wait_for_master(addr, int(port), timeout_s)
        try:
            deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout_s))
        except (dist.DistError, OSError, socket.gaierror) as e:
            raise DistributedError(rendezvous_message(e, rank, world, addr, port,
                                                      timeout_s)) from None
        unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def shm_buffer(addr: str, port: int | str, rank: int | str) -> Path:
    """The ``/dev/shm`` buffer DeepSpeed's CPU all-reduce creates for process ``rank`` of the
    run whose rendezvous is ``addr:port`` (named after the user id, the address, the port and
    the rank: deepspeed/ops/csrc/cpu/comm/shm.cpp); ``rank="*"`` gives a glob pattern."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_buffer() -> None:
    """Remove this process's shared-memory buffer name once every process has mapped every
    buffer (each maps all of them while joining; the mappings outlive the name)."""
    if dist.get_world_size() > 1:
        dist.barrier()
    shm_buffer(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
               os.environ["RANK"]).unlink(missing_ok=True)  # absent on GPUs, across nodes


def remove_shm_buffers(addr: str, port: int) -> None:
    """Every process's buffer of the run at ``addr:port`` on this machine: those left by
    processes that died before the group had formed."""
    pattern = shm_buffer(addr, port, "*")
    for path in pattern.parent.glob(pattern.name):
        path.unlink(missing_ok=True)


def finish_distributed() -> None:
    """Leave the process group at the end of a process's training (without it, torch warns
    at exit that resources may leak)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
