"""Tiny Qwen-1 folders laid out as users download Qwen-7B-Chat, with random weights.

``tiny_qwen1_dir`` is the reusable one (safetensors shards + index, fp32); ``write_qwen1``
builds variants (``.bin`` shards, other config values) for tests that need them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from bench.lib.qwen1_folder import GENERATION_CONFIG, TINY, TOKENIZER_CONFIG

#: Qwen-7B-Chat's config.json (the 8192-context release) with the sizes made tiny, as the
#: Qwen-1 benchmark builds it; these folders hold fp32 weights, so its bf16 flag is off.
TINY_QWEN1_CONFIG = {**TINY, "bf16": False}

#: The folder's Python files: importing any of them fails the test that did it.
REMOTE_CODE = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py",
               "qwen_generation_utils.py")


def qwen1_random_state(config: dict, seed: int = 0):
    """Random weights under Qwen-1's tensor names, in the order Qwen-1 saves them.

    Scales keep activations near unit size so attention, rotary, norms and the gate all
    change the logits measurably (0.02-std weights would make every layer near identity).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    ff = config["intermediate_size"] // 2

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=g) / in_dim ** 0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=g)

    state = {"transformer.wte.weight": torch.randn(v, h, generator=g)}
    for n in range(config["num_hidden_layers"]):
        p = f"transformer.h.{n}."
        state[p + "ln_1.weight"] = norm()
        state[p + "attn.c_attn.weight"] = linear(3 * h, h)
        state[p + "attn.c_attn.bias"] = 0.1 * torch.randn(3 * h, generator=g)
        state[p + "attn.c_proj.weight"] = linear(h, h)
        state[p + "ln_2.weight"] = norm()
        state[p + "mlp.w1.weight"] = linear(ff, h)
        state[p + "mlp.w2.weight"] = linear(ff, h)
        state[p + "mlp.c_proj.weight"] = linear(h, ff)
    state["transformer.ln_f.weight"] = norm()
    state["lm_head.weight"] = linear(v, h)
    return state


def write_qwen1_folder(folder: Path, tiktoken_file: Path, *, layout: str = "safetensors",
                       shards: int = 3, config: dict | None = None, seed: int = 0,
                       dtype: str = "fp32", state: dict | None = None) -> Path:
    """Write a Qwen-1 folder: config, generation/tokenizer configs, ``qwen.tiktoken``,
    remote-code files that fail when imported, and the weights as ``layout``
    ("safetensors" or "bin") in ``shards`` files (with an index json when more than one)."""
    import torch

    cfg = dict(TINY_QWEN1_CONFIG if config is None else config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    shutil.copyfile(tiktoken_file, folder / "qwen.tiktoken")
    for name in REMOTE_CODE:
        (folder / name).write_text(
            f'raise RuntimeError("{name} was imported: chatft must not run a model '
            'folder\'s Python code")\n')
    if state is None:
        state = qwen1_random_state(cfg, seed)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: t.to(torch_dtype) for k, t in state.items()}
    names = list(state)
    per = -(-len(names) // shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    ext = "safetensors" if layout == "safetensors" else "bin"
    stem = "model" if layout == "safetensors" else "pytorch_model"
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        file = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}" if len(groups) > 1 else f"{stem}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if layout == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(folder / file), metadata={"format": "pt"})
        else:
            torch.save(part, folder / file)
        weight_map.update({k: file for k in group})
        total += sum(t.numel() * t.element_size() for t in part.values())
    if len(groups) > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


@pytest.fixture(scope="session")
def write_qwen1(qwen_tiktoken) -> Callable[..., Path]:
    """``write_qwen1(folder, **options)``: see :func:`write_qwen1_folder`."""
    def write(folder: Path, **options) -> Path:
        return write_qwen1_folder(folder, qwen_tiktoken, **options)
    return write


@pytest.fixture(scope="session")
def tiny_qwen1_dir(tmp_path_factory, write_qwen1) -> Path:
    """A tiny Qwen-7B-Chat-shaped folder: 3 safetensors shards + index, fp32, seed 0."""
    return write_qwen1(tmp_path_factory.mktemp("tiny-qwen1") / "Qwen-7B-Chat")


@pytest.fixture(scope="session")
def tiny_qwen1_bin_dir(tmp_path_factory, write_qwen1) -> Path:
    """The same weights as ``tiny_qwen1_dir`` (seed 0) stored as 2 bf16 ``.bin`` shards."""
    return write_qwen1(tmp_path_factory.mktemp("tiny-qwen1-bin") / "Qwen-7B-Chat",
                       layout="bin", shards=2, dtype="bf16")
