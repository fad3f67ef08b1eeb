"""What every benchmark result records about the run (bench.lib.environment): versions,
the git commit, the machine (host memory and GPUs from the planner's probe)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace


import chatft
from bench.lib import environment as env
from bench.lib.measure import gpu_memory_used
from chatft.train.plan.hardware import host_memory


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_a_full_commit_or_none(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    # no commit yet: `git rev-parse HEAD` prints the literal "HEAD" here
    assert env.git_commit(repo) is None
    (repo / "f.txt").write_text("x")
    _git(repo, "add", "f.txt")
    _git(repo, "commit", "-q", "-m", "one")
    commit = env.git_commit(repo)
    assert commit == _git(repo, "rev-parse", "HEAD") and re.fullmatch(r"[0-9a-f]{40}", commit)
    # a folder inside a repository is not a checkout of its own (an installed chatft)
    (repo / "site-packages").mkdir()
    assert env.git_commit(repo / "site-packages") is None
    assert env.git_commit(tmp_path / "missing") is None


def test_versions_name_chatft_from_the_imported_code(monkeypatch):
    monkeypatch.setattr(chatft, "__version__", "9.8.7")
    v = env.versions(("aiohttp", "no-such-distribution-xyz", "torch"))
    assert list(v) == ["python", "torch", "transformers", "chatft", "aiohttp",
                       "no-such-distribution-xyz", "cuda", "git_commit"]
    assert v["chatft"] == "9.8.7"  # not the installed distribution's metadata
    assert v["no-such-distribution-xyz"] is None
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    import torch

    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda
    assert v["git_commit"] == env.git_commit()


def test_cpu_model_is_read_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                       "model name\t: AMD EPYC 7B13 64-Core Processor\nprocessor\t: 1\n")
    assert env.cpu_model(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"


def test_hardware_on_the_cpu_records_no_gpu():
    hw = env.hardware("cpu", gpu_count_key="gpus_visible")
    assert hw["cpu_cores"] == os.cpu_count() and hw["host_memory_gib"] > 0
    # host memory is the planner's own probe: the same RAM and limit it budgets with
    memory = host_memory()
    assert hw["host_memory_gib"] == round(memory.total / 2**30, 1)
    assert hw["host_memory_limit_gib"] == (None if memory.limit is None else round(memory.limit / 2**30, 1))
    assert len(hw["load_average_at_start"]) == 3
    assert hw["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert not {"gpu", "gpus_visible", "gpu_memory_gib", "driver"} & set(hw)


def test_gpu_memory_in_use(fake_nvidia_smi):
    fake_nvidia_smi("0, 1024\\n1, 81559\\n")
    assert gpu_memory_used() == {0: 1024 << 20, 1: 81559 << 20}  # MiB -> bytes
    fake_nvidia_smi("NVIDIA-SMI has failed\\n", rc=9)
    assert gpu_memory_used() is None


def test_hardware_on_cuda_records_the_chosen_gpu(fake_nvidia_smi, monkeypatch):
    """The GPU branch, with torch.cuda answering as a 2-GPU machine would."""
    import torch

    names = {0: "NVIDIA H100", 1: "NVIDIA H200"}
    memory = {0: 80 * (1 << 30), 1: int(139.8 * (1 << 30))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=memory[i]))
    fake_nvidia_smi("580.159.04\\n580.159.04\\n")
    hw = env.hardware("cuda:1", gpu_count_key="gpus_visible")
    assert (hw["gpu"], hw["gpus_visible"], hw["gpu_memory_gib"], hw["driver"]) == (
        "NVIDIA H200", 2, 139.8, "580.159.04")
    assert "gpu_count" not in hw
    assert env.hardware("cuda")["gpu"] == "NVIDIA H100"  # no index: the first GPU
    fake_nvidia_smi("", rc=9)
    assert env.hardware("cuda")["driver"] is None
    assert "gpu" not in env.hardware("cpu")  # torch sees a GPU, the work runs on the CPU
