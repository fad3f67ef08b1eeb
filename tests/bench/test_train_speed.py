"""The training-speed benchmark's parts: model shapes, the tutorial's data recipe, the chatft
command line, step statistics and the process-tree memory sampler."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench.lib import measure
from bench.lib import shapes
from bench.lib import tutorial_recipe as recipe
from bench.lib import train_speed as ts
from chatft.config_parse import load_config


def test_qwen2_7b_parameter_count_from_shape():
    assert shapes.n_params(shapes.QWEN2_7B) == 7_615_616_512


def test_parameter_count_equals_the_built_model(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(shapes.TINY))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == shapes.n_params(shapes.TINY)


def test_model_folder_holds_config_and_tokenizer_only(tmp_path, qwen_tiktoken):
    from transformers import AutoConfig, AutoTokenizer

    folder = shapes.write_model_folder(tmp_path / "m", shapes.QWEN2_7B, qwen_tiktoken)
    assert not list(folder.glob("*.safetensors"))
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (28, 4, 152064)
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == 32768
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    assert theta == 1e6 and cfg.rms_norm_eps == 1e-6
    assert AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>") == 151645


def test_tutorial_process_func_masks_prompt_and_appends_pad(qwen_tokenizer):
    sample = recipe.tutorial_process_func({"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"},
                                      qwen_tokenizer)
    ids, labels = sample["input_ids"], sample["labels"]
    # The tutorial's strings: the prompt is .strip()ped, so no newline before the assistant turn.
    assert qwen_tokenizer.decode(ids) == (
        "<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛.<|im_end|>\n<|im_start|>user\n"
        "你是谁？<|im_end|><|im_start|>assistant\n我是甄嬛。<|im_end|>\n<|endoftext|>")
    n_prompt = labels.index(next(x for x in labels if x != -100))
    assert labels[:n_prompt] == [-100] * n_prompt
    assert ids[n_prompt] == 151644  # <|im_start|> of the assistant turn: first trained token
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == labels[-1] == 151643  # the pad token (<|endoftext|>) is appended and trained
    assert sample["attention_mask"] == [1] * len(ids)


def test_tutorial_process_func_cuts_at_128(qwen_tokenizer):
    sample = recipe.tutorial_process_func({"instruction": "说", "input": "", "output": "好" * 300},
                                      qwen_tokenizer)
    assert [len(v) for v in sample.values()] == [128, 128, 128]
    assert sample["input_ids"][-1] != 151643  # cut before the appended pad token


def test_step_stats_leave_out_warmup():
    stats = measure.step_stats([10.0, 2.0, 4.0], [100, 300, 500], gpus=2, params=10**9, warmup=1)
    assert stats["steps_measured"] == 2
    assert stats["step_time_p50_s"] == 2.0 and stats["step_time_mean_s"] == 3.0
    assert stats["tokens_per_s_per_gpu"] == round(800 / 6 / 2, 2)
    assert stats["mfu"] == pytest.approx(800 / 6 / 2 * 6e9 / 989e12, rel=1e-4)  # 5 digits
    # a CPU smoke run of the tiny model (15 tokens/s per process): ~1.8e-6, not rounded to 0
    tiny = measure.step_stats([1.0, 1.0], [30, 30], gpus=2, params=19_538_496, warmup=1)["mfu"]
    assert tiny == pytest.approx(15 * 6 * 19_538_496 / 989e12, rel=1e-4)
    assert measure.step_stats([10.0], [100], gpus=1, params=1, warmup=1) == {"steps_measured": 0}


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 11)]
    assert measure.percentile(xs, 50) == 5.0 and measure.percentile(xs, 95) == 10.0
    assert measure.percentile(xs, 0) == 1.0 and measure.percentile([7.0], 50) == 7.0


def test_chatft_batch_keeps_global_batch():
    assert ts.chatft_batch(1, 128, None) == (128, 1)
    assert ts.chatft_batch(4, 128, None) == (32, 1)
    assert ts.chatft_batch(2, 128, 2) == (32, 2)
    with pytest.raises(ValueError):
        ts.chatft_batch(3, 128, None)


@pytest.mark.parametrize("gpus", [1, 4])
def test_chatft_command_is_a_valid_chatft_config(tmp_path, gpus):
    cmd = ts.chatft_command(model=tmp_path / "m", data=tmp_path / "d.json", out=tmp_path / "o",
                            gpus=gpus, settings=ts.ABLATIONS["gc_flip"], max_steps=6, export=False,
                            global_batch=128, accumulation=None, cpu_smoke=False)
    assert cmd[1:4] == ["-m", "chatft", "train"]
    cfg = load_config(None, cmd[4:])  # every option is one chatft knows, and the whole is valid
    assert cfg.model.random_init and cfg.data.packing and cfg.train.precision == "bf16"
    # the flip of the recommended choice (no recomputation)
    assert cfg.model.gradient_checkpointing == "on"
    assert cfg.train.max_steps == 6
    assert cfg.train.export is False and cfg.data.system == recipe.TUTORIAL_SYSTEM
    t = cfg.train
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.world_size == 128
    if gpus == 1:
        assert cfg.deepspeed.backend == "torch" and not cfg.uses_deepspeed
    else:
        assert cfg.launch.nproc == 4 and cfg.deepspeed.zero_stage == 2 and cfg.uses_deepspeed


def test_read_metrics_keeps_step_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 3.0}\n{"step": 1, "loss": 2.5, "tokens": 10}\n\n')
    assert ts.read_metrics(path) == [{"step": 1, "loss": 2.5, "tokens": 10}]
    assert ts.read_metrics(tmp_path / "missing.jsonl") == []


def test_process_tree_sampler_sees_a_child_and_its_memory():
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; x = bytearray(200 << 20); "
                              "print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in measure.process_tree(os.getpid())
        assert measure.rss_bytes(child.pid) >= 200 << 20
        sampler = measure.ProcessTreeSampler(os.getpid())
        sampler.sample()
        assert sampler.peak_rss >= (200 << 20) + measure.rss_bytes(os.getpid())
        assert sampler.peak_processes >= 2
    finally:
        child.kill()
        child.wait()
    assert measure.rss_bytes(child.pid) == 0


def test_ablations_that_cannot_run_on_a_cpu_say_why():
    assert "CUDA" in ts.ablation_skip_reason("liger_off", cpu=True)
    assert "CPU" in ts.ablation_skip_reason("attn_flex", cpu=True)
    assert ts.ablation_skip_reason("gc_flip", cpu=True) is None
    has_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    assert (ts.ablation_skip_reason("attn_varlen", cpu=True) is None) == has_varlen


def test_tutorial_worker_entry_accepts_launcher_local_rank_first(capsys):
    # DeepSpeed's launcher runs `-m bench.lib.train_speed --local_rank=N tutorial ...`.
    assert ts.main(["--local_rank=0"]) == 2
    assert "usage" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # "tutorial" found; its own parser then wants --model etc.
        ts.main(["--local_rank=0", "tutorial"])
