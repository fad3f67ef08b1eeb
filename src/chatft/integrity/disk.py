"""Writing to disk durably, and saying so when the disk is full.

``os.replace`` makes a rename atomic for a crash of the process; for a power loss the data of
every file and the directory entries must also be on the disk before the rename, hence
:func:`fsync_dir` and :func:`write_durable`. A full disk shows up as ``ENOSPC`` from Python,
as a bare ``RuntimeError`` from torch's zip writer ("unexpected pos 58399168 vs 58399056"),
or as a plain ``Exception`` from the tokenizers package ("No space left on device (os error
28)"); :func:`out_of_space` recognizes all of them so the caller can report free and needed
bytes instead.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from chatft.errors import ChatftError

#: Phrases of writers that lose the errno: torch's zip writer when a write came up short, and
#: Rust libraries (the tokenizers package) that raise a plain Exception with the OS's text.
_SHORT_WRITE = ("unexpected pos", "failed writing", "file write failed", "PytorchStreamWriter",
                "No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(ChatftError):
    """Not enough free space for a file chatft must write."""


def gb(n: float) -> str:
    """Bytes as a short decimal size: ``1.23 GB``, ``456 MB``, ``789 kB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the filesystem that holds ``path`` or its nearest
    existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says that a write ran out of space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(exc) for s in _SHORT_WRITE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(what: str, folder: str | Path, needed: int) -> str:
    return (f"{what}: not enough disk space in {folder}: about {gb(needed)} needed, "
            f"{gb(free_bytes(folder))} free. Free some space (older checkpoints are deleted only "
            f"after a new one is complete, so save_total_limit + 1 of them must fit), or "
            f"point output_dir at a larger disk")


def ensure_space(folder: str | Path, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` before writing when ``needed`` bytes do not fit."""
    if free_bytes(folder) < needed:
        raise DiskFullError(disk_full_message(what, folder, needed))


def fsync_dir(path: str | Path) -> None:
    """Put a directory's entries (new, renamed or deleted files) on the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) and force it to the disk before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
