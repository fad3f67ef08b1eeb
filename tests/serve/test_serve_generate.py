"""Generation on the tiny export: loading, sampling, batched decoding with a KV cache."""

from __future__ import annotations

import pytest
import torch

from chatft.data.render import chat_format
from chatft.errors import ChatftError
from chatft.serve.batch import Event, SamplingParams, keep_top_k, penalize_repeats, sample_next
from chatft.serve.generate import load_chat_model, reply, stream_reply

from .conftest import CONTEXT, PERSONA

HI = [{"role": "user", "content": "Hello, who are you?"}]
PROMPTS = [[{"role": "user", "content": t}] for t in
           ("hi", "Tell me about the palace, the emperor and the consorts.", "你好", "a b c d")]


def test_load_reads_persona_stops_and_context(chat_model, qwen_tokenizer):
    assert chat_model.system_prompt == PERSONA
    ids = qwen_tokenizer.convert_tokens_to_ids
    assert chat_model.stop_ids == {ids("<|im_end|>"), ids("<|endoftext|>")}
    assert chat_model.max_context == CONTEXT
    assert chat_model.name.startswith("tiny-export")


def test_prompt_ids_are_the_training_format(chat_model, qwen_tokenizer):
    fmt = chat_format(qwen_tokenizer)
    system = [{"role": "system", "content": PERSONA}]
    assert chat_model.prompt_ids(HI) == fmt.prompt_ids(system + HI)
    own = [{"role": "system", "content": "Be a cat."}] + HI
    assert chat_model.prompt_ids(own) == fmt.prompt_ids(own)
    assert chat_model.prompt_ids(own, system="Be a dog.") == fmt.prompt_ids(
        [{"role": "system", "content": "Be a dog."}] + HI)


def test_not_a_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(ChatftError, match="does not exist"):
        load_chat_model(tmp_path / "missing")
    with pytest.raises(ChatftError, match="no config.json"):
        load_chat_model(tmp_path)


def _hf_greedy(cm, messages, n: int, **kw) -> list[int]:
    ids = torch.tensor([cm.prompt_ids(messages)])
    with torch.inference_mode():
        out = cm.model.generate(ids, max_new_tokens=n, do_sample=False,
                                eos_token_id=sorted(cm.stop_ids), pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(chat_model):
    for messages in PROMPTS:
        ref = _hf_greedy(chat_model, messages, 24)
        expected = chat_model.tokenizer.decode(ref, skip_special_tokens=True)
        got = reply(chat_model, messages, SamplingParams(max_new_tokens=24))
        assert got.text == expected
        assert got.completion_tokens == len(ref) and got.finish_reason == "length"
        assert got.prompt_tokens == len(chat_model.prompt_ids(messages))


def _collect(events: dict[int, list[Event]], i: int):
    return lambda ev: events.setdefault(i, []).append(ev)


def test_sequences_joining_and_leaving_a_running_batch_match_running_alone(chat_model):
    params = [SamplingParams(max_new_tokens=n) for n in (30, 5, 20, 12)]
    alone = [reply(chat_model, m, p).text for m, p in zip(PROMPTS, params)]
    events: dict[int, list[Event]] = {}
    seqs = [chat_model.sequence(chat_model.prompt_ids(m), p, _collect(events, i))
            for i, (m, p) in enumerate(zip(PROMPTS, params))]
    batch = chat_model.new_batch()
    batch.admit(seqs[:2])  # two prompts of different lengths: left padding
    batch.step()
    batch.step()
    batch.admit(seqs[2:3])  # joins a running batch
    for _ in range(6):
        batch.step()  # seq 1 (5 tokens) leaves here
    assert len(batch) == 2 and seqs[1].finish_reason == "length"
    batch.admit(seqs[3:])
    while len(batch):
        batch.step()
    assert batch.cache is None and batch.length == 0
    for i, text in enumerate(alone):
        assert "".join(e.text for e in events[i]) == text
        assert events[i][-1].finish_reason == "length"
        assert events[i][-1].completion_tokens == params[i].max_new_tokens


def test_cancelled_row_is_removed_and_padding_dropped(chat_model):
    events: dict[int, list[Event]] = {}
    long_prompt = [{"role": "user", "content": "word " * 200}]
    seqs = [chat_model.sequence(chat_model.prompt_ids(m), SamplingParams(max_new_tokens=50),
                                _collect(events, i)) for i, m in enumerate([long_prompt, HI])]
    batch = chat_model.new_batch()
    batch.admit(seqs)
    batch.step()
    wide = batch.length
    seqs[0].cancel()
    batch.step()
    assert len(batch) == 1 and events[0][-1].finish_reason == "cancelled"
    # Only the short row is left: its left padding is gone from the cache.
    assert batch.length == len(seqs[1].prompt_ids) + seqs[1].generated - 1 < wide
    assert int(batch.pad[0]) == 0
    while len(batch):
        batch.step()
    assert "".join(e.text for e in events[1]) == reply(
        chat_model, HI, SamplingParams(max_new_tokens=50)).text


def test_end_of_turn_token_stops_and_is_not_shown(chat_model):
    greedy = _hf_greedy(chat_model, HI, 10)
    # Declare the 6th greedy token an end-of-turn token: the answer must stop before it.
    events: list[Event] = []
    seq = chat_model.sequence(chat_model.prompt_ids(HI), SamplingParams(max_new_tokens=10),
                              events.append)
    seq.stop_ids = frozenset({greedy[5]}) if greedy[5] not in greedy[:5] else seq.stop_ids
    assert greedy[5] not in greedy[:5], "pick another position for this model"
    batch = chat_model.new_batch()
    batch.admit([seq])
    while len(batch):
        batch.step()
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 5
    assert "".join(e.text for e in events) == chat_model.tokenizer.decode(
        greedy[:5], skip_special_tokens=True)


def test_stop_string_ends_answer(chat_model):
    full = reply(chat_model, HI, SamplingParams(max_new_tokens=30)).text
    cut = full[len(full) // 2:len(full) // 2 + 3]
    got = reply(chat_model, HI, SamplingParams(max_new_tokens=30, stop=(cut,)))
    assert got.finish_reason == "stop"
    assert got.text == full[:full.index(cut)]


def test_seeded_sampling_is_reproducible_and_seed_dependent(chat_model):
    def sample(seed):
        return reply(chat_model, HI, SamplingParams(max_new_tokens=20, temperature=1.0,
                                                    seed=seed)).text
    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) == 3
    assert sample(7) != reply(chat_model, HI, SamplingParams(max_new_tokens=20)).text


def test_seeded_answer_does_not_depend_on_batch_neighbours(chat_model):
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1234)
    alone = reply(chat_model, HI, params).text
    events: dict[int, list[Event]] = {}
    others = [chat_model.sequence(chat_model.prompt_ids(m), SamplingParams(
        max_new_tokens=25, temperature=1.0), _collect(events, i)) for i, m in enumerate(PROMPTS)]
    mine = chat_model.sequence(chat_model.prompt_ids(HI), params, _collect(events, 99))
    batch = chat_model.new_batch()
    batch.admit(others[:2])
    batch.step()
    batch.admit([mine] + others[2:])
    while len(batch):
        batch.step()
    assert "".join(e.text for e in events[99]) == alone


def test_stream_reply_yields_text_as_it_is_generated(chat_model):
    events = list(stream_reply(chat_model, HI, SamplingParams(max_new_tokens=15)))
    assert len([e for e in events if e.text]) > 3
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 15


def test_prompt_longer_than_context_is_refused(chat_model):
    with pytest.raises(ChatftError, match="context"):
        chat_model.sequence(list(range(CONTEXT)), SamplingParams(), lambda ev: None)


def test_sample_next_greedy_and_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4))
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5])
    # Row 1: cdf 0.1 0.3 0.6 1.0; u = 0.35 -> token 2.  Row 2: u = 0.05 -> token 0.
    # Row 3: top-p 0.5 keeps {3 (0.4), 2 (0.3)}, renormalised 4/7, 3/7 in that order;
    # u = 0.6 -> token 2.  Rows 1 and 2 are unaffected by row 3's sort.
    uniform = torch.tensor([0.99, 0.35, 0.05, 0.6])
    assert sample_next(logits, temperature, top_p, uniform).tolist() == [3, 2, 0, 2]
    # top-p so small that only the most likely token survives.
    assert sample_next(logits[:1], torch.tensor([1.0]), torch.tensor([0.01]),
                       torch.tensor([0.999])).tolist() == [3]


def _reference_top_p(probs: torch.Tensor, top_p: float, u: float) -> int:
    """Nucleus sampling by full sort, one row, written the plain way."""
    p, ids = probs.sort(descending=True)
    keep, total = [], 0.0
    for value, i in zip(p.tolist(), ids.tolist()):
        keep.append((value, i))
        total += value
        if total >= top_p:
            break
    mass = sum(v for v, _ in keep)
    acc = 0.0
    for value, i in keep:
        acc += value
        if acc > u * mass:
            return i
    return keep[-1][1]


def test_top_p_with_large_vocabulary_matches_a_full_sort():
    """Peaked rows are served from the top-k candidates, flat rows fall back to sorting;
    both give the token a full sort gives."""
    g = torch.Generator().manual_seed(0)
    vocab = 40000
    flat = torch.randn(3, vocab, generator=g) * 0.1  # nucleus far beyond 16384 tokens
    peaked = torch.randn(3, vocab, generator=g) * 6.0  # nucleus of a few tokens
    mid = torch.randn(2, vocab, generator=g) * 2.0  # nucleus between the candidate sizes
    logits = torch.cat([flat, peaked, mid])
    n = logits.shape[0]
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.5, 0.99, 0.95, 0.8])
    uniform = torch.rand(n, generator=g)
    got = sample_next(logits, torch.ones(n), top_p, uniform).tolist()
    probs = torch.softmax(logits, dim=-1)
    assert got == [_reference_top_p(probs[r], float(top_p[r]), float(uniform[r]))
                   for r in range(n)]


def test_repetition_penalty_matches_transformers_generate(chat_model):
    changed = 0
    for messages in PROMPTS:
        ref = _hf_greedy(chat_model, messages, 24, repetition_penalty=1.3)
        got = reply(chat_model, messages, SamplingParams(max_new_tokens=24, repetition_penalty=1.3))
        assert got.text == chat_model.tokenizer.decode(ref, skip_special_tokens=True)
        changed += got.text != reply(chat_model, messages, SamplingParams(max_new_tokens=24)).text
    assert changed  # the penalty changed some answer: the comparison above is not vacuous


def test_top_k_one_is_greedy_whatever_the_temperature(chat_model):
    greedy = reply(chat_model, HI, SamplingParams(max_new_tokens=16)).text
    for seed in (1, 2, 3):
        params = SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=seed)
        assert reply(chat_model, HI, params).text == greedy


def test_logit_processors_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    # tokens 0 and 1 seen, penalty 2: 2.0 / 2 = 1.0, -1.0 * 2 = -2.0; the others unchanged
    assert penalize_repeats(logits, torch.tensor([0, 1]), 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # the input is left alone
    inf = float("-inf")
    assert keep_top_k(logits, 2).tolist() == [2.0, inf, inf, 3.0]
    assert keep_top_k(torch.tensor([1.0, 1.0, 0.0]), 1).tolist() == [1.0, 1.0, inf]  # ties kept
    assert keep_top_k(logits, 0).tolist() == logits.tolist()
    assert keep_top_k(logits, 9).tolist() == logits.tolist()
