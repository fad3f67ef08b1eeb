"""The planner applied to chatft's config: the planned kernels, the token budget from the config
and from the data, ``--plan auto``, the out-of-memory advice, a user's DeepSpeed JSON, and
``chatft plan`` as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from chatft.config_parse import load_config
from chatft.errors import ChatftError
from chatft.train.plan.apply import (apply_plan, explain_out_of_memory, job_from_config,
                                     micro_batch_layout, out_of_memory_message, token_budget)
from chatft.train.plan.cost import GIB, DeepSpeedSizes, Strategy
from chatft.train.plan.report import fewest_checkpoint_layers
from chatft.train.plan.shape import ModelShape
from tests.train.conftest import QWEN2_7B, REPO

SEVEN_B = ModelShape.from_config(QWEN2_7B)


def test_planned_attention_is_what_the_gpu_engine_will_use():
    from chatft.model.attention import varlen_takes_gqa
    from chatft.model.build import resolve_attention

    job = job_from_config(load_config(None, []), QWEN2_7B, 4096)
    assert job.attention == resolve_attention("auto", torch.device("cuda"))
    assert job.varlen_takes_gqa == (job.attention == "varlen" and varlen_takes_gqa())
    assert job_from_config(load_config(None, ["--attn_implementation", "sdpa"]), QWEN2_7B,
                           4096).attention == "sdpa"


def test_token_budget_from_config_and_from_data():
    cfg = load_config(None, ["--per_device_train_batch_size", "4", "--max_length", "1000"])
    assert token_budget(cfg) == 4032  # 4 x 1000, up to a multiple of 64
    capped = load_config(None, ["--per_device_train_batch_size", "8", "--max_length", "1000",
                                "--micro_batch_tokens", "2000"])
    assert token_budget(capped) == 3008  # cap + one more sample at most
    # micro-batches without the lengths: 8 samples of up to 1000 tokens over a 2000 cap
    assert micro_batch_layout(capped) == (3008, 4)
    # from lengths: the largest bin over the run equals a brute-force replay of the loop's planner
    from chatft.train.batching import plan_step

    lengths = np.random.default_rng(0).integers(10, 300, size=50)
    trained = lengths // 2
    cfg = load_config(None, ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps",
                             "2", "--nproc", "2", "--num_train_epochs", "2"])
    worst = 0
    for step in range(2 * 5):  # 50 samples, global batch 12: 5 steps per epoch
        for rank in (0, 1):
            p = plan_step(lengths, trained, global_batch=12, seed=cfg.train.seed, epoch=step // 5,
                          step_in_epoch=step % 5, world_size=2, rank=rank, accumulation=2)
            worst = max([worst] + [int(lengths[mb].sum()) for mb in p.micro_batches if mb])
    assert token_budget(cfg, lengths) == -(-worst // 64) * 64
    # under a token cap the micro-batch count is the most any step needs
    capped = load_config(None, ["--per_device_train_batch_size", "6", "--nproc", "2",
                                "--micro_batch_tokens", "300", "--max_length", "300",
                                "--num_train_epochs", "2"])
    most = max(len(plan_step(lengths, trained, global_batch=12, seed=capped.train.seed,
                             epoch=step // 5, step_in_epoch=step % 5, world_size=2, rank=0,
                             accumulation=1, micro_batch_tokens=300).micro_batches)
               for step in range(10))
    assert most > 1 and micro_batch_layout(capped, lengths)[1] == most


def test_plan_auto_applies_the_recommendation():
    cfg = load_config(None, ["--plan", "auto", "--max_length", "8192", "--per_device_train_batch_size", "1"])
    plan, changes = apply_plan(cfg, QWEN2_7B, 8192, 141 * GIB, 128 * GIB)
    k = plan.recommended.strategy.checkpoint_layers
    assert (cfg.deepspeed.backend, cfg.deepspeed.zero_stage, cfg.model.gradient_checkpointing,
            cfg.model.checkpoint_layers) == ("torch", 0, "on", k)
    assert f"checkpoint_layers -1 -> {k}" in changes
    # 4 GPUs: ZeRO without recomputation
    cfg = load_config(None, ["--plan", "auto", "--nproc", "4"])
    plan, _ = apply_plan(cfg, QWEN2_7B, 8192, 141 * GIB, 512 * GIB)
    assert cfg.deepspeed.backend == "deepspeed" and cfg.deepspeed.zero_stage in (1, 2)
    assert cfg.model.gradient_checkpointing == "off"
    # gradient_checkpointing auto alone keeps the engine and picks the fewest layers
    cfg = load_config(None, ["--zero_stage", "3", "--gradient_checkpointing", "auto"])
    plan, _ = apply_plan(cfg, QWEN2_7B, 8192, 141 * GIB, 128 * GIB)
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.backend == "deepspeed"
    assert cfg.model.gradient_checkpointing == "on"
    assert cfg.model.checkpoint_layers == fewest_checkpoint_layers(plan.job, Strategy("deepspeed", 3), 141 * GIB)
    # nothing fits: a user error naming the budgets
    with pytest.raises(ChatftError, match="no strategy that fits"):
        apply_plan(load_config(None, ["--plan", "auto"]), QWEN2_7B, 8192, 24 * GIB, 64 * GIB)


def test_out_of_memory_message_names_what_ran_out_and_what_fits():
    cfg = load_config(None, ["--max_length", "4096"])
    text = out_of_memory_message(cfg, "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                 "a total capacity of 23.55 GiB\nmore detail", device="cuda:0",
                                 gpus=1, tokens=4096, model_config=QWEN2_7B,
                                 gpu_budget=24 * GIB, host_budget=256 * GIB)
    assert text.startswith("out of GPU memory on cuda:0 (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "This run: plain, recompute none, 4,096 tokens" in text
    assert "--offload_optimizer cpu" in text and "--plan auto" in text  # offloading fits 24 GiB


def test_explain_out_of_memory_turns_the_error_into_exit_code_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    cfg = load_config(None, ["--model", str(tmp_path), "--max_length", "2048",
                             "--per_device_train_batch_size", "2"])
    with pytest.raises(ChatftError) as e:
        with explain_out_of_memory(cfg, lengths=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")
    assert e.value.exit_code == 2
    assert "out of GPU memory" in str(e.value) and "4,096 tokens" in str(e.value)
    with explain_out_of_memory(cfg):  # nothing raised: nothing happens
        pass


def _chatft(*args) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "chatft", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_cli_plan_on_a_tiny_model_folder(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "tiny"
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    proc = _chatft("plan", "--model", folder, "--tokens", "512", "--gpu-mem", "24GiB",
                   "--cpu-mem", "64GiB", "--learning_rate", "1e-5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    n_params = ModelShape.from_config(config).n_params
    assert f"{n_params / 1e9:.2f}B params" in lines[0]
    assert "512 tokens per micro-batch, 1 GPU(s)" in lines[1]
    assert lines[-1].startswith("recommended: plain, recompute none")
    # bad options are user errors
    proc = _chatft("plan", "--model", folder, "--gpu-mem", "plenty")
    assert proc.returncode == 2 and "plenty" in proc.stderr


def test_cli_plan_needs_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    proc = _chatft("plan", "--model", tmp_path, "--gpus", "4", "--gpu-mem", "141GiB",
                   "--cpu-mem", "512GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["job"]["model"]["n_params"] == 7_615_616_512 and data["job"]["gpus"] == 4
    # no --tokens and no tokenizer to read the data with: the config's bound, 8 x 4096
    assert data["job"]["tokens"] == 32768 and data["tokens_source"].startswith("the config's bound")
    assert data["recommended"]["fits"] and data["recommended"]["strategy"]["backend"] == "deepspeed"


def test_current_strategy_and_buckets_read_a_users_deepspeed_json(tmp_path):
    from chatft.train.plan.apply import current_strategy, deepspeed_sizes

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
        "stage3_max_live_parameters": 12345}}))
    cfg = load_config(None, ["--deepspeed", str(ds_json), "--gradient_checkpointing", "on",
                             "--checkpoint_layers", "5"])
    assert current_strategy(cfg, 28) == Strategy("deepspeed", 3, True, False, 5)
    sizes = deepspeed_sizes(cfg.deepspeed, SEVEN_B)
    assert sizes.reduce_bucket_size == 3584 * 3584  # "auto" as chatft fills it: hidden^2
    assert sizes.max_live_parameters == 12345
    assert sizes.prefetch_bucket_size == DeepSpeedSizes().prefetch_bucket_size


def test_train_on_a_machine_without_gpu_keeps_the_config(capsys):
    from chatft.train.plan.apply import auto_plan
    from chatft.train.plan.hardware import gpu_memory

    if gpu_memory() is not None:
        pytest.skip("this machine has a GPU")

    cfg = load_config(None, ["--plan", "auto", "--gradient_checkpointing", "auto"])
    auto_plan(cfg, None)
    assert cfg.deepspeed.zero_stage == 0 and cfg.model.gradient_checkpointing == "off"
    assert "no GPU" in capsys.readouterr().err
