"""Evaluation during training: when a step evaluates or saves, which evaluated checkpoint is the
best, when to stop early, and what the export is. Pure bookkeeping; the loop measures.

Semantics follow Hugging Face's Trainer: ``eval_loss`` is better when lower; the best is the
evaluated *checkpoint* with the lowest value (the first one on a tie), so that the export can
reload it; early stopping counts evaluations in a row that do not beat the best so far by more
than ``early_stopping_threshold`` and stops when the count reaches ``early_stopping_patience``
(EarlyStoppingCallback). The evaluation before training (step 0) is the baseline: reported,
never the best (there is no checkpoint of it) and never counted for patience.

The record travels in every checkpoint's ``trainer_state.json`` (:meth:`History.to_dict`), so
a resumed run continues with the best-so-far and the patience count it had.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def due(strategy: str, every: int, done: int, steps_per_epoch: int) -> bool:
    """Whether ``strategy`` (no/steps/epoch) acts after optimizer step ``done`` (1-based).

    >>> [d for d in range(1, 9) if due("epoch", 0, d, 3)], [d for d in range(1, 9) if due("steps", 2, d, 3)]
    ([3, 6], [2, 4, 6, 8])
    """
    if strategy == "steps":
        return every > 0 and done % every == 0
    if strategy == "epoch":
        return done % steps_per_epoch == 0
    return False


@dataclass(frozen=True)
class Evaluation:
    step: int  # optimizer steps done when it was measured (0: before training)
    epoch: float  # epochs done then
    eval_loss: float  # held-out mean NLL per trained token
    checkpoint: bool  # a checkpoint of this very step was saved: the export can reload it


@dataclass
class History:
    """Every evaluation of a run, the best checkpoint among them and the patience count."""

    patience: int = 0  # early_stopping_patience (0: never stop early)
    threshold: float = 0.0  # early_stopping_threshold
    evaluations: list[Evaluation] = field(default_factory=list)
    bad_evaluations: int = 0  # in a row, without beating the best by more than threshold

    def add(self, step: int, epoch: float, eval_loss: float, checkpoint: bool) -> None:
        """Record an evaluation (in step order); updates the patience count."""
        if step > 0:
            previous = [e.eval_loss for e in self.trained if math.isfinite(e.eval_loss)]
            if math.isfinite(eval_loss) and (not previous or eval_loss < min(previous) - self.threshold):
                self.bad_evaluations = 0
            else:
                self.bad_evaluations += 1
        self.evaluations.append(Evaluation(step, epoch, eval_loss, checkpoint))

    @property
    def trained(self) -> list[Evaluation]:
        """The evaluations after training started (step > 0)."""
        return [e for e in self.evaluations if e.step > 0]

    @property
    def baseline(self) -> Evaluation | None:
        return next((e for e in self.evaluations if e.step == 0), None)

    @property
    def best(self) -> Evaluation | None:
        """The checkpointed evaluation with the lowest eval_loss (the earliest of equals; a
        non-finite loss is never the best)."""
        candidates = [e for e in self.trained if e.checkpoint and math.isfinite(e.eval_loss)]
        return min(candidates, key=lambda e: e.eval_loss) if candidates else None

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def at(self, step: int) -> Evaluation | None:
        return next((e for e in reversed(self.evaluations) if e.step == step), None)

    def mark_checkpoint(self, step: int) -> None:
        """A checkpoint of ``step`` was saved after its evaluation (e.g. the last step)."""
        self.evaluations = [Evaluation(e.step, e.epoch, e.eval_loss, True) if e.step == step
                            else e for e in self.evaluations]

    def export_choice(self, last_step: int, last_epoch: float, load_best: bool) -> tuple[int, str]:
        """``(step whose weights to export, why)``; ``last_step`` is where training ended."""
        best, n = self.best, len(self.trained)
        plural = "s" if n != 1 else ""
        if load_best and best is not None:
            step = best.step
            why = (f"step {best.step} (epoch {_epoch(best.epoch)}): lowest eval_loss "
                   f"{best.eval_loss:.4f} of {n} evaluation{plural}")
        else:
            step = last_step
            why = f"the last step {last_step} (epoch {_epoch(last_epoch)})"
            last = self.at(last_step)
            if last is not None:
                why += f": eval_loss {last.eval_loss:.4f}"
            if not load_best and best is not None and best.step != last_step:
                why += (f"; the lowest was {best.eval_loss:.4f} at step {best.step} "
                        "(load_best_model_at_end is off)")
            elif load_best:
                why += "; no evaluated checkpoint to choose from"
        base = self.baseline
        chosen = self.at(step)
        if base is not None and chosen is not None and base.eval_loss <= chosen.eval_loss:
            why += f"; note: the model before training scored {base.eval_loss:.4f}, not worse"
        return step, why

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"evaluations": [asdict(e) for e in self.evaluations],
                "bad_evaluations": self.bad_evaluations,
                # Hugging Face's trainer_state names, for readers that know those:
                "best_metric": best.eval_loss if best else None,
                "best_global_step": best.step if best else None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, patience: int, threshold: float) -> "History":
        """The record a checkpoint saved (None: an older checkpoint without one); the
        early-stopping settings are the current run's."""
        raw = raw or {}
        return cls(patience, threshold, [Evaluation(**e) for e in raw.get("evaluations", [])],
                   int(raw.get("bad_evaluations", 0)))


def _epoch(epoch: float) -> str:
    """1.0 -> "1", 1.5 -> "1.5"."""
    return f"{epoch:g}"
