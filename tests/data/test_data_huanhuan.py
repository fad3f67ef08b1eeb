"""Acceptance on the real data: huanhuan.json (3,729 Alpaca records) with the Qwen tokenizer.

Every expectation is computed here independently of chatft's rendering: the ChatML text is
written out by hand and tokenized with ``tiktoken`` on Qwen's ranks, and trained tokens are
decoded with tiktoken too, not with the tokenizer under test.
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from chatft.config import DataArgs
from chatft.config_parse import load_config
from chatft.data.prepare import DataOptions, prepare

HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


@pytest.fixture(scope="module")
def records(huanhuan_path) -> list[dict]:
    return json.loads(huanhuan_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def enc(qwen_tiktoken):
    import tiktoken

    from chatft.model.qwen_tokenizer import QWEN_PATTERN, SPECIAL_TOKENS, read_ranks

    ranks = read_ranks(qwen_tiktoken)
    return tiktoken.Encoding("qwen-ref", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})


@pytest.fixture(scope="module")
def prepared(huanhuan_path, qwen_tokenizer, tmp_path_factory):
    """Prepared exactly as `chatft data prepare huanhuan.json --system ...` does by default."""
    cfg = load_config(None, ["--data", str(huanhuan_path), "--system", HUANHUAN_SYSTEM])
    opts = DataOptions.from_config(cfg.data)
    assert opts.max_length == DataArgs().max_length and opts.overlong == "drop"
    ds, _, cached = prepare(cfg.data.path, qwen_tokenizer, opts,
                            str(tmp_path_factory.mktemp("huanhuan-cache")))
    assert not cached
    return ds


def chatml(rec: dict) -> str:
    user = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
    return (f"<|im_start|>system\n{HUANHUAN_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{rec['output']}<|im_end|>\n")


def test_every_record_is_kept(prepared, records):
    assert len(records) == 3729
    s = prepared.summary
    assert (s.records, s.kept, s.truncated, s.dropped) == (3729, 3729, 0, {})
    assert prepared.record_index.tolist() == list(range(3729))
    assert s.lines()[1] == "samples:   3729 read, 3729 kept, 0 dropped (none), 0 truncated"


def test_every_label_span_is_the_output_and_im_end(prepared, records, enc):
    for i, rec in enumerate(records):
        ids, mask = prepared.sample(i)
        trained_at = np.flatnonzero(mask)
        # one contiguous span, ending on <|im_end|>, followed by the final newline only
        assert trained_at[-1] - trained_at[0] + 1 == len(trained_at), i
        assert trained_at[-1] == len(ids) - 2 and ids[trained_at[-1]] == 151645, i
        assert enc.decode(ids[mask].tolist()) == rec["output"] + "<|im_end|>", i


def test_totals_ids_and_length_stats_are_exact(prepared, records, enc):
    """Qwen's own tokenizer feeds tiktoken the NFC form of the text, so the reference does."""
    expected = [enc.encode(unicodedata.normalize("NFC", chatml(r)), allowed_special="all")
                for r in records]
    lengths = sorted(len(e) for e in expected)
    trained = sum(len(enc.encode(unicodedata.normalize("NFC", r["output"]))) + 1 for r in records)
    s = prepared.summary
    assert s.tokens == sum(lengths) == len(prepared.input_ids)
    assert s.trained_tokens == trained == int(prepared.loss_mask.sum())
    assert 0.25 < s.trained_fraction < 0.4  # mostly prompt: system + question + scaffolding
    for i, e in enumerate(expected):
        assert prepared.sample(i)[0].tolist() == e, i
    # nearest-rank percentiles over 3,729 sorted lengths: p50 at index 1864, p95 at 3542
    assert (s.length_min, s.length_p50, s.length_p95, s.length_max) == (
        lengths[0], lengths[1864], lengths[3542], lengths[-1])
    assert s.length_mean == pytest.approx(sum(lengths) / 3729)
    assert s.lines()[2] == (f"tokens:    {sum(lengths):,} total, {trained:,} trained "
                            f"({100 * trained / sum(lengths):.1f}%)")
