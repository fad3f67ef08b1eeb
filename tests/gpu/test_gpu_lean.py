"""GPU tests of the memory-lean optimizers (``pytest -m gpu``): torchao's update compiled by
triton, and optimizer moments moved between pinned host memory and the GPU on a side stream."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _engine(precision: str, **train):
    from tests.train.lean_helpers import make_engine

    return make_engine(precision, 1e-3, device="cuda", **train)


def _train(engine, steps: int) -> list[float]:
    from tests.train.lean_helpers import train_steps

    return train_steps(engine, range(steps), 1e-3)


@pytest.mark.parametrize("precision, options", [
    ("fp32", dict(optim="adamw_torch_8bit")),
    ("bf16", dict(optim="adamw_torch_8bit", master_weights="none")),
])
def test_host_moments_on_a_side_stream_equal_device_moments(precision, options):
    device = _engine(precision, optimizer_in_bwd=True, **options)
    host = _engine(precision, optimizer_in_bwd=True, optimizer_states="host", **options)
    assert _train(device, 5) == _train(host, 5)
    for (k, a), b in zip(device.model.state_dict().items(), host.model.state_dict().values()):
        assert torch.equal(a, b), k
    states = host.optimizer.host
    slabs = [s for per_dtype in states.arena.slabs.values() for s in per_dtype]
    assert slabs and all(s.is_pinned() for s in slabs)
    # between steps every moment of the host run is in pinned host memory; the device run's
    # are on the GPU
    for engine, where in ((host, "cpu"), (device, "cuda")):
        for p, optimizer in engine.optimizer.optimizers.items():
            moments = [v for v in optimizer.state[p].values() if v.shape == p.shape]
            assert len(moments) == 2 and all(m.device.type == where for m in moments)


def test_in_backward_8bit_matches_the_ordinary_8bit_step_on_cuda():
    ordinary = _engine("fp32", optim="adamw_torch_8bit")
    fused = _engine("fp32", optim="adamw_torch_8bit", optimizer_in_bwd=True)
    assert _train(ordinary, 4) == _train(fused, 4)


@pytest.mark.parametrize("precision, options", [
    ("bf16", dict(optim="adamw_torch_8bit", master_weights="none")),
    ("fp32", dict(optim="adamw_torch_4bit")),
])
def test_host_moments_in_pinned_slabs_checkpoint_and_resume_bit_for_bit(precision, options, tmp_path):
    """On CUDA the host moments are views of pinned slabs (uint8 codes, fp32 scales): the
    checkpoint must save them and a fresh engine must continue the run exactly."""
    from tests.train.lean_helpers import train_steps, weights

    options = dict(options, optimizer_in_bwd=True, optimizer_states="host")
    straight = _engine(precision, **options)
    expected = train_steps(straight, range(5), 1e-3, decay=0.2)
    first = _engine(precision, **options)
    train_steps(first, range(2), 1e-3, decay=0.2)
    first.save(tmp_path, {"step": 2})
    resumed = _engine(precision, **options)
    assert resumed.load(tmp_path) == {"step": 2}
    assert train_steps(resumed, range(2, 5), 1e-3, decay=0.2) == expected[2:]
    ws, wr = weights(straight), weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
