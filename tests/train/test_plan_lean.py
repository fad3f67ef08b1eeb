"""The memory planner's lean optimizer choices (8-/4-bit AdamW, bf16 weights without masters,
the step in backward, moments in host memory): their arithmetic by hand for Qwen2-7B, the
ranking, what ``--plan auto`` sets, and ``chatft plan`` finding the 24 GiB plans."""

from __future__ import annotations

import json
from dataclasses import replace

from chatft.config import Config
from chatft.train.plan.apply import apply_strategy, current_strategy
from chatft.train.plan.cost import (GIB, Job, Strategy, activation_peak_bytes,
                                    backward_workspace_bytes, estimate, head_activation_bytes,
                                    loss_bytes)
from chatft.train.plan.report import LEAN_STRATEGIES, base_strategies, make_plan
from chatft.train.plan.shape import ModelShape
from tests.train.conftest import QWEN2_7B
from tests.train.test_optim_memory import qwen2_7b_gradient_order
from tests.train.test_plan_apply import _chatft

SEVEN_B = ModelShape.from_config(QWEN2_7B)
P, V, H, L = 7_615_616_512, 152_064, 3_584, 28
LEAN_HOST = Strategy("torch", checkpoint_layers=L, optim="adamw_torch_8bit", master_weights="none",
                     optimizer_in_bwd=True, optimizer_states="host")
#: 8-bit moments, lm_head + final norm + last down projection in flight with their bf16
#: gradients and GPU copies of their moments, and 8 bytes per lm_head element of update work
#: space (the numbers of tests/train/test_optim_memory.py's 24 GiB setting)
IN_FLIGHT = (2 * 544_997_376 + 2 * (544_997_376 + 4 * 2_128_896 + 1024)
             + 2 * 3584 + 8 * 3584
             + 2 * 67_895_296 + 2 * (67_895_296 + 4 * 265_216 + 1024)
             + 8 * 544_997_376)


def test_gradient_order_is_backwards_over_the_tensors():
    assert SEVEN_B.gradient_order() == qwen2_7b_gradient_order()
    assert sum(SEVEN_B.gradient_order()) == SEVEN_B.n_params == P
    tied = ModelShape(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, vocab_size=32, tie_word_embeddings=True, qk_norm=True)
    order = tied.gradient_order()
    # no lm_head of its own: the final norm first, the (tied) embedding last; q/k norms (hd 4)
    # between o and v in each layer
    layer = [8 * 16, 16 * 8, 16 * 8, 8, 8 * 8, 4, 4, 4 * 8, 4 * 8, 8 * 8, 8]
    assert order == [8] + layer * 2 + [32 * 8]
    assert sum(order) == tied.n_params


def test_lean_24gib_setting_on_qwen2_7b_by_hand():
    """bf16 weights on the GPU, 8-bit moments in host memory, the step in backward, every
    layer recomputed, chatft's chunked loss, 2,752 tokens (huanhuan's largest micro-batch of
    32 samples)."""
    T = 2752
    job = Job(model=SEVEN_B, tokens=T, attention="varlen", loss="chunked")
    e = estimate(job, LEAN_HOST)
    # The loss: 12 bytes x 2048 rows x V (the chunk's fp32 log-probs, their and the logits'
    # gradients) beats 6 x 2048 x V + a later chunk's bf16 lm_head gradient
    loss = 12 * 2048 * V
    assert loss == loss_bytes(job, True) == 3_737_124_864
    work = T * 2 * (3 * 18_944 + 2 * H)  # one layer's backward intermediates
    assert work == backward_workspace_bytes(job) == 352_256_000
    # Backward start: the 28 recomputed layers' inputs, the head's activations (fp32 norm
    # input, normalized, output, rstd, and the gathered hidden states), then the larger of the
    # loss and the last layer's work space with lm_head's update in flight beside it.
    saved = L * T * 2 * H + T * ((4 + 2 * 2) * H + 4 + 2 * H)
    assert head_activation_bytes(job) == T * ((4 + 2 * 2) * H + 4 + 2 * H)
    assert activation_peak_bytes(job, L, True) == (saved + loss, "backward start")
    assert activation_peak_bytes(job, L, True, IN_FLIGHT) == (saved + work + IN_FLIGHT, "backward start")
    assert e.gpu_parts == {"bf16 weights": 2 * P,
                           "updates in flight": work + IN_FLIGHT - loss,  # 3.21 GiB
                           "activations": int((saved + loss) * 0.993), "fixed": 0}
    assert e.gpu_phase == "forward/backward (backward start)"
    assert round(e.gpu_bytes / GIB, 2) == 21.45  # + 0.75 context: within 95% of 24 GiB
    # Host: the process, the moments' pinned one-GiB slabs (15 of uint8 codes, one of fp32
    # scales and maps), and the bf16 export copy
    assert e.host_parts == {"processes": int(1.904 * GIB), "offloaded states": 16 * GIB,
                            "gathered weights": 2 * P}
    assert e.host_pinned_bytes == 16 * GIB
    # Speed: 6 P T FLOPs (lm_head's and the layers' matmuls; embeddings are a lookup) plus one
    # more forward of every layer (2 x 233M x T each), at 400 TFLOP/s; the moments' round trip
    # (2 x 15.47 GB at 25 GB/s = 1.24 s) overlaps the backward pass (4 P T + the recompute)
    # and adds what is longer than it.
    matmul, layer = P - V * H, 233_057_792
    compute = T * (6 * matmul + 2 * layer * L) / 400e12
    backward = T * (4 * matmul + 2 * layer * L) / 400e12
    assert abs(e.step_seconds - (compute + 2 * 15_471_616_000 / 25e9 - backward)) < 1e-9
    assert abs(e.tokens_per_second - T / e.step_seconds) < 1e-6


def test_8bit_ordinary_step_and_device_moments_by_hand():
    """8-bit moments on the GPU, no masters, the ordinary step: weights and gradients in bf16,
    the moments, and at the step torchao's work space for the largest tensor."""
    job = Job(model=SEVEN_B, tokens=2048, attention="flash_attention_2", fused_kernels=True,
              loss="fused")
    s = Strategy("torch", checkpoint_layers=L, optim="adamw_torch_8bit", master_weights="none")
    moments = 15_471_616_000  # test_optim_memory: 8-bit moments of Qwen2-7B
    e = estimate(job, s)
    resident = {"bf16 weights": 2 * P, "bf16 grads": 2 * P, "Adam moments": moments}
    step = {**resident, "update work space": 8 * 544_997_376, "fixed": 0}
    assert e.gpu_phase == "optimizer step" and e.gpu_parts == step
    assert e.host_pinned_bytes == 0
    # one micro-batch: Liger's lm_head gradient is the whole gradient counted among the states
    act, _ = activation_peak_bytes(job, L, False)
    assert sum(step.values()) > sum(resident.values()) + int(act * 0.993)


def test_lean_choices_offered_only_where_they_run():
    one = Job(model=SEVEN_B, tokens=2048)
    assert set(LEAN_STRATEGIES) <= set(base_strategies(one))
    assert all(not s.lean_options for s in base_strategies(replace(one, gpus=4)))  # no ZeRO + lean
    assert all(not s.lean_options for s in base_strategies(replace(one, precision="fp32")))
    accumulating = base_strategies(replace(one, micro_batches=2))
    assert any(s.lean_options for s in accumulating)
    assert not any(s.optimizer_in_bwd for s in accumulating)  # the step must be one micro-batch
    # the options that select it: no clipping by the global norm in backward
    opts = LEAN_HOST.options(L)
    i = opts.index("--optim")
    assert opts[i:i + 10] == ["--optim", "adamw_torch_8bit", "--master_weights", "none",
                              "--optimizer_in_bwd", "true", "--optimizer_states", "host",
                              "--max_grad_norm", "0"]
    assert "--optim" not in Strategy("torch").options(L)  # the default adds nothing


def test_fp32_adamw_wins_wherever_it_fits():
    """Lean rows are in the table, but a fitting fp32-AdamW strategy is recommended even when a
    lean one is faster (one H200, 8,192 tokens: 8-bit moments fit without recomputation)."""
    small = ModelShape(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, vocab_size=151_936, tie_word_embeddings=True,
                       qkv_bias=True, model_type="qwen2")
    plan = make_plan(Job(model=small, tokens=2048), 80 * GIB, 256 * GIB)
    assert plan.recommended.strategy == Strategy("torch")
    assert any(r.strategy.lean_options and r.fits and r.relative_speed == 1.0 for r in plan.rows)
    plan = make_plan(Job(model=SEVEN_B, tokens=8192), 141 * GIB, 128 * GIB)
    faster = plan.row(Strategy("torch", optim="adamw_torch_8bit"))
    assert faster.fits and faster.relative_speed > plan.recommended.relative_speed
    assert not plan.recommended.strategy.lean_options and plan.recommended.strategy.checkpoint_layers > 0


def test_apply_sets_the_lean_options_and_zero_resets_them():
    cfg = Config()
    changes = apply_strategy(cfg, LEAN_HOST, L)
    t = cfg.train
    assert (t.optim, t.master_weights, t.optimizer_in_bwd, t.optimizer_states, t.max_grad_norm) == \
        ("adamw_torch_8bit", "none", True, "host", 0.0)
    assert "optimizer_in_bwd False -> True" in changes and "max_grad_norm 1.0 -> 0.0" in changes
    cfg.validate()
    assert current_strategy(cfg, L) == LEAN_HOST
    apply_strategy(cfg, Strategy("deepspeed", 3, offload_optimizer=True), L)
    assert (t.optim, t.master_weights, t.optimizer_in_bwd, t.optimizer_states) == \
        ("adamw_torch", "fp32", False, "device")
    cfg.launch.nproc = 4
    cfg.validate()  # ZeRO with no lean option left: a valid config


def test_cli_plan_finds_the_24gib_plans(tmp_path):
    """The tutorial's config on Qwen2-7B's config.json alone, at huanhuan's largest micro-batch
    (2,752 tokens of 32 samples on one GPU, 2,496 per GPU on four)."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    common = ["plan", "configs/huanhuan_qwen7b_zero2_offload.yaml", "--model", tmp_path,
              "--gpu-mem", "24GiB", "--json"]
    one = json.loads(_chatft(*common, "--gpus", "1", "--cpu-mem", "64GiB", "--tokens", "2752").stdout)
    rec = one["recommended"]
    assert rec["fits"] and rec["strategy"]["optimizer_states"] == "host"
    assert rec["strategy"]["optim"] == "adamw_torch_8bit" and rec["strategy"]["optimizer_in_bwd"]
    assert rec["gpu_device_gib"] <= 0.95 * 24 and rec["host_gib"] <= 0.95 * 64
    four = json.loads(_chatft(*common, "--gpus", "4", "--cpu-mem", "128GiB", "--tokens", "2496").stdout)
    assert four["recommended"] is None  # every 4-GPU layout needs 150+ GiB host or 24+ GiB GPU
    fewer = four["fewer_gpus"]
    assert fewer["job"]["gpus"] == 1 and fewer["asked_gpus"] == 4
    assert fewer["recommended"]["strategy"]["optimizer_states"] == "host"
    assert fewer["recommendation"].startswith("uses 1 of 4 GPUs: no 4-GPU layout fits 24.0 GiB "
                                              "per GPU with 128.0 GiB host; the others stay idle.")
    # 128 samples (about 10k tokens) do not fit one GPU: it keeps 32 per step, and says so
    assert "--nproc 1 --per_device_train_batch_size 32 (a step trains 32 samples instead of 128" \
        in fewer["recommendation"]
    assert "estimated by the planner" in fewer["recommendation"]
