"""The one data model: a conversation is a tuple of :class:`Message`.

Every input format (Alpaca, ShareGPT, OpenAI messages) is converted to this before anything
else looks at it, and :func:`check_conversation` enforces the shape training relies on:
an optional system message first, then user/assistant turns alternating, ending with an
assistant turn (the turn that is learned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """One training sample: its messages and the index of the record it came from."""

    messages: tuple[Message, ...]
    index: int

    def as_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


def check_conversation(messages: list[Message] | tuple[Message, ...]) -> tuple[int, str] | None:
    """Return ``(position, problem)`` for the first structural problem, or None if valid.

    >>> check_conversation([Message("user", "hi"), Message("assistant", "hello")]) is None
    True
    >>> check_conversation([Message("user", "hi")])
    (0, 'the conversation must end with an assistant turn')
    """
    if not messages:
        return 0, "the conversation has no messages"
    start = 1 if messages[0].role == "system" else 0
    if start == len(messages):
        return 0, "the conversation has only a system message"
    for pos, m in enumerate(messages):
        if m.role not in ROLES:
            return pos, f"unknown role {m.role!r}"
        if m.role == "system" and pos != 0:
            return pos, "a system message may only come first"
        if pos >= start:
            expected = "user" if (pos - start) % 2 == 0 else "assistant"
            if m.role != expected:
                article = "an" if expected == "assistant" else "a"
                return pos, (f"expected {article} {expected} turn here (turns alternate user, "
                             f"assistant), got {m.role}")
        if m.role != "system" and not m.content.strip():
            return pos, f"the {m.role} message is empty"
    if messages[-1].role != "assistant":
        return len(messages) - 1, "the conversation must end with an assistant turn"
    return None
