"""Stale build locks: a lock nobody holds goes, a held one stays."""

from __future__ import annotations

import os
import subprocess
import sys

from chatft.train.op_builds import build_root, clear_stale_locks, open_files, stale_locks


def _lock(root, op):
    path = root / "py311_cpu" / op / "lock"
    path.parent.mkdir(parents=True)
    return path


def test_an_unheld_lock_is_removed_and_named(tmp_path):
    lock = _lock(tmp_path, "cpu_adam")
    lock.touch()
    said = []
    assert clear_stale_locks(tmp_path, say=said.append, recheck_s=0.01) == [lock]
    assert not lock.exists()
    assert len(said) == 1 and str(lock) in said[0]


def test_a_lock_this_process_holds_stays(tmp_path):
    lock = _lock(tmp_path, "cpu_adam")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # how torch's FileBaton takes it
    try:
        assert clear_stale_locks(tmp_path, say=print, recheck_s=0.01) == []
        assert lock.exists()
    finally:
        os.close(fd)
    assert stale_locks(tmp_path, recheck_s=0.01) == [lock]


def test_a_lock_another_process_holds_stays(tmp_path):
    lock = _lock(tmp_path, "deepspeed_shm_comm")
    code = (f"import os, sys, time; fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert clear_stale_locks(tmp_path, say=print, recheck_s=0.01) == []
        assert lock.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder died without removing it (as a killed build does): now it is stale.
    assert clear_stale_locks(tmp_path, say=print, recheck_s=0.01) == [lock]


def test_open_files_sees_this_processes_open_file(tmp_path):
    path = tmp_path / "f"
    with open(path, "w"):
        st = os.stat(path)
        held = open_files()
        assert held is None or (st.st_dev, st.st_ino) in held


def test_build_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_root() == tmp_path
    assert clear_stale_locks(tmp_path / "missing") == []
