"""Kernel choices of model building (pure decisions; no GPU needed to check them)."""

from __future__ import annotations

import importlib.util

import torch

from chatft.model.build import resolve_attention

HAS_VARLEN = importlib.util.find_spec("torch.nn.attention.varlen") is not None


def test_auto_attention_is_varlen_only_on_cuda_in_half_precision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    half = "varlen" if HAS_VARLEN else "sdpa"
    assert resolve_attention("auto", cuda, torch.bfloat16) == half
    assert resolve_attention("auto", cuda, torch.float16) == half
    # FlashAttention has no fp32 kernel: an fp32 run on a GPU gets SDPA
    assert resolve_attention("auto", cuda, torch.float32) == "sdpa"
    assert resolve_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attention("flex_attention", cuda, torch.float32) == "flex_attention"
