"""The run lock: a live run keeps its output folder; a dead one's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatft.job.lock import RunLock, RunLockedError, lock_path

REPO = Path(__file__).resolve().parents[2]


def _holder(out: Path) -> subprocess.Popen:
    """Another process that takes the lock of ``out`` and keeps it until killed."""
    code = ("import sys, time; from chatft.job.lock import RunLock; "
            f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_run_keeps_the_folder_and_a_killed_one_is_taken_over(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        assert f"PID {holder.pid} on host" in str(e.value) and "still alive" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 cannot remove the file, but the kernel released the flock with the process
    assert lock_path(tmp_path, 0).is_file()
    lock = RunLock(tmp_path).acquire()
    assert f"taking over the run lock .chatft-run.node0.lock of PID {holder.pid}" in \
        capsys.readouterr().err
    lock.release()
    assert not lock_path(tmp_path, 0).exists()


def test_each_node_has_its_own_lock_and_release_frees_it(tmp_path):
    with RunLock(tmp_path, 0), RunLock(tmp_path, 1):
        assert lock_path(tmp_path, 1).is_file()
        with pytest.raises(RunLockedError):
            RunLock(tmp_path, 1).acquire()  # the same node twice (same process here)
    with RunLock(tmp_path, 1):  # released: free again
        pass


def test_without_flock_a_live_pid_on_this_host_decides(tmp_path, monkeypatch):
    import fcntl
    import json
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock_path(tmp_path, 0).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time()}))

        def no_flock(fd, op):
            raise OSError(38, "Function not implemented")  # ENOSYS, as on some mounts

        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.raises(RunLockedError, match=f"PID {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    RunLock(tmp_path).acquire().release()  # its PID is gone: taken over
