"""Rendering with the model's own chat template: exact loss masks, verification, bad templates.

Masks are checked token by token on short strings with the real Qwen tokenizer (ChatML): each
expected list is ``(token text, trained)``, readable without running anything.
"""

from __future__ import annotations

import pytest

from chatft.data.messages import Conversation, Message
from chatft.data.render import chat_format, render, render_many
from chatft.errors import ChatftError, TemplateError
from chatft.model.qwen_tokenizer import CHATML_TEMPLATE, IM_END, IM_START

S, E = IM_START, IM_END


def conv(*turns: tuple[str, str], index: int = 0) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in turns), index)  # type: ignore[arg-type]


def pieces(tokenizer, sample) -> list[tuple[str, int]]:
    return [(tokenizer.decode([i]), int(m)) for i, m in zip(sample.input_ids, sample.loss_mask)]


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer):
    return chat_format(qwen_tokenizer)


# Scaffolding of a ChatML turn header, and Qwen's default system turn (the template adds it when
# a conversation has no system message).
def header(role: str) -> list[tuple[str, int]]:
    return [(S, 0), (role, 0), ("\n", 0)]


DEFAULT_SYSTEM = header("system") + [("You", 0), (" are", 0), (" a", 0), (" helpful", 0),
                                     (" assistant", 0), (".", 0), (E, 0), ("\n", 0)]


def test_chat_format_finds_im_end(qwen):
    assert (qwen.eot_token, qwen.eot_id) == ("<|im_end|>", 151645)


def test_single_turn_trains_the_answer_and_im_end_only(qwen, qwen_tokenizer):
    r = render(conv(("system", "S"), ("user", "hi"), ("assistant", "yes yes yes")), qwen)
    assert pieces(qwen_tokenizer, r) == (
        header("system") + [("S", 0), (E, 0), ("\n", 0)]
        + header("user") + [("hi", 0), (E, 0), ("\n", 0)]
        + header("assistant") + [("yes", 1), (" yes", 1), (" yes", 1), (E, 1), ("\n", 0)])
    assert r.input_ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert len(r.input_ids) == len(r.loss_mask) == 20


MULTI = conv(("user", "hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!"))


def _multi_expected(first: int, rest: int, last: int) -> list[tuple[str, int]]:
    """The multi-turn conversation with ``first``: mask of the first answer, ``last``: of the
    last answer, ``rest``: of every other token."""
    def h(role):
        return [(t, rest) for t, _ in header(role)]
    return ([(t, rest) for t, _ in DEFAULT_SYSTEM]
            + h("user") + [("hi", rest), (E, rest), ("\n", rest)]
            + h("assistant") + [("Hello", first), ("!", first), (E, first), ("\n", rest)]
            + h("user") + [("By", rest), ("e", rest), (E, rest), ("\n", rest)]
            + h("assistant") + [("By", last), ("e", last), ("!", last), (E, last), ("\n", rest)])


def test_multi_turn_train_on_assistant(qwen, qwen_tokenizer):
    assert pieces(qwen_tokenizer, render(MULTI, qwen)) == _multi_expected(1, 0, 1)


def test_multi_turn_train_on_last(qwen, qwen_tokenizer):
    assert pieces(qwen_tokenizer, render(MULTI, qwen, "last")) == _multi_expected(0, 0, 1)


def test_multi_turn_train_on_all(qwen, qwen_tokenizer):
    r = render(MULTI, qwen, "all")
    assert pieces(qwen_tokenizer, r) == _multi_expected(1, 1, 1)
    assert all(r.loss_mask)


def test_masks_agree_with_and_without_verification(qwen):
    for mode in ("assistant", "last", "all"):
        assert render(MULTI, qwen, mode, verify=True) == render(MULTI, qwen, mode, verify=False)


def test_render_many_matches_render_one_by_one(qwen):
    convs = [MULTI, conv(("user", "a"), ("assistant", "b"), index=7)]
    assert render_many(convs, qwen) == [render(c, qwen) for c in convs]
    assert [r.index for r in render_many(convs, qwen)] == [0, 7]
    assert render_many([], qwen) == []  # e.g. inspect --index with only absent records


def test_unicode_whitespace_and_nfc_answers_verify(qwen, qwen_tokenizer):
    """Emoji and CJK split across byte-level tokens, inner and outer spaces, and a decomposed
    'e' + combining acute accent (Qwen normalizes to NFC first) are all trained exactly."""
    r = render(conv(("system", "S"), ("user", "hi"), ("assistant", "café 😀 e\u0301 甄嬛")), qwen)
    assert [p for p in pieces(qwen_tokenizer, r) if p[1]] == [
        ("ca", 1), ("fé", 1), (" 😀", 1), (" é", 1), (" ", 1), ("甄", 1), ("嬛", 1), (E, 1)]
    r = render(conv(("system", "S"), ("user", "hi"), ("assistant", "  padded  ")), qwen)
    assert [p for p in pieces(qwen_tokenizer, r) if p[1]] == [
        (" ", 1), (" padded", 1), ("  ", 1), (E, 1)]


def test_answer_that_merges_with_the_template_is_refused(qwen):
    # "assistant\n" + "\nnew...": the two newlines form one token (19, after the 11 tokens of
    # the default system turn and 8 of the user turn) that is half template, half answer
    with pytest.raises(TemplateError) as e:
        render(conv(("user", "hi"), ("assistant", "\nnewline first"), index=4), qwen)
    assert str(e.value).startswith("record 4: token 19 ('\\n\\n') straddles the edge of an "
                                   "assistant turn")
    assert "strip leading/trailing whitespace" in str(e.value)


def test_system_prompt_rendering(qwen):
    assert qwen.text(conv(("user", "q"), ("assistant", "a")).as_dicts()) == (
        f"{S}system\nYou are a helpful assistant.{E}\n{S}user\nq{E}\n{S}assistant\na{E}\n")
    assert qwen.text(conv(("system", "甄嬛"), ("user", "q"), ("assistant", "a")).as_dicts()) == (
        f"{S}system\n甄嬛{E}\n{S}user\nq{E}\n{S}assistant\na{E}\n")


# --------------------------------------------------------------------------- bad templates


@pytest.fixture
def with_template(qwen_tokenizer, monkeypatch):
    """Swap the (session-wide) Qwen tokenizer's template for this test only."""
    def use(template: str | None):
        monkeypatch.setattr(qwen_tokenizer, "chat_template", template)
        return qwen_tokenizer
    return use


CHATML_BODY = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + CONTENT + "
               "'<|im_end|>\\n' }}{%- endfor -%}")


def test_template_that_breaks_the_prefix_property(with_template):
    # The generation prompt says "assistant:" but rendered turns say "assistant": the prompt the
    # model sees at inference is not what it was trained on.
    tok = with_template(CHATML_BODY.replace("CONTENT", "m['content']")
                        + "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant:\\n' }}"
                          "{%- endif -%}")
    fmt = chat_format(tok)
    with pytest.raises(TemplateError) as e:
        render(conv(("user", "q"), ("assistant", "a"), index=3), fmt)
    assert str(e.value).startswith(
        "record 3: the chat template does not render turn 1 as a continuation of the turns "
        "before it (rendering messages[:k] with the generation prompt is not a prefix")


def test_template_that_rewrites_assistant_text(with_template):
    tok = with_template(CHATML_BODY.replace("CONTENT", "m['content'] | trim")
                        + "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
                          "{%- endif -%}")
    fmt = chat_format(tok)  # the probe has no spaces to strip, so this passes
    render(conv(("user", "q"), ("assistant", "a")), fmt)
    with pytest.raises(TemplateError) as e:
        render(conv(("user", "q"), ("assistant", " two spaces "), index=5), fmt)
    assert str(e.value) == ("record 5: the chat template changes assistant turn 1: expected "
                            "' two spaces ', rendered 'two spaces<|im_end|>\\n'")


def test_template_that_drops_earlier_answers(with_template):
    # Like templates that strip reasoning from history: earlier assistant turns are rewritten.
    tok = with_template(
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] == 'assistant' and not loop.last -%}...{%- else -%}{{ m['content'] }}"
        "{%- endif -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    fmt = chat_format(tok)
    with pytest.raises(TemplateError, match="record 0: the chat template changes assistant turn 1: "
                                            "expected 'Hello!', rendered '...<|im_end|>"):
        render(MULTI, fmt)
    # only the last turn is trained with train_on last, and that one is rendered verbatim
    assert sum(render(MULTI, fmt, "last").loss_mask) == 4


def test_template_that_uppercases_is_caught_by_the_probe(with_template):
    tok = with_template(CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper"))
    with pytest.raises(TemplateError, match="does not render the assistant's text verbatim"):
        chat_format(tok)


def test_template_without_special_end_of_turn(with_template):
    tok = with_template("{%- for m in messages -%}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}"
                        "{%- endfor -%}")
    with pytest.raises(TemplateError) as e:
        chat_format(tok)
    assert str(e.value) == ("the chat template ends an assistant turn with '\\n\\n', not with a "
                            "special end-of-turn token; the model could not learn to stop")


def test_template_that_raises_or_does_not_parse(with_template):
    tok = with_template("{{ raise_exception('System role not supported') }}")
    with pytest.raises(TemplateError) as e:
        chat_format(tok)
    assert str(e.value) == ("the chat template failed to render the conversation (roles user, "
                            "assistant): TemplateError: System role not supported")
    tok = with_template("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TemplateError, match="TemplateSyntaxError"):
        chat_format(tok)


def test_template_that_refuses_one_record(with_template, qwen):
    tok = with_template(CHATML_TEMPLATE.replace(
        "{%- for message in messages -%}",
        "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('no system here') }}"
        "{%- endif -%}{%- for message in messages -%}"))
    fmt = chat_format(tok)
    with pytest.raises(TemplateError) as e:
        render_many([conv(("user", "q"), ("assistant", "a")),
                     conv(("system", "s"), ("user", "q"), ("assistant", "a"), index=9)], fmt)
    assert str(e.value).startswith("record 9: the chat template failed to render")


def test_no_chat_template(with_template):
    with pytest.raises(TemplateError, match="the tokenizer has no chat template"):
        chat_format(with_template(None))


@pytest.fixture(scope="module")
def spaced_tokenizer():
    """A word-level tokenizer whose decode() joins tokens with spaces: it changes the text
    between rendering and decoding, which only the label check can see."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "user", "assistant", "hi", "Hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (S, E)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token=E)
    fast.chat_template = CHATML_BODY.replace("CONTENT", "m['content']") + (
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    return fast


def test_label_check_catches_a_tokenizer_that_changes_text(spaced_tokenizer):
    fmt = chat_format(spaced_tokenizer)
    c = conv(("user", "hi"), ("assistant", "Hello world"), index=2)
    with pytest.raises(TemplateError) as e:
        render(c, fmt)
    assert str(e.value).startswith(
        "record 2: label check failed for assistant span 0: the trained tokens decode to "
        "'Hello world <|im_end|>' but the turn is 'Hello world<|im_end|>'.")
    # with verification off the same sample renders; its mask covers the answer and <|im_end|>
    r = render(c, fmt, verify=False)
    assert spaced_tokenizer.convert_ids_to_tokens(
        [i for i, m in zip(r.input_ids, r.loss_mask) if m]) == ["Hello", "world", E]


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from chatft.config import DEFAULT_MODEL
    from chatft.model.loading import load_tokenizer, resolve_model

    try:
        source = resolve_model(DEFAULT_MODEL)
    except ChatftError as e:
        pytest.skip(f"embedded SmolLM2 not available: {e}")
    return load_tokenizer(source)


SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_smollm2_eot_and_default_system_prompt(smollm2):
    fmt = chat_format(smollm2)
    assert fmt.eot_token == "<|im_end|>"
    assert fmt.eot_id == smollm2.convert_tokens_to_ids("<|im_end|>")
    c = conv(("user", "Hi there"), ("assistant", "Hello! How can I help?"),
             ("user", "2+2?"), ("assistant", "4"))
    text = fmt.text(c.as_dicts())
    assert text.startswith(f"{S}system\n{SMOL_SYSTEM}{E}\n{S}user\nHi there{E}\n")
    r = render(c, fmt)
    trained = [i for i, m in zip(r.input_ids, r.loss_mask) if m]
    assert smollm2.decode(trained) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # the default system prompt is template text, never trained
    assert SMOL_SYSTEM not in smollm2.decode(trained)


def test_smollm2_own_system_prompt_replaces_its_default(smollm2):
    fmt = chat_format(smollm2)
    c = conv(("system", "现在你要扮演皇帝身边的女人--甄嬛."), ("user", "你是谁？"),
             ("assistant", "我是甄嬛，家父是大理寺少卿甄远道。"))
    assert SMOL_SYSTEM not in fmt.text(c.as_dicts())
    for mode in ("assistant", "last"):
        r = render(c, fmt, mode)
        assert smollm2.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m]) == (
            "我是甄嬛，家父是大理寺少卿甄远道。<|im_end|>")
