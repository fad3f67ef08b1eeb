"""Model shapes the benchmarks train with random weights, and config-only model folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Qwen2-7B exactly (Qwen2-7B-Instruct's config.json: 32k context, untied embeddings).
QWEN2_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "hidden_act": "silu", "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16", "use_cache": True,
}
#: A Qwen2 small enough for CPU smoke runs; same vocabulary, so the real tokenizer fits.
TINY: dict[str, Any] = {**QWEN2_7B, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_window_layers": 2}
MODEL_CONFIGS = {"qwen2-7b": QWEN2_7B, "tiny": TINY}


def n_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Qwen2 config, counted from its shape (Qwen2-7B: 7,615,616,512)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (+bias), k and v (+bias), o
    mlp = 3 * h * inter  # gate, up, down
    layer = attn + mlp + 2 * h  # + two RMSNorm weights
    embeddings = v * h * (1 if cfg["tie_word_embeddings"] else 2)
    return cfg["num_hidden_layers"] * layer + embeddings + h  # + final norm


def write_model_folder(folder: Path, shape: dict[str, Any], tiktoken_file: Path) -> Path:
    """A model folder with only ``config.json`` and the real Qwen tokenizer (no weights):
    both sides build random weights from it."""
    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=1) + "\n")
    if not (folder / "tokenizer.json").is_file():
        build_qwen_tokenizer(tiktoken_file).save_pretrained(folder)
    return folder
