"""SDPA with a mask at a length % 128 == 64: the training process keeps it off cuDNN's kernel,
whose backward returns NaN there (model/attention.py, avoid_cudnn_sdpa)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatft.model.attention import avoid_cudnn_sdpa

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _masked_grad_q(length: int) -> torch.Tensor:
    """grad_q of one masked SDPA call whose rows all have a log-sum-exp near -120 (what
    Qwen2.5's attention-sink heads produce). q/k/v ``[1, 2, T, 64]`` bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 64, generator=g) * s for s in (0.1, 0.1, 1.0))
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(64)
    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.ones_like(out))
    return q.grad


@pytest.mark.parametrize("length", [192, 256, 320])
def test_masked_sdpa_backward_is_finite_in_a_training_process(length):
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        avoid_cudnn_sdpa()
        assert torch.isfinite(_masked_grad_q(length)).all()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
