"""The optimizer step in backward, and optimizer states in host memory, on the tiny Qwen2 of
tests/train/lean_helpers.py (CPU: the host-state code runs with CPU copies)."""

from __future__ import annotations

import pytest
import torch

from tests.train.lean_helpers import make_engine, train_steps, weights

STEPS = range(5)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_8bit"])
def test_in_backward_gives_the_same_weights_as_the_ordinary_step(optim):
    """fp32: each parameter's update in its gradient hook equals the step after backward."""
    ordinary = make_engine("fp32", 1e-3, optim=optim)
    fused = make_engine("fp32", 1e-3, optim=optim, optimizer_in_bwd=True)
    a = train_steps(ordinary, STEPS, 1e-3)
    b = train_steps(fused, STEPS, 1e-3)
    assert a == b and a[-1] < a[0]
    wa, wb = weights(ordinary), weights(fused)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_in_backward_frees_each_gradient_and_logs_the_global_norm():
    from tests.train.lean_helpers import batches

    norms, alive = [], []
    for engine in (make_engine("fp32", 1e-3), make_engine("fp32", 1e-3, optimizer_in_bwd=True)):
        params = [p for g in engine.optimizer.param_groups for p in g["params"]]
        seen: list[int] = []  # gradients alive after each parameter's gradient is complete
        for p in params:  # registered after chatft's hook, so they run after it
            p.register_post_accumulate_grad_hook(
                lambda p, params=params, seen=seen: seen.append(sum(q.grad is not None for q in params)))
        engine.begin_step(1e-3)
        loss, n = engine.forward(batches()[0])
        engine.backward(loss / n, True)
        alive.append(max(seen))
        norms.append(engine.step(1e-3))
        assert len(seen) == len(params)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and norms[0] > 0
    # the ordinary step ends backward with every gradient; in backward, each is freed at once
    assert alive == [len(params), 0]


@pytest.mark.parametrize("precision, options", [
    ("bf16", dict(optim="adamw_torch_8bit", master_weights="none")),
    ("fp32", dict(optim="adamw_torch")),
])
def test_host_states_give_the_same_weights_as_device_states(precision, options):
    device = make_engine(precision, 1e-3, optimizer_in_bwd=True, **options)
    host = make_engine(precision, 1e-3, optimizer_in_bwd=True, optimizer_states="host", **options)
    assert train_steps(device, STEPS, 1e-3) == train_steps(host, STEPS, 1e-3)
    wd, wh = weights(device), weights(host)
    assert all(torch.equal(wd[k], wh[k]) for k in wd)
    states = host.optimizer.host
    # every moment went through the host copies: to the "device" and back once per step
    # after the first (which creates them)
    moments = states.host_bytes
    assert moments > 0 and states.moved_bytes == (2 * len(STEPS) - 1) * moments


CHOICES = {
    "bf16-masters": ("bf16", {}),  # the default optimizer of bf16 runs
    "8bit": ("fp32", dict(optim="adamw_torch_8bit")),
    "4bit-masters": ("bf16", dict(optim="adamw_torch_4bit")),
    "bf16-sr": ("bf16", dict(master_weights="none")),
    "in-bwd": ("fp32", dict(optimizer_in_bwd=True)),
    "8bit-sr-in-bwd-host": ("bf16", dict(optim="adamw_torch_8bit", master_weights="none",
                                         optimizer_in_bwd=True, optimizer_states="host")),
}


@pytest.mark.parametrize("name", list(CHOICES))
def test_saved_engine_state_resumes_the_identical_run(name, tmp_path):
    """2 steps, save, a fresh engine loads, 2 more steps == 4 uninterrupted steps, bit for
    bit: the quantized moments, the per-parameter optimizers and the host copies round-trip,
    and the learning rate (decaying here) reaches the loaded optimizers."""
    precision, options = CHOICES[name]
    straight = make_engine(precision, 1e-3, **options)
    expected = train_steps(straight, range(5), 1e-3, decay=0.2)
    first = make_engine(precision, 1e-3, **options)
    train_steps(first, range(2), 1e-3, decay=0.2)
    first.save(tmp_path, {"step": 2})
    resumed = make_engine(precision, 1e-3, **options)
    assert resumed.load(tmp_path) == {"step": 2}
    assert train_steps(resumed, range(2, 5), 1e-3, decay=0.2) == expected[2:]
    ws, wr = weights(straight), weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
