"""Fixtures for training tests: a tiny random Qwen2 folder with the real Qwen tokenizer, a small
chat dataset, and a helper that runs ``chatft`` as users do (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Qwen2-7B's config.json shape (untied embeddings, q/k/v biases), for the memory planner's tests.
QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6)

TINY_QWEN2 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
                  rms_norm_eps=1e-6, rope_theta=10000.0)


def write_tiny_qwen2(folder: Path, tokenizer, **shape) -> Path:
    """Save a random Qwen2ForCausalLM (seed 0) of ``shape`` (Qwen2Config fields) with Qwen's
    full vocabulary and ``tokenizer`` (the real Qwen one, ChatML template) into ``folder``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A Qwen2ForCausalLM with 2 layers of width 32 and Qwen's full vocabulary, saved with the
    real Qwen tokenizer (ChatML template): a model folder like a user's, only tiny."""
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), qwen_tokenizer, **TINY_QWEN2)


@pytest.fixture(scope="session")
def chat_small(tmp_path_factory, chat_alpaca) -> Path:
    """The first 64 records of :func:`chat_alpaca` (Alpaca, like the tutorial's data; real text)."""
    records = json.loads(chat_alpaca.read_text(encoding="utf-8"))[:64]
    path = tmp_path_factory.mktemp("data") / "chat64.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def run_chatft(*args: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m chatft ARGS`` with this checkout's sources first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "chatft", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"chatft {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def step_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(output_dir) if "loss" in r]
