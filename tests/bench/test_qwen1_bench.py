"""bench/qwen1_7b.py's parts: the random Qwen-1 folder (shape, shard plan, values), the train
command and the rows read back from chatft's output; and the whole benchmark at tiny scale."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatft
from bench.lib import environment
from bench.lib import phase_run
from bench.lib import qwen1 as bq
from bench.lib import qwen1_folder as qf
from chatft.model import qwen1
from chatft.model.qwen1 import expected_shapes, iter_converted_tensors, qwen2_config_from_qwen1

REPO = Path(__file__).resolve().parents[2]


def test_qwen_7b_chat_config_is_the_published_shape():
    c = qf.QWEN_7B_CHAT
    assert (c["model_type"], c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]) \
        == ("qwen", 4096, 32, 32)
    assert (c["intermediate_size"], c["kv_channels"], c["vocab_size"], c["seq_length"]) \
        == (22016, 128, 151936, 8192)
    assert (c["rotary_emb_base"], c["layer_norm_epsilon"], c["rotary_pct"]) == (10000, 1e-6, 1.0)
    assert c["use_dynamic_ntk"] is c["use_logn_attn"] is c["no_bias"] is c["bf16"] is True
    assert c["tie_word_embeddings"] is False
    # chatft's converter accepts it as it is.
    q2 = qwen2_config_from_qwen1(c)
    assert (q2.intermediate_size, q2.num_key_value_heads, q2.max_position_embeddings) \
        == (11008, 32, 8192)


def test_parameter_count_by_hand():
    # embeddings + lm_head: 2 x 151936 x 4096 = 1,244,659,712
    # per layer: c_attn 3 x 4096^2 + 3 x 4096 = 50,343,936; c_proj 4096^2 = 16,777,216;
    #   w1 + w2 + mlp.c_proj 3 x 11008 x 4096 = 135,266,304; ln_1 + ln_2 8,192 -> 202,395,648
    # 32 layers = 6,476,660,736; + ln_f 4,096
    assert qf.n_params(qf.QWEN_7B_CHAT) == 1_244_659_712 + 6_476_660_736 + 4_096 == 7_721_324_544


def _converted_shapes(specs: list[qf.TensorSpec], hidden: int) -> dict[str, tuple[int, ...]]:
    """What chatft's converter makes of the planned tensors (meta tensors: no memory)."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        parts = qwen1._convert_one(spec.name, torch.empty(spec.shape, device="meta"), hidden)
        assert parts is not None, f"{spec.name} is not a Qwen-1 tensor name"
        for name, t in parts:
            assert name not in out, f"{name} produced twice"
            out[name] = tuple(t.shape)
    return out


def test_full_size_shard_plan_has_exactly_the_tensors_the_converter_expects():
    cfg = qf.QWEN_7B_CHAT
    specs = qf.qwen1_tensors(cfg)
    assert len(specs) == 2 + 8 * 32 + 1  # wte, lm_head, 8 per layer, ln_f
    plan = qf.plan_shards(specs, 8)
    assert len(plan) == 8
    assert [s for shard in plan for s in shard] == specs  # every tensor once, in order
    sizes = [sum(s.numel for s in shard) * 2 for shard in plan]
    total = qf.n_params(cfg) * 2
    assert sum(sizes) == total == 15_442_649_088
    largest = max(s.numel for s in specs) * 2  # the embeddings, 1.24 GB
    assert all(size <= total / 8 + largest for size in sizes)
    assert max(sizes) < 2.1e9  # ~1.93 GB each: one shard is all the writer holds
    converted = _converted_shapes(specs, cfg["hidden_size"])
    assert converted == expected_shapes(qwen2_config_from_qwen1(cfg))


def test_plan_shards_by_hand():
    a, b, c, d = (qf.TensorSpec(n, (k,), "normal") for n, k in zip("abcd", (1, 1, 1, 1)))
    assert qf.plan_shards([a, b, c, d], 2, value_bytes=1) == [[a, b], [c, d]]
    big = qf.TensorSpec("big", (10,), "normal")
    # Middle bytes at 5, 10.5, 11.5 of 12: thirds [0, 4), [4, 8), [8, 12) -> shards 1, 2, 2;
    # shard 0 gets nothing and is left out.
    assert qf.plan_shards([big, a, b], 3, value_bytes=1) == [[big], [a, b]]
    assert qf.plan_shards([a], 8, value_bytes=1) == [[a]]
    with pytest.raises(ValueError):
        qf.plan_shards([a], 0)


def test_pool_random_wraps_around_and_differs_per_tensor():
    src = qf.PoolRandom(std=0.02, seed=3, pool_values=16)
    pool = src.pool
    assert pool.dtype == torch.bfloat16 and pool.shape == (16,)
    t = src.normal((5, 8), index=1)  # 40 values from a pool of 16: wraps twice
    offset = 2654435761 % 16  # 1
    flat = t.flatten()
    assert torch.equal(flat[:16 - offset], pool[offset:])
    assert torch.equal(flat[16 - offset:32 - offset], pool)
    assert not torch.equal(src.normal((16,), index=0), src.normal((16,), index=1))
    assert torch.equal(qf.PoolRandom(0.02, seed=3, pool_values=16).pool, pool)  # seeded


def test_tiny_random_folder_converts_and_holds_the_expected_values(tmp_path, qwen_tiktoken):
    folder = tmp_path / "Qwen-7B-Chat"
    res = qf.write_random_qwen1(folder, qf.TINY, qwen_tiktoken, n_shards=3, device="cpu")
    assert res.random_device == "cpu" and res.n_params == qf.n_params(qf.TINY)
    assert res.weight_bytes == 2 * res.n_params and res.n_tensors == len(qf.qwen1_tensors(qf.TINY))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == res.shards
    assert index["metadata"]["total_size"] == res.weight_bytes
    assert json.loads((folder / "config.json").read_text()) == qf.TINY
    assert (folder / "qwen.tiktoken").read_bytes() == qwen_tiktoken.read_bytes()
    assert not list(tmp_path.glob(".*tmp-*"))  # the temporary folder was renamed
    assert (folder / res.shards[0]).stat().st_mode & 0o044  # readable by others, like mkdir

    converted = dict(iter_converted_tensors(folder))  # checks every name and shape
    assert set(converted) == set(expected_shapes(qwen2_config_from_qwen1(qf.TINY)))
    assert all(t.dtype == torch.bfloat16 for t in converted.values())
    assert torch.equal(converted["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    emb = converted["model.embed_tokens.weight"].float()
    assert emb.std().item() == pytest.approx(0.02, rel=0.05) and abs(emb.mean().item()) < 1e-3

    with pytest.raises(FileExistsError):
        qf.write_random_qwen1(folder, qf.TINY, qwen_tiktoken, n_shards=3, device="cpu")


def test_train_command_is_the_one_gpu_recommended_job():
    cmd = bq.train_command(Path("/m"), Path("/d.json"), Path("/o"), bq.TrainSettings())
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert cmd[1:4] == ["-m", "chatft", "train"]
    assert args["--model"] == "/m" and args["--data"] == "/d.json"
    assert args["--system"] == "现在你要扮演皇帝身边的女人--甄嬛."
    assert (args["--backend"], args["--precision"], args["--gradient_checkpointing"]) \
        == ("torch", "bf16", "on")
    assert (args["--per_device_train_batch_size"], args["--micro_batch_tokens"]) == ("128", "4096")
    assert (args["--max_steps"], args["--export"], args["--save_strategy"]) == ("8", "true", "no")
    assert "--random_init" not in args  # the folder's own weights, converted in memory


def _fake_run(lines: list[tuple[float, str]], start: float = 1000.0) -> phase_run.PhaseRun:
    return phase_run.PhaseRun(command=["chatft", "train"], returncode=0, timed_out=False, wall_s=90.0,
                       start_unix=start, peak_host_rss_gib=20.5, gpu_used_peak_gib=None,
                       lines=lines)


def test_train_summary_reads_metrics_and_the_stamped_output(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "config.json").write_text("{}")
    (out / "final" / "chatft_export_check.json").write_text('{"max_rel_diff": 0.001}')
    steps = [{"step": 1, "loss": 12.0, "tokens": 20000, "step_time_s": 10.0, "time": 1040.0,
              "gpu_mem_allocated_gib": [110.0], "gpu_mem_reserved_gib": [115.0]},
             {"step": 2, "loss": 11.0, "tokens": 20000, "step_time_s": 2.0, "time": 1042.0,
              "gpu_mem_allocated_gib": [120.5], "gpu_mem_reserved_gib": [125.0]},
             {"step": 3, "loss": 10.5, "tokens": 10000, "step_time_s": 1.0, "time": 1043.0,
              "gpu_mem_allocated_gib": [120.5], "gpu_mem_reserved_gib": [126.0]}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    run = _fake_run([(5.0, "chatft: 3357 training samples, global batch 128, ..."),
                     (44.0, "chatft: trained 3 steps in 13.0 s (3,846 tokens/s)"),
                     (70.5, "chatft: exported /o/final (bf16; reload check: ...)")])
    row = bq.train_summary(run, out, params=7_721_324_544)
    assert row["status"] == "ok" and row["steps_done"] == 3
    assert row["time_to_first_step_s"] == 40.0  # 1040 - 1000
    # After the first step: 30,000 tokens in 3 s.
    assert row["tokens_per_s_per_gpu"] == 10_000.0
    assert row["mfu"] == pytest.approx(round(10_000 * 6 * 7_721_324_544 / 989e12, 5))
    assert (row["peak_gpu_allocated_gib"], row["peak_gpu_reserved_gib"]) == (120.5, 126.0)
    assert row["export_s"] == 26.5 and row["export_check"] == {"max_rel_diff": 0.001}
    assert (row["loss_first"], row["loss_last"]) == (12.0, 10.5)
    assert row["engine_summary"].startswith("3357 training samples, global batch 128")
    assert row["peak_host_rss_gib_sampled"] == 20.5


def test_train_summary_without_steps_or_export_is_a_failure(tmp_path):
    row = bq.train_summary(_fake_run([(1.0, "Traceback ..."), (1.1, "OutOfMemoryError")]),
                           tmp_path, params=1)
    assert row["status"] == "failed" and "OutOfMemoryError" in row["error"]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "loss": 1.0, "tokens": 10, "step_time_s": 1.0}) + "\n")
    row = bq.train_summary(_fake_run([]), tmp_path, params=1)
    assert row["status"] == "failed" and row["exported"] is False


def test_convert_summary_takes_the_reported_peak(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    run = _fake_run([(20.0, "wrote:     /w/converted"), (20.1, "peak RSS:  3.90 GiB")])
    row = bq.convert_summary(run, tmp_path)
    assert row["peak_host_rss_gib_reported"] == 3.90 and row["folder_bytes"] == 15
    assert row["shards"] == 2 and row["status"] == "ok"


def test_run_phase_stamps_lines_and_kills_on_timeout(tmp_path):
    code = "import time; print('a', flush=True); time.sleep(0.3); print('b', flush=True)"
    run = phase_run.run_phase([sys.executable, "-c", code], tmp_path / "log", {}, 30, gpu=False)
    assert run.returncode == 0 and not run.timed_out
    assert [line for _, line in run.lines] == ["a", "b"]
    # Stamps are seconds since the start: 'b' cannot come before the child's 0.3 s sleep.
    assert 0 <= run.first_line_time("^a") <= run.first_line_time("^b")
    assert run.first_line_time("^b") >= 0.3 and run.first_line_time("^c") is None
    assert (tmp_path / "log").read_text().splitlines()[0].startswith("$ ")
    run = phase_run.run_phase([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log2",
                       {}, 0.5, gpu=False)
    assert run.timed_out and run.returncode != 0 and run.wall_s < 30


@pytest.mark.slow
def test_tiny_end_to_end_on_cpu(tmp_path, chat_alpaca, qwen_tiktoken):
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "qwen1_7b.py"), "--shape", "tiny",
           "--workdir", str(tmp_path / "w"), "--out", str(out), "--label", "smoke",
           "--data", str(chat_alpaca), "--tiktoken", str(qwen_tiktoken)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-4000:]
    result = json.loads((out / "qwen1_7b_smoke.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == result  # last line: the JSON
    assert "tok/s" in res.stdout and "convert" in res.stdout
    assert result["complete"] and result["model"]["weights"] == "random"
    assert result["versions"]["chatft"] == chatft.__version__
    assert result["versions"]["git_commit"] == environment.git_commit()
    assert {"accelerate", "safetensors", "cuda"} <= set(result["versions"])
    hw = result["hardware"]
    assert hw["host_memory_gib"] > 0 and hw["workdir_disk_free_gib_at_start"] > 0
    p = result["phases"]
    assert all(p[k]["status"] == "ok" for k in ("write", "convert", "train", "reload"))
    assert p["write"]["n_params"] == qf.n_params(qf.TINY) == result["model"]["n_params"]
    assert p["convert"]["peak_host_rss_gib_reported"] > 0 and p["convert"]["folder_bytes"] > 0
    t = p["train"]
    assert t["steps_done"] == 2 and t["tokens_per_s_per_gpu"] > 0 and 0 < t["mfu"] < 1
    assert t["time_to_first_step_s"] > 0 and t["export_s"] > 0 and t["exported"]
    assert "global batch 8" in t["engine_summary"]
    assert math.isclose(t["loss_first"], math.log(151936), rel_tol=0.05)  # random init
    r = p["reload"]
    assert r["ok"] and r["model_class"] == "Qwen2ForCausalLM" and r["completion_tokens"] > 0
    assert r["prompt"].startswith(
        "<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛.<|im_end|>\n<|im_start|>user\n你是谁")
    assert result["summary"]["all_ok"] and result["folders_deleted"]
    assert not (tmp_path / "w" / "Qwen-7B-Chat").exists() and not (tmp_path / "w" / "run").exists()
