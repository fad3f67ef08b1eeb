"""Optimizers: AdamW parameter groups, and AdamW over fp32 master weights for bf16 models.

:class:`MasterWeightAdamW` is the single-process bf16 optimizer. The model holds bf16 weights
and gradients (2 + 2 bytes per parameter); the optimizer holds fp32 master weights and fp32
Adam moments (4 + 8 bytes): 16 bytes per parameter in all, the same as DeepSpeed's mixed
precision, without DeepSpeed's extra fp32 gradient copy. It steps the parameters in chunks
(~``chunk_numel`` elements): a chunk's bf16 gradients are upcast, clipped, applied to its
masters with torch's fused AdamW, and the masters are rounded back into the bf16 weights,
so only one chunk of fp32 gradients exists at any time. That is what lets a 7B model train
with its optimizer on one 141 GB GPU. The optimizer over the masters is torch's AdamW unless
another one is given (``inner``: e.g. torchao's 8-bit AdamW, see :mod:`chatft.train.optim_choice`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Elements :class:`MasterWeightAdamW` upcasts to fp32 at once (at least; a chunk closes once it
#: reaches this size). The memory planner counts this chunk at the optimizer step.
MASTER_CHUNK_NUMEL = 1 << 28


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and norm weights (1-D) get none, as usual for AdamW."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
          device: torch.device) -> torch.optim.AdamW:
    """torch AdamW, fused on CUDA (one kernel for all tensors), foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=not fused)


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision parameters, stepped chunk by chunk."""

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 device: torch.device, chunk_numel: int = MASTER_CHUNK_NUMEL,
                 inner: Callable[[list[dict]], Any] | None = None):
        """``inner(groups)`` builds the optimizer over a chunk's masters (default: torch AdamW
        with ``lr``, ``betas``, ``eps``)."""
        if inner is None:
            def inner(masters_groups: list[dict]) -> torch.optim.AdamW:
                return adamw(masters_groups, lr=lr, betas=betas, eps=eps, device=device)
        # chunks: list of (model params, their fp32 masters, the optimizer over the masters)
        self.chunks: list[tuple[list[nn.Parameter], list[torch.Tensor], Any]] = []
        for group in groups:
            current: list[nn.Parameter] = []
            size = 0
            for p in group["params"] + [None]:
                if p is not None:
                    current.append(p)
                    size += p.numel()
                if current and (p is None or size >= chunk_numel):
                    masters = [q.detach().float().clone() for q in current]
                    opt = inner([{"params": masters, "weight_decay": group["weight_decay"]}])
                    self.chunks.append((current, masters, opt))
                    current, size = [], 0

    @property
    def param_groups(self) -> list[dict]:
        # Read each time: loading a state dict replaces the chunk optimizers' group dicts, and
        # the learning rate must be set on the new ones.
        return [g for _, _, opt in self.chunks for g in opt.param_groups]

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """One AdamW update; ``grad_scale`` multiplies every gradient (clipping)."""
        for params, masters, opt in self.chunks:
            for p, m in zip(params, masters):
                if p.grad is not None:
                    m.grad = p.grad.float()
                    if grad_scale != 1.0:
                        m.grad.mul_(grad_scale)
            opt.step()
            for p, m in zip(params, masters):
                m.grad = None
                p.copy_(m)  # round the updated master into the bf16 weight

    def zero_grad(self, set_to_none: bool = True) -> None:
        for params, _, _ in self.chunks:
            for p in params:
                p.grad = None

    def state_dict(self) -> dict:
        return {"masters": [[m for m in masters] for _, masters, _ in self.chunks],
                "optimizers": [opt.state_dict() for _, _, opt in self.chunks]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for (params, masters, opt), saved, opt_state in zip(self.chunks, state["masters"],
                                                                state["optimizers"]):
                for p, m, s in zip(params, masters, saved):
                    m.copy_(s)
                    p.copy_(m)
                opt.load_state_dict(opt_state)

    def master_state(self) -> dict[int, torch.Tensor]:
        """fp32 master weight of each model parameter, keyed by ``id(param)``."""
        return {id(p): m for params, masters, _ in self.chunks for p, m in zip(params, masters)}
