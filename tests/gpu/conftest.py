"""GPU fixtures: a tiny Qwen2 whose head size (64) suits every GPU attention kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import huanhuan_small, tiny_qwen2_dir  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="session")
def tiny_qwen2_gpu_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2-gpu")
    cfg = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      eos_token_id=qwen_tokenizer.eos_token_id,
                      pad_token_id=qwen_tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder
