"""The process tree's small parts: which processes are workers, and when a parent is gone."""

from __future__ import annotations

import subprocess
import sys

from chatft.job.tree import is_worker, start_time


def test_only_the_worker_itself_is_a_worker():
    py = sys.executable
    assert is_worker([py, "-u", "-m", "chatft.job.worker", "--local_rank=0", "--config-json", "c"])
    # DeepSpeed's runner and per-node launcher name the module but only start workers
    assert not is_worker([py, "-m", "deepspeed.launcher.runner", "--module", "chatft.job.worker"])
    assert not is_worker([py, "-u", "-m", "deepspeed.launcher.launch", "--module",
                          "chatft.job.worker", "--config-json", "c"])


def test_a_dead_parent_not_yet_reaped_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert start_time(child.pid) is not None
    child.kill()
    for _ in range(100):  # a zombie until we wait for it; its /proc entry stays meanwhile
        if start_time(child.pid) is None:
            break
        subprocess.run(["sleep", "0.05"])
    assert start_time(child.pid) is None
    child.wait()
    assert start_time(child.pid) is None
