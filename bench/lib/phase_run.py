"""One benchmark phase in its own process: output stamped line by line, memory peaks sampled.

A crash or a timeout loses only that phase; its wall time and peaks are its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.measure import GIB, ProcessTreeSampler



@dataclass
class PhaseRun:
    """One phase's process: exit code, wall time, memory peaks and its output lines, each
    stamped with seconds since the process started."""

    command: list[str]
    returncode: int
    timed_out: bool
    wall_s: float
    start_unix: float
    peak_host_rss_gib: float
    gpu_used_peak_gib: float | None
    lines: list[tuple[float, str]] = field(default_factory=list)

    def first_line_time(self, pattern: str) -> float | None:
        """Seconds after the start at which a line matching ``pattern`` was printed."""
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def fields(self) -> dict[str, Any]:
        return {"command": shlex.join(self.command), "returncode": self.returncode,
                "timed_out": self.timed_out, "wall_s": round(self.wall_s, 2),
                "peak_host_rss_gib_sampled": self.peak_host_rss_gib,
                "gpu_used_peak_gib": self.gpu_used_peak_gib}


def run_phase(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float,
              gpu: bool) -> PhaseRun:
    """Run ``cmd`` in its own process group, its output (stdout and stderr) stamped line by
    line into ``log``, its tree's RSS (and the GPU's memory in use, above the level before it
    started) sampled from ``/proc`` and nvidia-smi; the group is killed after ``timeout_s``."""
    lines: list[tuple[float, str]] = []
    start_unix, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, text=True, encoding="utf-8",
                            errors="replace", bufsize=1)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
        except ProcessLookupError:  # it ended just now
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    with ProcessTreeSampler(proc.pid, gpus=gpu) as sampler, log.open("w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        assert proc.stdout is not None
        for raw in proc.stdout:
            stamp = time.perf_counter() - t0
            line = raw.rstrip("\n")
            lines.append((stamp, line))
            f.write(f"[{stamp:8.2f}] {line}\n")
            f.flush()
        rc = proc.wait()
    timer.cancel()
    wall = time.perf_counter() - t0
    gpu_peak = sampler.gpu_peak_above_baseline()
    return PhaseRun(command=cmd, returncode=rc, timed_out=timed_out.is_set(), wall_s=wall,
                    start_unix=start_unix, peak_host_rss_gib=round(sampler.peak_rss / GIB, 3),
                    gpu_used_peak_gib=round(max(gpu_peak.values()) / GIB, 3) if gpu_peak else None,
                    lines=lines)


def last_json(run: PhaseRun) -> dict[str, Any] | None:
    """The JSON object a child printed on its last output line, if any."""
    for _, line in reversed(run.lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None
