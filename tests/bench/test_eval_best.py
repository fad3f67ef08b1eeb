"""The best-checkpoint benchmark's library (bench.lib.eval_best): the commands it runs, what it
reads from a run folder, and the acceptance checks (on hand-written run folders)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.lib import eval_best as eb

REPO = Path(__file__).resolve().parents[2]


def test_commands_are_the_issues_runs():
    train = eb.train_command("q.gguf", "huanhuan.json", Path("/r/b16"), eb.RUNS["b16"], 3.0, None)
    assert train[:2] == ["chatft", "train"]
    text = " ".join(train)
    assert "--eval_ratio 0.1 --num_train_epochs 3" in text
    assert "--per_device_train_batch_size 16 --learning_rate 1e-5" in text
    assert "--max_steps" not in text and "--eval_strategy" not in text  # the defaults evaluate
    ev = eb.eval_command("q.gguf", "huanhuan.json", [Path("/r/defaults/final"), Path("/r/b16/final")],
                         Path("/r/report.md"), 128)
    assert ev[:5] == ["chatft", "eval", "q.gguf", "/r/defaults/final", "/r/b16/final"]
    assert ev.count("--ask") == len(eb.QUESTIONS) and eb.SYSTEM_PROMPT in ev


def _run_folder(root: Path, evals: list[tuple[int, float]], exported: int) -> Path:
    (root / "final").mkdir(parents=True)
    lines = [{"step": s, "epoch": s / 210, "eval_loss": v} for s, v in evals]
    lines += [{"step": s, "loss": 2.0, "step_time_s": 0.1} for s in range(1, 631)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "final" / "chatft.json").write_text(json.dumps(
        {"extra": {"exported_step": exported, "exported_because": "step ... lowest"}}))
    return root


def test_run_summary_and_checks(tmp_path):
    b16 = eb.run_summary(_run_folder(tmp_path / "b16", [(0, 5.46), (210, 4.0902), (420, 4.1221),
                                                        (630, 4.4310)], 210))
    assert (b16["lowest_eval_loss"], b16["lowest_at_step"], b16["exported_step"]) == (4.0902, 210, 210)
    assert b16["steps"] == 630 and b16["train_time_s"] == 63.0
    runs = {"b16": b16}
    finals = {"b16": "/r/b16/final"}
    report = {"models": [{"model": "q.gguf", "eval_loss": 5.4601},
                         {"model": "/r/b16/final", "eval_loss": 4.0907}]}
    checks = eb.checks(runs, report, finals)
    assert checks["b16_export_equals_lowest"]["ok"] is True
    assert checks["b16_export_at_most"]["ok"] is True and checks["base_equals_step0"]["ok"] is True
    report["models"][1]["eval_loss"] = 4.1221  # the last epoch's model instead of the best
    checks = eb.checks(runs, report, finals)
    assert checks["b16_export_equals_lowest"]["ok"] is False and checks["b16_export_at_most"]["ok"] is False
    assert eb.checks(runs, None, finals)["b16_export_equals_lowest"]["ok"] is None  # not measured


@pytest.mark.slow
def test_smoke_run_on_a_tiny_model_exports_the_best_and_writes_the_result(tmp_path, chat_alpaca,
                                                                          qwen_tokenizer):
    """The whole script on the CPU: two 2-step runs of a tiny random Qwen2 folder on 24 records,
    then chatft eval of the three models; the checks hold (fp32 export)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_dir = tmp_path / "tiny"
    eot = qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(qwen_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=eot, pad_token_id=eot,
                         eos_token_id=qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    qwen_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "eval_best_qwen.py"), "--model-path", str(model_dir),
           "--data", str(chat_alpaca), "--limit", "24", "--epochs", "1", "--max-steps", "2",
           "--max-new-tokens", "4", "--budget", "1200", "--eval-reserve", "400",
           "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--label", "smoke"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    result = json.loads((out / "eval_best_smoke.json").read_text(encoding="utf-8"))
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["complete"] is True and result["complete"] and result["smoke"]
    assert result["versions"]["git_commit"] and result["hardware"]["host_memory_gib"] > 0
    assert set(result["commands"]) == {"train_defaults", "train_b16", "eval"}
    assert "--per_device_train_batch_size 16 --learning_rate 1e-5" in result["commands"]["train_b16"]
    for name in eb.RUNS:
        run = result["runs"][name]
        assert [e["step"] for e in run["evaluations"]] == [0, 1, 2]
        assert run["exported_step"] == run["lowest_at_step"] and "lowest eval_loss" in run["exported_because"]
    # Every check measured; the exports hold their run's lowest evaluation and the base model
    # its step-0 value (the b16 bound is the real model's, not a tiny one's).
    assert {k: c["ok"] for k, c in result["checks"].items() if k != "b16_export_at_most"} == {
        "defaults_export_equals_lowest": True, "b16_export_equals_lowest": True,
        "base_equals_step0": True}
    assert [m["model"] for m in result["report"]["models"]] == [
        str(model_dir), result["finals"]["defaults"], result["finals"]["b16"]]
    assert eb.QUESTIONS[0] in result["report_md"] and "defaults/final" in result["report_md"]
