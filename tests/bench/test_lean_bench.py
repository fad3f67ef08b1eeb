"""The lean benchmarks' library: the quality variants' commands and comparison, and the 7B
benchmark's planner prediction for a row's own configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib import lean_7b, lean_quality
from bench.lib import shapes
from chatft.config_parse import load_config
from tests.conftest import shared_file

GIB = 1 << 30


def test_quality_commands_and_comparison(tmp_path):
    assert lean_quality.steps_per_epoch(3729) == 210  # 3,357 training records in batches of 16
    cmd = lean_quality.command(Path("m.gguf"), Path("d.json"), tmp_path, ["--optim", "adamw_torch_8bit"], 210)
    cfg = load_config(None, cmd[cmd.index("train") + 1:])  # a valid chatft config
    assert (cfg.train.per_device_train_batch_size, cfg.train.learning_rate, cfg.train.optim) == \
        (16, 1e-5, "adamw_torch_8bit")
    assert (cfg.train.eval_strategy, cfg.train.save_strategy) == ("steps", "no")
    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "eval_loss": {v}}}\n{{"step": {s}, "loss": 1.0}}\n'
        for s, v in ((0, 5.46), (210, 4.09), (420, 4.12), (630, 4.43), (630, 4.43))))
    assert lean_quality.eval_losses(tmp_path) == [5.46, 4.09, 4.12, 4.43]  # one per step
    rows = {"adamw_torch": {"eval_loss_per_epoch": [4.09, 4.12, 4.43]},
            "adamw_torch_8bit": {"eval_loss_per_epoch": [4.10, 4.15, 4.43]},
            "adamw_torch_noclip": {"eval_loss_per_epoch": []},
            "lean_24gib": {"eval_loss_per_epoch": [4.0, 4.1, 4.4]}}
    lean_quality.compare(rows)
    assert rows["adamw_torch_8bit"]["diff_per_epoch"] == [0.01, 0.03, 0.0]
    assert rows["adamw_torch_8bit"]["within_tolerance"] is False  # 0.03 > 0.02
    assert "diff_per_epoch" not in rows["lean_24gib"]  # its reference has no losses yet
    # without an adamw_torch row: the reference's losses measured before
    rows = {"bf16_sr": {"eval_loss_per_epoch": [4.1, 4.13, 4.44]}}
    lean_quality.compare(rows)
    assert rows["bf16_sr"]["reference"] == "adamw_torch (measured before)"
    assert rows["bf16_sr"]["diff_per_epoch"] == [0.0098, 0.008, 0.009]
    assert rows["bf16_sr"]["within_tolerance"] is True


def test_lean_7b_rows_are_valid_configs_and_the_planner_predicts_each(tmp_path, qwen_tiktoken,
                                                                    monkeypatch):
    data = shared_file("data/huanhuan.json")
    if data is None:
        pytest.skip("huanhuan.json not found (set CHATFT_SHARED)")
    model = shapes.write_model_folder(tmp_path / "model", shapes.MODEL_CONFIGS["tiny"], qwen_tiktoken)
    args = lean_7b.train_args("lean8_host_b32", model, data, tmp_path / "run", 3, "24GiB")
    cfg = load_config(None, args)
    assert (cfg.train.optim, cfg.train.optimizer_states, cfg.train.max_gpu_memory) == \
        ("adamw_torch_8bit", "host", "24GiB")
    monkeypatch.setenv("CHATFT_DATA_CACHE", str(tmp_path / "cache"))
    p = lean_7b.planner_prediction(args, 24 * GIB, 64 * GIB)
    assert p["strategy"] == "plain + 8-bit Adam, bf16 SR, step in bwd, host states"
    assert p["recompute"] == "all" and p["tokens_source"] == "from the data"
    assert 0 < p["tokens"] <= 32 * 4096 and p["fits_budget"]
    assert p["gpu_allocated_gib"] == pytest.approx(sum(p["gpu_parts_gib"].values()), abs=0.01)
    # a tiny model fits with fp32 AdamW too: the planner recommends that instead
    assert not p["row_is_recommended"] and p["recommended"].startswith("plain, recompute none")
