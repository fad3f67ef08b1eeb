"""Incremental detokenization with stop strings: token ids in, safe-to-show text out.

Two things make "decode each new token on its own" wrong:

* Byte-level BPE splits one character over several tokens (most CJK characters take two or
  three), so decoding a token alone gives U+FFFD until the rest arrives. Text is released
  only when the decoded window no longer ends in U+FFFD.
* Some tokenizers change how a token decodes depending on its left neighbour (SentencePiece
  drops a leading space at the start). Each new token is therefore decoded together with a
  few tokens before it, and only the difference is released.

Stop strings are matched on the released text. Text that could still become the start of a
stop string is held back, so a stop string never reaches the client even when it spans
several tokens; once matched, the stop string and everything after it are cut.
"""

from __future__ import annotations

from typing import Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one generated answer, fed one token id at a time."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        # Decoding window: ids[_prefix:_read] were decoded already; ids[_prefix:] is decoded
        # with them as left context and the part past their text is new.
        self._prefix = 0
        self._read = 0
        self._text = ""  # all text decoded so far (cut at a matched stop string)
        self._sent = 0  # len(_text) already returned to the caller
        self.stopped = False
        """True once a stop string matched: generation should end."""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may now be shown (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith(_REPLACEMENT):
            return ""  # an incomplete character (or a special token that decodes to nothing)
        searched_from = len(self._text)
        self._text += now[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(searched_from)

    def _release(self, searched_from: int) -> str:
        if self._stop:
            longest = max(len(s) for s in self._stop)
            start = max(0, searched_from - longest + 1)
            hits = [at for at in (self._text.find(s, start) for s in self._stop) if at >= 0]
            if hits:
                self._text = self._text[:min(hits)]
                self.stopped = True
                return self._flush()
            end = len(self._text) - _held_back(self._text, self._stop)
        else:
            end = len(self._text)
        out = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out

    def _flush(self) -> str:
        out = self._text[self._sent:]
        self._sent = len(self._text)
        return out

    def finish(self) -> str:
        """Generation ended: return whatever is still held back (partial stop-string
        prefixes, a trailing incomplete character)."""
        if not self.stopped and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix:self._read])
            now = self._decode(self._ids[self._prefix:])
            self._text += now[len(before):]
            self._read = len(self._ids)
        return self._flush()

    @property
    def text(self) -> str:
        """All text released so far (after :meth:`finish`: the whole answer)."""
        return self._text[:self._sent]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
