"""This machine's memory as the planner and the benchmarks read it: host RAM and the container's
limit from their files, GPUs from nvidia-smi, and size strings."""

from __future__ import annotations

import pytest

from chatft.errors import ChatftError
from chatft.train.plan.cost import GIB
from chatft.train.plan.hardware import HostMemory, gpu_memory, host_memory, nvidia_smi, parse_size


def test_host_memory_is_memtotal_and_a_lower_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25165824 kB\nMemFree:         1000 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    # no limit files: the RAM (25165824 KiB = 24 GiB) is all there is
    assert host_memory(meminfo, (v2, v1)) == HostMemory(24 * GIB, None)
    # cgroup v2 says "max", v1 a huge number (its "none"): still no limit
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")
    assert host_memory(meminfo, (v2, v1)).usable == 24 * GIB
    # a container limited to 16 GiB: recorded, and what the planner budgets with
    v1.write_text(f"{16 * GIB}\n")
    mem = host_memory(meminfo, (v2, v1))
    assert (mem.total, mem.limit, mem.usable) == (24 * GIB, 16 * GIB, 16 * GIB)
    assert host_memory(tmp_path / "missing", ()) == HostMemory(0, None)
    assert host_memory().total > 0  # this machine


def test_nvidia_smi_rows(fake_nvidia_smi):
    args = fake_nvidia_smi("0, 1024\\n1, 81559\\n")
    assert nvidia_smi("index", "memory.used") == [["0", "1024"], ["1", "81559"]]
    assert args.read_text().split() == ["--query-gpu=index,memory.used",
                                        "--format=csv,noheader,nounits"]


def test_nvidia_smi_failing_or_missing_is_none(fake_nvidia_smi, monkeypatch, tmp_path):
    fake_nvidia_smi("NVIDIA-SMI has failed\\n", rc=9)
    assert nvidia_smi("driver_version") is None and gpu_memory() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert nvidia_smi("driver_version") is None and gpu_memory() is None


def test_gpu_memory_is_the_smallest_visible_gpu(fake_nvidia_smi):
    # without an initialized CUDA context the planner asks nvidia-smi (MiB), never torch
    args = fake_nvidia_smi("81559, NVIDIA H100 80GB HBM3\\n143771, NVIDIA H200\\n")
    assert gpu_memory() == (81559 << 20, "NVIDIA H100 80GB HBM3")
    assert args.read_text().split()[0] == "--query-gpu=memory.total,name"


def test_parse_size():
    assert parse_size("24GiB") == 24 * GIB
    assert parse_size("24G") == 24 * GIB
    assert parse_size("80GB") == 80 * 10 ** 9
    assert parse_size("64") == 64 * GIB
    assert parse_size("512 MiB") == 512 << 20
    for bad in ("lots", "-3GiB", "12XB"):
        with pytest.raises(ChatftError):
            parse_size(bad)
