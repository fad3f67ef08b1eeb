"""The training forward pass: decoder -> hidden states -> loss on trained positions only.

Computing full logits is the largest waste in chat fine-tuning: ``[tokens x vocab]`` in fp32
is 5 GB for 8k tokens of a 152k-vocab model, and two thirds of the positions carry no loss.
:class:`CausalLMLoss` therefore

1. runs the decoder (``model.base_model``) to hidden states ``[B, T, H]``,
2. keeps only the ``N`` positions whose target is not ignored: ``[N, H]``,
3. computes ``sum(cross_entropy)`` over those with a fused kernel that never materializes
   ``[N, V]`` logits: Liger's fused linear cross-entropy on CUDA, or chunks of
   ``chunk_size`` rows whose logits are recomputed in the backward pass (PyTorch, any device).

It returns the *sum* of token losses; normalization (per trained token of the whole optimizer
step) is the training loop's job, so packing and accumulation do not change what is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chatft.data.labels import IGNORE_INDEX

#: Rows of the chunked cross-entropy whose logits exist at once (``[rows, V]`` in fp32); the
#: memory planner counts them.
LOSS_CHUNK_ROWS = 2048


def _chunk_ce_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # [n, V], freed after the forward of this chunk
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_linear_cross_entropy(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                                 chunk_size: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """``sum_i CE(lm_head(hidden[i]), targets[i])`` with at most ``chunk_size x V`` logits alive.

    ``hidden``: ``[N, H]``; ``targets``: ``[N]`` (no ignored entries). Each chunk is
    checkpointed, so its logits are recomputed in backward instead of being stored.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, lm_head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(lm_head, h, t)
    return total


class CausalLMLoss(nn.Module):
    """Wraps a ``*ForCausalLM`` model; ``forward`` returns ``(loss_sum, n_targets)``.

    This wrapper is what the training engine (DeepSpeed or plain PyTorch) sees as "the model";
    ``self.model`` stays a plain transformers model, which export saves unchanged.
    """

    def __init__(self, model: nn.Module, fused_kernel: str = "chunked",
                 chunk_size: int = LOSS_CHUNK_ROWS):
        super().__init__()
        self.model = model
        self.fused_kernel = fused_kernel
        self.chunk_size = chunk_size
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise NotImplementedError(f"models with {attr} are not supported by chatft's loss")
        if fused_kernel == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self._liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {}
        if attention_mask is None and self.model.config._attn_implementation == "varlen":
            from chatft.model.attention import cu_seqlens_from_positions

            cu, longest = cu_seqlens_from_positions(position_ids)
            extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                         max_length_k=longest)
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                    attention_mask=attention_mask, use_cache=False, **extra)
        hidden = out.last_hidden_state  # [B, T, H]
        keep = targets != IGNORE_INDEX  # [B, T]
        n = keep.sum()
        h, t = hidden[keep], targets[keep]  # [N, H], [N]
        if h.shape[0] == 0:
            # No target in this micro-batch (e.g. an empty bin in the last step): a zero loss
            # that still touches every parameter, so collective gradient hooks fire everywhere.
            h, t = hidden[:, :1].reshape(-1, hidden.shape[-1]), input_ids[:, :1].reshape(-1)
            return self._ce_sum(h, t) * 0.0, n
        return self._ce_sum(h, t), n

    def _ce_sum(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lm_head = self.model.get_output_embeddings()
        if self.fused_kernel == "liger":
            return self._liger(lm_head.weight, h, t)
        return chunked_linear_cross_entropy(lm_head, h, t, self.chunk_size)
