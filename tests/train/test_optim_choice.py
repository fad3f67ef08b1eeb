"""Optimizer choices: config refusals, and low-bit / stochastically rounded updates tracking
AdamW over 50 steps of a tiny Qwen2 (tests/train/lean_helpers.py).

Tolerances, as a fraction of the reference run's loss drop over the 50 steps (lr 1e-3 with
fp32 weights: 6.27 -> 3.90), on every step's loss:

* 8-bit moments: 0.05. torchao's 8-bit map keeps about two significant digits of each moment
  relative to its block's largest, so each update's direction is off by a few percent; on
  this fast-moving problem that measured 0.023 of the drop at worst (CPU, torch 2.13).
* 4-bit moments: 0.2. Sixteen levels per block (a linear map without zero for the second
  moment) perturb the update more: measured 0.12.
* bf16 weights without masters (stochastic rounding) against bf16 weights with fp32 masters,
  at lr 2e-5 (a fine-tuning rate: most updates are below half of bf16's spacing): 0.05;
  measured 0.021 (with 8-bit moments 0.020). Plain rounding at that rate loses most updates
  and learns only ~0.2 of the drop; the test checks that it falls short, so the compensation
  is what makes the difference.
"""

from __future__ import annotations

import pytest

from chatft.config_parse import load_config
from chatft.errors import ConfigError
from tests.train.lean_helpers import make_engine, train_steps

STEPS = range(50)


def _problems(*args: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(args))
    return str(e.value)


def test_optimizer_options_that_cannot_run_are_refused_together():
    msg = _problems("--optim", "adamw_torch_8bit", "--zero_stage", "2",
                    "--optimizer_in_bwd", "--gradient_accumulation_steps", "2",
                    "--optimizer_states", "host", "--precision", "bf16")
    assert "runs on the plain PyTorch engine" in msg
    assert "gradient_accumulation_steps 1" in msg
    assert "set max_grad_norm 0" in msg  # the default 1.0 clips by the global norm
    assert "set master_weights none" in msg
    assert "master_weights none needs bf16" in _problems("--master_weights", "none",
                                                         "--precision", "fp32")
    assert "needs optimizer_in_bwd" in _problems("--optimizer_states", "host")
    assert "fp16" in _problems("--optimizer_in_bwd", "--max_grad_norm", "0", "--precision", "fp16")
    assert "not one of" in _problems("--optim", "adamw_bnb_8bit")
    load_config(None, ["--optim", "adamw_torch_8bit", "--master_weights", "none",
                       "--optimizer_in_bwd", "--max_grad_norm", "0", "--optimizer_states", "host",
                       "--precision", "bf16"])  # the lean setting is valid


def test_a_choice_that_only_fails_at_run_time_is_a_config_error():
    """precision auto resolves to fp32 on a CPU: bf16 weights without masters cannot be."""
    import torch

    from chatft.train.engine import TorchEngine, resolve_precision
    from tests.train.lean_helpers import tiny_model

    cfg = load_config(None, ["--master_weights", "none"])  # precision auto: valid as written
    precision, _ = resolve_precision(cfg.train.precision, torch.device("cpu"))
    with pytest.raises(ConfigError, match="master_weights none needs bf16"):
        TorchEngine(cfg.train, tiny_model(torch.float32), precision, torch.device("cpu"), "chunked")


@pytest.fixture(scope="module")
def fp32_adamw() -> list[float]:
    return train_steps(make_engine("fp32", 1e-3), STEPS, 1e-3)


@pytest.mark.parametrize("optim, tolerance", [("adamw_torch_8bit", 0.05), ("adamw_torch_4bit", 0.2)])
def test_low_bit_adamw_tracks_fp32_adamw_over_50_steps(fp32_adamw, optim, tolerance):
    losses = train_steps(make_engine("fp32", 1e-3, optim=optim), STEPS, 1e-3)
    drop = fp32_adamw[0] - fp32_adamw[-1]
    assert drop > 2.0
    worst = max(abs(a - b) for a, b in zip(losses, fp32_adamw))
    assert worst <= tolerance * drop, (optim, worst / drop)


@pytest.fixture(scope="module")
def bf16_with_masters() -> list[float]:
    return train_steps(make_engine("bf16", 2e-5), STEPS, 2e-5)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_8bit"])
def test_bf16_stochastic_rounding_tracks_fp32_masters(bf16_with_masters, optim):
    losses = train_steps(make_engine("bf16", 2e-5, master_weights="none", optim=optim), STEPS, 2e-5)
    drop = bf16_with_masters[0] - bf16_with_masters[-1]
    worst = max(abs(a - b) for a, b in zip(losses, bf16_with_masters))
    assert worst <= 0.05 * drop, (optim, worst / drop)


def test_without_compensation_bf16_weights_lose_the_small_updates(bf16_with_masters):
    """The same update rounded to nearest (torchao without stochastic rounding) learns far
    less at a fine-tuning learning rate: what master_weights none must not do."""
    from chatft.train.optim_choice import _torchao_class

    engine = make_engine("bf16", 2e-5, master_weights="none")
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    engine.optimizer = _torchao_class("adamw_torch")(
        [{"params": params, "weight_decay": 0.01}], lr=2e-5, betas=(0.9, 0.95), eps=1e-8,
        bf16_stochastic_round=False)
    losses = train_steps(engine, STEPS, 2e-5)
    drop = bf16_with_masters[0] - bf16_with_masters[-1]
    assert losses[0] - losses[-1] < 0.5 * drop


def test_torchao_choices_compile_in_this_process_unless_the_environment_says(monkeypatch):
    """One compile worker per core would hold host memory for the whole run (see
    compile_in_process); TORCHINDUCTOR_COMPILE_THREADS still wins."""
    import torch
    from torch._inductor import config as inductor

    from chatft.config import TrainArgs
    from chatft.train.optim_choice import optimizer_factory

    t = TrainArgs(optim="adamw_torch_8bit")
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor, "compile_threads", 4)
    optimizer_factory(TrainArgs(), "fp32", torch.device("cpu"))  # fp32 AdamW: nothing compiled
    assert inductor.compile_threads == 4
    optimizer_factory(t, "fp32", torch.device("cpu"))
    assert inductor.compile_threads == 1
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    monkeypatch.setattr(inductor, "compile_threads", 3)
    optimizer_factory(t, "fp32", torch.device("cpu"))
    assert inductor.compile_threads == 3
