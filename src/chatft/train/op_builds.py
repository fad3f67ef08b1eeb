"""Stale build locks of DeepSpeed's just-in-time compiled ops.

DeepSpeed compiles its CPU ops (``cpu_adam`` for CPUAdam, ``deepspeed_shm_comm`` for the CPU
all-reduce) on first use through torch's extension builder, which guards each op's build folder
with a ``lock`` file: created with ``O_EXCL``, held open while building, removed when done. A
process killed mid-build (Ctrl-C twice, a timeout, an out-of-memory kill) leaves the file behind,
and every later run that loads the op waits on it forever without a word. Before DeepSpeed
starts, each process removes such locks: a lock no living process holds open is stale.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def build_root() -> Path:
    """The folder torch builds extensions under (``TORCH_EXTENSIONS_DIR`` or its default)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def open_files() -> set[tuple[int, int]] | None:
    """``(device, inode)`` of every file some process on this machine holds open, read from
    ``/proc/PID/fd``; None where there is no ``/proc`` (then nothing is ever called stale).
    Processes whose descriptors this user may not read are skipped: they belong to other
    users, who do not build into this user's folder."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[tuple[int, int]] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(proc / pid / "fd" / fd)
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
    return held


def stale_locks(root: Path, recheck_s: float = 0.5) -> list[Path]:
    """Build locks under ``root`` (``root/<python_cuda>/<op>/lock``) that no process holds open,
    looked at twice ``recheck_s`` apart: a builder closes its lock a moment before removing
    it, so a lock is stale only if it is still the same file, still unheld, on the second look."""
    locks = sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock"))
    if not locks:
        return []
    first = _unheld(locks)
    if not first:
        return []
    time.sleep(recheck_s)
    second = _unheld(first)
    return [lock for lock in second if first[lock] == second[lock]]


def _unheld(locks) -> dict[Path, tuple[int, int]]:
    held = open_files()
    if held is None:
        return {}
    out = {}
    for lock in locks:
        try:
            st = os.stat(lock)
        except OSError:
            continue  # released meanwhile
        key = (st.st_dev, st.st_ino)
        if key not in held:
            out[lock] = key
    return out


def clear_stale_locks(root: Path | None = None, say: Callable[[str], None] = print,
                      recheck_s: float = 0.5) -> list[Path]:
    """Remove the stale build locks under ``root`` (default :func:`build_root`), saying which
    and why; returns them. Several processes may do this at once: a lock another one removed
    first is simply gone."""
    root = build_root() if root is None else root
    if not root.is_dir():
        return []
    removed = []
    for lock in stale_locks(root, recheck_s):
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        removed.append(lock)
        say(f"removed {lock}: a build lock no process holds, left by a build that was killed; "
            "without removing it the op's next load would wait forever")
    return removed
