"""Measurements every benchmark shares: the host memory of a process tree (from ``/proc``), GPU
memory in use (nvidia-smi), step statistics, tokens/s and MFU.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from chatft.train.plan.hardware import nvidia_smi

GIB = 1 << 30
#: Dense bf16 peak of one H200 (datasheet), the denominator of MFU.
PEAK_FLOPS = 989e12



def _children_map() -> dict[int, list[int]]:
    """``ppid -> [pid]`` for every process visible in /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ")".
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(kids.get(pid, ()))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_memory_used() -> dict[int, int] | None:
    """Memory in use on each GPU as the driver sees it (bytes by nvidia-smi index), or None."""
    rows = nvidia_smi("index", "memory.used")
    return None if rows is None else {int(idx): int(mib) << 20 for idx, mib in rows}


class ProcessTreeSampler:
    """Background thread: peak summed RSS of a process tree (every ``interval`` s, from /proc)
    and, where nvidia-smi exists, peak memory in use per GPU.

    Summed RSS counts pages shared between processes (the launcher's children share their
    Python and CUDA libraries) once per process, so it can only overstate.
    """

    def __init__(self, root: int, interval: float = 0.5, gpus: bool = False):
        self.root, self.interval = root, interval
        self.peak_rss = 0
        self.peak_processes = 0
        self.gpu_baseline = gpu_memory_used() if gpus else None
        self.gpu_peak: dict[int, int] = dict(self.gpu_baseline or {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessTreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        tree = process_tree(self.root)
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in tree))
        self.peak_processes = max(self.peak_processes, len(tree))

    def _run(self) -> None:
        last_gpu = 0.0
        while not self._stop.is_set():
            self.sample()
            if self.gpu_baseline is not None and time.monotonic() - last_gpu >= 1.0:
                last_gpu = time.monotonic()
                for idx, used in (gpu_memory_used() or {}).items():
                    self.gpu_peak[idx] = max(self.gpu_peak.get(idx, 0), used)
            self._stop.wait(self.interval)

    def gpu_peak_above_baseline(self) -> dict[int, int] | None:
        """Peak minus the memory each GPU had in use before the variant started."""
        if self.gpu_baseline is None:
            return None
        return {i: self.gpu_peak.get(i, 0) - self.gpu_baseline.get(i, 0) for i in self.gpu_peak}


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def mfu(tokens_per_s_per_gpu: float, params: int, peak_flops: float = PEAK_FLOPS) -> float:
    """Model FLOPs utilization: ``tokens/s/GPU x 6 x N_params / peak`` (6N = forward and
    backward matmuls per token; attention's quadratic term left out, small at these lengths)."""
    return tokens_per_s_per_gpu * 6 * params / peak_flops


def step_stats(step_times: list[float], step_tokens: list[int], gpus: int, params: int,
               warmup: int) -> dict[str, Any]:
    """Throughput over the steps after the first ``warmup`` (allocation, compilation and
    autotuning happen in those); ``step_tokens`` are non-padding tokens of all GPUs."""
    times, tokens = step_times[warmup:], step_tokens[warmup:]
    if not times:
        return {"steps_measured": 0}
    tps = sum(tokens) / sum(times) / gpus
    return {"steps_measured": len(times), "warmup_steps_excluded": min(warmup, len(step_times)),
            "step_time_p50_s": round(percentile(times, 50), 4),
            "step_time_mean_s": round(statistics.mean(times), 4),
            "first_step_time_s": round(step_times[0], 3),
            "tokens_per_step_mean": round(statistics.mean(tokens), 1),
            # five significant digits: a CPU smoke run's MFU (~1e-6) must not round to 0
            "tokens_per_s_per_gpu": round(tps, 2), "mfu": float(f"{mfu(tps, params):.5g}")}
