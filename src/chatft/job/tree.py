"""One process tree: signals reach every worker once, and nothing outlives ``chatft train``.

``chatft train --nproc N`` is the parent of DeepSpeed's runner, which starts DeepSpeed's
per-node launcher, which starts the N workers. Left alone, a signal or a dead parent breaks
that tree in two ways: Ctrl-C in a terminal reaches every process of the foreground group
(and DeepSpeed's launcher signals its workers once more), and a killed parent leaves the
launcher and workers training in the background.

Parent side (:func:`run_launcher`): the launcher starts in a session of its own, so terminal
signals reach the parent only. The parent passes SIGINT/SIGTERM to each worker exactly once
(the workers stop at the end of the step and write a checkpoint), waits ``--stop_timeout``
seconds for them, then kills the whole group. A second signal is passed on as well (the
workers then stop at once) and shortens the wait. When the launcher exits, whatever is left
of its group is killed.

Worker side (:func:`die_with_parent`): a worker asks the kernel for SIGKILL when its own
parent (DeepSpeed's launcher, torchrun's agent) dies (``PR_SET_PDEATHSIG``), and a thread
watches the ``chatft train`` process named in its environment: if that one dies, even by kill
-9, the worker stops within a second, and the launchers above it then exit by themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PARENT_PID_ENV = "CHATFT_PARENT_PID"
PARENT_START_ENV = "CHATFT_PARENT_START"  # start time of that PID, so a reused PID is no parent
WORKER_MODULE = "chatft.job.worker"
#: Exit code of a worker whose ``chatft train`` parent died.
ORPHANED_EXIT = 4
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None
    when there is no such process, it has exited and waits to be reaped (a zombie: a killed
    parent whose own parent has not collected it yet), or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def parent_env() -> dict[str, str]:
    """What a worker needs to watch this process (see :func:`die_with_parent`)."""
    return {PARENT_PID_ENV: str(os.getpid()), PARENT_START_ENV: start_time(os.getpid()) or ""}


def _workers(root: int) -> list[int]:
    """PIDs of the chatft workers below process ``root``."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for p in procs:
        try:
            if is_worker(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def is_worker(cmdline: list[str]) -> bool:
    """A worker runs ``python ... -m chatft.job.worker``; DeepSpeed's runner and launcher
    name the module too (``--module chatft.job.worker``) but are not workers."""
    return any(a == "-m" and b == WORKER_MODULE for a, b in zip(cmdline, cmdline[1:]))


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_launcher(cmd: list[str], env: dict[str, str], stop_timeout: float) -> int:
    """Run the launcher command as the root of its own process group and return its exit
    code (128 + the signal's number when a signal stopped the run)."""
    proc = subprocess.Popen(cmd, env={**env, **parent_env()}, start_new_session=True)
    received: list[int] = []
    deadline: list[float] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        targets = _workers(proc.pid)
        # Before the workers exist (or with workers on other hosts, pdsh), the launcher itself
        # gets the signal: DeepSpeed's runner passes it on over pdsh; locally it just ends.
        for pid in targets or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        name = signal.Signals(signum).name
        if len(received) == 1:
            wait = stop_timeout
            print(f"chatft: {name}: passed to {len(targets)} worker(s); they finish the step and "
                  f"save; killing them in {wait:.0f} s (--stop_timeout) if they have not exited "
                  "(a second signal stops them at once)", file=sys.stderr, flush=True)
        else:
            wait = min(30.0, deadline[0] - time.monotonic())
            print(f"chatft: {name} again: passed on; killing the workers in {wait:.0f} s",
                  file=sys.stderr, flush=True)
        deadline[:] = [time.monotonic() + wait]

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    print("chatft: the workers did not stop in time: killing them",
                          file=sys.stderr, flush=True)
                    _kill_group(proc.pid, signal.SIGKILL)
                    deadline.clear()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        # Whatever the launcher left behind (it was killed, or exited before its children).
        _kill_group(proc.pid, signal.SIGKILL)
    if received:
        return rc if rc > 0 else 128 + received[0]
    return rc if rc >= 0 else 128 - rc


def die_with_parent(where: str) -> None:
    """Make this worker die with its launcher (PR_SET_PDEATHSIG) and stop when the ``chatft
    train`` process named in its environment is gone (a watchdog thread)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the launcher died before the request took effect
            os._exit(ORPHANED_EXIT)
    pid = os.environ.get(PARENT_PID_ENV)
    if not pid or not Path("/proc").is_dir():
        return
    started = os.environ.get(PARENT_START_ENV) or None

    def watch() -> None:
        while start_time(int(pid)) == started:
            time.sleep(1.0)
        print(f"chatft: error: {where}: `chatft train` (PID {pid}) is gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="chatft-parent-watch", daemon=True).start()
