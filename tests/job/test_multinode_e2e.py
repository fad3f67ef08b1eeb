"""Several "nodes" on one machine (loopback, gloo), resume on another process count, and what
happens when a process or the parent dies.

Every run trains the tiny random Qwen2 on 64 Alpaca records in fp32 with a global batch of 8
samples per step. The reference is one node with 2 processes (ZeRO-2, and ZeRO-3); a run split
over two ``chatft train --nnodes 2 --node_rank 0|1 --master_addr 127.0.0.1`` launches (one
process each), the same split started by two ``torchrun --nnodes 2`` agents, and runs resumed
from its step-2 checkpoint on 1 and on 4 processes must reproduce its per-step losses.
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


def _start(*args, launcher: tuple = ()) -> subprocess.Popen:
    """``[LAUNCHER] chatft ARGS`` in the background, as a user's shell starts it."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    python = [sys.executable] if not launcher else []
    return subprocess.Popen([*map(str, launcher), *python, "-m", "chatft", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _nodes(common: list, port: int, extra=(), timeout_s: int = 180,
           other_output: Path | None = None) -> list[subprocess.Popen]:
    """Node 0 and node 1 of a per-node launch; node 1 writes into ``other_output`` if given
    (a folder node 0 does not see, as a node-local disk would be)."""
    nodes = []
    for r in (0, 1):
        args = list(common)
        if r == 1 and other_output is not None:
            args[args.index("--output_dir") + 1] = other_output
        nodes.append(_start(*args, "--nnodes", 2, "--node_rank", r, "--master_addr",
                            "127.0.0.1", "--master_port", port, "--nproc", 1, "--ddp_timeout",
                            timeout_s, *extra))
    return nodes


def _torchrun_nodes(common: list, port: int, extra=(), timeout_s: int = 180) -> list:
    """Two ``torchrun --nnodes 2 --nproc_per_node 1`` agents, as README's "Several machines"
    starts one per node."""
    exe = Path(sys.executable).with_name("torchrun")
    torchrun = [exe] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [_start(*common, "--ddp_timeout", timeout_s, *extra,
                   launcher=(*torchrun, "--nnodes", 2, "--nproc_per_node", 1, "--node_rank", r,
                             "--master_addr", "127.0.0.1", "--master_port", port))
            for r in (0, 1)]


def _wait(nodes: list[subprocess.Popen], timeout: int) -> list[tuple[str, str]]:
    """Every node's (stdout, stderr); a node still running after ``timeout`` is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()


def _finish(nodes: list[subprocess.Popen], timeout: int = 900) -> list[str]:
    """Wait for every node; each must succeed. Returns their stderr."""
    outs = _wait(nodes, timeout)
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, f"node exited {p.returncode}:\n{err[-6000:]}"
    return [err for _, err in outs]


def _same_export(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x = load_file(a / "final" / "model.safetensors")
    y = load_file(b / "final" / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert (x[k] - y[k]).abs().max().item() <= 1e-6, k


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
    errs = _finish(_nodes(_common(tiny_qwen2_dir, chat_small, two), free_port(),
                          ["--zero_stage", 2]))
    return {"ref": ref, "two": two, "shm_left": shm_left, "node_err": errs[0]}


def test_two_nodes_of_one_process_train_as_one_node_of_two(runs):
    ref = step_losses(runs["ref"])
    assert len(ref) == STEPS and ref[-1] < ref[0]
    assert step_losses(runs["two"]) == pytest.approx(ref, rel=2e-5)
    _same_export(runs["ref"], runs["two"])


def test_two_torchrun_nodes_train_as_one_node_of_two(runs, tmp_path, tiny_qwen2_dir,
                                                     chat_small):
    out = tmp_path / "torchrun"
    errs = _finish(_torchrun_nodes(_common(tiny_qwen2_dir, chat_small, out), free_port(),
                                   ["--zero_stage", 2]))
    assert "torchrun started 2 processes on 2 node(s)" in errs[0] + errs[1]
    assert step_losses(out) == pytest.approx(step_losses(runs["ref"]), rel=2e-5)
    _same_export(runs["ref"], out)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_qwen2_dir, chat_small) -> dict:
    """The ZeRO-3 reference (one node, 2 processes) and the same over two per-node launches."""
    root = tmp_path_factory.mktemp("multinode-zero3")
    ref = root / "one-node"
    run_chatft(*_common(tiny_qwen2_dir, chat_small, ref), "--nproc", 2, "--zero_stage", 3)
    two = root / "two-nodes"
    _finish(_nodes(_common(tiny_qwen2_dir, chat_small, two), free_port(), ["--zero_stage", 3]))
    return {"ref": ref, "two": two}


def test_two_nodes_at_zero3_train_as_one_node_of_two(zero3):
    ref = step_losses(zero3["ref"])
    assert len(ref) == STEPS and ref[-1] < ref[0]
    assert step_losses(zero3["two"]) == pytest.approx(ref, rel=2e-5)
    _same_export(zero3["ref"], zero3["two"])


def test_an_output_folder_each_node_does_not_share_is_refused_at_start(tmp_path,
                                                                       tiny_qwen2_dir,
                                                                       chat_small):
    """Node 1 writes into a folder node 0 never sees (a node-local disk): every node stops at
    start naming the folder and the node that does not see the others' files."""
    common = _common(tiny_qwen2_dir, chat_small, tmp_path / "node0-disk", steps=400)
    nodes = _nodes(common, free_port(), ["--zero_stage", 2], 60,
                   other_output=tmp_path / "node1-disk")
    outs = _wait(nodes, 300)
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode != 0
        assert "is not shared between the nodes" in err, err[-4000:]
        assert "Traceback" not in err.split("chatft: error")[-1], err[-4000:]
    err0 = outs[0][1]
    assert f"the output folder {tmp_path / 'node0-disk'} is not shared" in err0
    assert "node 0 (host" in err0 and "does not see the files of node(s) 1" in err0
    assert not (tmp_path / "node0-disk" / "checkpoints").exists()


def test_a_two_process_run_leaves_nothing_in_dev_shm(runs):
    # DeepSpeed's CPU all-reduce buffers: /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
    assert runs["shm_left"] == set()


def _resume_from_step2(ref: Path, resumed: Path, nproc: int, stage: int, model: Path,
                       data: Path) -> None:
    shutil.copytree(ref, resumed, ignore=shutil.ignore_patterns("final", "step-000004"))
    (resumed / "checkpoints" / "latest").write_text("step-000002\n")
    proc = run_chatft(*_common(model, data, resumed), "--nproc", nproc, "--zero_stage", stage,
                      "--resume", "auto", "--export", "false")
    assert "universal" in proc.stderr and "global batch of 8" in proc.stderr
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert step_losses(resumed) == pytest.approx(step_losses(ref), rel=2e-5)


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_on_another_process_count_keeps_the_trajectory(runs, nproc, tmp_path,
                                                              tiny_qwen2_dir, chat_small):
    """Written by 2 ZeRO-2 processes at step 2; resumed on 1 (accumulating 2 micro-batches) or 4
    (micro-batch 2) through the universal checkpoint: steps 3-4 come out the same."""
    _resume_from_step2(runs["ref"], tmp_path / "resumed", nproc, 2, tiny_qwen2_dir, chat_small)


@pytest.mark.parametrize("nproc", [1, 4])
def test_zero3_resume_on_another_process_count_keeps_the_trajectory(zero3, nproc, tmp_path,
                                                                    tiny_qwen2_dir, chat_small):
    """The same at ZeRO-3 (parameters partitioned too)."""
    _resume_from_step2(zero3["ref"], tmp_path / "resumed", nproc, 3, tiny_qwen2_dir, chat_small)


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
