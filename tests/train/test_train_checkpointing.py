"""Checkpoints that can be trusted, on the plain engine: damage is detected and ``--resume auto``
falls back past it; crafted pickles are refused on resume and export with nothing executed; a
resume with other settings is refused naming each; a full disk says free and needed bytes; the
default settings save every epoch, so a run killed after epoch 1 can be exported."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from chatft import checkpoint as ckpt
from chatft.config import TrainArgs
from chatft.integrity import manifest
from chatft.integrity.disk import DiskFullError
from chatft.train import checkpointing
from chatft.train.checkpointing import resume_differences, save_checkpoint
from chatft.train.engine import TorchEngine
from chatft.train.loop import RunRecord
from tests.train.conftest import run_chatft, step_losses
from tests.train.test_train_stopping import start_chatft

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def _args(model: Path, data: Path, out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--system", SYSTEM, "--output_dir", out,
            "--max_steps", "6", "--learning_rate", "1e-3", "--precision", "fp32",
            "--per_device_train_batch_size", "8", "--seed", "7", "--save_steps", "2",
            "--save_total_limit", "3", "--export", "false", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_qwen2_dir, chat_small) -> Path:
    """Six steps, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("ckpt") / "base"
    run_chatft(*_args(tiny_qwen2_dir, chat_small, out))
    assert [p.name for p in ckpt.complete_checkpoints(out)] == \
        ["step-000002", "step-000004", "step-000006"]
    return out


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _overwrite(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))


def test_random_bytes_are_detected_and_resume_auto_falls_back(base, tmp_path, tiny_qwen2_dir,
                                                               chat_small):
    out = _copy(base, tmp_path / "run")
    damaged = ckpt.checkpoints_dir(out) / "step-000006"
    _overwrite(damaged / "engine_state.pt", 4 << 20, 1 << 20)  # 1 MB of random bytes
    proc = run_chatft(*_args(tiny_qwen2_dir, chat_small, out), "--resume", "auto")
    assert f"{damaged} is damaged: engine_state.pt: expected xxh3_128" in proc.stderr
    assert "same size, different bytes" in proc.stderr
    good = ckpt.checkpoints_dir(out) / "step-000004"
    assert f"resumed from {good} (the newest good one; damaged: step-000006) at step 4" in proc.stderr
    assert step_losses(out) == pytest.approx(step_losses(base), rel=1e-6)
    assert manifest.verify(damaged) == []  # step 6 was written again, whole


def test_export_skips_a_damaged_checkpoint_of_a_run_and_refuses_a_named_one(base, tmp_path):
    out = _copy(base, tmp_path / "run")
    newest = ckpt.checkpoints_dir(out) / "step-000006"
    with open(newest / "engine_state.pt", "r+b") as f:
        f.truncate(1000)
    proc = run_chatft("export", newest, "--output", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{newest}: the checkpoint is damaged" in proc.stderr
    assert "engine_state.pt: expected" in proc.stderr and "found 1,000 bytes" in proc.stderr
    proc = run_chatft("export", out, "--output", tmp_path / "y")
    assert f"{newest} is damaged, skipping it" in proc.stderr
    assert "exported " + str(ckpt.checkpoints_dir(out) / "step-000004") in proc.stdout


def test_a_truncated_checkpoint_named_by_resume_is_an_error_naming_the_file(base, tmp_path,
                                                                            tiny_qwen2_dir,
                                                                            chat_small):
    out = _copy(base, tmp_path / "run")
    named = ckpt.checkpoints_dir(out) / "step-000004"
    size = (named / "engine_state.pt").stat().st_size
    with open(named / "engine_state.pt", "r+b") as f:
        f.truncate(size // 2)
    proc = run_chatft(*_args(tiny_qwen2_dir, chat_small, out), "--resume", named, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"engine_state.pt: expected {size:,} bytes, found {size // 2:,} bytes" in proc.stderr
    assert f"--resume {named}: the checkpoint is damaged" in proc.stderr


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_engine_state_is_refused_on_resume_and_export_and_nothing_runs(
        base, tmp_path, tiny_qwen2_dir, chat_small):
    out = _copy(base, tmp_path / "run")
    newest = ckpt.checkpoints_dir(out) / "step-000006"
    marker = tmp_path / "code-ran"
    state = torch.load(newest / "engine_state.pt", weights_only=True)
    state["client_state"]["note"] = _RunsCode(marker)
    torch.save(state, newest / "engine_state.pt")
    manifest.merge(newest)  # a crafted checkpoint comes with a matching manifest
    for proc in (run_chatft(*_args(tiny_qwen2_dir, chat_small, out), "--resume", "auto",
                            check=False),
                 run_chatft("export", newest, "--output", tmp_path / "x", check=False)):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"{newest / 'engine_state.pt'}: refused to load" in proc.stderr
        assert "posix.system" in proc.stderr or "os.system" in proc.stderr
    assert not marker.exists()


def test_resume_with_other_settings_names_each_difference_and_needs_force(
        base, tmp_path, tiny_qwen2_dir, chat_small):
    out = _copy(base, tmp_path / "run")
    changed = _args(tiny_qwen2_dir, chat_small, out, "--learning_rate", "5e-4", "--seed", "8",
                    "--per_device_train_batch_size", "4", "--max_steps", "8")
    changed[changed.index("--system") + 1] = "You are a lighthouse keeper."
    proc = run_chatft(*changed, "--resume", "auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.split("chatft: error: ", 1)[1]
    for line in ("training data: tokenized data", "data.system: '现在你要扮演皇帝身边的女人--甄嬛.' in "
                 "the checkpoint, 'You are a lighthouse keeper.' now",
                 "train.learning_rate: 0.001 in the checkpoint, 0.0005 now",
                 "train.seed: 7 in the checkpoint, 8 now", "train.max_steps: 6 in the checkpoint, 8 now",
                 "global batch: 8 samples", "--resume_force"):
        assert line in error, line
    proc = run_chatft(*changed, "--resume", "auto", "--resume_force")
    assert "resuming despite different settings (--resume_force)" in proc.stderr
    assert "at step 6" in proc.stderr and len(step_losses(out)) == 8


def test_resume_differences_ignore_how_the_global_batch_is_split():
    saved = {"train": {"per_device_train_batch_size": 8, "learning_rate": 1e-3},
             "launch": {"nproc": 1}}
    now = {"train": {"per_device_train_batch_size": 4, "learning_rate": 1e-3},
           "launch": {"nproc": 2}, "deepspeed": {"zero_stage": 2}}
    assert resume_differences(saved, now) == []
    now["train"]["gradient_accumulation_steps"] = 2
    assert resume_differences(saved, now) == [
        "global batch: 8 samples (8 per device x 1 accumulated x 1 process(es)) in the "
        "checkpoint, 16 (4 per device x 2 accumulated x 2 process(es)) now"]


def test_saves_by_strategy():
    """When the loop saves (7 steps, 3 per epoch): by the schedule's strategy, and the last step."""
    from chatft.config import Schedule
    from chatft.train.evaluation import due

    def saves(**kw):
        s = Schedule.of(TrainArgs(**kw), held_out=False)
        return [d for d in range(1, 8)
                if s.save != "no" and (due(s.save, s.save_steps, d, 3) or d == 7)]

    assert saves() == [3, 6, 7]  # the default: every epoch, and the last step
    assert saves(save_steps=2) == [2, 4, 6, 7]  # save_steps alone means steps
    assert saves(save_strategy="steps", save_steps=2) == [2, 4, 6, 7]
    assert saves(save_strategy="epoch", save_steps=2) == [3, 6, 7]  # as Hugging Face's Trainer
    assert saves(save_strategy="no") == []


def test_a_default_run_killed_after_epoch_1_can_be_exported(tmp_path, tiny_qwen2_dir, chat_small):
    """No save option given: the default save_strategy (epoch) saves after every epoch."""
    out = tmp_path / "killed"
    proc = start_chatft("train", "--model", tiny_qwen2_dir, "--data", chat_small, "--output_dir",
                        out, "--num_train_epochs", "50", "--precision", "fp32",
                        "--per_device_train_batch_size", "8")  # 8 steps per epoch
    first_epoch = ckpt.checkpoints_dir(out) / "step-000008"
    deadline = time.monotonic() + 600
    while not (first_epoch / ckpt.MARKER).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    exported = run_chatft("export", out, "--output", tmp_path / "model")
    assert "exported " in exported.stdout and (tmp_path / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------- full disk, in process


@pytest.fixture
def engine_and_record(qwen_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=8,
                                         intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    engine = TorchEngine(TrainArgs(), model, "fp32", torch.device("cpu"), "chunked")
    return engine, RunRecord(qwen_tokenizer, {"train": {}}, "tiny", data_key="k")


def test_a_full_disk_before_saving_says_free_and_needed_bytes(tmp_path, engine_and_record,
                                                              monkeypatch):
    engine, record = engine_and_record
    args = TrainArgs(output_dir=str(tmp_path))
    first = save_checkpoint(engine, args, 2, record, {"loss": 1.0})
    size = manifest.read_manifest(first)["total_bytes"]
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: size // 3)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(engine, args, 4, record, {"loss": 1.0})
    text = str(err.value)
    assert "checkpoint step-000004: not enough disk space" in text
    assert "about " in text and "needed" in text and "free" in text
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002"]
    assert not list(ckpt.checkpoints_dir(tmp_path).glob("*.partial"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                  "unexpected pos 58399168 vs 58399056")])
def test_a_disk_that_fills_up_while_saving_is_reported_and_cleaned(tmp_path, engine_and_record,
                                                                   monkeypatch, failure):
    """The writer fails as torch's zip writer or Python does on a full disk: the message says
    so, the partial folder is gone, the previous checkpoint is still the latest."""
    engine, record = engine_and_record
    args = TrainArgs(output_dir=str(tmp_path))
    save_checkpoint(engine, args, 2, record, {"loss": 1.0})

    def full_disk(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError, match="checkpoint step-000004: not enough disk space"):
        save_checkpoint(engine, args, 4, record, {"loss": 1.0})
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    assert not list(ckpt.checkpoints_dir(tmp_path).glob("*.partial"))


def test_a_real_full_filesystem(tmp_path, engine_and_record):
    """On a tmpfs (root only; skipped elsewhere) just larger than the engine's estimate (after
    a step, so that the moments the estimate counts are written): the check before writing
    passes, the tokenizer files do not fit, the real ENOSPC is reported."""
    import subprocess

    from tests.train.lean_helpers import train_steps

    engine, record = engine_and_record
    train_steps(engine, range(1), 1e-3)
    mount = tmp_path / "small"
    mount.mkdir()
    size = engine.checkpoint_bytes() + (2 << 20)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        args = TrainArgs(output_dir=str(mount / "run"))
        with pytest.raises(DiskFullError) as err:
            save_checkpoint(engine, args, 2, record, {"loss": 1.0})
        assert "No space left on device" in str(err.value.__cause__)  # the real one
        assert "needed" in str(err.value) and str(mount / "run") in str(err.value)
        assert not list(ckpt.checkpoints_dir(mount / "run").glob("*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------- the first checkpoint checked before step 1


def test_a_run_whose_checkpoint_cannot_fit_is_refused_before_training(tmp_path, engine_and_record,
                                                                      monkeypatch):
    """The check before step 1 uses the engine's own estimate; saving off skips it."""
    engine, _ = engine_and_record
    args = TrainArgs(output_dir=str(tmp_path))
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: engine.checkpoint_bytes() - 1)
    with pytest.raises(DiskFullError) as err:
        checkpointing.check_space_before_training(engine, args, saves=True)
    text = str(err.value)
    assert "checkpoints: not enough disk space" in text and "--save_strategy no" in text
    checkpointing.check_space_before_training(engine, args, saves=False)
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: engine.checkpoint_bytes())
    checkpointing.check_space_before_training(engine, args, saves=True)


def test_the_loop_refuses_before_its_first_step(tmp_path, engine_and_record, monkeypatch):
    """loop.train runs the check before any step: a shortage leaves the weights untouched."""
    import numpy as np

    from chatft.data.prepare import TokenizedDataset
    from chatft.train import loop

    engine, record = engine_and_record
    n, length = 4, 6
    data = TokenizedDataset(input_ids=np.arange(n * length, dtype=np.int32) % 50 + 10,
                            loss_mask=np.ones(n * length, dtype=bool),
                            offsets=np.arange(0, n * length + 1, length, dtype=np.int64),
                            record_index=np.arange(n, dtype=np.int64), summary=None)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: 1)
    args = TrainArgs(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                     num_train_epochs=1)
    with pytest.raises(DiskFullError, match="--save_strategy no"):
        loop.train(engine, loop.TrainData(data, None, 0, packing=True), args, record)
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())


@pytest.mark.parametrize("precision, choice", [
    ("fp32", {}),  # torch's AdamW: two fp32 moments per weight
    ("bf16", {"optim": "adamw_torch_8bit"}),  # fp32 masters, written twice, 8-bit moments
    ("bf16", {"optim": "adamw_torch_4bit", "master_weights": "none", "optimizer_in_bwd": True,
              "optimizer_states": "host"}),  # bf16 weights, 4-bit moments in host memory
    ("bf16", {"optim": "adamw_torch_4bit", "master_weights": "none", "optimizer_in_bwd": True,
              "optimizer_states": "host", "slab_bytes": 64 << 10}),  # ... in slabs, written whole
], ids=["fp32", "masters-8bit", "host-4bit", "host-4bit-slabs"])
def test_the_estimate_before_step_1_is_what_the_first_checkpoint_writes(tmp_path, precision,
                                                                         choice):
    """Before step 1 no optimizer has moments; the estimate counts them all the same, by the
    optimizer's choice. After one step the checkpoint's tensors (the data records in
    engine_state.pt's zip) are the estimate plus what it ignores: a step counter per weight and
    torchao's learning rates (a few bytes per weight). The file adds ~300 bytes per tensor of
    zip records and pickled structure: up to 12% on this 122k-parameter model, and on models
    of millions of parameters under 1% (the end-to-end runs check that)."""
    import zipfile

    from chatft.train.host_states import HostArena
    from tests.train.lean_helpers import make_engine, train_steps

    choice = dict(choice)
    slab_bytes = choice.pop("slab_bytes", 0)
    engine = make_engine(precision, 1e-3, **choice)
    if slab_bytes:  # what a CUDA machine does (1 GiB pinned slabs), small and unpinned
        engine.optimizer.host.arena = HostArena(pin=False, slab_bytes=slab_bytes)
    estimate = engine.checkpoint_bytes()
    assert not any(engine.optimizer.state_dict().get("state", {}).values())  # no moments yet
    train_steps(engine, range(1), 1e-3)
    engine.save(tmp_path, {"step": 1})
    path = tmp_path / "engine_state.pt"
    with zipfile.ZipFile(path) as z:
        tensors = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    weights = sum(1 for _ in engine.model.parameters())
    assert 0 <= tensors - estimate <= 8 * weights, (estimate, tensors)
    if slab_bytes:  # the moments went into several slabs, each in the file whole
        arena = engine.optimizer.host.arena
        assert arena.own_bytes == 0 and arena.reserved_bytes >= 2 * slab_bytes
    assert 0.85 < estimate / path.stat().st_size <= 1, (estimate, path.stat().st_size)
