"""File checksums for checkpoint manifests.

The checksum guards against damage (a truncated copy, a bad disk, bytes overwritten by hand),
not against someone who can rewrite the manifest as well: that is what the pickle allow-list
(:mod:`chatft.integrity.pickles`) is for. So speed decides. A 7B checkpoint with its
optimizer states is ~106 GB (14 bytes per parameter); on a 2-core EPYC CPU, reading a cached
file (``bench/checksum_speed.py``, ``bench/results/checksum_speed_cpu.json``), XXH3-128 runs
at 9.0 GB/s, CRC-32 at 3.1 GB/s, SHA-256 at 1.0 GB/s and BLAKE2b at 0.8 GB/s: ~12 s, ~35 s,
~105 s and ~130 s of one core for that checkpoint, before it is split across processes.
XXH3-128 it is (the ``xxhash`` package).
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

ALGORITHM = "xxh3_128"
#: Read size: large enough that per-call overhead vanishes, small enough for any host.
CHUNK = 16 << 20


def file_digest(path: str | Path, *, fsync: bool = False) -> tuple[int, str]:
    """``(size in bytes, hex XXH3-128)`` of ``path``; with ``fsync``, the file's data is
    also forced to the disk (the pages were just written and are still cached, so the read
    costs little next to the write)."""
    h = xxhash.xxh3_128()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()
