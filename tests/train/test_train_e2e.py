"""CPU end to end on the real DeepSpeed path: train -> checkpoint -> resume -> export -> reload ->
generate, and the invariances that say the distributed engine computes what one process does.

All runs use the same tiny random Qwen2 (real Qwen tokenizer), 64 Alpaca records of real chat,
fp32, and a global batch of 8 samples per step:

* ``plain``       one process, no DeepSpeed, micro-batch 8 x accumulation 1
* ``accum``       one process, no DeepSpeed, micro-batch 4 x accumulation 2
* ``zero0``       2 processes, DeepSpeed without ZeRO (the default for several), micro-batch 4 each
* ``zero2``       2 processes, DeepSpeed ZeRO-2, micro-batch 4 each
* ``zero3``       2 processes, DeepSpeed ZeRO-3, micro-batch 4 each
Their per-step losses must agree to fp32 round-off: the loss is normalized per trained token of
the whole step, so the split into micro-batches and processes cannot change it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from chatft.integrity import manifest
from tests.train.conftest import metrics, run_chatft, step_losses

pytestmark = pytest.mark.slow
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
STEPS = 4


def _common(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", model, "--data", data, "--system", SYSTEM, "--output_dir", out,
            "--max_steps", STEPS, "--learning_rate", "1e-3", "--precision", "fp32",
            "--save_steps", "2", "--save_total_limit", "3", "--eval_ratio", "0.1",
            "--eval_steps", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen2_dir, chat_small) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    layouts = {
        "plain": ["--per_device_train_batch_size", "8"],
        "accum": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                  "--export", "false"],
        "zero0": ["--per_device_train_batch_size", "4", "--nproc", "2", "--export", "false"],
        "zero2": ["--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "2"],
        "zero3": ["--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "3"],
    }
    out = {}
    for name, extra in layouts.items():
        out[name] = root / name
        proc = run_chatft(*_common(tiny_qwen2_dir, chat_small, out[name]), *extra)
        (out[name] / "stderr.txt").write_text(proc.stderr)
    return out


def test_one_process_zero0_zero2_and_zero3_agree_step_by_step(runs):
    plain = step_losses(runs["plain"])
    assert len(plain) == STEPS and plain[-1] < plain[0]
    for name in ("zero0", "zero2", "zero3"):
        assert step_losses(runs[name]) == pytest.approx(plain, rel=2e-5), name


def test_micro_batch_4x2_equals_8x1(runs):
    assert step_losses(runs["accum"]) == pytest.approx(step_losses(runs["plain"]), rel=2e-5)


def test_held_out_loss_is_logged_before_during_and_after(runs):
    evals = [r for r in metrics(runs["zero2"]) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (runs["zero2"] / "loss_curve.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["plain", "zero0", "zero2", "zero3"])
def test_the_size_said_before_step_1_is_what_each_checkpoint_writes(runs, name):
    """Before step 1 (no optimizer moments exist yet) the run says how large each checkpoint
    will be; the engine's files of its first checkpoint (every process's share) are that size
    to the 3 digits printed. The folder adds the tokenizer, the trainer state, the manifest and
    DeepSpeed's conversion scripts."""
    said = re.search(r"checkpoints: about ([\d.]+) (GB|MB|kB) each",
                     (runs[name] / "stderr.txt").read_text())
    estimate = float(said[1]) * {"GB": 1e9, "MB": 1e6, "kB": 1e3}[said[2]]
    files = manifest.read_manifest(runs[name] / "checkpoints" / "step-000002")["files"]
    written = sum(f["size"] for path, f in files.items()
                  if path == "engine_state.pt" or path.startswith("engine/"))
    assert abs(estimate / written - 1) < 0.01, (estimate, written)


def test_checkpoints_are_complete_and_rotated(runs):
    root = runs["zero3"] / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000004"
    for step in ("step-000002", "step-000004"):
        assert (root / step / "COMPLETE").is_file()
        assert json.loads((root / step / "trainer_state.json").read_text())["engine"] == "deepspeed"
    assert not list(root.glob("*.partial"))


@pytest.mark.parametrize("name", ["zero2", "plain"])
def test_resumed_run_reproduces_the_uninterrupted_losses(runs, name, tmp_path, tiny_qwen2_dir,
                                                         chat_small):
    """Resume from the step-2 checkpoint of a finished run: steps 3-4 come out the same."""
    resumed = tmp_path / name
    shutil.copytree(runs[name], resumed, ignore=shutil.ignore_patterns("final", "step-000004"))
    (resumed / "checkpoints" / "latest").write_text("step-000004\n")  # stale: falls back to step 2
    layout = ["--per_device_train_batch_size", "8"] if name == "plain" else \
        ["--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "2"]
    proc = run_chatft(*_common(tiny_qwen2_dir, chat_small, resumed), *layout, "--resume", "auto")
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert step_losses(resumed) == pytest.approx(step_losses(runs[name]), rel=1e-6)
    assert json.loads((resumed / "final" / "chatft.json").read_text())["extra"]["resumed_from"]


@pytest.mark.parametrize("name", ["zero2", "zero3", "plain"])
def test_export_reloads_with_plain_transformers_and_generates(runs, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    final = runs[name] / "final"
    meta = json.loads((final / "chatft.json").read_text())
    assert meta["system_prompt"] == SYSTEM and meta["eot_token"] == "<|im_end|>"
    check = json.loads((final / "chatft_export_check.json").read_text())
    assert check["max_rel_diff"] <= check["tolerance"]
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(final)
    gen = GenerationConfig.from_pretrained(final)
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "你是谁"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_chatft_export_from_a_zero3_checkpoint_matches_the_end_of_training_export(runs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    run_chatft("export", runs["zero3"] / "checkpoints" / "step-000004", "--output", out)
    a = load_file(out / "model.safetensors")
    b = load_file(runs["zero3"] / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k].float() - b[k].float()).abs().max() == 0 for k in a)


def test_chat_one_shot_uses_the_saved_persona(runs):
    proc = run_chatft("chat", runs["zero2"] / "final", "--prompt", "你是谁", "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.strip()


def test_tutorial_deepspeed_json_runs_unchanged_with_cpu_offload(tmp_path, tiny_qwen2_dir,
                                                                 chat_small):
    """The tutorial's ds_config.json (ZeRO-2, CPUAdam offload, offload_param, fp16 and every
    batch/optimizer/scheduler value "auto") works as is; its offload_param gets a warning."""
    from tests.train.test_train_units import TUTORIAL_DS

    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps(TUTORIAL_DS))
    out = tmp_path / "tutorial"
    proc = run_chatft("train", "--model", tiny_qwen2_dir, "--data", chat_small, "--system", SYSTEM,
                      "--output_dir", out, "--max_steps", "3", "--per_device_train_batch_size", "4",
                      "--nproc", "2", "--deepspeed", ds, "--learning_rate", "1e-3", "--export", "false",
                      timeout=1500)
    assert "offload_param at ZeRO stage 2" in proc.stderr
    losses = step_losses(out)
    assert len(losses) == 3 and all(l == l for l in losses)  # finite, logged
    # DeepSpeed's WarmupDecayLR drives the rate: its "auto" warmup became 1 step; its log-shaped
    # warmup gives 0 for the first two updates (scheduler iterations -1 and 0), then it decays
    # linearly towards 0 at total_num_steps = 3: at iteration 1, 1e-3 * (3 - 1) / (3 - 1).
    lrs = [r["lr"] for r in metrics(out) if "lr" in r]
    assert lrs == pytest.approx([0.0, 0.0, 1e-3])


def test_fp16_with_loss_scaling_and_tensorboard(tmp_path, tiny_qwen2_dir, chat_small):
    """fp16 on the plain engine (autocast + dynamic loss scaling) trains and exports; the
    TensorBoard writer records the run."""
    out = tmp_path / "fp16"
    run_chatft("train", "--model", tiny_qwen2_dir, "--data", chat_small, "--output_dir", out,
               "--max_steps", "3", "--per_device_train_batch_size", "8", "--precision", "fp16",
               "--learning_rate", "1e-3", "--report_to", "tensorboard")
    assert len(step_losses(out)) == 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "final" / "model.safetensors").is_file()
