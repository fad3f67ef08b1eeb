"""Several "nodes" on one machine (loopback, gloo), resume on another process count, and what
happens when a process or the parent dies.

Every run trains the tiny random Qwen2 on 64 Alpaca records in fp32 with a global batch of 8
samples per step. The reference is one node with 2 processes (ZeRO-2); a run split over two
``chatft train --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` launches (one process
each) and runs resumed from its step-2 checkpoint on 1 and on 4 processes must reproduce its
per-step losses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chatft.job.lock import RunLock
from chatft.job.tree import is_worker
from chatft.train.distributed import free_port
from tests.train.conftest import REPO, chat_small, run_chatft, step_losses, tiny_qwen2_dir  # noqa: F401

pytestmark = pytest.mark.slow
STEPS = 4


def _common(model: Path, data: Path, out: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--model", model, "--data", data, "--system", "你是甄嬛.",
            "--output_dir", out, "--max_steps", steps, "--learning_rate", "1e-3",
            "--precision", "fp32", "--save_steps", "2", "--save_total_limit", "3",
            "--eval_ratio", "0", "--seed", "7", "--per_device_train_batch_size", "4"]


def _start(*args) -> subprocess.Popen:
    """``chatft ARGS`` in the background, as a user's shell starts it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "chatft", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _nodes(common: list, port: int, extra=(), timeout_s: int = 180) -> list[subprocess.Popen]:
    return [_start(*common, "--nnodes", 2, "--node_rank", r, "--master_addr", "127.0.0.1",
                   "--master_port", port, "--nproc", 1, "--ddp_timeout", timeout_s, *extra)
            for r in (0, 1)]


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in kids if is_worker(p.cmdline())]


def _gone_within(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return alive


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path}:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen2_dir, chat_small) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    ref = root / "one-node"
    port = free_port()  # names the run's /dev/shm buffers (other runs may share the machine)
    run_chatft(*_common(tiny_qwen2_dir, chat_small, ref), "--nproc", 2, "--zero_stage", 2,
               "--master_port", port)
    shm_left = {name for name in _shm() if f"_{port}_" in name}
    two = root / "two-nodes"
    nodes = _nodes(_common(tiny_qwen2_dir, chat_small, two), free_port(), ["--zero_stage", 2])
    outs = [p.communicate(timeout=900) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, f"node exited {p.returncode}:\n{err[-6000:]}"
    return {"ref": ref, "two": two, "shm_left": shm_left, "node_err": outs[0][1]}


def test_two_nodes_of_one_process_train_as_one_node_of_two(runs):
    ref = step_losses(runs["ref"])
    assert len(ref) == STEPS and ref[-1] < ref[0]
    assert step_losses(runs["two"]) == pytest.approx(ref, rel=2e-5)
    from safetensors.torch import load_file

    a = load_file(runs["ref"] / "final" / "model.safetensors")
    b = load_file(runs["two"] / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_a_two_process_run_leaves_nothing_in_dev_shm(runs):
    # DeepSpeed's CPU all-reduce buffers: /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
    assert runs["shm_left"] == set()


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_on_another_process_count_keeps_the_trajectory(runs, nproc, tmp_path,
                                                              tiny_qwen2_dir, chat_small):
    """Written by 2 ZeRO-2 processes at step 2; resumed on 1 (accumulating 2 micro-batches) or 4
    (micro-batch 2) through the universal checkpoint: steps 3-4 come out the same."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["ref"], resumed, ignore=shutil.ignore_patterns("final", "step-000004"))
    (resumed / "checkpoints" / "latest").write_text("step-000002\n")
    proc = run_chatft(*_common(tiny_qwen2_dir, chat_small, resumed), "--nproc", nproc,
                      "--zero_stage", 2, "--resume", "auto", "--export", "false")
    assert "universal" in proc.stderr and "global batch of 8" in proc.stderr
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert step_losses(resumed) == pytest.approx(step_losses(runs["ref"]), rel=2e-5)


def test_a_killed_rank_is_named_and_the_run_resumes(tmp_path, tiny_qwen2_dir, chat_small):
    """kill -9 of rank 1 (node 1's only worker) mid-run: node 0 stops within --ddp_timeout + 30
    s naming rank 1, nothing is left running, and --resume auto continues from the last
    complete checkpoint."""
    out = tmp_path / "killed"
    timeout_s = 30
    common = _common(tiny_qwen2_dir, chat_small, out, steps=400)
    nodes = _nodes(common, free_port(), ["--zero_stage", 2], timeout_s)
    try:
        _wait_for(out / "checkpoints" / "step-000002" / "COMPLETE", nodes[0])
        everything = _workers(nodes[0]) + _workers(nodes[1])
        (victim,) = _workers(nodes[1])
        victim.kill()
        killed_at = time.monotonic()
        _, err0 = nodes[0].communicate(timeout=timeout_s + 120)
        took = time.monotonic() - killed_at
        _, err1 = nodes[1].communicate(timeout=60)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert took < timeout_s + 30, took
    assert "rank 1" in err0, err0[-4000:]
    assert "Traceback" not in err0.split("chatft: error")[-1]
    assert not _gone_within(everything, 30)
    last = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / last / "COMPLETE").is_file()
    done = int(last.split("-")[1])
    # One step more than the checkpoint's (a shorter run than the killed one's 400 steps, which
    # a resume refuses without --resume_force: the schedule changes).
    proc = run_chatft(*_common(tiny_qwen2_dir, chat_small, out, steps=done + 1), "--nproc", 2,
                      "--zero_stage", 2, "--resume", "auto", "--resume_force", "true",
                      "--export", "false")
    assert f"resumed from" in proc.stderr and last in proc.stderr


def test_a_wrong_master_address_is_named_within_the_timeout(tmp_path, tiny_qwen2_dir,
                                                            chat_small):
    port = free_port()
    start = time.monotonic()
    proc = run_chatft(*_common(tiny_qwen2_dir, chat_small, tmp_path / "o"), "--nnodes", 2,
                      "--node_rank", 1, "--master_addr", "127.0.0.2", "--master_port", port,
                      "--nproc", 1, "--ddp_timeout", 15, check=False, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 15 + 120  # the timeout plus starting Python + DeepSpeed
    assert f"could not reach the master (node 0) at 127.0.0.2:{port} within 15 s" in proc.stderr
    assert "node 1" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_outlives_a_killed_parent_and_the_lock_is_released(sig, tmp_path,
                                                                   tiny_qwen2_dir, chat_small):
    out = tmp_path / "o"
    parent = _start(*_common(tiny_qwen2_dir, chat_small, out, steps=400), "--nproc", 2,
                    "--zero_stage", 2, "--stop_timeout", 20)
    try:
        _wait_for(out / "checkpoints" / "step-000002" / "COMPLETE", parent)
        tree = psutil.Process(parent.pid).children(recursive=True)
        assert len(_workers(parent)) == 2
        parent.send_signal(sig)
        alive = _gone_within(tree, 30 + (20 if sig == signal.SIGTERM else 0))
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        parent.wait(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode != 0
    RunLock(out).acquire().release()  # free: the run that held it is gone
