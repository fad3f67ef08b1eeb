"""A Qwen-1 (Qwen-7B-Chat) folder of random values, written shard by shard.

Qwen-7B-Chat's ``config.json`` key for key, bf16 safetensors shards under Qwen-1's tensor names
with an index, the real ``qwen.tiktoken``; values from ``torch.randn`` on the GPU when there is
one (each tensor copied to the host before its shard is saved), else from a cheap generator
(:class:`PoolRandom`), so the whole model is never in memory. Used by ``bench/lib/qwen1.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bench.lib.measure import GIB

if TYPE_CHECKING:
    import torch


#: Qwen-7B-Chat's ``config.json`` (the 8192-context release), key for key. One change: the
#: published file leaves ``bf16``/``fp16``/``fp32`` all false (Qwen-1's code then picks by
#: hardware); here ``bf16`` is true because the shards are stored in bf16.
QWEN_7B_CHAT: dict[str, Any] = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0,
    "bf16": True,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 4096,
    "intermediate_size": 22016,  # Qwen-1 stores twice the MLP width: w1/w2 have 11008 outputs
    "initializer_range": 0.02,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 8192,
    "softmax_in_fp32": False,
    "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_cache_kernel": False,
    "use_cache_quantization": False,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "vocab_size": 151936,
}
#: The same folder made small for CPU smoke runs; Qwen's padded vocabulary is kept, so every
#: id of the real tokenizer is in range.
TINY: dict[str, Any] = {**QWEN_7B_CHAT, "hidden_size": 64, "intermediate_size": 192,
                        "kv_channels": 16, "num_attention_heads": 4, "num_hidden_layers": 2}
SHAPES: dict[str, dict[str, Any]] = {"7b": QWEN_7B_CHAT, "tiny": TINY}

#: Qwen-7B-Chat's ``generation_config.json`` and ``tokenizer_config.json``.
GENERATION_CONFIG = {
    "chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
    "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0,
    "top_p": 0.8, "repetition_penalty": 1.1, "transformers_version": "4.31.0",
}
TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}
#: Bytes per stored value (bf16).
VALUE_BYTES = 2


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a Qwen-1 checkpoint: its name, shape and how it is filled
    (``normal``: N(0, initializer_range) like a fresh model's linears and embeddings;
    ``ones``: an RMSNorm weight)."""

    name: str
    shape: tuple[int, ...]
    init: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def qwen1_tensors(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of a Qwen-1 checkpoint with config ``cfg``, in the order Qwen-1 saves them.

    ``H`` = hidden size, ``F`` = ``intermediate_size // 2`` (each of w1/w2's outputs), ``V`` =
    vocabulary: ``wte`` [V, H]; per layer ``ln_1`` [H], fused ``c_attn`` [3H, H] + bias [3H],
    ``attn.c_proj`` [H, H], ``ln_2`` [H], ``w1``/``w2`` [F, H], ``mlp.c_proj`` [H, F];
    ``ln_f`` [H]; ``lm_head`` [V, H] (not tied).
    """
    h, v, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    out = [TensorSpec("transformer.wte.weight", (v, h), "normal")]
    for n in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{n}."
        out += [TensorSpec(p + "ln_1.weight", (h,), "ones"),
                TensorSpec(p + "attn.c_attn.weight", (3 * h, h), "normal"),
                TensorSpec(p + "attn.c_attn.bias", (3 * h,), "normal"),
                TensorSpec(p + "attn.c_proj.weight", (h, h), "normal"),
                TensorSpec(p + "ln_2.weight", (h,), "ones"),
                TensorSpec(p + "mlp.w1.weight", (ff, h), "normal"),
                TensorSpec(p + "mlp.w2.weight", (ff, h), "normal"),
                TensorSpec(p + "mlp.c_proj.weight", (h, ff), "normal")]
    out += [TensorSpec("transformer.ln_f.weight", (h,), "ones"),
            TensorSpec("lm_head.weight", (v, h), "normal")]
    return out


def n_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Qwen-1 config (Qwen-7B-Chat: 7,721,324,544)."""
    return sum(t.numel for t in qwen1_tensors(cfg))


def plan_shards(tensors: Sequence[TensorSpec], n_shards: int,
                value_bytes: int = VALUE_BYTES) -> list[list[TensorSpec]]:
    """Split ``tensors`` (kept in order) into at most ``n_shards`` consecutive shards of about
    equal bytes: a tensor goes to the shard its middle byte falls in. A shard that would get
    no tensor (one tensor larger than a shard's share, as the embeddings of a tiny model) is
    left out, so fewer shards may come back."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, not {n_shards}")
    total = sum(t.numel for t in tensors) * value_bytes
    shards: list[list[TensorSpec]] = [[] for _ in range(n_shards)]
    before = 0
    for t in tensors:
        size = t.numel * value_bytes
        index = min(n_shards - 1, int((before + size / 2) * n_shards // total)) if total else 0
        shards[index].append(t)
        before += size
    return [s for s in shards if s]


def shard_file_name(i: int, n: int) -> str:
    """``model-0000i-of-0000n.safetensors`` (1-based), or ``model.safetensors`` alone."""
    return f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"


class PoolRandom:
    """Cheap random values for the CPU: one pool of ``pool_values`` N(0, std) bf16 values is
    drawn once, and each tensor is copied out of it, starting at an offset that depends on
    the tensor's index and wrapping around. Drawing 7.7 billion normal values on a CPU takes
    minutes; copying them is memory speed. Tensors repeat pieces of the pool, which changes
    nothing for speed or memory."""

    def __init__(self, std: float, seed: int, pool_values: int = 1 << 24):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(pool_values, generator=g) * std).to(torch.bfloat16)  # [P]

    def normal(self, shape: tuple[int, ...], index: int) -> "torch.Tensor":
        import torch

        numel, pool = math.prod(shape), self.pool
        out = torch.empty(numel, dtype=torch.bfloat16)  # [numel], filled by wrapping copies
        offset = (index * 2654435761) % pool.numel()  # Knuth's multiplicative hash
        done = 0
        while done < numel:
            k = min(numel - done, pool.numel() - offset)
            out[done:done + k].copy_(pool[offset:offset + k])
            done, offset = done + k, 0
        return out.view(shape)


class CudaRandom:
    """``torch.randn`` on the GPU (billions of values per second), copied to the host."""

    def __init__(self, std: float, seed: int, device: str = "cuda"):
        import torch

        self.std, self.device = std, torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, shape: tuple[int, ...], index: int) -> "torch.Tensor":
        import torch

        t = torch.randn(shape, generator=self.generator, device=self.device,
                        dtype=torch.bfloat16).mul_(self.std)
        return t.cpu()


@dataclass
class WriteResult:
    """What :func:`write_random_qwen1` wrote and how long it took."""

    folder: str
    shards: list[str]
    n_tensors: int
    n_params: int
    weight_bytes: int
    random_device: str
    generate_s: float  # drawing the values (on the GPU: including the copy to the host)
    save_s: float  # writing the shards
    total_s: float
    peak_rss_gib: float


def write_random_qwen1(folder: Path, cfg: dict[str, Any], tiktoken_file: Path, *,
                       n_shards: int = 8, device: str = "auto", seed: int = 0) -> WriteResult:
    """Write a random Qwen-1 folder of shape ``cfg`` (bf16 safetensors shards + index,
    ``config.json``, generation and tokenizer configs, ``qwen.tiktoken``), one shard at a time:
    host memory holds at most one shard. The folder appears only when complete."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from chatft.model.qwen1 import peak_rss_bytes

    t_start = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    std = float(cfg.get("initializer_range", 0.02))
    source = CudaRandom(std, seed, device) if device.startswith("cuda") else PoolRandom(std, seed)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        plan = plan_shards(qwen1_tensors(cfg), n_shards)
        weight_map: dict[str, str] = {}
        names, index, total = [], 0, 0
        generate_s = save_s = 0.0
        for i, specs in enumerate(plan, start=1):
            t0 = time.perf_counter()
            shard: dict[str, torch.Tensor] = {}
            for spec in specs:
                shard[spec.name] = (torch.ones(spec.shape, dtype=torch.bfloat16)
                                    if spec.init == "ones" else source.normal(spec.shape, index))
                index += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            name = shard_file_name(i, len(plan))
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            save_s += time.perf_counter() - t1
            generate_s += t1 - t0
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update({n: name for n in shard})
            names.append(name)
            del shard  # the next shard reuses this memory
        if len(plan) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        shutil.copyfile(tiktoken_file, tmp / "qwen.tiktoken")
        # mkdtemp makes the folder private and safetensors writes 0600: give the modes a
        # plain mkdir/open would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return WriteResult(folder=str(folder), shards=names, n_tensors=len(weight_map),
                       n_params=n_params(cfg), weight_bytes=total, random_device=device,
                       generate_s=round(generate_s, 2), save_s=round(save_s, 2),
                       total_s=round(time.perf_counter() - t_start, 2),
                       peak_rss_gib=round(peak_rss_bytes() / GIB, 3))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
