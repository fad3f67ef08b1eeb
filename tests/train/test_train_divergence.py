"""The divergence guard: a step with a non-finite loss or gradient norm changes nothing, and too
many in a row stop the run naming the step, the learning rate and the last good checkpoint,
which rotation keeps."""

from __future__ import annotations

import math

import pytest
import torch

from chatft import checkpoint as ckpt
from chatft.config import TrainArgs
from chatft.integrity import manifest
from chatft.train.divergence import BadStepGuard, bad_step_reason
from chatft.train.engine import TorchEngine
from tests.train.conftest import metrics, run_chatft

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def test_bad_step_reasons_and_fp16_leaves_the_norm_to_its_scaler():
    assert bad_step_reason(2.5, 1.0, "fp32") is None
    assert bad_step_reason(float("nan"), 1.0, "bf16") == "loss nan"
    assert bad_step_reason(2.5, float("inf"), "fp32") == "gradient norm inf"
    assert bad_step_reason(2.5, float("inf"), "fp16") is None  # an overflow: the scaler skips it
    assert bad_step_reason(float("inf"), 1.0, "fp16") == "loss inf"


def test_guard_counts_runs_of_bad_steps_and_stops_at_the_limit(tmp_path):
    guard = BadStepGuard(max_bad_steps=3)
    for step, reason in [(1, None), (2, "loss nan"), (3, "loss nan"), (4, None), (5, "loss nan"),
                         (6, "loss nan")]:
        guard.observe(step, reason)
    assert (guard.consecutive, guard.total, guard.first_of_run, guard.exhausted) == (2, 4, 5, False)
    guard.observe(7, "gradient norm nan")
    assert guard.exhausted
    text = str(guard.error(7, "gradient norm nan", 1000.0, tmp_path / "step-000004"))
    assert "steps 5-7" in text and "gradient norm nan" in text and "learning rate 1e+03" in text
    assert str(tmp_path / "step-000004") in text and "--resume_force" in text
    assert "No checkpoint was saved" in str(guard.error(7, "loss nan", 1.0, None))
    assert not BadStepGuard(max_bad_steps=0, consecutive=99).exhausted  # 0: never stop


def _engine(precision="fp32") -> TorchEngine:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1))
    return TorchEngine(TrainArgs(), model, precision, torch.device("cpu"), "chunked")


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts and lists, cloned, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _snapshot(engine: TorchEngine) -> list[torch.Tensor]:
    """Weights and every tensor of the optimizer's state (moments, step counts, masters)."""
    return _tensors(engine.model.state_dict()) + _tensors(engine.optimizer.state_dict())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plain_engine_skips_a_bad_update_and_drops_its_gradients(precision):
    engine = _engine(precision)
    ids = torch.randint(0, 64, (1, 12))
    batch_loss = lambda: engine.model(input_ids=ids, labels=ids).loss  # noqa: E731
    batch_loss().backward()
    engine.step(1e-3)  # one good update: the optimizer has state
    before = _snapshot(engine)
    batch_loss().backward()
    norm = engine.step(1e-3, skip=True)  # the loop says: the loss was not finite
    assert math.isfinite(norm) and _same(before, _snapshot(engine))
    assert all(p.grad is None for p in engine.model.parameters())
    batch_loss().backward()
    next(engine.model.parameters()).grad[0, 0] = float("nan")  # a NaN gradient, finite loss
    assert math.isnan(engine.step(1e-3)) and _same(before, _snapshot(engine))
    assert engine.finite_weights()
    batch_loss().backward()
    engine.step(1e-3)
    assert not _same(before, _snapshot(engine))  # good steps update again
    with torch.no_grad():
        next(engine.model.parameters())[0, 0] = float("inf")
    assert not engine.finite_weights()


def test_lr_1e3_stops_naming_step_lr_and_the_last_good_checkpoint(tmp_path, tiny_qwen2_dir,
                                                                   chat_small):
    """The issue's repro: loss 1e7 and NaN gradients from step 2 on. The bad updates are skipped,
    never saved, and after 3 in a row training stops; the step-1 checkpoint survives rotation."""
    out = tmp_path / "diverged"
    proc = run_chatft("train", "--model", tiny_qwen2_dir, "--data", chat_small, "--system", SYSTEM,
                      "--output_dir", out, "--max_steps", "20", "--learning_rate", "1e3",
                      "--precision", "fp32", "--per_device_train_batch_size", "8",
                      "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
                      "--max_bad_steps", "3", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.split("chatft: error: ", 1)[1]
    good = ckpt.checkpoints_dir(out) / "step-000001"
    assert "training diverged: 3 steps in a row (steps 2-4)" in error
    assert "step 4: " in error and "learning rate" in error and str(good) in error
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000001"]
    assert manifest.verify(good) == []
    state = torch.load(good / "engine_state.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    logged = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r.get("skipped", False) for r in logged] == [False, True, True, True]
    assert "step 2: no checkpoint (its update was skipped)" in proc.stderr
    assert not (out / "final").exists()
