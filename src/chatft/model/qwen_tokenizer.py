"""A fast Hugging Face tokenizer built from Qwen's ``qwen.tiktoken`` file.

``qwen.tiktoken`` (in every Qwen-7B-Chat folder) lists ``base64(token_bytes) rank`` for the
151,643 byte-level BPE tokens. tiktoken's BPE repeatedly merges the adjacent pair whose
concatenation has the lowest rank, and returns a whole pre-token directly when it is itself
a token. The equivalent Hugging Face model is a byte-level BPE whose merge list holds, for
every token, each split into two tokens, ordered by the rank of the result, with
``ignore_merges`` for the whole-word shortcut. Pre-tokenization is Qwen's regular expression
(digits split one by one), after Unicode NFC normalization as Qwen's own tokenizer applies.

Special tokens follow Qwen: ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644,
``<|im_end|>`` = 151645, then ``<|extra_0|>`` .. ``<|extra_204|>``.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from chatft.errors import ChatftError

#: Qwen's pre-tokenizer pattern (from its tokenizer; Qwen-1 and Qwen2 use the same).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_SYSTEM = "You are a helpful assistant."

#: ChatML, as Qwen's chat models use it; a conversation without a system message gets Qwen's
#: default one, as Qwen-1's ``model.chat`` and Qwen2's template do.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64 rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise ChatftError(f"{path}: cannot read the tiktoken file: {e.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise ChatftError(f"{path}: line {n} is not 'base64-token rank'") from None
    return ranks


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and the merge list that reproduces tiktoken's BPE on ``ranks``."""
    b2u = _byte_to_unicode()
    to_str = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def build_qwen_tokenizer(tiktoken_file: str | Path, *, chat_template: str = CHATML_TEMPLATE):
    """A ``PreTrainedTokenizerFast`` equal to tiktoken on Qwen's ranks (after NFC)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = read_ranks(tiktoken_file)
    vocab, merges = bpe_vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    first = len(ranks)
    for i, text in enumerate(SPECIAL_TOKENS):
        added = tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        assert added == 1 and tok.token_to_id(text) == first + i, "special token ids must follow Qwen"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
        model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast
