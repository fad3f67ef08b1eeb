"""The loss: chunked linear cross-entropy, trained-positions-only, and packed == unpacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatft.train.batching import pack, pad
from chatft.train.loss import CausalLMLoss, chunked_linear_cross_entropy


def tiny_model(attn="sdpa", vocab=97, tie=False, hidden=32, heads=4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      tie_word_embeddings=tie, max_position_embeddings=256)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.train()


def samples(n=5, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 20))
        ids = rng.integers(0, vocab, length)
        mask = np.zeros(length, bool)
        mask[length // 2:] = True  # the "assistant" half is trained
        out.append((ids, mask))
    return out


def test_chunked_cross_entropy_equals_full_logits_in_value_and_gradient():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(head(h), t, reduction="sum")
    ref.backward()
    g_ref, w_ref = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    got = chunked_linear_cross_entropy(head, h, t, chunk_size=8)  # 5 chunks, the last short
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, g_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, w_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_loss_sum_equals_transformers_loss_times_targets(tie):
    model = tiny_model(tie=tie)
    batch = pad(samples(3))
    loss_sum, n = CausalLMLoss(model)(batch.input_ids, batch.position_ids, batch.targets,
                                      batch.attention_mask)
    # transformers shifts labels itself: give it unshifted labels (the targets moved right by one)
    labels = torch.full_like(batch.targets, -100)
    labels[:, 1:] = batch.targets[:, :-1]
    hf = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
               use_cache=False).loss
    assert int(n) == int((batch.targets != -100).sum())
    torch.testing.assert_close(loss_sum / n, hf, rtol=1e-5, atol=1e-6)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(attn):
    """Padding-free packing (block-diagonal attention from position_ids) computes exactly what
    separate padded rows compute: same loss sum, same gradients (fp32)."""
    model = tiny_model(attn)
    wrapper = CausalLMLoss(model)
    data = samples(5)
    padded = pad(data)
    loss_pad, n_pad = wrapper(padded.input_ids, padded.position_ids, padded.targets,
                              padded.attention_mask)
    loss_pad.backward()
    g_pad = _grads(model)
    model.zero_grad(set_to_none=True)
    packed = pack(data)
    assert packed.input_ids.shape[0] == 1 and packed.tokens == padded.tokens
    loss_pack, n_pack = wrapper(packed.input_ids, packed.position_ids, packed.targets, None)
    loss_pack.backward()
    g_pack = _grads(model)
    assert int(n_pack) == int(n_pad)
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-5, atol=1e-5)
    assert g_pack.keys() == g_pad.keys()
    for k in g_pad:
        torch.testing.assert_close(g_pack[k], g_pad[k], rtol=1e-4, atol=1e-6, msg=k)


def test_packing_without_block_diagonal_attention_would_differ():
    """Control for the test above: the same row with positions 0..T-1 (one long sequence,
    samples attending to each other) gives a different loss, so the equality is not vacuous."""
    model = tiny_model()
    wrapper = CausalLMLoss(model)
    data = samples(5)
    packed = pack(data)
    loss_pack, _ = wrapper(packed.input_ids, packed.position_ids, packed.targets, None)
    flat_pos = torch.arange(packed.input_ids.shape[1])[None]
    loss_flat, _ = wrapper(packed.input_ids, flat_pos, packed.targets, None)
    assert abs(float(loss_pack) - float(loss_flat)) > 1e-3


def test_micro_batch_without_targets_gives_zero_loss_and_zero_gradients():
    model = tiny_model()
    ids, mask = np.arange(6), np.zeros(6, bool)
    batch = pack([(ids, mask)])
    loss, n = CausalLMLoss(model)(batch.input_ids, batch.position_ids, batch.targets, None)
    loss.backward()
    assert int(n) == 0 and float(loss) == 0.0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads)


def test_varlen_attention_equals_sdpa_on_packed_rows():
    """The varlen path (FlashAttention on CUDA, per-sample SDPA elsewhere) sees the sample
    boundaries through cu_seqlens and computes what mask-based SDPA computes."""
    from chatft.model.attention import register

    register()
    data = samples(4)
    packed = pack(data)
    results = {}
    for attn in ("sdpa", "varlen"):
        model = tiny_model(attn)
        loss, _ = CausalLMLoss(model)(packed.input_ids, packed.position_ids, packed.targets, None)
        loss.backward()
        results[attn] = (loss.detach(), _grads(model))
    torch.testing.assert_close(results["varlen"][0], results["sdpa"][0], rtol=1e-5, atol=1e-5)
    for k, g in results["sdpa"][1].items():
        torch.testing.assert_close(results["varlen"][1][k], g, rtol=1e-4, atol=1e-6, msg=k)
