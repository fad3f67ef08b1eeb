"""``chatft data inspect``: show samples token by token, coloured by role and by loss.

Trained tokens (the ones the loss sees) are printed bold green on a dark background; untrained
text is coloured by the message it belongs to (system magenta, user cyan, template scaffolding
grey). Token boundaries alternate between two shades so BPE splits are visible.
"""

from __future__ import annotations

from typing import Sequence

from chatft.data.messages import Conversation
from chatft.data.render import ChatFormat, Rendered

_RESET = "\x1b[0m"
_STYLE = {
    "trained": ("\x1b[1;32;48;5;22m", "\x1b[1;92;48;5;28m"),
    "assistant": ("\x1b[32m", "\x1b[92m"),  # assistant text not trained (train_on=last)
    "system": ("\x1b[35m", "\x1b[95m"),
    "user": ("\x1b[36m", "\x1b[96m"),
    "template": ("\x1b[90m", "\x1b[37m"),
}


def token_roles(conv: Conversation, text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    """Role of the message each token's characters belong to ('template' for the rest)."""
    spans, cursor = [], 0
    for m in conv.messages:
        at = text.find(m.content, cursor) if m.content else -1
        if at >= 0:
            spans.append((at, at + len(m.content), m.role))
            cursor = at + len(m.content)
    roles = []
    for a, b in offsets:
        role = next((r for s, e, r in spans if s <= a and b <= e and b > a), "template")
        roles.append(role)
    return roles


def colour_sample(conv: Conversation, sample: Rendered, fmt: ChatFormat, colour: bool = True) -> str:
    text = fmt.text(conv.as_dicts())
    enc = fmt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore
    assert list(enc["input_ids"][: len(sample)]) == sample.input_ids[: len(enc["input_ids"])]
    roles = token_roles(conv, text, enc["offset_mapping"])
    parts = []
    for t, tok_id in enumerate(sample.input_ids):
        piece = fmt.tokenizer.decode([tok_id], skip_special_tokens=False,  # type: ignore
                                     clean_up_tokenization_spaces=False)
        if not colour:
            parts.append(f"[{piece}]" if sample.loss_mask[t] else piece)
            continue
        style = "trained" if sample.loss_mask[t] else roles[t]
        parts.append(_STYLE[style][t % 2] + piece.replace("\n", "\u21b5\n") + _RESET)
    return "".join(parts)


def legend(colour: bool = True) -> str:
    if not colour:
        return "legend: [trained tokens] in brackets"
    return ("legend: " + " ".join(_STYLE[k][0] + k + _RESET for k in
                                  ("trained", "system", "user", "assistant", "template"))
            + "  (shades alternate per token; \u21b5 is a newline)")
