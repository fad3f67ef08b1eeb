"""``attn_implementation="varlen"``: packed attention from cumulative sequence lengths.

Packed rows hold several samples; attention must stay inside each one. SDPA and flex attention
get that from a block-diagonal mask derived from ``position_ids``. Varlen attention skips the
mask altogether: it takes the packed tokens ``[T, heads, head_dim]`` and the sample boundaries
``cu_seqlens`` (``[0, len0, len0+len1, ..., T]``) and runs causal FlashAttention on each sample
(``torch.nn.attention.varlen.varlen_attn``, CUDA). On other devices the same function runs
SDPA sample by sample, so the path is testable anywhere.

The boundaries come from ``position_ids`` (a sample starts where the position is 0) and reach
the attention function as transformers' ``cu_seq_lens_q``/``max_length_q`` keyword arguments.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "varlen"


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``position_ids`` ``[1, T]`` (restarting at 0 per sample) -> ``(cu_seqlens [N+1] int32,
    longest sample)``.

    >>> cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    (tensor([0, 3, 5, 6], dtype=torch.int32), 3)
    """
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


@functools.cache
def _varlen_kernel():
    """torch's varlen FlashAttention and how this torch version asks for causal masking."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, {"causal": causal, "gqa": "enable_gqa" in params}


def varlen_takes_gqa() -> bool:
    """Whether this torch's varlen kernel attends grouped k/v heads itself; without it k/v are
    repeated per query head below, and autograd saves them so (the memory planner counts it)."""
    return bool(_varlen_kernel()[1].get("gqa"))


def _per_sample_sdpa(q, k, v, cu, scale):
    """Reference path: SDPA on each sample. q/k/v: ``[T, heads, D]`` (k/v already expanded)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [heads, len, D]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function. query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``;
    returns ``([1, T, Hq, D], None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        # Not a packed training row (evaluation probes, generation): ordinary SDPA, causal
        # within the row, or with the padding mask transformers built.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, is_causal=attention_mask is None)
    max_len = int(kwargs["max_length_q"])
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
    groups = q.shape[1] // k.shape[1]
    kernel, how = _varlen_kernel()
    if kernel is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if groups > 1 and not how["gqa"]:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        extra = {"enable_gqa": True} if groups > 1 and how["gqa"] else {}
        out = kernel(q, k, v, cu, cu, max_len, max_len, scale=scaling, **how["causal"], **extra)
    else:  # CPU, fp32 (FlashAttention has no fp32 kernel) or a torch without the kernel
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        out = _per_sample_sdpa(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def avoid_cudnn_sdpa() -> None:
    """Keep SDPA off cuDNN's kernels in this (training) process; flash, memory-efficient and
    math kernels stay. Why: cuDNN's SDPA backward with an explicit mask returns NaN ``grad_q``
    when the sequence length % 128 == 64 and a query row's log-sum-exp is below -88.7
    (pytorch/pytorch#196678: torch >= 2.11 on H100/H200, where cuDNN is SDPA's first choice).
    Qwen2.5's attention-sink heads give such rows in every batch; LLaMA-Factory's SDPA run lost
    its weights to it at its first batch padded to 192 tokens (bench/sdpa_mask_nan.py).
    chatft's SDPA rows pass a block-diagonal mask, so they are exposed; varlen passes none."""
    torch.backends.cuda.enable_cudnn_sdp(False)


@functools.cache
def register() -> str:
    """Make ``attn_implementation="varlen"`` known to transformers (no mask is built for it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    # Packed rows carry no mask (cu_seqlens say where samples end); anything else gets the
    # SDPA mask, which the fallback above consumes.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
