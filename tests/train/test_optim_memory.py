"""Memory arithmetic of the optimizer choices, checked by hand on Qwen2-7B."""

from __future__ import annotations

from chatft.train.optim_memory import (GIB, OptimizerChoice, first_fit_slabs, is_quantized,
                                       moment_bytes, optimizer_memory, pinned_block)

H, I, V, KV = 3584, 18944, 152064, 512  # Qwen2-7B: hidden, MLP, vocabulary, k/v width


def qwen2_7b_gradient_order() -> list[int]:
    """Element counts of Qwen2-7B's tensors in about the order backward finishes them:
    lm_head, the final norm, each layer from the last (MLP, norms, attention), embeddings."""
    layer = [H * I, I * H, I * H, H,  # down, up, gate, post-attention norm
             H * H, KV * H, KV, KV * H, KV, H * H, H, H]  # o, v (+bias), k (+bias), q (+bias), norm
    return [V * H, H] + layer * 28 + [V * H]


def test_qwen2_7b_has_7_6_billion_parameters():
    # per layer: 2 x 3584^2 (q, o) + 2 x 512 x 3584 (k, v) + 3 x 18944 x 3584 (MLP)
    #            + 3584 + 2 x 512 (biases) + 2 x 3584 (norms) = 233,057,792
    assert sum(qwen2_7b_gradient_order()) == 28 * 233_057_792 + 2 * 544_997_376 + 3584
    assert sum(qwen2_7b_gradient_order()) == 7_615_616_512


def test_moment_bytes_by_hand():
    q = H * H  # 12,845,056 = 50,176 blocks of 256 = 100,352 of 128
    assert is_quantized(q, "adamw_torch_8bit") and not is_quantized(H, "adamw_torch_8bit")
    assert not is_quantized(4096 + 128, "adamw_torch_8bit") and is_quantized(4096 + 128, "adamw_torch_4bit")
    # two moments of (uint8 codes + fp32 scale per 256 + 256-entry fp32 map)
    assert moment_bytes(q, "adamw_torch_8bit") == 2 * (12_845_056 + 4 * 50_176 + 1024)
    # two moments of (packed 4-bit codes + fp32 scale per 128 + 16-entry fp32 map)
    assert moment_bytes(q, "adamw_torch_4bit") == 2 * (6_422_528 + 4 * 100_352 + 64)
    assert moment_bytes(q, "adamw_torch") == 8 * 12_845_056
    assert moment_bytes(H, "adamw_torch_8bit") == 8 * 3584  # too small: fp32 moments


def test_lean_24gib_setting_for_qwen2_7b_by_hand():
    """bf16 weights, no masters, 8-bit moments on the host, update in backward."""
    c = OptimizerChoice("bf16", "adamw_torch_8bit", "none", True, "host")
    m = optimizer_memory(qwen2_7b_gradient_order(), c)
    # Not quantized: biases (3584 + 512 + 512) and norms (2 x 3584) per layer, the final norm.
    plain = 28 * 11_776 + 3584
    quantized = 7_615_616_512 - plain  # in 28 x 7 + 2 = 198 tensors
    assert m.moments == 2 * quantized + 2 * 4 * quantized // 256 + 198 * 2 * 1024 + 8 * plain
    assert m.moments == 15_471_616_000  # 14.41 GiB
    assert m.device == m.weights == 2 * 7_615_616_512  # 14.18 GiB: only the bf16 weights
    assert m.gradients == m.masters == 0 and m.host == m.moments
    assert m.transfer_per_step == 2 * 15_471_616_000  # every moment to the GPU and back
    # In flight at most: lm_head, the final norm and the last down projection (3 = 2 queued
    # + 1 being hooked), each with its bf16 gradient and GPU copy of its moments, plus the
    # update's work space for lm_head (8 bytes per element).
    lm_head = 2 * 544_997_376 + 2 * (544_997_376 + 4 * 2_128_896 + 1024)
    norm = 2 * 3584 + 8 * 3584
    down = 2 * 67_895_296 + 2 * (67_895_296 + 4 * 265_216 + 1024)
    assert m.transient_device == lm_head + norm + down + 8 * 544_997_376
    # 1 GiB slabs, first fit, one set per dtype (uint8 codes: 15 slabs; fp32 scales and
    # maps, 0.23 GB: one): each set ends in a partly filled slab
    assert m.moments <= m.host_reserved <= m.moments + 2 * GIB
    assert m.host_reserved == 16 * GIB


def test_ordinary_and_device_choices_by_hand():
    numels = [1000, 5000, 4096 * 4]  # gradient order
    total = sum(numels)
    default = optimizer_memory(numels, OptimizerChoice("bf16"))
    # bf16 weights + bf16 grads + fp32 masters + fp32 moments; one master chunk of fp32 grads
    assert default.device == 2 * total + 2 * total + 4 * total + 8 * total
    assert default.transient_device == 4 * total and default.host == 0
    sr = optimizer_memory(numels, OptimizerChoice("bf16", master_weights="none"))
    assert sr.device == 2 * total + 2 * total + 8 * total and sr.transient_device == 0
    in_bwd = optimizer_memory(numels, OptimizerChoice("fp32", optimizer_in_bwd=True))
    assert in_bwd.device == 4 * total + 8 * total  # no gradients kept
    assert in_bwd.transient_device == 4 * 4096 * 4  # the largest gradient, updated at once
    four = optimizer_memory(numels, OptimizerChoice("fp32", "adamw_torch_4bit"))
    assert four.moments == 8 * 1000 + 8 * 5000 + 2 * (8192 + 4 * 128 + 64)  # 5000 % 128 != 0
    assert four.transient_device == 25 * 16384


def test_first_fit_slabs_by_hand():
    # 600 opens slab 0; 500 does not fit after it and opens slab 1; 300 fits slab 0 at 600;
    # 1200 is larger than a slab (its own pinned block of 2048); 90 fits slab 0 at 904
    # (900 rounded up to the alignment of 8).
    assert first_fit_slabs([(n, "uint8") for n in (600, 500, 300, 1200, 90)], slab_bytes=1000,
                           align=8) == ([994, 500], 2048)
    assert pinned_block(1200) == 2048 and pinned_block(1024) == 1024 and pinned_block(1) == 1
    # one slab set per dtype: 600 uint8 opens a uint8 slab, 300 fp32 an fp32 one, 500 uint8
    # does not fit after 600 and opens a second uint8 slab, 200 fp32 fits at 304
    parts = [(600, "uint8"), (300, "float32"), (500, "uint8"), (200, "float32")]
    assert first_fit_slabs(parts, slab_bytes=1000, align=8) == ([600, 500, 504], 0)
