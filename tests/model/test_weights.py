"""A model folder with missing or truncated weights is named in one message, for training
(``build_model``) and for chat/serve (``load_chat_model``), never a raw OSError or
SafetensorError traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chatft.config import ModelArgs
from chatft.errors import ChatftError
from chatft.model.build import build_model
from chatft.model.loading import ModelSource
from chatft.model.weights import check_safetensors, check_weights


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, qwen_tokenizer) -> Path:
    """A 1-layer Qwen2 of width 16 with a 2-shard safetensors index and the Qwen tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("small")
    cfg = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder, max_shard_size="5MB")
    qwen_tokenizer.save_pretrained(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shards(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_a_whole_folder_passes_and_lists_its_shards(small_folder):
    assert [p.name for p in check_weights(small_folder)] == _shards(small_folder)
    assert len(_shards(small_folder)) >= 2


def test_a_truncated_shard_is_named_with_expected_and_found_sizes(small_folder, tmp_path):
    folder = _copy(small_folder, tmp_path / "m")
    shard = folder / _shards(folder)[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ChatftError) as err:
        check_safetensors(shard)
    assert str(shard) in str(err.value) and "truncated" in str(err.value)
    assert f"{size:,}" in str(err.value) and f"{size - 1000:,}" in str(err.value)
    with pytest.raises(ChatftError, match=shard.name):  # training a model from it
        build_model(ModelArgs(), ModelSource("hf", folder), dtype=torch.float32,
                    device=torch.device("cpu"), seed=0, gradient_checkpointing=False)
    with open(shard, "r+b") as f:
        f.truncate(5)  # not even the header's length
    with pytest.raises(ChatftError, match="too short"):
        check_safetensors(shard)


def test_a_missing_shard_or_no_weights_at_all_is_named(small_folder, tmp_path):
    from chatft.serve.generate import load_chat_model

    folder = _copy(small_folder, tmp_path / "m")
    missing = _shards(folder)[-1]
    (folder / missing).unlink()
    with pytest.raises(ChatftError, match=f"missing: {missing}"):
        check_weights(folder)
    with pytest.raises(ChatftError, match=missing):  # chat / serve
        load_chat_model(folder, device="cpu")
    for f in folder.glob("model*"):
        f.unlink()
    with pytest.raises(ChatftError, match="no weights"):
        build_model(ModelArgs(), ModelSource("hf", folder), dtype=torch.float32,
                    device=torch.device("cpu"), seed=0, gradient_checkpointing=False)


def test_a_garbled_header_is_damaged(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 8)
    with pytest.raises(ChatftError, match="damaged"):
        check_safetensors(path)
