"""The valid ranges of the generation knobs, shared by the API and ``chatft chat``.

One table, so a value the server refuses with a 400 is refused by the chat command too, with
the same words. :meth:`Limit.problem` says what is wrong with a value, or None; each caller
puts its own name in front (``'temperature'`` for the API, ``--temperature`` for the CLI).

NaN and infinities are refused everywhere: NaN compares false with every bound, so a plain
``lo <= v <= hi`` test lets it through, and a NaN temperature or top-p silently turns the
sampler's probabilities into NaN (the "sampled" token is then whatever argmax of NaN gives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64_MIN, UINT64_MAX = -2 ** 63, 2 ** 64 - 1


@dataclass(frozen=True)
class Limit:
    """``lo <= value <= hi`` (``lo < value`` when ``lo_open``); ``integer``: a Python int
    (never a bool, never a float such as 3.0)."""

    lo: float
    hi: float
    lo_open: bool = False
    integer: bool = False
    text: str | None = None
    """How the range reads in messages, when the bounds alone read badly."""

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value`` (a phrase to follow the knob's name), or None."""
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer, got {_shown(value)}"
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {_shown(value)}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"must be a finite number, got {value}"
        if value < self.lo or value > self.hi or (self.lo_open and value == self.lo):
            return f"must be {self.describe()}, got {value}"
        return None

    def describe(self) -> str:
        if self.text:
            return self.text
        lo = f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}"
        return lo if self.hi == math.inf else f"{lo} and <= {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _shown(value: object) -> str:
    return "a bool" if isinstance(value, bool) else type(value).__name__


TEMPERATURE = Limit(0.0, 2.0)
"""OpenAI's range; 0 = greedy. Above 2 a trained model's answer is noise."""

TOP_P = Limit(0.0, 1.0, lo_open=True)

TOP_K = Limit(-1, math.inf, integer=True, text="-1 or 0 (no limit) or a positive count")
"""0 or -1 = no limit (-1 is vLLM's spelling); a k at or above the vocabulary is no limit."""

REPETITION_PENALTY = Limit(0.0, 10.0, lo_open=True)
"""1 = off; the penalty divides logits, so 0 is meaningless and large values only repeat
the same effect."""

PENALTY = Limit(-2.0, 2.0)
"""OpenAI's frequency/presence penalties (this server supports only 0)."""

SEED = Limit(INT64_MIN, UINT64_MAX, integer=True, text="between -2**63 and 2**64-1")
"""What ``torch.Generator.manual_seed`` takes; larger integers cannot seed it."""

MAX_TOKENS = Limit(1, math.inf, integer=True)
"""At least one token; the upper bound is the room the context leaves (checked later, when
the prompt's length is known)."""
