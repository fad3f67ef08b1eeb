"""What differs on 2-process DeepSpeed ZeRO-2: a SIGTERM to one process stops both after the
same step with one complete checkpoint, which resumes to the uninterrupted losses; each process
verifies its share of a checkpoint and ``--resume auto`` falls back past a damaged shard; a
crafted pickle in a DeepSpeed shard is refused with nothing executed; DeepSpeed skips a
diverging step's update itself and the run stops keeping the last good checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch

from chatft import checkpoint as ckpt
from chatft.integrity import manifest
from tests.train.conftest import metrics, run_chatft, step_losses
from tests.train.test_train_stopping import start_chatft, wait_for_step

pytestmark = pytest.mark.slow
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
STEPS = 8


def _args(model: Path, data: Path, out: Path, *layout) -> list:
    return ["train", "--model", model, "--data", data, "--system", SYSTEM, "--output_dir", out,
            "--max_steps", STEPS, "--learning_rate", "1e-3", "--precision", "fp32", "--seed", "7",
            "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3",
            "--export", "false", *layout]


ZERO2 = ("--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_qwen2_dir, chat_small) -> list[float]:
    """The uninterrupted losses, from one plain process (ZeRO-2 on 2 processes equals it)."""
    out = tmp_path_factory.mktemp("zero2-safety") / "reference"
    run_chatft(*_args(tiny_qwen2_dir, chat_small, out, "--per_device_train_batch_size", "8"))
    return step_losses(out)


def _worker(launched: psutil.Process, rank: int, timeout: float = 300) -> psutil.Process:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in launched.children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "chatft.job.worker" in cmd and f"--local_rank={rank}" in cmd:
                return p
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_qwen2_dir, chat_small) -> tuple[Path, int, str]:
    """A ZeRO-2 run whose rank-1 worker alone got a SIGTERM after step 2."""
    out = tmp_path_factory.mktemp("zero2-safety") / "stopped"
    proc = start_chatft(*_args(tiny_qwen2_dir, chat_small, out, *ZERO2))
    rank1 = _worker(psutil.Process(proc.pid), 1)
    wait_for_step(out, 2, proc)
    rank1.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    done = max(r["step"] for r in metrics(out) if "loss" in r)
    return out, done, stderr


def test_a_signal_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(stopped):
    out, done, stderr = stopped
    assert 2 <= done < STEPS
    saved = ckpt.checkpoints_dir(out) / ckpt.step_name(done)
    assert (f"stopped by a signal to another process after step {done} of {STEPS}: saved "
            f"checkpoint {saved}") in stderr
    # process 0 speaks for both (its line names it: "chatft: error: rank 0 (...): stopped by")
    assert sum("chatft: error:" in line and ": stopped by " in line
               for line in stderr.splitlines()) == 1
    assert ckpt.latest_checkpoint(out) == saved and manifest.verify(saved) == []
    shards = sorted(p.name for p in (saved / "engine").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_resuming_the_stopped_run_gives_the_uninterrupted_losses(stopped, reference, tmp_path,
                                                                 tiny_qwen2_dir, chat_small):
    out = tmp_path / "resumed"
    shutil.copytree(stopped[0], out)
    proc = run_chatft(*_args(tiny_qwen2_dir, chat_small, out, *ZERO2), "--resume", "auto")
    assert f"at step {stopped[1]}" in proc.stderr
    assert step_losses(out) == pytest.approx(reference, rel=2e-5)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_damaged_shard_is_passed_over_and_a_crafted_one_refused(stopped, tmp_path,
                                                                  tiny_qwen2_dir, chat_small):
    out = tmp_path / "tampered"
    shutil.copytree(stopped[0], out)
    newest, older = ckpt.newest_first(out)[:2]
    damaged = newest / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(damaged, "r+b") as f:
        f.seek(damaged.stat().st_size // 2)
        f.write(os.urandom(4096))
    crafted = older / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(crafted, weights_only=False)  # our own file, written by the run above
    state["note"] = _RunsCode(marker)
    torch.save(state, crafted)
    manifest.merge(older)  # it comes with a matching manifest

    proc = run_chatft(*_args(tiny_qwen2_dir, chat_small, out, *ZERO2), "--resume", "auto",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"{newest} is damaged: engine/zero_pp_rank_1_mp_rank_00_optim_states.pt: expected "
            f"xxh3_128") in proc.stderr
    assert f"{newest.name} is damaged (see above): trying the next older checkpoint" in proc.stderr
    assert f"{crafted}: refused to load" in proc.stderr and "system" in proc.stderr
    proc = run_chatft("export", older, "--output", tmp_path / "x", check=False)
    assert proc.returncode == 2 and f"{crafted}: refused to load" in proc.stderr
    assert not marker.exists()


def test_deepspeed_skips_diverging_steps_and_the_last_good_checkpoint_is_kept(
        tmp_path, tiny_qwen2_dir, chat_small):
    out = tmp_path / "diverged"
    proc = run_chatft("train", "--model", tiny_qwen2_dir, "--data", chat_small, "--system", SYSTEM,
                      "--output_dir", out, "--max_steps", "20", "--learning_rate", "1e3",
                      "--precision", "fp32", *ZERO2, "--save_strategy", "steps", "--save_steps",
                      "1", "--save_total_limit", "1", "--max_bad_steps", "3", "--export", "false",
                      check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    good = ckpt.checkpoints_dir(out) / "step-000001"
    assert proc.stderr.count("training diverged: 3 steps in a row (steps 2-4)") == 1
    assert str(good) in proc.stderr.split("training diverged", 1)[1]
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000001"]
    assert manifest.verify(good) == []
    logged = [r for r in metrics(out) if "loss" in r]
    assert [r.get("skipped", False) for r in logged] == [False, True, True, True]
