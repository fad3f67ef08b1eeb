"""A graceful stop: SIGTERM finishes the current step, saves it, says where and exits 143; the
resumed run equals the uninterrupted one. A second signal aborts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatft import checkpoint as ckpt
from chatft.train.stopping import DEBOUNCE_S, StopSignals
from tests.train.conftest import REPO, metrics, run_chatft, step_losses

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
STEPS = 8


def test_the_first_signal_is_recorded_and_copies_of_it_do_not_abort():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(rank=1) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C's copy arriving at once: not a second one
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_after_the_first_aborts_at_once():
    code = (f"import os, signal, time\n"
            f"from chatft.train.stopping import StopSignals\n"
            f"with StopSignals() as s:\n"
            f"    os.kill(os.getpid(), signal.SIGINT)\n"
            f"    time.sleep({DEBOUNCE_S} + 0.3)\n"
            f"    os.kill(os.getpid(), signal.SIGINT)\n"
            f"    time.sleep(5)\n"
            f"print('survived')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGINT and "survived" not in proc.stdout
    assert "aborting now, without saving" in proc.stderr


def _args(model: Path, data: Path, out: Path) -> list:
    return ["train", "--model", model, "--data", data, "--system", SYSTEM, "--output_dir", out,
            "--max_steps", STEPS, "--learning_rate", "1e-3", "--precision", "fp32",
            "--per_device_train_batch_size", "8", "--seed", "7", "--export", "false"]


def start_chatft(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "chatft", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``metrics.jsonl`` has logged ``step`` (the run is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (out / "metrics.jsonl").is_file() and \
                any(r.get("step", 0) >= step and "loss" in r for r in metrics(out)):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigterm_saves_the_current_step_and_the_resumed_run_equals_the_uninterrupted_one(
        tmp_path, tiny_qwen2_dir, chat_small):
    reference = tmp_path / "reference"
    run_chatft(*_args(tiny_qwen2_dir, chat_small, reference))

    out = tmp_path / "stopped"
    proc = start_chatft(*_args(tiny_qwen2_dir, chat_small, out))
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    done = max(r["step"] for r in metrics(out) if "loss" in r)
    assert 2 <= done < STEPS
    saved = ckpt.checkpoints_dir(out) / ckpt.step_name(done)
    assert f"stopped by SIGTERM after step {done} of {STEPS}: saved checkpoint {saved}" in stderr
    assert ckpt.latest_checkpoint(out) == saved

    proc = run_chatft(*_args(tiny_qwen2_dir, chat_small, out), "--resume", "auto")
    assert f"resumed from {saved} at step {done}" in proc.stderr
    assert step_losses(out) == pytest.approx(step_losses(reference), rel=1e-6)
