"""Qwen-1 folders: config mapping, exact weight conversion, the converted folder, chat format.

Exactness is checked against ``qwen1_forward`` below, an independent fp32 implementation of
Qwen-1's forward pass written from its published description (modeling_qwen.py): RMSNorm,
fused ``c_attn`` with bias split q|k|v, rotary embedding on the two halves of each head,
causal softmax attention, MLP ``c_proj(w1(x) * silu(w2(x)))``, ``ln_f``, ``lm_head`` — and,
optionally, the two inference-time context extensions (logn attention, dynamic NTK).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from bench.lib import qwen1_folder as qwen1_bench
from chatft.errors import ChatftError
from chatft.model import qwen1
from chatft.model.qwen1 import (convert_qwen1, iter_converted_tensors, load_qwen1_model,
                                qwen2_config_from_qwen1)

from .conftest import REMOTE_CODE, TINY_QWEN1_CONFIG, qwen1_random_state

#: Qwen-7B-Chat's config.json as published (8192-context release).
QWEN_7B_CHAT = {**qwen1_bench.QWEN_7B_CHAT, "bf16": False}
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


# ---------------------------------------------------------------- reference forward pass

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """x: [B, T, heads, d]; rotate each position's pairs (i, i + d/2) by pos * base^(-2i/d)."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2).float() / d)  # [d/2]
    angles = torch.outer(torch.arange(t).float(), inv_freq)  # [T, d/2]
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, T, 1, d]
    first, second = x[..., : d // 2], x[..., d // 2:]
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * angles.cos() + rotated_half * angles.sin()


def qwen1_forward(state: dict, cfg: dict, ids: torch.Tensor, *,
                  context_extensions: bool = False) -> torch.Tensor:
    """Logits ``[B, T, V]`` of Qwen-1 for ``ids`` ``[B, T]``, in fp32.

    ``context_extensions`` applies ``use_logn_attn`` and ``use_dynamic_ntk`` as Qwen-1's
    inference does (query scaled by log(p)/log(seq_length) past seq_length; rotary base
    scaled by alpha^(d/(d-2)), alpha = 2^ceil(log2(T/seq_length) + 1) - 1, at least 1).
    """
    w = {k: v.float() for k, v in state.items()}
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d, eps, seq_length = h // heads, cfg["layer_norm_epsilon"], cfg["seq_length"]
    b, t = ids.shape
    base = float(cfg["rotary_emb_base"])
    query_scale = torch.ones(t)
    if context_extensions:
        alpha = max(2 ** math.ceil(math.log(t / seq_length, 2) + 1) - 1, 1)
        base = base * alpha ** (d / (d - 2))
        query_scale = torch.tensor([math.log(p, seq_length) if p > seq_length else 1.0
                                    for p in range(1, t + 1)])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["transformer.wte.weight"][ids]  # [B, T, H]
    for n in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{n}."
        y = _rms_norm(x, w[p + "ln_1.weight"], eps)
        qkv = y @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]  # [B, T, 3H]
        q, k, v = (z.reshape(b, t, heads, d) for z in qkv.split(h, dim=-1))
        q, k = _rotary(q, base), _rotary(k, base)
        q = q * query_scale[None, :, None, None]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, d]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = scores.softmax(-1) @ v  # [B, heads, T, d]
        attn = attn.transpose(1, 2).reshape(b, t, h)
        x = x + attn @ w[p + "attn.c_proj.weight"].T
        y = _rms_norm(x, w[p + "ln_2.weight"], eps)
        a1 = y @ w[p + "mlp.w1.weight"].T
        a2 = y @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    x = _rms_norm(x, w["transformer.ln_f.weight"], eps)
    return x @ w["lm_head.weight"].T


def read_qwen1_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        elif f.suffix == ".bin":
            state.update(torch.load(f, weights_only=True))
    return state


def sample_ids(qwen_tokenizer) -> torch.Tensor:
    """Two real sentences, [2, T], including special tokens, and one id past the tokenizer."""
    a = qwen_tokenizer("<|im_start|>user\n皇上驾到！<|im_end|>\n<|im_start|>assistant\n皇上万福金安。",
                       add_special_tokens=False)["input_ids"]
    b = qwen_tokenizer("Hello, how are you doing today? 你好，今天怎么样？ 12345!",
                       add_special_tokens=False)["input_ids"]
    t = min(len(a), len(b))
    ids = torch.tensor([a[:t], b[:t]])
    ids[1, -1] = 151935  # a padding row of the embedding matrix converts too
    return ids


# ---------------------------------------------------------------- config

def test_config_of_qwen_7b_chat():
    c = qwen2_config_from_qwen1(QWEN_7B_CHAT)
    assert c.model_type == "qwen2"
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) \
        == (4096, 32, 32, 32)
    assert c.intermediate_size == 11008  # Qwen-1 stores it doubled
    assert c.rms_norm_eps == 1e-6
    assert c.rope_parameters["rope_theta"] == 10000.0
    assert c.rope_parameters["rope_type"] == "default"
    assert c.max_position_embeddings == 8192
    assert c.vocab_size == 151936
    assert c.tie_word_embeddings is False
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (151643, 151645, 151643)
    assert not c.use_sliding_window


def test_config_of_first_release_names():
    """The first Qwen-7B release used GPT-2 style names and a 2048-token context."""
    old = {"model_type": "qwen", "n_embd": 4096, "n_head": 32, "n_layer": 32,
           "ffn_hidden_size": 22016, "kv_channels": 128, "seq_length": 2048,
           "max_position_embeddings": 8192, "vocab_size": 151936, "layer_norm_epsilon": 1e-5,
           "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True}
    c = qwen2_config_from_qwen1(old)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (4096, 32, 32)
    assert c.intermediate_size == 11008
    assert c.max_position_embeddings == 2048  # seq_length, the trained context, wins
    assert c.rms_norm_eps == 1e-5


@pytest.mark.parametrize("change, phrase", [
    ({"rotary_pct": 0.5}, "rotary_pct"),
    ({"kv_channels": 64}, "kv_channels"),
    ({"no_bias": False}, "no_bias"),
    ({"apply_residual_connection_post_layernorm": True}, "post_layernorm"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantized"),
    ({"visual": {"image_size": 448}}, "Qwen-VL"),
    ({"intermediate_size": 22015}, "odd"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_variants_are_refused(change, phrase):
    with pytest.raises(ChatftError, match=phrase):
        qwen2_config_from_qwen1({**QWEN_7B_CHAT, **change})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ChatftError) as e:
        qwen2_config_from_qwen1({**QWEN_7B_CHAT, "rotary_pct": 0.25, "no_bias": False})
    assert "rotary_pct" in str(e.value) and "no_bias" in str(e.value)


# ---------------------------------------------------------------- weights

def test_tensor_mapping(tiny_qwen1_dir):
    src = read_qwen1_state(tiny_qwen1_dir)
    out = dict(iter_converted_tensors(tiny_qwen1_dir))
    assert len(out) == 3 + 2 * 12
    h = TINY_QWEN1_CONFIG["hidden_size"]
    for n in range(2):
        fused_w, fused_b = src[f"transformer.h.{n}.attn.c_attn.weight"], \
            src[f"transformer.h.{n}.attn.c_attn.bias"]
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(out[f"model.layers.{n}.self_attn.{proj}.weight"],
                               fused_w[i * h:(i + 1) * h])
            assert torch.equal(out[f"model.layers.{n}.self_attn.{proj}.bias"],
                               fused_b[i * h:(i + 1) * h])
        # w2 goes through SiLU in Qwen-1 (a1 * silu(a2)), so it is the gate
        assert torch.equal(out[f"model.layers.{n}.mlp.gate_proj.weight"],
                           src[f"transformer.h.{n}.mlp.w2.weight"])
        assert torch.equal(out[f"model.layers.{n}.mlp.up_proj.weight"],
                           src[f"transformer.h.{n}.mlp.w1.weight"])
        assert torch.equal(out[f"model.layers.{n}.mlp.down_proj.weight"],
                           src[f"transformer.h.{n}.mlp.c_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], src["transformer.wte.weight"])
    assert torch.equal(out["lm_head.weight"], src["lm_head.weight"])


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_logits_equal_qwen1_reference(layout, tiny_qwen1_dir, tiny_qwen1_bin_dir, qwen_tokenizer):
    folder = tiny_qwen1_dir if layout == "safetensors" else tiny_qwen1_bin_dir
    ids = sample_ids(qwen_tokenizer)
    expected = qwen1_forward(read_qwen1_state(folder), TINY_QWEN1_CONFIG, ids)
    model = load_qwen1_model(folder)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The reference is sensitive to the mapping: swapping gate and up changes the logits.
    state = read_qwen1_state(folder)
    for n in range(2):
        p = f"transformer.h.{n}.mlp."
        state[p + "w1.weight"], state[p + "w2.weight"] = state[p + "w2.weight"], state[p + "w1.weight"]
    assert (qwen1_forward(state, TINY_QWEN1_CONFIG, ids) - expected).abs().max() > 1e-2


def test_bin_and_safetensors_hold_the_same_model(tiny_qwen1_dir, tiny_qwen1_bin_dir):
    """Same seed; the .bin variant is bf16, so it equals the fp32 weights rounded."""
    fp32 = dict(iter_converted_tensors(tiny_qwen1_dir))
    bf16 = dict(iter_converted_tensors(tiny_qwen1_bin_dir))
    assert fp32.keys() == bf16.keys()
    assert all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(fp32[k].to(torch.bfloat16), bf16[k]) for k in fp32)


def test_single_unindexed_bin(tmp_path, write_qwen1, qwen_tokenizer):
    folder = write_qwen1(tmp_path / "q", layout="bin", shards=1)
    assert (folder / "pytorch_model.bin").is_file()
    assert not list(folder.glob("*.index.json"))
    ids = sample_ids(qwen_tokenizer)
    with torch.no_grad():
        got = load_qwen1_model(folder)(ids).logits
    torch.testing.assert_close(got, qwen1_forward(read_qwen1_state(folder), TINY_QWEN1_CONFIG, ids),
                               atol=1e-5, rtol=0)


def test_context_extensions_act_only_past_seq_length(tmp_path, write_qwen1, caplog):
    """logn attention and dynamic NTK are inert within seq_length; beyond it chatft computes
    the plain trained-context network and warns."""
    cfg = {**TINY_QWEN1_CONFIG, "seq_length": 16, "max_position_embeddings": 16}
    folder = write_qwen1(tmp_path / "q", config=cfg, shards=1)
    state = read_qwen1_state(folder)
    with caplog.at_level(logging.WARNING, logger="chatft"):
        model = load_qwen1_model(folder, max_length=24)
    assert "max_length 24 exceeds" in caplog.text and "seq_length 16" in caplog.text
    assert "use_logn_attn and use_dynamic_ntk" in caplog.text
    ids = torch.randint(0, 151851, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (9, 16):  # within the trained context: Qwen-1's inference == plain network
            torch.testing.assert_close(model(ids[:, :t]).logits,
                                       qwen1_forward(state, cfg, ids[:, :t], context_extensions=True),
                                       atol=1e-5, rtol=0)
        got = model(ids).logits
    torch.testing.assert_close(got, qwen1_forward(state, cfg, ids), atol=1e-5, rtol=0)
    extended = qwen1_forward(state, cfg, ids, context_extensions=True)
    assert (got - extended).abs().max() > 1e-2


def test_no_warning_within_context(tiny_qwen1_dir, caplog):
    assert qwen1.context_warning(tiny_qwen1_dir, 8192) is None
    assert "8193 exceeds" in qwen1.context_warning(tiny_qwen1_dir, 8193)
    with caplog.at_level(logging.WARNING, logger="chatft"):
        load_qwen1_model(tiny_qwen1_dir, max_length=8192)
    assert "exceeds" not in caplog.text


def test_remote_code_is_never_imported(tiny_qwen1_dir):
    load_qwen1_model(tiny_qwen1_dir)
    imported = [m for m in sys.modules if any(m.endswith(f.removesuffix(".py")) for f in REMOTE_CODE)]
    assert imported == []


def test_missing_tensor_is_an_error(tmp_path, write_qwen1):
    state = qwen1_random_state(TINY_QWEN1_CONFIG)
    del state["transformer.h.1.mlp.w2.weight"]
    folder = write_qwen1(tmp_path / "q", state=state)
    with pytest.raises(ChatftError, match=r"missing.*model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_qwen1_model(folder)


def test_unknown_tensor_is_an_error(tmp_path, write_qwen1):
    state = qwen1_random_state(TINY_QWEN1_CONFIG)
    state["transformer.h.0.attn.lora_A.weight"] = torch.zeros(8, 64)
    folder = write_qwen1(tmp_path / "q", state=state)
    with pytest.raises(ChatftError, match="lora_A"):
        list(iter_converted_tensors(folder))


def test_saved_buffers_are_skipped(tmp_path, write_qwen1):
    state = qwen1_random_state(TINY_QWEN1_CONFIG)
    state["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    folder = write_qwen1(tmp_path / "q", state=state)
    assert len(dict(iter_converted_tensors(folder))) == 27


def test_shape_mismatch_names_the_tensor(tmp_path, write_qwen1):
    folder = write_qwen1(tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 256  # the weights have 96 MLP outputs, the config says 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatftError, match=r"mlp\.w1\.weight.*\(128, 64\)"):
        list(iter_converted_tensors(folder))


def test_missing_shard_is_reported(tmp_path, write_qwen1):
    folder = write_qwen1(tmp_path / "q")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ChatftError, match="model-00002-of-00003.safetensors"):
        list(iter_converted_tensors(folder))


# ---------------------------------------------------------------- convert

def test_convert_writes_an_exact_hf_folder(tiny_qwen1_dir, tmp_path, qwen_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dst = tmp_path / "qwen2"
    # Small shards so the 27 tensors (39 MB of embeddings each) spread over several files.
    result = convert_qwen1(tiny_qwen1_dir, dst, dtype="fp32", max_shard_bytes=30 * 2**20)
    assert result.folder == dst
    assert len(result.weight_files) >= 3
    assert all((dst / f).is_file() for f in result.weight_files)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.weight_files)
    assert len(index["weight_map"]) == result.n_tensors == 27
    assert index["metadata"]["total_size"] == result.weight_bytes
    assert result.peak_rss_bytes > result.weight_bytes / 4  # a plausible process peak
    assert "tokenizer.json" in result.tokenizer_files
    assert not [f for f in os.listdir(dst) if f.endswith(".py")]  # no remote code copied
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in dst.iterdir()} == {0o666 & ~umask}

    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.model_type == "qwen2" and cfg.intermediate_size == 96
    gen = GenerationConfig.from_pretrained(dst)
    assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
    assert gen.top_p == 0.8 and gen.repetition_penalty == 1.1  # Qwen-7B-Chat's sampling kept

    tok = AutoTokenizer.from_pretrained(dst)
    text = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n你是谁"
    assert tok(text)["input_ids"] == qwen_tokenizer(text)["input_ids"]
    assert tok.chat_template == qwen_tokenizer.chat_template

    ids = sample_ids(qwen_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(
        got, qwen1_forward(read_qwen1_state(tiny_qwen1_dir), TINY_QWEN1_CONFIG, ids),
        atol=1e-5, rtol=0)


def test_convert_bf16_from_bin(tiny_qwen1_bin_dir, tmp_path):
    from safetensors.torch import load_file

    result = convert_qwen1(tiny_qwen1_bin_dir, tmp_path / "out")  # default bf16, one shard
    assert result.weight_files == ["model.safetensors"]
    out = load_file(tmp_path / "out" / "model.safetensors")
    ref = dict(iter_converted_tensors(tiny_qwen1_bin_dir))
    assert out.keys() == ref.keys()
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], ref[k]) for k in ref)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_convert_streams_shard_by_shard(tiny_qwen1_dir, tmp_path, monkeypatch):
    """Output shards are written while input shards are still being read, and none grows
    past the limit plus one tensor: the whole model is never held at once."""
    events: list[str] = []
    read, write = qwen1._read_shard, qwen1._write_shard

    def logged_read(path):
        events.append(f"read {path.name}")
        yield from read(path)

    def logged_write(tensors, path):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        biggest = max(t.numel() * t.element_size() for t in tensors.values())
        events.append(f"write {len(tensors)}")
        assert size <= limit or len(tensors) == 1 or size - biggest <= limit
        write(tensors, path)

    monkeypatch.setattr(qwen1, "_read_shard", logged_read)
    monkeypatch.setattr(qwen1, "_write_shard", logged_write)
    limit = 30 * 2**20
    convert_qwen1(tiny_qwen1_dir, tmp_path / "out", dtype="fp32", max_shard_bytes=limit)
    reads = [i for i, e in enumerate(events) if e.startswith("read")]
    writes = [i for i, e in enumerate(events) if e.startswith("write")]
    assert len(reads) == 3 and len(writes) >= 3
    assert writes[0] < reads[-1]  # the first output shard is on disk before the last input is read


def test_convert_refuses_a_non_empty_destination(tiny_qwen1_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ChatftError, match="already exists"):
        convert_qwen1(tiny_qwen1_dir, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind


def test_convert_cli(tiny_qwen1_dir, tmp_path, capsys):
    from chatft.cli import main

    assert main(["convert", str(tiny_qwen1_dir), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out") in out and "peak RSS" in out and "fp16" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # A second run refuses to overwrite, as a one-paragraph error with exit code 2.
    assert main(["convert", str(tiny_qwen1_dir), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------- chat format

#: Qwen-1's tokenizer pattern and special tokens (tokenization_qwen.py), restated here so the
#: reference does not go through chatft's tokenizer code.
QWEN1_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
             r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def qwen1_tiktoken(qwen_tiktoken):
    """Qwen-1's tokenizer as its remote code builds it: tiktoken on qwen.tiktoken, NFC first."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in Path(qwen_tiktoken).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    enc = tiktoken.Encoding("qwen", pat_str=QWEN1_PAT, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special=set())


def make_context(encode, query: str, history: list[tuple[str, str]], system: str) -> list[int]:
    """Qwen-1's make_context for chat_format "chatml" (no window truncation): every role,
    newline and content is tokenized on its own; <|im_start|>/<|im_end|> are inserted as ids."""
    im_start, im_end, nl = [151644], [151645], encode("\n")

    def turn(role: str, content: str) -> list[int]:
        return im_start + encode(role) + nl + encode(content) + im_end

    ids = turn("system", system)
    for q, r in history:
        ids += nl + turn("user", q) + nl + turn("assistant", r)
    return ids + nl + turn("user", query) + nl + im_start + encode("assistant") + nl


def as_messages(query: str, history: list[tuple[str, str]], system: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for q, r in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return msgs + [{"role": "user", "content": query}]


#: model.chat(tokenizer, "你是谁", history=[], system="现在你要扮演皇帝身边的女人--甄嬛.")
TUTORIAL_IDS = [151644, 8948, 198, 99601, 105182, 102889, 104937, 102144, 106354, 313, 109628,
                123591, 13, 151645, 198, 151644, 872, 198, 105043, 100165, 151645, 198, 151644,
                77091, 198]

HISTORY = [("皇上驾到！", "皇上万福金安。"),
           ("你叫什么名字？\n说说看", "臣妾甄嬛，是大理寺少卿甄远道之女。 ")]
HISTORY_QUERY = "朕今日乏了，陪朕说说话吧 :)"
HISTORY_IDS = [151644, 8948, 198, 99601, 105182, 102889, 104937, 102144, 106354, 313,
               109628, 123591, 13, 151645, 198, 151644, 872, 198, 111469, 99646,
               26939, 6313, 151645, 198, 151644, 77091, 198, 111469, 31207, 99477,
               34230, 50285, 1773, 151645, 198, 151644, 872, 198, 56568, 99882, 99245,
               101419, 94432, 36587, 36587, 50930, 151645, 198, 151644, 77091, 198,
               102394, 114835, 109628, 123591, 3837, 20412, 103683, 101277, 82647,
               106987, 109628, 99427, 44793, 53930, 57750, 1773, 220, 151645, 198,
               151644, 872, 198, 112576, 102242, 100467, 34187, 3837, 100522, 112576,
               36587, 104283, 100003, 25956, 151645, 198, 151644, 77091, 198]


def test_tutorial_prompt_ids(qwen_tokenizer, qwen1_tiktoken):
    from chatft.data.render import chat_format

    ids = chat_format(qwen_tokenizer).prompt_ids(as_messages("你是谁", [], SYSTEM))
    assert ids == make_context(qwen1_tiktoken, "你是谁", [], SYSTEM)
    assert ids == TUTORIAL_IDS


def test_multi_turn_prompt_ids(qwen_tokenizer, qwen1_tiktoken):
    from chatft.data.render import chat_format

    ids = chat_format(qwen_tokenizer).prompt_ids(as_messages(HISTORY_QUERY, HISTORY, SYSTEM))
    assert ids == make_context(qwen1_tiktoken, HISTORY_QUERY, HISTORY, SYSTEM)
    assert ids == HISTORY_IDS


def test_default_system_prompt_is_qwens(qwen_tokenizer, qwen1_tiktoken):
    """model.chat's default system prompt is "You are a helpful assistant."; chatft's
    template adds the same when a conversation has none."""
    from chatft.data.render import chat_format

    ids = chat_format(qwen_tokenizer).prompt_ids([{"role": "user", "content": "你是谁"}])
    assert ids == make_context(qwen1_tiktoken, "你是谁", [], "You are a helpful assistant.")


# ---------------------------------------------------------------- loading paths

def test_loading_routes_a_qwen1_folder(tiny_qwen1_dir, qwen_tokenizer):
    from chatft.model.loading import load_tokenizer, model_config, resolve_model

    source = resolve_model(str(tiny_qwen1_dir))
    assert source.kind == "qwen1"
    cfg = model_config(source)
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 2
    tok = load_tokenizer(source)
    text = "<|im_start|>user\n你是谁<|im_end|>"
    assert tok(text)["input_ids"] == qwen_tokenizer(text)["input_ids"]


def test_data_inspect_with_a_qwen1_folder(tiny_qwen1_dir, tmp_path):
    env = {**os.environ, "CHATFT_DATA_CACHE": str(tmp_path / "cache")}
    data = tmp_path / "three.json"  # record 2 is huanhuan's record 2
    data.write_text(json.dumps([{"instruction": "hi", "input": "", "output": "yes"},
                                {"instruction": "你是谁", "input": "", "output": "我是甄嬛。"},
                                {"instruction": "皇上驾到！", "input": "", "output": "皇上万福金安。"}],
                               ensure_ascii=False), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "chatft", "data", "inspect", str(data),
         "--model", str(tiny_qwen1_dir), "--index", "2", "--colour", "never"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # Record 2 is {"instruction": "皇上驾到！", "output": "皇上万福金安。"}: the answer and
    # its <|im_end|> are the trained tokens.
    assert "--- record 2: 31 tokens, 7 trained" in proc.stdout
    assert "<|im_start|>user\n皇上驾到！<|im_end|>\n<|im_start|>assistant\n" \
        "[皇上][万][福][金][安][。][<|im_end|>]" in proc.stdout
    assert "3 read, 3 kept" in proc.stdout
