"""The best checkpoint, end to end on a tiny model whose held-out loss falls, then rises.

The training answers are all "apple banana", the held-out answers "banana apple" to other
questions: a random model first learns that both words come (held-out loss falls), then their
order (it rises). With a constant lr of 3e-2 and 4 steps per epoch, the held-out loss is
11.85 before training, 11.02 / 8.74 / 10.86 after epochs 1 / 2 / 3 on every engine, so the
export must hold the step-8 checkpoint's weights, not the last step's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatft.export.hf import checkpoint_state_dict
from tests.conftest import persona_alpaca_records
from tests.train.conftest import metrics, run_chatft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def apple_data(tmp_path_factory) -> tuple[Path, Path]:
    questions = [r["instruction"] for r in persona_alpaca_records()[:40]]
    root = tmp_path_factory.mktemp("apple")
    train, held = root / "train.json", root / "held.json"
    train.write_text(json.dumps([{"instruction": q, "input": "", "output": "apple banana"}
                                 for q in questions[:32]], ensure_ascii=False))
    held.write_text(json.dumps([{"instruction": q, "input": "", "output": "banana apple"}
                                for q in questions[32:]], ensure_ascii=False))
    return train, held


def _train(model: Path, data: tuple[Path, Path], out: Path, *extra: str):
    return run_chatft("train", "--model", model, "--data", data[0], "--eval_file", data[1],
                      "--output_dir", out, "--num_train_epochs", "3",
                      "--learning_rate", "3e-2", "--lr_scheduler_type", "constant",
                      "--warmup_ratio", "0", "--precision", "fp32", "--seed", "7",
                      "--export_dtype", "fp32", *extra)


LAYOUTS = {
    # the defaults: evaluate and save every epoch, export the best
    "plain": ["--per_device_train_batch_size", "8"],
    "zero3": ["--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "3"],
    # every step, stopping after 2 evaluations without improvement
    "zero2": ["--per_device_train_batch_size", "4", "--nproc", "2", "--zero_stage", "2",
              "--eval_steps", "1", "--early_stopping_patience", "2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen2_dir, apple_data) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("best")
    out = {}
    for name, extra in LAYOUTS.items():
        proc = _train(tiny_qwen2_dir, apple_data, root / name, *extra)
        out[name] = (root / name, proc.stderr)
    return out


def evals(out: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}


def assert_exported(out: Path, step: int) -> None:
    """The exported weights are exactly those of checkpoint ``step`` (fp32 both)."""
    folder = out / "checkpoints" / f"step-{step:06d}"
    saved = checkpoint_state_dict(folder, json.loads((folder / "trainer_state.json").read_text())["engine"])
    exported = load_file(out / "final" / "model.safetensors")
    assert set(exported) <= set(saved)
    assert all(torch.equal(exported[k], saved[k].float()) for k in exported)
    assert json.loads((out / "final" / "chatft.json").read_text())["extra"]["exported_step"] == step


@pytest.mark.parametrize("name", ["plain", "zero3"])
def test_every_epoch_is_evaluated_and_the_best_checkpoint_is_exported(runs, name):
    out, stderr = runs[name]
    losses = evals(out)
    assert list(losses) == [0, 4, 8, 12]
    assert losses[8] < losses[12] and losses[8] < losses[4] < losses[0]  # falls, then rises
    assert f"export: step 8 (epoch 2): lowest eval_loss {losses[8]:.4f} of 3 evaluations" in stderr
    assert "step 8 (epoch 2): held-out loss" in stderr  # each value printed as it comes
    assert_exported(out, 8)
    # rotation (limit 2) deleted step 4 but kept the best beside the newest
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000008", "step-000012"]
    state = json.loads((out / "checkpoints" / "step-000012" / "trainer_state.json").read_text())
    assert state["evaluation"]["best_global_step"] == 8 and state["epoch"] == 3
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_the_engines_agree_on_every_evaluation(runs):
    plain, zero3 = evals(runs["plain"][0]), evals(runs["zero3"][0])
    assert zero3 == pytest.approx(plain, rel=1e-5)
    assert evals(runs["zero2"][0])[8] == pytest.approx(plain[8], rel=1e-5)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(runs):
    """Evaluated every step: the lowest is at step 8, steps 9 and 10 are worse, so patience 2
    stops at step 10 (of 12) and the step-8 checkpoint is exported (ZeRO-2)."""
    out, stderr = runs["zero2"]
    losses = evals(out)
    assert list(losses) == list(range(11))
    assert min(losses, key=losses.get) == 8 and losses[8] < losses[9] < losses[10]
    assert max(r["step"] for r in metrics(out) if "loss" in r) == 10
    assert "early stopping at step 10: 2 evaluation(s) in a row" in stderr
    assert "export: step 8 (epoch 2): lowest eval_loss" in stderr
    assert_exported(out, 8)


def test_resume_keeps_the_best_so_far(runs, tmp_path, tiny_qwen2_dir, apple_data):
    """Resumed from the step-8 checkpoint (its own evaluation is the best), the run trains
    steps 9-12 and still exports step 8: the record came with the checkpoint."""
    out = tmp_path / "resumed"
    shutil.copytree(runs["plain"][0], out, ignore=shutil.ignore_patterns("final", "step-000012"))
    proc = _train(tiny_qwen2_dir, apple_data, out, *LAYOUTS["plain"], "--resume", "auto")
    assert "resumed from" in proc.stderr and "step-000008" in proc.stderr
    assert evals(out) == pytest.approx(evals(runs["plain"][0]), rel=1e-6)
    assert "export: step 8 (epoch 2): lowest eval_loss" in proc.stderr
    assert_exported(out, 8)


def test_chatft_eval_reports_base_and_tuned_side_by_side(runs, tmp_path, tiny_qwen2_dir, apple_data):
    """``chatft eval BASE TUNED``: the tuned export's held-out loss is the run's lowest
    evaluation (training's definition), the base model's is the run's step-0 value, and the
    report holds both, the run's evaluations with the exported one marked, and the answers."""
    out, _ = runs["plain"]
    report = tmp_path / "report.md"
    proc = run_chatft("eval", tiny_qwen2_dir, out / "final", "--data", apple_data[0],
                      "--eval_file", apple_data[1], "--ask", "Who are you?", "--ask", "你是谁？",
                      "--max-new-tokens", "6", "--precision", "fp32", "--out", report)
    losses = evals(out)
    facts = json.loads(report.with_suffix(".json").read_text())
    base, tuned = facts["models"]
    assert tuned["eval_loss"] == pytest.approx(losses[8], abs=1e-5)
    assert base["eval_loss"] == pytest.approx(losses[0], abs=1e-5)
    assert (base["kind"], tuned["kind"]) == ("Hugging Face folder", "chatft export")
    assert tuned["answers"]["Who are you?"].startswith("apple banana")  # it learned its answer
    text = report.read_text()
    assert f"| `{out / 'final'}` | chatft export | {losses[8]:.4f} | 8 | " in text
    assert "| not a chatft run |" in text
    assert f"| 8 | 2 | {losses[8]:.4f} | exported |" in text
    assert f"| 0 | 0 | {losses[0]:.4f} | before training |" in text
    assert text.count("### 你是谁？") == 1 and "> apple banana" in text
    assert "![loss curves](report_curves.png)" in text
    assert (tmp_path / "report_curves.png").stat().st_size > 1000
    assert f"{out / 'final'}: held-out loss {losses[8]:.4f}" in proc.stderr
