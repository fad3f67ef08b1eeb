"""Learning-rate schedules: linear warmup from 0, then cosine / linear decay to 0, or constant."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, peak: float, total_steps: int, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr used by the first update).

    >>> [round(lr_at(s, peak=1.0, total_steps=4, warmup=2, kind="linear"), 3) for s in range(4)]
    [0.5, 1.0, 0.5, 0.0]
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return peak * (1.0 - progress)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")
