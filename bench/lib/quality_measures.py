"""What the quality benchmark reads off a run: whether an answer is in character
(:func:`persona_check`, a deliberately simple, documented heuristic) and the run's metrics
(:func:`read_metrics`, from ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- persona check

#: Words of the persona's world: her names, her forms of address and self-reference, the
#: people around her (her father 甄远道 answers "你的父亲是谁？").
PERSONA_MARKERS = ("甄嬛", "嬛嬛", "本宫", "臣妾", "嫔妾", "皇上", "娘娘", "小主", "四郎",
                   "甄远道", "皇后", "华妃")
#: Self-descriptions of a chat assistant: an answer with one of these is out of character.
ASSISTANT_MARKERS = ("ai", "assistant", "smollm", "language model", "hugging face", "chatbot",
                     "人工智能", "助手", "语言模型", "机器人")
#: At least this share of an answer's letters must be CJK ideographs (the data's language).
MIN_CJK_SHARE = 0.5

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[a-z]+(?: [a-z]+)*")


@dataclass(frozen=True)
class PersonaCheck:
    in_character: bool
    persona_markers: tuple[str, ...]
    """Persona words found in the answer."""

    assistant_markers: tuple[str, ...]
    """Assistant self-descriptions found (any one makes the answer out of character)."""

    cjk_share: float
    """CJK ideographs / all letters and ideographs (punctuation, digits, spaces not counted)."""


def persona_check(answer: str) -> PersonaCheck:
    """Heuristic: in character = mentions the persona's world (:data:`PERSONA_MARKERS`), never
    describes itself as an assistant (:data:`ASSISTANT_MARKERS`; Latin ones matched as whole
    words, case-insensitively), and is mostly Chinese (:data:`MIN_CJK_SHARE`).

    It misses in-character answers that name nobody ("你放心，我自有分寸。") and would accept
    an answer that names 皇上 while making no sense; read the answers.

    >>> persona_check("臣妾是甄嬛。").in_character
    True
    >>> persona_check("I am SmolLM, an AI assistant.").assistant_markers
    ('ai', 'assistant', 'smollm')
    """
    lower = answer.lower()
    found = tuple(m for m in PERSONA_MARKERS if m in answer)
    latin = " " + " ".join(_LATIN_WORD.findall(lower)) + " "
    breaks = tuple(m for m in ASSISTANT_MARKERS
                   if (f" {m} " in latin if m.isascii() else m in answer))
    letters = [c for c in answer if c.isalpha()]  # CJK ideographs count as alphabetic
    cjk = sum(1 for c in letters if _CJK.match(c))
    share = cjk / len(letters) if letters else 0.0
    return PersonaCheck(bool(found) and not breaks and share >= MIN_CJK_SHARE, found, breaks,
                        round(share, 3))


# --------------------------------------------------------------------------- metrics


@dataclass
class RunMetrics:
    """What one run's ``metrics.jsonl`` says."""

    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    evals: list[dict]
    """Every ``{"step", "eval_loss"}`` record, in order."""

    final_train_loss: float | None
    tokens: int
    """Tokens (prompt + answer) processed by all optimizer steps."""

    train_s: float
    """Sum of the steps' ``step_time_s``: forward, backward and optimizer, nothing else."""

    loss_curve: list[list[float]] = field(default_factory=list)
    """``[step, train loss]`` pairs, at most ~100, evenly spaced, last step always included."""

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.train_s if self.train_s > 0 else None


def read_metrics(path: str | Path, curve_points: int = 100) -> RunMetrics:
    """Parse ``metrics.jsonl``. Held-out loss before/after = first/last ``eval_loss`` record
    (chatft evaluates at step 0 and after the last step)."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    stride = max(1, math.ceil(len(steps) / curve_points))
    curve = [[r["step"], round(r["loss"], 5)] for i, r in enumerate(steps)
             if i % stride == 0 or i == len(steps) - 1]
    return RunMetrics(
        steps=max((r["step"] for r in steps), default=0),
        eval_loss_before=evals[0]["eval_loss"] if evals else None,
        eval_loss_after=evals[-1]["eval_loss"] if len(evals) > 1 else None,
        evals=evals,
        final_train_loss=steps[-1]["loss"] if steps else None,
        tokens=sum(int(r["tokens"]) for r in steps),
        train_s=sum(float(r["step_time_s"]) for r in steps),
        loss_curve=curve)
