"""The run lock: one live run per output folder.

Two runs in one output folder (a ``--resume auto`` started while the first still trains, a
second node started with the same ``--node_rank``) interleave their metrics and checkpoints.
The process that owns a node's part of the run (``chatft train``; under torchrun or srun, the
node's local rank 0) holds ``output_dir/.chatft-run.node<R>.lock``: an exclusive ``flock`` on
it, which the kernel releases when the process ends however it ends (kill -9 included), and
its PID, host and command in it for the message. A lock file whose flock is free belongs to
a dead run and is taken over, saying so. On a file system without flock (some network
mounts), the PID decides: a live PID on this host keeps the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from chatft.errors import ChatftError


class RunLockedError(ChatftError):
    """Another run that is still alive uses this output folder."""


def lock_path(output_dir: str | Path, node_rank: int) -> Path:
    return Path(output_dir) / f".chatft-run.node{node_rank}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """Held from :meth:`acquire` to :meth:`release` (or the end of the process)."""

    def __init__(self, output_dir: str | Path, node_rank: int = 0):
        self.path = lock_path(output_dir, node_rank)
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> RunLockedError:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) \
            if "started" in holder else "?"
        return RunLockedError(
            f"{self.path.parent} is in use by a run that is still alive: PID {pid} on host "
            f"{host}, started {since} ({holder.get('command', '?')}). Stop it first (kill {pid} "
            "on that host; it saves a checkpoint and exits), wait for it to end, or use "
            "another --output_dir")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = self._holder()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(holder) from None
                return self._acquire_by_pid(holder)
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder released and removed it meanwhile: lock the new file
        return self._take(fd, holder)

    def _acquire_by_pid(self, holder: dict) -> "RunLock":
        """No flock on this file system: the recorded PID decides (on this host only)."""
        if (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                and holder["pid"] != os.getpid() and _pid_alive(holder["pid"])):
            raise self._refuse(holder)
        return self._take(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), holder)

    def _take(self, fd: int, holder: dict) -> "RunLock":
        if holder.get("pid") and holder.get("pid") != os.getpid():
            print(f"chatft: taking over the run lock {self.path.name} of PID {holder['pid']} on "
                  f"{holder.get('host', '?')}, which is no longer running", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
