"""GPU fixtures: a tiny Qwen2 whose head size (64) suits every GPU attention kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import TINY_QWEN2, write_tiny_qwen2
from tests.train.conftest import chat_small, tiny_qwen2_dir  # noqa: F401  (shared fixtures)


#: TINY_QWEN2 with head size 64 (width 128 over 2 heads; 1 key-value head).
TINY_QWEN2_GPU = {**TINY_QWEN2, "hidden_size": 128, "intermediate_size": 256,
                  "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="session")
def tiny_qwen2_gpu_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-gpu"), qwen_tokenizer,
                            **TINY_QWEN2_GPU)
