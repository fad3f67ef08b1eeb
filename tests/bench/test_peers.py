"""The peers benchmark's pure parts: shared data files, each tool's configuration, the step
recorder's token and sample counting, result-row assembly, and the shared evaluator against
chatft's own held-out loss. No test needs LLaMA-Factory or ms-swift installed, and none trains
a peer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from bench.lib import peer_configs as pc
from bench.lib import peer_eval, peer_runs
from bench.peer_hook import peer_measure

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(25)]


# --------------------------------------------------------------------------- data files


def test_split_holds_out_every_tenth_record_as_messages(tmp_path):
    info = pc.write_split(RECORDS, tmp_path)
    train = [json.loads(x) for x in Path(info["train"]).read_text().splitlines()]
    held = [json.loads(x) for x in Path(info["eval"]).read_text().splitlines()]
    assert (info["train_samples"], info["eval_samples"]) == (23, 2)
    assert [h["messages"][1]["content"] for h in held] == ["问题9", "问题19"]
    assert len(train) == 23 and "问题9" not in {t["messages"][1]["content"] for t in train}
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    assert train[0]["messages"][0]["content"] == pc.SYSTEM_PROMPT
    lf = json.loads((tmp_path / "dataset_info.json").read_text())
    assert lf[pc.LF_TRAIN]["file_name"] == pc.TRAIN_FILE
    assert lf[pc.LF_EVAL]["tags"]["system_tag"] == "system"


def test_split_without_hold_out_trains_on_everything(tmp_path):
    info = pc.write_split(RECORDS, tmp_path, hold_out=False)
    assert (info["train_samples"], info["eval_samples"]) == (25, 0)


def test_input_follows_the_instruction():
    msg = pc.to_messages({"instruction": "a", "input": "b", "output": "c"})
    assert msg["messages"][1]["content"] == "ab"


# --------------------------------------------------------------------------- equal jobs


def test_packed_rows_hold_128_mean_samples():
    length = pc.packed_row_length(68.23)
    assert length == 4367
    assert pc.PACKED_ROWS_PER_STEP * length >= 128 * 68.23 > pc.PACKED_ROWS_PER_STEP * (length - 1)


def test_unpacked_batch_multiplies_to_128():
    assert pc.unpacked_batch() == (32, 4)
    with pytest.raises(ValueError):
        pc.unpacked_batch(128, 48)


# --------------------------------------------------------------------------- tool configs


def _lf(tmp_path, **kw):
    base = dict(model=tmp_path / "m", data_dir=tmp_path / "d", out=tmp_path / "o", per_device=2,
                accumulation=1, cutoff_len=4367, packing="neat", gpu=True, epochs=3,
                learning_rate=1e-5)
    return pc.lf_config(**{**base, **kw})


def test_llamafactory_packing_modes(tmp_path):
    neat = _lf(tmp_path)
    assert neat["neat_packing"] is True and neat["packing"] is True
    plain = _lf(tmp_path, packing="plain")
    assert "neat_packing" not in plain and plain["packing"] is True
    none = _lf(tmp_path, packing="none")
    assert none["packing"] is False
    with pytest.raises(ValueError):
        _lf(tmp_path, packing="tight")


def test_llamafactory_gpu_switches_and_attention(tmp_path):
    gpu, cpu = _lf(tmp_path), _lf(tmp_path, gpu=False)
    assert (gpu["bf16"], gpu["enable_liger_kernel"]) == (True, True)
    assert (cpu["bf16"], cpu["enable_liger_kernel"]) == (False, False)
    assert gpu["flash_attn"] == "sdpa" and gpu["template"] == "qwen"
    assert gpu["disable_gradient_checkpointing"] is False
    assert _lf(tmp_path, gradient_checkpointing=False)["disable_gradient_checkpointing"] is True


def test_llamafactory_quality_saves_and_evaluates_each_epoch(tmp_path):
    cfg = _lf(tmp_path, packing="none", eval_each_epoch=True, save_each_epoch=True,
              deepspeed=tmp_path / "ds.json")
    assert cfg["save_strategy"] == "epoch" and cfg["save_only_model"] is True
    assert cfg["eval_dataset"] == pc.LF_EVAL and cfg["eval_strategy"] == "epoch"
    assert cfg["deepspeed"] == str(tmp_path / "ds.json")
    assert _lf(tmp_path)["save_strategy"] == "no"


def test_yaml_text_reads_back_as_the_same_mapping(tmp_path):
    cfg = _lf(tmp_path, packing="none", eval_each_epoch=True)
    cfg["odd"] = "a: b # c"
    assert yaml.safe_load(pc.yaml_text(cfg)) == cfg


def _pairs(args: list[str]) -> dict[str, str]:
    assert len(args) % 2 == 0
    return dict(zip(args[::2], args[1::2]))


def test_swift_args(tmp_path):
    base = dict(model=tmp_path / "m", train=tmp_path / "t.jsonl", out=tmp_path / "o",
                per_device=32, accumulation=4, max_length=1024, packing=False, gpu=True,
                epochs=3, learning_rate=1e-5, attn_impl="sdpa")
    a = _pairs(peer_runs.pc.swift_args(**base))
    assert a["--tuner_type"] == "full" and a["--torch_dtype"] == "bfloat16"
    assert a["--use_liger_kernel"] == "true" and a["--attn_impl"] == "sdpa"
    assert "--packing" not in a and a["--eval_strategy"] == "no"
    assert int(a["--per_device_train_batch_size"]) * int(a["--gradient_accumulation_steps"]) == 128
    packed = _pairs(pc.swift_args(**{**base, "packing": True, "attn_impl": "flash_attn"}))
    assert packed["--packing"] == packed["--padding_free"] == "true"
    cpu = _pairs(pc.swift_args(**{**base, "gpu": False, "eval_file": tmp_path / "e.jsonl",
                                  "save_each_epoch": True}))
    assert (cpu["--torch_dtype"], cpu["--bf16"], cpu["--use_liger_kernel"]) == ("float32", "false", "false")
    assert cpu["--val_dataset"] == str(tmp_path / "e.jsonl") and cpu["--save_strategy"] == "epoch"
    fp32 = _pairs(pc.swift_args(**{**base, "torch_dtype": "float32"}))
    assert (fp32["--torch_dtype"], fp32["--bf16"]) == ("float32", "true")


def test_zero2_config_is_stage_2_with_trainer_auto_values():
    ds = pc.zero2_config()
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["bf16"]["enabled"] == "auto"


def test_every_speed_row_builds_a_command(tmp_path):
    data = pc.write_split(RECORDS, tmp_path / "data", hold_out=False)
    ctx = peer_runs.Context(work=tmp_path, model_dir=tmp_path / "m", data=data,
                            sites={"llamafactory": tmp_path / "lf", "swift": tmp_path / "sw"},
                            gpu=True, pad_id=0, timeout_s=1, row_length=4367)
    for row in peer_runs.SPEED_ROWS.values():
        out = tmp_path / row.name
        out.mkdir()
        cmd, env, config = peer_runs.speed_job(row, ctx, out)
        assert config.is_file()
        module = {"llamafactory": "llamafactory.cli", "swift": "swift.cli.main"}[row.tool]
        assert cmd[1:3] == ["-m", module]
        assert ("FORCE_TORCHRUN" in env) == row.deepspeed
        penv = peer_runs.peer_env(ctx, row.tool, out, env, stop_after=8)
        assert penv["PYTHONPATH"].split(os.pathsep) == [str(ctx.sites[row.tool]),
                                                        str(peer_runs.HOOK_DIR)]
        assert penv["PEER_MEASURE_STOP_AFTER"] == "8"


# --------------------------------------------------------------------------- recorder


def test_segments_packed_padded_and_continued_rows():
    # LLaMA-Factory's packed row: two samples, then padding (pad id 0, position 0).
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0]])
    pos = torch.tensor([[0, 1, 0, 1, 2, 0, 0]])
    labels = torch.tensor([[-100, 6, -100, 8, 9, -100, -100]])
    assert peer_measure.segments(ids, pos, 0, labels) == [(2, 1), (3, 2)]
    # Padded rows without position ids: one sample per row; an all-padding row is none.
    ids = torch.tensor([[5, 6, 0], [7, 0, 0], [0, 0, 0]])
    assert peer_measure.segments(ids, None, 0) == [(2, 0), (1, 0)]
    # A row that begins mid-sample still counts its first piece.
    assert peer_measure.segments(torch.tensor([[5, 6, 7]]), torch.tensor([[3, 4, 0]]), 0) == [
        (2, 0), (1, 0)]


def test_counter_counts_each_micro_batch_once():
    counter = peer_measure._Counter(pad_id=0)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    labels = torch.tensor([[-100, 2, 3, -100], [-100, 5, -100, -100]])
    counter.record({"input_ids": ids, "labels": labels, "attention_mask": ids != 0})
    counter.record({"pixel_values": ids})  # no input ids: nothing to count
    got = counter.drain()
    assert got == {"nonpad": 5, "all": 8, "trained": 3, "lengths": [3, 2],
                   "trained_per_sample": [2, 1]}
    assert counter.drain()["nonpad"] == 0


def test_wrapped_trainer_init_keeps_its_signature():
    """ms-swift reads Trainer.__init__'s parameters to pick `processing_class`; the wrapper
    must not hide them (a subclass is patched here, never transformers' own class)."""
    import inspect
    import types

    from transformers import Trainer

    module = types.SimpleNamespace(Trainer=type("Patched", (Trainer,), {"__init__": Trainer.__init__}))
    peer_measure._patch_trainer_module(module)
    assert module.Trainer.__init__ is not Trainer.__init__
    assert "processing_class" in inspect.signature(module.Trainer.__init__).parameters
    assert Trainer.__init__ is not module.Trainer.__init__  # transformers' class untouched


HOOKED_TRAINER = textwrap.dedent("""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    rows = [{"input_ids": [1 + (i + j) % 60 for j in range(6)] + [0, 0],
             "attention_mask": [1] * 6 + [0, 0],
             "labels": [-100, -100] + [1 + (i + j) % 60 for j in range(2, 6)] + [-100, -100]}
            for i in range(16)]
    args = TrainingArguments(output_dir=OUT, per_device_train_batch_size=4, max_steps=4,
                             report_to="none", save_strategy="no", use_cpu=True, logging_steps=1)
    Trainer(model=Qwen2ForCausalLM(cfg), args=args, train_dataset=rows).train()
    print("TRAINING ENDED")
""")


def test_sitecustomize_puts_the_recorder_into_every_trainer(tmp_path):
    """A plain Trainer script, started with the hook folder on the path: the recorder writes
    one record per step and ends the process after PEER_MEASURE_STOP_AFTER steps."""
    script = tmp_path / "train.py"
    script.write_text(f"OUT = {str(tmp_path / 'trainer')!r}\n" + HOOKED_TRAINER)
    out = tmp_path / "measure.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(peer_runs.HOOK_DIR)]),
               PEER_MEASURE_OUT=str(out), PEER_MEASURE_STOP_AFTER="2", PEER_PAD_ID="0",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINING ENDED" not in proc.stdout  # stopped after step 2, before the end
    rec = json.loads(out.read_text())
    assert [s["step"] for s in rec["steps"]] == [1, 2] and rec["stopped_after"] == 2
    first = rec["steps"][0]
    assert (first["nonpad"], first["all"], first["trained"]) == (24, 32, 16)
    assert first["lengths"] == [6, 6, 6, 6] and first["trained_per_sample"] == [4, 4, 4, 4]
    # Trainer's own count (switched to non-padding mode by the recorder: the attention mask's
    # sum) agrees with the recorder's.
    assert rec["steps"][-1]["num_input_tokens_seen"] == 48
    assert rec["max_steps"] == 4 and rec["logs"]


# --------------------------------------------------------------------------- result rows


def _record(times, nonpad, lengths, seen=None):
    steps = []
    total = 0
    for i, (t, n, ls) in enumerate(zip(times, nonpad, lengths)):
        total += n if seen is None else seen[i]
        steps.append({"step": i + 1, "time_s": t, "end_unix": 100.0 + sum(times[:i + 1]),
                      "nonpad": n, "all": n + 10, "trained": n // 2, "lengths": ls,
                      "trained_per_sample": [x - 1 for x in ls],
                      "num_input_tokens_seen": total, "max_memory_allocated": (i + 1) << 30,
                      "max_memory_reserved": (i + 2) << 30})
    return {"steps": steps, "max_steps": 90}


def test_speed_stats_by_hand():
    rec = _record([5.0, 1.0, 2.0, 2.0], [900, 1000, 1000, 3000], [[3, 4], [3], [5], [4, 4]])
    s = peer_runs.speed_stats(rec, start_unix=90.0, params=1_000_000_000, warmup=2,
                              data_lengths=[3, 3, 4, 4, 4, 5], data_trained=[2, 2, 2, 2, 2, 3])
    assert s["tokens_per_s_per_gpu"] == 1000.0  # (1000 + 3000) / (2 + 2)
    assert s["mfu"] == round(1000 * 6 * 1e9 / 989e12, 5)
    assert s["step_time_p50_s"] == 2.0 and s["time_to_first_step_s"] == 15.0
    assert s["e2e_wall_s"] == 15.0 + 89 * 2.0 and s["e2e_kind"] == "extrapolated"
    assert s["samples_per_step_mean"] == 1.5 and s["padding_per_step_mean"] == 10
    assert s["peak_gpu_allocated_gib"] == 4.0 and s["peak_gpu_reserved_gib"] == 5.0
    assert s["own_count"]["within_1_percent"] is True
    assert s["lengths_check"]["unmatched"] == 0 and s["lengths_check"]["samples_seen"] == 6
    # Samples of length 3 train as chatft does; those of lengths 4 and 5 one label more.
    assert s["trained_check"] == {"samples": 6, "differences": {"0": 2, "1": 4}}


def test_own_count_mismatch_is_reported_not_hidden():
    rec = _record([1.0, 1.0], [100, 100], [[1], [1]], seen=[400, 400])
    check = peer_runs.speed_stats(rec, 99.0, 1, 0, [1, 1])["own_count"]
    assert check["ratio"] == 4.0 and check["within_1_percent"] is False and check["note"]


def test_trained_check_names_the_difference_per_sample():
    c = peer_runs.trained_check([(5, 3), (6, 2), (9, 1)], [(5, 2), (6, 2), (6, 1)])
    assert c["differences"] == {"0": 1, "1": 1, "no such length": 1}


def test_lengths_check_counts_lengths_the_data_does_not_hold():
    c = peer_runs.lengths_check([3, 3, 7], [3, 4])
    assert c["unmatched"] == 2 and c["matched_fraction"] == round(1 / 3, 4)


def test_epoch_checkpoints_sorted_by_step(tmp_path):
    for n in (630, 210, 420):
        d = tmp_path / "run" / f"checkpoint-{n}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
    (tmp_path / "run" / "checkpoint-999").mkdir()  # no weights: not an epoch checkpoint
    assert [p.name for p in peer_runs.epoch_checkpoints(tmp_path / "run")] == [
        "checkpoint-210", "checkpoint-420", "checkpoint-630"]


# --------------------------------------------------------------------------- evaluator


def test_shared_evaluator_equals_chatfts_held_out_loss(tmp_path, qwen_tokenizer, huanhuan_path):
    """The evaluator on the base model = chatft's own held-out loss before training
    (``chatft train --eval_ratio 0.1``, first ``eval_loss`` of metrics.jsonl), fp32 CPU."""
    from tests.train.conftest import TINY_QWEN2, metrics, run_chatft, write_tiny_qwen2

    model = write_tiny_qwen2(tmp_path / "tiny", qwen_tokenizer, **TINY_QWEN2)
    records = json.loads(huanhuan_path.read_text(encoding="utf-8"))[:60]
    src = tmp_path / "huanhuan60.json"
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    run_chatft("train", "--model", model, "--data", src, "--system", pc.SYSTEM_PROMPT,
               "--eval_ratio", "0.1", "--max_steps", "1", "--per_device_train_batch_size", "8",
               "--output_dir", tmp_path / "run", "--export", "false", "--save_strategy", "no")
    chatft_before = [m["eval_loss"] for m in metrics(tmp_path / "run") if "eval_loss" in m][0]

    files = pc.write_split(records, tmp_path / "split")
    samples = peer_eval.render_file(Path(files["eval"]), qwen_tokenizer)
    assert len(samples) == 6
    ours = peer_eval.held_out_loss(model, samples, device="cpu", max_tokens=256)
    assert ours["samples"] == 6 and ours["dtype"] == "float32"
    assert ours["loss"] == pytest.approx(chatft_before, rel=1e-5)
    # Batching does not change the sum.
    again = peer_eval.held_out_loss(model, samples, device="cpu", max_tokens=100_000)
    assert again["loss"] == pytest.approx(ours["loss"], rel=1e-6)


def test_answer_folder_takes_weights_from_one_and_tokenizer_from_the_other(tmp_path):
    ck, base = tmp_path / "ck", tmp_path / "base"
    ck.mkdir()
    base.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (ck / f).write_text("ck")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (base / f).write_text("base")
    out = peer_eval.with_base_tokenizer(ck, base, tmp_path / "answer")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "config.json": "ck", "model.safetensors": "ck", "tokenizer.json": "base",
        "tokenizer_config.json": "base"}


def test_quality_rows_train_at_equal_settings(tmp_path):
    data = pc.write_split(RECORDS, tmp_path / "data")
    ctx = peer_runs.Context(work=tmp_path, model_dir=tmp_path / "m", data=data,
                            sites={"llamafactory": tmp_path / "lf", "swift": tmp_path / "sw"},
                            gpu=True, pad_id=0, timeout_s=1)
    seen = {}
    for row in peer_runs.QUALITY_ROWS.values():
        out = tmp_path / row.name
        out.mkdir()
        cmd, _, config = peer_runs.quality_job(row, ctx, out, epochs=3)
        if row.tool == "llamafactory":
            cfg = yaml.safe_load(config.read_text())
            seen[row.name] = (cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"],
                              cfg["learning_rate"], cfg["num_train_epochs"], cfg["lr_scheduler_type"],
                              cfg["warmup_ratio"], cfg["bf16"])
            assert cfg["packing"] is False and cfg["save_strategy"] == "epoch"
            assert cfg["enable_liger_kernel"] is (row.name != "llamafactory_noliger")
        else:
            a = _pairs(cmd[cmd.index("sft") + 1:])
            seen[row.name] = (int(a["--per_device_train_batch_size"])
                              * int(a["--gradient_accumulation_steps"]), float(a["--learning_rate"]),
                              float(a["--num_train_epochs"]), a["--lr_scheduler_type"],
                              float(a["--warmup_ratio"]), a["--bf16"] == "true")
            assert a["--val_dataset"] == data["eval"] and a["--save_strategy"] == "epoch"
            assert a["--torch_dtype"] == ("float32" if row.name == "swift_fp32" else "bfloat16")
    assert set(seen.values()) == {(16, 1e-5, 3, "cosine", 0.03, True)}


def test_own_eval_losses_one_per_step():
    from bench.lib import peer_quality
    logs = {"logs": [{"step": 4, "eval_loss": 2.0}, {"step": 8, "eval_loss": 1.5},
                     {"step": 8, "eval_loss": 1.5}, {"step": 8, "loss": 9.0}]}
    assert peer_quality.own_eval_losses(logs) == [{"step": 4, "eval_loss": 2.0},
                                                   {"step": 8, "eval_loss": 1.5}]


def test_segments_from_a_block_diagonal_mask_when_position_ids_run_on():
    """LLaMA-Factory's neat packing marks sample boundaries in a 4D float mask only; the
    recorder splits its rows there (position ids that run on across samples are ignored)."""
    seg = torch.tensor([1, 1, 2, 2, 2, 0])
    allow = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0) & torch.ones(6, 6).tril().bool()
    mask = torch.where(allow, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    counter = peer_measure._Counter(pad_id=0)
    counter.record({"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0]]),
                    "position_ids": torch.arange(6)[None], "attention_mask": mask[None, None],
                    "labels": torch.tensor([[-100, 6, -100, 8, 9, -100]])})
    counter.record({"input_ids": torch.tensor([[5, 6, 7, 0]]),
                    "attention_mask": torch.tensor([[1, 2, 2, 0]])})  # segment ids
    out = counter.drain()
    assert out["lengths"] == [2, 3, 1, 2] and out["trained_per_sample"] == [1, 2, 0, 0]


def test_first_nonfinite_grad_norm_flags_a_nan_run():
    from bench.lib import peer_quality
    logs = {"logs": [{"step": 1, "grad_norm": 2.0, "loss": 4.0},
                     {"step": 2, "eval_loss": 3.0},
                     {"step": 3, "grad_norm": float("inf"), "loss": 3.9},
                     {"step": 4, "grad_norm": float("nan"), "loss": 0.0}]}
    assert peer_quality.first_nonfinite_grad_norm(logs) == {
        "step": 3, "loss_logged": 3.9, "nonfinite_steps_logged": 2}
    assert peer_quality.first_nonfinite_grad_norm({"logs": logs["logs"][:2]}) is None


def test_chatft_train_time_reads_its_closing_line(tmp_path):
    from bench.lib import peer_quality
    log = tmp_path / "log.txt"
    log.write_text("train: 100%|...| 630/630\nchatft: trained 630 steps in 115.7 s (5,952 tokens/s)"
                   "; held-out loss 5.4602 -> 4.4310\n")
    assert peer_quality.chatft_train_time(log) == (115.7, 630)
    assert peer_quality.chatft_train_time(tmp_path / "missing.txt") == (None, None)
