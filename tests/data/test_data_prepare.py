"""The data step: length policy, summary arithmetic, the on-disk cache, the eval split.

Samples use the real Qwen tokenizer with answers made of the word "yes": with system prompt
"S" and user turn "hi", a sample is 15 prompt tokens, m answer tokens ("yes", " yes", ...),
<|im_end|> and a final newline: 17 + m tokens, of which m + 1 are trained.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from chatft.data.prepare import (DataOptions, Summary, TokenizedDataset, apply_length_policy,
                                 cache_key, prepare, resolve_data_path, split_eval, tokenize_file)
from chatft.data.render import Rendered, chat_format
from chatft.errors import DataError, TemplateError

ANSWER_WORDS = [1, 2, 3, 4, 10]  # lengths 18, 19, 20, 21, 27; trained 2, 3, 4, 5, 11


def yes_records(words=ANSWER_WORDS) -> list[dict]:
    return [{"instruction": "hi", "output": " ".join(["yes"] * m)} for m in words]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def yes_file(tmp_path) -> Path:
    return write_json(tmp_path / "yes.json", yes_records())


OPTS = DataOptions(system="S")


# --------------------------------------------------------------------------- length policy


def _sample(n: int, trained_from: int, index: int = 0) -> Rendered:
    return Rendered(list(range(n)), [t >= trained_from for t in range(n)], index)


def test_length_policy_drop():
    summary = Summary("f", "alpaca")
    kept = apply_length_policy([_sample(5, 3), _sample(6, 3, 1), _sample(4, 1, 2)], 5, "drop", summary)
    assert [s.index for s in kept] == [0, 2]
    assert summary.dropped == {"too_long": 1} and summary.truncated == 0


def test_length_policy_truncate_and_no_trained_tokens():
    summary = Summary("f", "alpaca")
    samples = [_sample(8, 2, 0),   # cut to 5: tokens 2..4 still trained -> kept, truncated
               _sample(8, 6, 1),   # cut to 5: every trained token cut off -> dropped
               _sample(5, 4, 2),   # fits, one target
               Rendered([0, 1, 2], [True, False, False], 3)]  # token 0 is never a target -> dropped
    kept = apply_length_policy(samples, 5, "truncate", summary)
    assert [(s.index, len(s), sum(s.loss_mask)) for s in kept] == [(0, 5, 3), (2, 5, 1)]
    assert summary.truncated == 1  # the dropped sample 1 is not also counted as truncated
    assert summary.dropped == {"no_trained_tokens": 2}


# --------------------------------------------------------------------------- summary


def test_summary_arithmetic(qwen_tokenizer, yes_file):
    ds = tokenize_file(str(yes_file), chat_format(qwen_tokenizer), OPTS)
    assert ds.lengths.tolist() == [18, 19, 20, 21, 27]
    assert [int(ds.sample(i)[1].sum()) for i in range(len(ds))] == [2, 3, 4, 5, 11]
    s = ds.summary
    assert (s.records, s.kept, s.truncated, s.dropped) == (5, 5, 0, {})
    assert (s.tokens, s.trained_tokens) == (105, 25)
    assert (s.length_min, s.length_mean, s.length_p50, s.length_p95, s.length_max) == (
        18, 21.0, 20, 27, 27)
    assert s.lines() == [
        f"data:      {yes_file} (alpaca)",
        "samples:   5 read, 5 kept, 0 dropped (none), 0 truncated",
        "tokens:    105 total, 25 trained (23.8%)",
        "length:    min 18, mean 21.0, p50 20, p95 27, max 27",
    ]
    # flat storage: sample i is input_ids[offsets[i]:offsets[i+1]]
    assert ds.offsets.tolist() == [0, 18, 37, 57, 78, 105]
    assert ds.record_index.tolist() == [0, 1, 2, 3, 4]
    assert ds.input_ids.dtype == np.int32 and ds.loss_mask.dtype == bool


def test_summary_drop_overlong(qwen_tokenizer, yes_file):
    s = tokenize_file(str(yes_file), chat_format(qwen_tokenizer),
                      replace(OPTS, max_length=20)).summary
    assert (s.kept, s.dropped, s.truncated, s.tokens, s.trained_tokens) == (
        3, {"too_long": 2}, 0, 18 + 19 + 20, 2 + 3 + 4)
    assert s.lines()[1] == "samples:   5 read, 3 kept, 2 dropped (too_long 2), 0 truncated"


def test_summary_truncate_overlong(qwen_tokenizer, yes_file):
    ds = tokenize_file(str(yes_file), chat_format(qwen_tokenizer),
                       replace(OPTS, max_length=20, overlong="truncate"))
    s = ds.summary
    # 21 -> 20 loses only the final newline (5 trained stay); 27 -> 20 keeps 5 of 11 trained
    assert ds.lengths.tolist() == [18, 19, 20, 20, 20]
    assert (s.kept, s.dropped, s.truncated, s.tokens, s.trained_tokens) == (5, {}, 2, 97, 19)


def test_summary_counts_samples_left_without_trained_tokens(qwen_tokenizer, tmp_path):
    long_question = {"instruction": " ".join(["hi"] * 20), "output": "yes"}  # 37 tokens
    path = write_json(tmp_path / "d.json", yes_records([1, 2]) + [long_question])
    ds = tokenize_file(str(path), chat_format(qwen_tokenizer),
                       replace(OPTS, max_length=30, overlong="truncate"))
    s = ds.summary
    assert ds.record_index.tolist() == [0, 1]
    assert (s.records, s.kept, s.truncated, s.dropped) == (3, 2, 0, {"no_trained_tokens": 1})
    assert s.lines()[1] == "samples:   3 read, 2 kept, 1 dropped (no_trained_tokens 1), 0 truncated"


def test_summary_counts_bad_records(qwen_tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", yes_records([1]) + [{"instruction": "hi"}]
                      + yes_records([2]) + [{"instruction": "hi", "output": 3}])
    fmt = chat_format(qwen_tokenizer)
    with pytest.raises(DataError, match="record 1: field 'output': missing"):
        tokenize_file(str(path), fmt, OPTS)
    s = tokenize_file(str(path), fmt, replace(OPTS, skip_bad=True)).summary
    assert (s.records, s.kept, s.dropped) == (4, 2, {"bad_record": 2})
    assert s.lines()[1] == "samples:   4 read, 2 kept, 2 dropped (bad_record 2), 0 truncated"
    assert s.lines()[4:] == [f"skipped:   {path}: record 1: field 'output': missing",
                             f"skipped:   {path}: record 3: field 'output': expected a string, "
                             "got number"]


def test_records_the_template_cannot_train_exactly_are_skipped_and_counted(qwen_tokenizer,
                                                                          tmp_path):
    # An answer starting with a newline merges with the template's "assistant\n" into one
    # token, so its first token cannot be trained exactly: an error naming file and record,
    # or with --skip-bad a counted drop.
    path = write_json(tmp_path / "d.json", yes_records([1]) +
                      [{"instruction": "hi", "output": "\nnewline first"}] + yes_records([2]))
    fmt = chat_format(qwen_tokenizer)
    with pytest.raises(TemplateError) as e:
        tokenize_file(str(path), fmt, OPTS)
    assert str(e.value).startswith(f"{path}: record 1: token ")
    assert "straddles the edge of an assistant turn" in str(e.value)
    assert str(e.value).endswith("(--skip-bad leaves such records out and counts them)")
    ds = tokenize_file(str(path), fmt, replace(OPTS, skip_bad=True))
    s = ds.summary
    assert ds.record_index.tolist() == [0, 2]
    assert (s.records, s.kept, s.dropped) == (3, 2, {"template_mismatch": 1})
    assert s.lines()[1] == "samples:   3 read, 2 kept, 1 dropped (template_mismatch 1), 0 truncated"
    assert s.lines()[4].startswith(f"skipped:   {path}: record 1: token ")


def test_nothing_survives_is_an_error(qwen_tokenizer, yes_file):
    with pytest.raises(DataError) as e:
        tokenize_file(str(yes_file), chat_format(qwen_tokenizer), replace(OPTS, max_length=10))
    assert str(e.value) == (f"{yes_file}: no sample survived preparation ({{'too_long': 5}}); "
                            "raise max_length or use overlong truncate")


def test_train_on_all_and_last_in_the_summary(qwen_tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", yes_records([1, 2]))
    fmt = chat_format(qwen_tokenizer)
    s = tokenize_file(str(path), fmt, replace(OPTS, train_on="all")).summary
    assert (s.tokens, s.trained_tokens) == (18 + 19, 17 + 18)  # every token but each first
    s = tokenize_file(str(path), fmt, replace(OPTS, train_on="last")).summary
    assert (s.tokens, s.trained_tokens) == (37, 2 + 3)  # one assistant turn each: as "assistant"


# --------------------------------------------------------------------------- cache


def test_rerun_is_served_from_the_cache(qwen_tokenizer, yes_file, tmp_path):
    cache = str(tmp_path / "cache")
    first, folder, cached = prepare(str(yes_file), qwen_tokenizer, OPTS, cache)
    assert not cached and (folder / "data.npz").is_file() and folder.parent == Path(cache)
    again, folder2, cached2 = prepare(str(yes_file), qwen_tokenizer, OPTS, cache)
    assert cached2 and folder2 == folder
    for name in ("input_ids", "loss_mask", "offsets", "record_index"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert again.summary == first.summary


def _prepared(path, tokenizer, opts, cache) -> tuple[TokenizedDataset, Path, bool]:
    return prepare(str(path), tokenizer, opts, cache)


def test_edited_byte_is_never_served_stale(qwen_tokenizer, yes_file, tmp_path):
    cache = str(tmp_path / "cache")
    _, folder, _ = _prepared(yes_file, qwen_tokenizer, OPTS, cache)
    raw = yes_file.read_bytes()
    at = raw.index(b"yes")
    yes_file.write_bytes(raw[:at] + b"Yes" + raw[at + 3:])  # one byte differs
    ds, folder2, cached = _prepared(yes_file, qwen_tokenizer, OPTS, cache)
    assert not cached and folder2 != folder
    answer = ds.sample(0)[0][ds.sample(0)[1]]
    assert qwen_tokenizer.decode(answer) == "Yes<|im_end|>"


def test_changed_system_prompt_is_never_served_stale(qwen_tokenizer, yes_file, tmp_path):
    cache = str(tmp_path / "cache")
    a, folder, _ = _prepared(yes_file, qwen_tokenizer, OPTS, cache)
    b, folder2, cached = _prepared(yes_file, qwen_tokenizer, replace(OPTS, system="T"), cache)
    assert not cached and folder2 != folder
    assert "<|im_start|>system\nT<|im_end|>" in qwen_tokenizer.decode(b.sample(0)[0])
    assert "<|im_start|>system\nS<|im_end|>" in qwen_tokenizer.decode(a.sample(0)[0])


def test_changed_max_length_is_never_served_stale(qwen_tokenizer, yes_file, tmp_path):
    cache = str(tmp_path / "cache")
    a, folder, _ = _prepared(yes_file, qwen_tokenizer, OPTS, cache)
    b, folder2, cached = _prepared(yes_file, qwen_tokenizer, replace(OPTS, max_length=20), cache)
    assert not cached and folder2 != folder
    assert (len(a), len(b)) == (5, 3) and b.summary.dropped == {"too_long": 2}


def test_changed_template_is_never_served_stale(qwen_tokenizer, yes_file, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    opts = DataOptions()  # no system prompt: the template's default one is used
    a, folder, _ = _prepared(yes_file, qwen_tokenizer, opts, cache)
    template = qwen_tokenizer.chat_template.replace("You are a helpful assistant.", "Be terse.")
    monkeypatch.setattr(qwen_tokenizer, "chat_template", template)
    b, folder2, cached = _prepared(yes_file, qwen_tokenizer, opts, cache)
    assert not cached and folder2 != folder
    assert qwen_tokenizer.decode(b.sample(0)[0]).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    assert qwen_tokenizer.decode(a.sample(0)[0]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>")


def test_every_option_is_part_of_the_key(qwen_tokenizer, yes_file, monkeypatch):
    import chatft.data.prepare as prepare_module

    fingerprint = prepare_module.tokenizer_fingerprint(qwen_tokenizer)  # hashed once, not 8 times
    monkeypatch.setattr(prepare_module, "tokenizer_fingerprint", lambda tok: fingerprint)
    base = cache_key(str(yes_file), qwen_tokenizer, OPTS)
    changed = [replace(OPTS, format="alpaca"), replace(OPTS, system=None),
               replace(OPTS, train_on="last"), replace(OPTS, max_length=4097),
               replace(OPTS, overlong="truncate"), replace(OPTS, skip_bad=True),
               replace(OPTS, verify_labels=False)]
    keys = {cache_key(str(yes_file), qwen_tokenizer, o) for o in changed}
    assert base not in keys and len(keys) == len(changed)


def test_same_bytes_elsewhere_reuse_the_cache_under_their_own_name(qwen_tokenizer, yes_file,
                                                                  tmp_path):
    cache = str(tmp_path / "cache")
    _prepared(yes_file, qwen_tokenizer, OPTS, cache)
    copy = tmp_path / "copy.json"
    copy.write_bytes(yes_file.read_bytes())
    ds, _, cached = _prepared(copy, qwen_tokenizer, OPTS, cache)
    assert cached and ds.summary.file == str(copy)


def test_default_cache_root_follows_the_environment(qwen_tokenizer, yes_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFT_DATA_CACHE", str(tmp_path / "env-cache"))
    _, folder, _ = prepare(str(yes_file), qwen_tokenizer, OPTS)
    assert folder.parent == tmp_path / "env-cache"


def test_missing_data_file(qwen_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        prepare(str(tmp_path / "nope.json"), qwen_tokenizer, OPTS)
    with pytest.raises(DataError, match="builtin:nope: no built-in dataset named 'nope'"):
        resolve_data_path("builtin:nope")


def test_options_from_config():
    from chatft.config_parse import load_config

    cfg = load_config(None, ["--system", "S", "--max_length", "99", "--skip-bad", "--train_on",
                             "last", "--overlong", "truncate", "--verify_labels", "false"])
    assert DataOptions.from_config(cfg.data) == DataOptions(
        format="auto", system="S", train_on="last", max_length=99, overlong="truncate",
        skip_bad=True, verify_labels=False)


def test_option_defaults_match_the_config_defaults():
    from chatft.config import DataArgs

    assert DataOptions.from_config(DataArgs(path="data.json")) == DataOptions()


def test_options_are_the_tokenizing_fields_of_data_args():
    """DataOptions declares nothing of its own: its fields are DataArgs' (same types and
    defaults), and every DataArgs field is either one of them (in the cache key) or one that
    cannot change the tokens, so a new data option has to be put on one side."""
    from dataclasses import fields

    from chatft.config import DataArgs
    from chatft.data.prepare import TOKENIZING_FIELDS

    args = {f.name: f for f in fields(DataArgs)}
    assert [f.name for f in fields(DataOptions)] == list(TOKENIZING_FIELDS)
    for f in fields(DataOptions):
        assert (f.type, f.default) == (args[f.name].type, args[f.name].default), f.name
    assert set(args) - set(TOKENIZING_FIELDS) == {"path", "eval_ratio", "eval_file", "packing",
                                                  "cache_dir"}


# --------------------------------------------------------------------------- dataset


def _dataset(lengths: list[int], records: list[int]) -> TokenizedDataset:
    total = sum(lengths)
    return TokenizedDataset(np.arange(total, dtype=np.int32), np.arange(total) % 2 == 1,
                            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                            np.array(records, dtype=np.int64), Summary("f", "alpaca"))


def test_split_eval_holds_out_every_nth_record():
    ds = _dataset([2, 3, 1, 4, 2, 2, 3, 1], [0, 1, 2, 3, 4, 5, 6, 7])
    train, held = split_eval(ds, 0.25)  # n = 4: records 3 and 7
    assert held.record_index.tolist() == [3, 7]
    assert train.record_index.tolist() == [0, 1, 2, 4, 5, 6]
    assert held.lengths.tolist() == [4, 1]
    assert held.input_ids.tolist() == [6, 7, 8, 9, 17]
    assert held.loss_mask.tolist() == [False, True, False, True, True]
    assert train.lengths.sum() + held.lengths.sum() == ds.lengths.sum()
    assert split_eval(ds, 0.0) == (ds, None)


def test_split_eval_uses_record_indices_not_positions():
    ds = _dataset([1, 1, 1], [1, 3, 4])  # records 0 and 2 were dropped
    train, held = split_eval(ds, 0.5)   # n = 2: odd record indices
    assert held.record_index.tolist() == [1, 3] and train.record_index.tolist() == [4]


def test_save_load_round_trip(tmp_path):
    ds = _dataset([2, 3], [0, 5])
    ds.summary.dropped = {"too_long": 1}
    ds.save(tmp_path / "d")
    back = TokenizedDataset.load(tmp_path / "d")
    assert back.summary == ds.summary
    for name in ("input_ids", "loss_mask", "offsets", "record_index"):
        assert np.array_equal(getattr(back, name), getattr(ds, name))
        assert getattr(back, name).dtype == getattr(ds, name).dtype
