"""Render conversations with the model's own chat template into ``(input_ids, loss_mask)``.

How the trained spans are found, for any template that renders turns in order:

1. ``full = template(messages)`` is the whole conversation as text.
2. For each assistant turn ``k``, ``prefix = template(messages[:k], add_generation_prompt)``
   must be a prefix of ``full``; the assistant text must follow it verbatim, and then the
   end-of-turn token (``<|im_end|>`` for ChatML). The trained character span is
   ``[len(prefix), len(prefix) + len(content) + len(eot))`` — the end-of-turn token is
   trained, so the model learns to stop.
3. ``full`` is tokenized once with offsets; a token is trained iff its characters lie in a
   trained span. ``input_ids`` and ``loss_mask`` come out of the same loop, so they cannot
   disagree in length or position.
4. Verification (on by default): every trained token run decodes to exactly
   ``content + eot``. A template that strips, reorders or rewrites turns fails here with a
   :class:`~chatft.errors.TemplateError` that says which turn and what differed.

``loss_mask[i]`` says that token ``i`` is a *target*; the shift that pairs each target with
the position predicting it happens in :mod:`chatft.data.labels`, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from chatft.data.messages import Conversation
from chatft.errors import TemplateError

TrainOn = Literal["assistant", "last", "all"]
_PROBE = "chatft-probe-7f3a"


@dataclass(frozen=True)
class Rendered:
    """One tokenized sample. ``loss_mask[i]`` is True where ``input_ids[i]`` is learned."""

    input_ids: list[int]
    loss_mask: list[bool]
    index: int  # record index in the source file

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class ChatFormat:
    """A tokenizer plus what we learned about its chat template (see :func:`chat_format`)."""

    tokenizer: object
    eot_token: str
    eot_id: int

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False,
             record: int | None = None) -> str:
        return apply_template(self.tokenizer, messages, add_generation_prompt, record)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation ready for the assistant to answer (for generation)."""
        return self.tokenizer(self.text(messages, add_generation_prompt=True),  # type: ignore
                              add_special_tokens=False)["input_ids"]


def apply_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
                   record: int | None = None) -> str:
    """The template's text for ``messages``; a template that fails (a Jinja syntax error, or
    its own ``raise_exception`` refusing the conversation) is a :class:`TemplateError`."""
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except JinjaError as e:
        where = f"record {record}: " if record is not None else ""
        raise TemplateError(f"{where}the chat template failed to render the conversation "
                            f"(roles {', '.join(m['role'] for m in messages)}): "
                            f"{type(e).__name__}: {e}") from None


def chat_format(tokenizer) -> ChatFormat:
    """Probe the tokenizer's chat template: find its end-of-turn token.

    Renders a probe conversation and takes the special token that directly follows the
    assistant text (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ...).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; chatft renders conversations "
                            "with the model's own template (set tokenizer.chat_template)")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    full = apply_template(tokenizer, msgs)
    at = full.find(_PROBE)
    if at < 0:
        raise TemplateError("the chat template does not render the assistant's text verbatim")
    tail = full[at + len(_PROBE):]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not tail_ids or tail_ids[0] not in specials:
        raise TemplateError(f"the chat template ends an assistant turn with {tail[:20]!r}, not "
                            "with a special end-of-turn token; the model could not learn to stop")
    eot_id = tail_ids[0]
    eot = tokenizer.convert_ids_to_tokens(eot_id)
    if not tail.startswith(eot):
        raise TemplateError(f"end-of-turn token {eot!r} is not rendered right after the "
                            "assistant text")
    return ChatFormat(tokenizer, eot, eot_id)


def _trained_spans(conv: Conversation, fmt: ChatFormat, train_on: TrainOn, full: str
                   ) -> list[tuple[int, int, str]]:
    """Character spans ``(start, end, expected_text)`` of the assistant turns to learn."""
    msgs = conv.as_dicts()
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for k in turns:
        prefix = fmt.text(msgs[:k], add_generation_prompt=True, record=conv.index)
        if not full.startswith(prefix):
            raise TemplateError(
                f"record {conv.index}: the chat template does not render turn {k} as a "
                "continuation of the turns before it (rendering messages[:k] with the "
                "generation prompt is not a prefix of the whole conversation), so the "
                "assistant span cannot be located")
        start = len(prefix)
        content = msgs[k]["content"]
        if not full.startswith(content, start):
            raise TemplateError(
                f"record {conv.index}: the chat template changes assistant turn {k}: expected "
                f"{content[:40]!r}, rendered {full[start:start + 40]!r}")
        end = start + len(content)
        if not full.startswith(fmt.eot_token, end):
            raise TemplateError(
                f"record {conv.index}: assistant turn {k} is not followed by the end-of-turn "
                f"token {fmt.eot_token!r} (rendered {full[end:end + 20]!r})")
        spans.append((start, end + len(fmt.eot_token), content + fmt.eot_token))
    return spans


def render_many(convs: Sequence[Conversation], fmt: ChatFormat, train_on: TrainOn = "assistant",
                verify: bool = True,
                on_error: Callable[[Conversation, TemplateError], None] | None = None
                ) -> list[Rendered]:
    """Render, tokenize (one batched call) and mask a list of conversations.

    A conversation the template cannot render exactly raises :class:`TemplateError`; with
    ``on_error`` it is handed to ``on_error`` instead and left out (``--skip-bad``)."""
    kept: list[tuple[Conversation, str, list[tuple[int, int, str]]]] = []
    for conv in convs:
        try:
            text = fmt.text(conv.as_dicts(), record=conv.index)
            kept.append((conv, text, _trained_spans(conv, fmt, train_on, text)))
        except TemplateError as e:
            if on_error is None:
                raise
            on_error(conv, e)
    if not kept:  # a tokenizer called on an empty batch fails
        return []
    enc = fmt.tokenizer([text for _, text, _ in kept], add_special_tokens=False,  # type: ignore[operator]
                        return_offsets_mapping=True)
    out = []
    for (conv, text, sp), ids, offsets in zip(kept, enc["input_ids"], enc["offset_mapping"]):
        try:
            out.append(_mask(conv, text, sp, ids, offsets, fmt, train_on, verify))
        except TemplateError as e:
            if on_error is None:
                raise
            on_error(conv, e)
    return out


def _mask(conv: Conversation, text: str, sp: list[tuple[int, int, str]], ids: list[int],
          offsets: list[tuple[int, int]], fmt: ChatFormat, train_on: TrainOn,
          verify: bool) -> Rendered:
    """The loss mask of one tokenized conversation: tokens whose characters lie inside a
    trained span; with ``verify``, each span's tokens must decode to exactly its text."""
    mask = [train_on == "all"] * len(ids)
    runs: list[list[int]] = [[] for _ in sp]
    if train_on != "all":
        j = 0  # spans are in order, tokens are in order: one merged pass
        for t, (a, b) in enumerate(offsets):
            while j < len(sp) and a >= sp[j][1]:
                j += 1
            if j == len(sp):
                break
            s, e, _ = sp[j]
            if a >= s and b <= e and b > a:
                mask[t] = True
                runs[j].append(ids[t])
            elif a < s < b or a < e < b:
                raise TemplateError(
                    f"record {conv.index}: token {t} ({text[a:b]!r}) straddles the edge of "
                    "an assistant turn, so the turn cannot be trained exactly (the assistant "
                    "text starts or ends with characters that merge with the template's; "
                    "strip leading/trailing whitespace from it)")
    else:
        for j, (s, e, _) in enumerate(sp):
            runs[j] = [i for i, (a, b) in zip(ids, offsets) if a >= s and b <= e and b > a]
    if verify:
        norm = getattr(getattr(fmt.tokenizer, "backend_tokenizer", None), "normalizer", None)
        for j, (s, e, expected) in enumerate(sp):
            if norm is not None:  # e.g. Qwen's NFC: compare what the tokenizer saw
                expected = norm.normalize_str(expected)
            got = fmt.tokenizer.decode(runs[j], skip_special_tokens=False,  # type: ignore
                                       clean_up_tokenization_spaces=False)
            if got != expected:
                raise TemplateError(
                    f"record {conv.index}: label check failed for assistant span {j}: the "
                    f"trained tokens decode to {got[:60]!r} but the turn is "
                    f"{expected[:60]!r}. The template or tokenizer changes the text "
                    "between rendering and tokenizing (normalization, stripped spaces).")
    return Rendered(list(ids), mask, conv.index)


def render(conv: Conversation, fmt: ChatFormat, train_on: TrainOn = "assistant",
           verify: bool = True) -> Rendered:
    """Render one conversation; see :func:`render_many`."""
    return render_many([conv], fmt, train_on, verify)[0]
