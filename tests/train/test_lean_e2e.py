"""``chatft train`` with each memory-lean optimizer choice on the tiny Qwen2 (CPU): a run with
checkpoints, then a copy resumed with ``--resume auto`` from its step-2 checkpoint must
reproduce steps 3-4 exactly; the lean 24 GiB setting also exports its bf16 weights as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.train.conftest import run_chatft, step_losses

pytestmark = pytest.mark.slow

CHOICES = {
    "8bit": ["--optim", "adamw_torch_8bit"],
    "4bit": ["--optim", "adamw_torch_4bit", "--precision", "bf16"],  # fp32 masters
    "bf16-sr": ["--master_weights", "none", "--precision", "bf16"],
    "lean-24gib": ["--optim", "adamw_torch_8bit", "--master_weights", "none", "--precision", "bf16",
                   "--optimizer_in_bwd", "--max_grad_norm", "0", "--optimizer_states", "host",
                   "--gradient_checkpointing", "on"],
}


def _train(model: Path, data: Path, out: Path, name: str, *extra: str):
    return run_chatft("train", "--model", model, "--data", data, "--output_dir", out,
                      "--max_steps", "4", "--per_device_train_batch_size", "8",
                      "--learning_rate", "1e-3", "--save_steps", "2", "--save_total_limit", "3",
                      "--seed", "7", "--export", str(name == "lean-24gib").lower(),
                      *CHOICES[name], *extra, timeout=1500)


@pytest.mark.parametrize("name", list(CHOICES))
def test_lean_choice_resumes_the_identical_run(name, tmp_path, tiny_qwen2_dir, chat_small):
    full = tmp_path / "full"
    _train(tiny_qwen2_dir, chat_small, full, name)
    losses = step_losses(full)
    assert len(losses) == 4 and losses[-1] < losses[0]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final", "step-000004"))
    (resumed / "checkpoints" / "latest").write_text("step-000002\n")
    (resumed / "metrics.jsonl").write_text("")
    proc = _train(tiny_qwen2_dir, chat_small, resumed, name, "--resume", "auto")
    assert "resumed from" in proc.stderr and "step-000002" in proc.stderr
    assert step_losses(resumed) == losses[2:]
    if name == "lean-24gib":
        _check_export_is_the_bf16_weights(full)


def _check_export_is_the_bf16_weights(run: Path):
    """Without master weights the trained weights are the bf16 ones: the export writes them
    unchanged (the checkpoint's "model" holds the same bf16 tensors)."""
    import torch
    from safetensors.torch import load_file

    exported = load_file(run / "final" / "model.safetensors")
    saved = torch.load(run / "checkpoints" / "step-000004" / "engine_state.pt",
                       map_location="cpu", weights_only=False)["model"]
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    assert exported.keys() <= saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in exported)
    check = json.loads((run / "final" / "chatft_export_check.json").read_text())
    assert check["max_rel_diff"] <= check["tolerance"]
