"""A Qwen-7B-Chat-style folder (Qwen-1, tiny, random) as users have it: train it directly on
2-process DeepSpeed ZeRO-2, export a plain transformers folder, reload it, chat with it."""

from __future__ import annotations

import json

import pytest

from tests.model.conftest import tiny_qwen1_dir, write_qwen1  # noqa: F401  (fixtures)
from tests.train.conftest import metrics, run_chatft, step_losses

pytestmark = pytest.mark.slow
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def test_qwen1_folder_trains_on_zero2_exports_reloads_and_chats(tmp_path, tiny_qwen1_dir,
                                                              chat_small):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    run_chatft("train", "--model", tiny_qwen1_dir, "--data", chat_small, "--system", SYSTEM,
               "--output_dir", out, "--nproc", "2", "--zero_stage", "2", "--max_steps", "3",
               "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--precision", "fp32",
               "--eval_ratio", "0.1")
    assert len(step_losses(out)) == 3
    held_out = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert held_out[-1] < held_out[0]  # it learns: same held-out records before and after
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config  # no remote code left
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.pad_token == "<|endoftext|>"
    # generation stops on <|im_end|> (and <|endoftext|>), as Qwen-1's chat does
    stops = model.generation_config.eos_token_id
    assert {151645, 151643} <= set(stops if isinstance(stops, list) else [stops])
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "你是谁"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    chat = run_chatft("chat", final, "--prompt", "你是谁", "--max-new-tokens", "4")
    assert chat.stdout.strip()
