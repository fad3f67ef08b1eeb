"""How long a run is, and its learning rate: linear warmup from 0, then cosine / linear decay to
0, or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatft.config import TrainArgs
from chatft.train.batching import steps_per_epoch


@dataclass(frozen=True)
class RunLength:
    """The optimizer steps of a run, from the training arguments and the data size."""

    global_batch: int  # samples per optimizer step, over all processes
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def run_length(args: TrainArgs, n_samples: int, world_size: int) -> RunLength:
    """``max_steps`` when set, else ``num_train_epochs`` (fractions allowed) of steps of
    ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` samples.

    >>> run_length(TrainArgs(num_train_epochs=1.5, per_device_train_batch_size=4), 10, 2)
    RunLength(global_batch=8, steps_per_epoch=2, total_steps=3, warmup_steps=1)
    """
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    per_epoch = steps_per_epoch(n_samples, global_batch)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return RunLength(global_batch, per_epoch, total,
                     warmup_steps_for(total, args.warmup_steps, args.warmup_ratio))


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, peak: float, total_steps: int, warmup: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr used by the first update).

    >>> [round(lr_at(s, peak=1.0, total_steps=4, warmup=2, kind="linear"), 3) for s in range(4)]
    [0.5, 1.0, 1.0, 0.0]
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


def save_due(done: int, length: RunLength, args: TrainArgs) -> bool:
    """Whether a checkpoint is saved after optimizer step ``done`` (1-based): by
    ``save_strategy`` (epoch ends, or every ``save_steps``), always at the last step unless
    ``save_strategy`` is ``no``.

    >>> args = TrainArgs(save_strategy="epoch")
    >>> [d for d in range(1, 8) if save_due(d, RunLength(8, 3, 7, 0), args)]
    [3, 6, 7]
    """
    if args.save_strategy == "no":
        return False
    if done == length.total_steps or (args.save_steps and done % args.save_steps == 0):
        return True
    return args.save_strategy == "epoch" and done % length.steps_per_epoch == 0
