"""``chatft.json``: the formatting a model was trained with, saved next to its weights.

An exported folder is a plain Hugging Face model folder (config, safetensors, tokenizer with
its chat template, generation_config) plus this small file, so ``chatft chat`` and
``chatft serve`` format prompts exactly as training did: same template (it lives in the
tokenizer files), same default system prompt, same end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatft.errors import ChatftError

FILENAME = "chatft.json"
FORMAT_VERSION = 1


@dataclass
class ChatMeta:
    system_prompt: str | None
    """Default system prompt: used when a conversation brings none."""

    eot_token: str
    """End-of-turn token the model was trained to emit (generation stops on it)."""

    base_model: str = ""
    """What training started from (path or alias)."""

    train_on: str = "assistant"
    """Which tokens were trained."""

    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    """Free-form facts about the run (steps, final losses, ...)."""


def write_meta(folder: str | Path, meta: ChatMeta) -> None:
    Path(folder, FILENAME).write_text(json.dumps(asdict(meta), ensure_ascii=False, indent=2) + "\n",
                                      encoding="utf-8")


def read_meta(folder: str | Path) -> ChatMeta | None:
    """The folder's ChatMeta, or None for a model chatft did not export."""
    path = Path(folder, FILENAME)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ChatMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ChatftError(f"{path}: unreadable chatft metadata ({e})") from None
