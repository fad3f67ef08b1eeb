"""bench/train_speed.py end to end on the CPU: the tutorial's recipe under DeepSpeed's launcher
and chatft's ZeRO-2 run, two processes each, tiny Qwen2, 40 Alpaca records of chat."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from chatft import __version__ as chatft_version
from bench.lib import environment

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_runs_both_variants_and_writes_the_result(tmp_path, chat_alpaca, qwen_tiktoken):
    records = json.loads(chat_alpaca.read_text(encoding="utf-8"))[:40]
    data = tmp_path / "chat40.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "train_speed.py"), "--model-config", "tiny",
           "--gpus", "2", "--variants", "tutorial,chatft", "--steps", "2", "--global-batch", "8",
           "--data", str(data), "--tiktoken", str(qwen_tiktoken), "--workdir", str(tmp_path / "w"),
           "--out", str(out), "--label", "smoke"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]

    result = json.loads((out / "train_speed_smoke.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == result  # last line: the JSON
    assert "tok/s/GPU" in res.stdout and "tutorial" in res.stdout
    assert result["complete"] and result["cpu_smoke"] and result["model"]["weights"] == "random"
    assert result["versions"]["chatft"] == chatft_version
    assert result["versions"]["git_commit"] == environment.git_commit()
    assert {"deepspeed", "accelerate", "liger-kernel", "cuda"} <= set(result["versions"])
    assert result["hardware"]["host_memory_gib"] > 0 and "cuda_visible_devices" in result["hardware"]
    tutorial, chatft = result["rows"]
    assert (tutorial["variant"], chatft["variant"]) == ("tutorial", "chatft")
    for row in (tutorial, chatft):
        assert row["status"] == "ok", row.get("error")
        assert row["steps_measured"] == 1 and row["tokens_per_s_per_gpu"] > 0
        assert 0 < row["mfu"] < 1
        assert row["time_to_first_step_s"] > 0 and row["peak_host_rss_gib"] > 0

    # The recipe: batch 1 per process, 3 epochs planned by Trainer, extrapolated from the steps.
    assert tutorial["samples"] == 40 and tutorial["model_dtype"] == "float32"
    total = 3 * math.ceil(40 / 2)
    assert f"({total} - 1) optimizer steps" in tutorial["e2e_note"]
    assert tutorial["e2e_wall_s"] == pytest.approx(
        tutorial["time_to_first_step_s"] + (total - 1) * tutorial["step_time_mean_s"], abs=0.2)
    assert tutorial["speedup_vs_seed"] == 1.0
    # DeepSpeed's CPU all-reduce buffers (memory in /dev/shm) of the recipe's run are gone.
    port = tutorial["command"].split("--master_port ")[1].split()[0]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    assert "DeepSpeed ZeRO-2" in chatft["engine_summary"]
    assert "global batch 8" in chatft["engine_summary"]
    assert chatft["settings"]["per_device_train_batch_size"] == 4
    assert chatft["speedup_vs_seed"] == pytest.approx(
        chatft["tokens_per_s_per_gpu"] / tutorial["tokens_per_s_per_gpu"], rel=0.01)
