"""What ran where: the software, the commit and the machine behind a benchmark result.

Every benchmark writes two records of the same shape into its result file:

* ``versions`` (:func:`versions`): Python, torch, transformers, chatft and the packages the
  benchmark adds, the CUDA release torch was built with, and the git commit of the chatft
  checkout;
* ``hardware`` (:func:`hardware`): CPU model and cores, host memory (the machine's RAM and the
  container's limit, read by the memory planner's own probe,
  :func:`chatft.train.plan.hardware.host_memory`), torch's thread count, the load average when
  the benchmark started, ``CUDA_VISIBLE_DEVICES``, and on CUDA the GPU's name, count, memory
  and driver.

A package that is not installed is recorded as ``None``; so is a fact this machine cannot tell
(no ``nvidia-smi``, no git, a checkout without commits).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import chatft
from chatft.train.plan.hardware import host_memory, nvidia_smi

GIB = 1 << 30
#: The checkout the benchmarks run from: ``bench/lib/environment.py`` -> the repository root,
#: whose ``src/`` holds the chatft the scripts put first on the path.
CHECKOUT = Path(__file__).resolve().parents[2]
#: Packages every result names, in this order; a benchmark adds the ones it uses.
CORE_PACKAGES = ("torch", "transformers", "chatft")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def package_version(name: str) -> str | None:
    """Version of the distribution ``name``, or None when it is not installed. chatft's own
    comes from ``chatft.__version__``: running from a checkout that is not installed leaves no
    distribution metadata, and the imported code is what ran in any case."""
    if name == "chatft":
        return chatft.__version__
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit(checkout: Path = CHECKOUT) -> str | None:
    """The 40-hex commit checked out in ``checkout``, or None: not the root of a git checkout
    (an installed chatft must not report the commit of whatever repository holds its
    site-packages), no ``git``, or no commit yet (``git rev-parse HEAD`` then prints the
    literal ``HEAD``, which is not a commit)."""
    if not (checkout / ".git").exists():  # a folder, or a file in a worktree
        return None
    try:
        res = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--verify", "--quiet",
                              "HEAD^{commit}"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = res.stdout.strip()
    return commit if res.returncode == 0 and _COMMIT.fullmatch(commit) else None


def versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """``python``, :data:`CORE_PACKAGES`, then each package of ``extra`` (in order, each
    once), ``cuda`` (the CUDA release torch was built with; None for a CPU build) and
    ``git_commit`` (:func:`git_commit`)."""
    import torch

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*CORE_PACKAGES, *extra):
        out.setdefault(name, package_version(name))
    out["cuda"] = torch.version.cuda
    out["git_commit"] = git_commit()
    return out


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name (``model name`` of ``/proc/cpuinfo``), else what
    ``platform.processor()`` says (often just the architecture, or empty)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def hardware(device: str, *, gpu_count_key: str = "gpu_count") -> dict[str, Any]:
    """The machine a benchmark runs on, taken when it starts. ``device`` is where the
    measured work runs (``cpu``, ``cuda``, ``cuda:1``); the GPU's facts are recorded only for a
    CUDA device that torch can see. ``gpu_count_key`` names the count of visible GPUs: each
    benchmark keeps the name its earlier results use (``gpu_count`` for serving,
    ``gpus_visible`` for training speed, ``gpu_count_visible`` for quality and Qwen-1), so its
    result files compare key for key."""
    import torch

    memory = host_memory()
    hw: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "host_memory_gib": round(memory.total / GIB, 1),
        # the container's limit when it is below the RAM (what the planner budgets with)
        "host_memory_limit_gib": round(memory.limit / GIB, 1) if memory.limit is not None else None,
        # torch's default intra-op threads here; child processes started with this
        # environment get the same unless their command sets them.
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        hw["gpu"] = torch.cuda.get_device_name(index)
        hw[gpu_count_key] = torch.cuda.device_count()
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / GIB, 1)
        rows = nvidia_smi("driver_version")
        hw["driver"] = (rows[0][0] or None) if rows else None
    return hw
