"""Incremental detokenization: never a broken character, stop strings never leak."""

from __future__ import annotations

from chatft.serve.detok import TextStream


def _feed(tok, text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, stop)
    pieces = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def test_multibyte_characters_are_released_whole(qwen_tokenizer):
    text = "皇上万福金安，臣妾甄嬛。龘🦜 Hello 𠀀 world"
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    # Some characters take several byte-level tokens, else this test would prove nothing.
    assert any("\ufffd" in qwen_tokenizer.decode([i]) for i in ids)
    pieces, stream = _feed(qwen_tokenizer, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == stream.text


def test_stop_string_spanning_tokens_is_cut(qwen_tokenizer):
    pieces, stream = _feed(qwen_tokenizer, "Answer: yes.\nUser: more", stop=("\nUser:",))
    assert stream.stopped
    assert "".join(pieces) == "Answer: yes." == stream.text
    assert not any("User" in p for p in pieces)


def test_earliest_of_several_stop_strings_wins(qwen_tokenizer):
    _, stream = _feed(qwen_tokenizer, "one two three four", stop=("four", "two"))
    assert stream.text == "one "


def test_held_back_prefix_is_released_when_no_stop_follows(qwen_tokenizer):
    stream = TextStream(qwen_tokenizer, ("ENDX",))
    ids = qwen_tokenizer("abc END", add_special_tokens=False)["input_ids"]
    shown = "".join(stream.push(i) for i in ids)
    assert not shown.endswith("END")  # could still become "ENDX"
    assert shown + stream.finish() == "abc END"
    assert not stream.stopped


def test_special_tokens_are_not_shown(qwen_tokenizer):
    stream = TextStream(qwen_tokenizer)
    ids = qwen_tokenizer("hi<|im_start|>there", add_special_tokens=False)["input_ids"]
    assert "".join(stream.push(i) for i in ids) + stream.finish() == "hithere"
