"""The divergence guard: steps whose loss or gradient norm is not finite change nothing, and
too many in a row stop the run with what to do next.

A bad step's update is skipped by the engine (:meth:`chatft.train.engine.Engine.step` with
``skip``, or its own check of the gradient norm), like fp16's loss scaler skips an overflow:
weights and optimizer state stay those of the last good step. Under fp16 a non-finite gradient
norm alone is the loss scaler's business (it skips and lowers the scale), so only a non-finite
loss counts there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from chatft.errors import ChatftError


class DivergenceError(ChatftError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradient."""

    every_rank = True


def bad_step_reason(loss: float, grad_norm: float, precision: str) -> str | None:
    """Why this step is bad ("loss nan", "gradient norm inf"), or None when it is fine."""
    if not math.isfinite(loss):
        return f"loss {loss}"
    if precision != "fp16" and not math.isfinite(grad_norm):
        return f"gradient norm {grad_norm}"
    return None


@dataclass
class BadStepGuard:
    """Counts bad steps (all of them, and the current run of consecutive ones)."""

    max_bad_steps: int  # consecutive bad steps that stop training (0: never)
    consecutive: int = 0
    total: int = 0
    first_of_run: int = 0  # step that began the current run of bad steps

    def observe(self, step: int, reason: str | None) -> None:
        if reason is None:
            self.consecutive = 0
            return
        if self.consecutive == 0:
            self.first_of_run = step
        self.consecutive += 1
        self.total += 1

    @property
    def exhausted(self) -> bool:
        return 0 < self.max_bad_steps <= self.consecutive

    def error(self, step: int, reason: str, lr: float, last_good: Path | None) -> DivergenceError:
        steps = (f"step {step}" if self.first_of_run == step
                 else f"steps {self.first_of_run}-{step}")
        where = (f"The last good checkpoint is {last_good}: resume from it (--resume {last_good}) "
                 f"with a lower --learning_rate and --resume_force (the learning rate is part of "
                 f"what a resume checks)" if last_good is not None else
                 "No checkpoint was saved before it: start again with a lower --learning_rate")
        return DivergenceError(
            f"training diverged: {self.consecutive} steps in a row ({steps}) had a non-finite "
            f"loss or gradient norm (step {step}: {reason}, learning rate {lr:.3g}); their "
            f"updates were skipped, and max_bad_steps is {self.max_bad_steps}. {where}")
