"""This machine's memory: the one probe of GPUs and host RAM that the planner's budgets and the
benchmarks' hardware records both use, and size strings such as ``24GiB``.

GPUs are read from torch where CUDA is already initialized (a training process), else from
``nvidia-smi``, so that planning in the launcher does not create a CUDA context that would hold
GPU memory for the whole run. Host memory is ``MemTotal`` of ``/proc/meminfo`` (the machine's
RAM) and, separately, the container's cgroup limit when one is set below it: the planner budgets
with the smaller (:attr:`HostMemory.usable`), a benchmark records both.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chatft.errors import ChatftError
from chatft.train.plan.cost import GIB

#: cgroup v2, then v1: the memory limit of the container this process runs in.
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"),
                      Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def nvidia_smi(*fields: str) -> list[list[str]] | None:
    """``nvidia-smi --query-gpu=<fields>``: one row per GPU in nvidia-smi's order, the values
    as strings without units (``memory.used`` in MiB). None where nvidia-smi is missing, hangs
    or fails."""
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return [[value.strip() for value in line.split(",")] for line in res.stdout.splitlines()
            if line.strip()]


def gpu_memory() -> tuple[int, str] | None:
    """(bytes, name) of the smallest visible GPU, or None without one (see the module
    docstring for where it is read)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, props.name
    gpus = []
    for row in nvidia_smi("memory.total", "name") or []:
        if len(row) >= 2 and row[0].isdigit():
            gpus.append((int(row[0]) << 20, row[1]))  # MiB -> bytes
    return min(gpus) if gpus else None


@dataclass(frozen=True)
class HostMemory:
    """The machine's RAM and the container's limit on it."""

    total: int
    """``MemTotal``: the machine's RAM in bytes (0 where it cannot be read)."""
    limit: int | None
    """The cgroup memory limit in bytes when it is below ``total``, else None."""

    @property
    def usable(self) -> int:
        """What processes here can use: the limit when there is one, else the RAM."""
        return self.limit if self.limit is not None else self.total


def host_memory(meminfo: Path = Path("/proc/meminfo"),
                limit_files: tuple[Path, ...] = CGROUP_LIMIT_FILES) -> HostMemory:
    """The host's :class:`HostMemory`. A limit file holding ``max``, or a value at or above the
    RAM (cgroup v1 writes a huge number for "none"), means no limit."""
    total = 0
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024  # the file counts kB of 1024 bytes
                break
    except OSError:
        pass
    limit = None
    for limit_file in limit_files:
        try:
            text = limit_file.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text.isdigit() and (not total or int(text) < total):
            limit = int(text) if limit is None else min(limit, int(text))
    return HostMemory(total, limit)


def detected_budgets() -> tuple[int, int, str]:
    """(GPU bytes, host bytes, where they came from): the smallest GPU's memory and this
    machine's usable RAM (its cgroup limit when lower), or 80 GiB / 64 GiB when there is no
    GPU."""
    gpu = gpu_memory()
    if gpu is None:
        return 80 * GIB, 64 * GIB, "no GPU here: assumed 80 GiB per GPU, 64 GiB host"
    return gpu[0], host_memory().usable, f"detected {gpu[1]} and this machine's RAM"


def parse_size(text: str) -> int:
    """'24GiB', '24G', '24 GB' (10^9), '24' (GiB) -> bytes."""
    s = text.strip().replace(" ", "")
    units = {"tib": 1 << 40, "t": 1 << 40, "gib": GIB, "g": GIB, "mib": 1 << 20, "m": 1 << 20,
             "tb": 10 ** 12, "gb": 10 ** 9, "mb": 10 ** 6, "": GIB}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    try:
        value = float(num)
    except ValueError:
        raise ChatftError(f"{text!r}: expected a size such as 24GiB, 80GB or 64") from None
    if unit not in units or value <= 0:
        raise ChatftError(f"{text!r}: expected a size such as 24GiB, 80GB or 64")
    return int(value * units[unit])
