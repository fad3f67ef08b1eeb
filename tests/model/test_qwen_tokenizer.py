"""The Qwen tokenizer built from qwen.tiktoken equals tiktoken on the same file.

The reference is ``tiktoken.Encoding`` with Qwen's ranks, Qwen's pre-tokenizer pattern
(``QWEN_PATTERN``) and Qwen's special tokens. It is fed the NFC form of each string, because
that is what Qwen's own tokenizer (``tokenization_qwen.py``) does before calling tiktoken;
chatft's tokenizer applies NFC itself, so it gets the raw string.
"""

from __future__ import annotations

import json
import unicodedata

import pytest

from chatft.errors import ChatftError
from chatft.model.qwen_tokenizer import (CHATML_TEMPLATE, QWEN_PATTERN, SPECIAL_TOKENS,
                                         bpe_vocab_and_merges, build_qwen_tokenizer, read_ranks)


@pytest.fixture(scope="module")
def enc(qwen_tiktoken):
    import tiktoken

    ranks = read_ranks(qwen_tiktoken)
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})


def reference(enc, text: str) -> list[int]:
    return enc.encode(unicodedata.normalize("NFC", text), disallowed_special=())


MIXED = [
    "Hello, world!",
    "你好，世界！",
    "现在你要扮演皇帝身边的女人--甄嬛.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }  // C++\r\n",
    "Emoji 😀👍🏽 and café, 👨‍👩‍👧‍👦 family",
    "  leading spaces\t\ttabs\n\n\nnewlines  ",
    "12345 + 67.89 = ?",
    "I'm here, you're there; they'll go. WE'VE SEEN IT'S",
    "e\u0301 (e + combining acute) vs \u00e9; Å vs A\u030a; ﬁ ligature",
    "日本語のテキストと한국어 텍스트 and Ελληνικά",
    "\u3000全角空格\u00a0nbsp\u200bzero-width",
    "tabs\tand\u000bvertical\u000cfeed",
    " ",
    "\n",
    "a" * 300,
    "😀" * 20,
    "混合 mixed 文本 with 数字 123 和 code `print('hi')`",
]


def test_equals_tiktoken_on_all_of_huanhuan(qwen_tokenizer, enc, huanhuan_path):
    records = json.loads(huanhuan_path.read_text(encoding="utf-8"))
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r.get(k)]
    assert len(texts) >= 2 * 3729
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == reference(enc, text), text


@pytest.mark.parametrize("text", MIXED)
def test_equals_tiktoken_on_mixed_strings(qwen_tokenizer, enc, text):
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == reference(enc, text)
    # decoding gives back the text the model saw (its NFC form)
    assert qwen_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


# Computed once with the tiktoken reference above and pasted here.
GOLDEN = {
    "Hello, world!": [9707, 11, 1879, 0],
    "你好，世界！": [108386, 3837, 99489, 6313],
    "现在你要扮演皇帝身边的女人--甄嬛.": [99601, 105182, 102889, 104937, 102144, 106354, 313,
                                  109628, 123591, 13],
    "def add(a, b):\n    return a + b\n": [750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293,
                                            198],
    "Emoji 😀👍🏽 and café": [92731, 90316, 144349, 145375, 323, 51950],
    "  leading spaces\t\ttabs\n\n\nnewlines  ": [220, 6388, 12621, 197, 3244, 3435, 1406, 931,
                                                7969, 256],
    "12345 + 67.89 = ?": [16, 17, 18, 19, 20, 488, 220, 21, 22, 13, 23, 24, 284, 937],
    "I'm here, you're there; they'll go.": [40, 2776, 1588, 11, 498, 2299, 1052, 26, 807, 3278,
                                            728, 13],
    "e\u0301": [963],  # NFC: the same single token as "é"
}


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(qwen_tokenizer, text):
    assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == GOLDEN[text]


GOLDEN_CHATML_TEXT = (
    "<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛.<|im_end|>\n"
    "<|im_start|>user\n你是谁？<|im_end|>\n"
    "<|im_start|>assistant\n我是甄嬛，家父是大理寺少卿甄远道。<|im_end|>\n")
GOLDEN_CHATML_IDS = [
    151644, 8948, 198, 99601, 105182, 102889, 104937, 102144, 106354, 313, 109628, 123591, 13,
    151645, 198, 151644, 872, 198, 105043, 100165, 11319, 151645, 198, 151644, 77091, 198,
    104198, 109628, 123591, 3837, 45629, 99910, 20412, 103683, 101277, 82647, 106987, 109628,
    99427, 44793, 1773, 151645, 198]


def test_golden_chatml_conversation(qwen_tokenizer, enc):
    messages = [{"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛."},
                {"role": "user", "content": "你是谁？"},
                {"role": "assistant", "content": "我是甄嬛，家父是大理寺少卿甄远道。"}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == GOLDEN_CHATML_TEXT
    assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == GOLDEN_CHATML_IDS
    assert enc.encode(text, allowed_special="all") == GOLDEN_CHATML_IDS
    # the generation prompt is the conversation up to the answer
    prompt = qwen_tokenizer.apply_chat_template(messages[:2], tokenize=False,
                                                add_generation_prompt=True)
    assert GOLDEN_CHATML_TEXT.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_default_system_prompt_when_none_is_given(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_follow_qwen(qwen_tokenizer, enc):
    tok = qwen_tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                     "<|extra_0|>", "<|extra_204|>"])
    assert ids == [151643, 151644, 151645, 151646, 151850]
    assert len(tok) == 151851 == enc.n_vocab
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    # special tokens written in text are recognized as one token each, never split
    assert tok("a<|im_end|>b", add_special_tokens=False)["input_ids"] == [64, 151645, 65]
    assert tok.decode([151644, 872]) == "<|im_start|>user"
    assert tok.chat_template == CHATML_TEMPLATE


def test_saved_folder_loads_back_identical(qwen_tokenizer, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    assert loaded.chat_template == qwen_tokenizer.chat_template
    assert loaded(GOLDEN_CHATML_TEXT, add_special_tokens=False)["input_ids"] == GOLDEN_CHATML_IDS
    assert loaded("e\u0301", add_special_tokens=False)["input_ids"] == [963]  # NFC kept
    assert loaded.eos_token == "<|im_end|>" and len(loaded) == 151851


# --------------------------------------------------------------------------- construction


def test_merges_from_ranks_by_hand():
    """Every token's splits into two tokens, ordered by the rank of the result (then the
    ranks of the halves): abc (rank 4) splits as a|bc and ab|c."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    vocab, merges = bpe_vocab_and_merges(ranks)
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    assert merges == [("a", "b"), ("a", "bc"), ("ab", "c"), ("b", "c")]


def test_tiny_tokenizer_merges_like_tiktoken(tmp_path):
    import base64

    import tiktoken

    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = build_qwen_tokenizer(path)
    ref = tiktoken.Encoding("tiny", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    # abcab: a+b merges first (rank 3) twice, then ab+c (rank 4); bcb: b+c (rank 5)
    for text, ids in (("abc", [4]), ("abcab", [4, 3]), ("bcb", [5, 1]), ("cab", [2, 3])):
        assert tok(text, add_special_tokens=False)["input_ids"] == ids == ref.encode(text)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 6  # specials follow the ranks


def test_read_ranks_errors(tmp_path):
    with pytest.raises(ChatftError, match="cannot read the tiktoken file"):
        read_ranks(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nYg== 1\nnot-a-rank-line\n")
    with pytest.raises(ChatftError) as e:
        read_ranks(bad)
    assert str(e.value) == f"{bad}: line 3 is not 'base64-token rank'"
    ok = tmp_path / "ok.tiktoken"
    ok.write_text("YQ== 0\n\nYg== 1\n")  # blank lines are skipped
    assert read_ranks(ok) == {b"a": 0, b"b": 1}
