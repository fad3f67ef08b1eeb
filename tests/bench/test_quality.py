"""The quality benchmark's library (bench.lib.quality): persona heuristic, metrics parsing,
the options each variant passes to ``chatft train``, the held-out check, and one end-to-end
run on a tiny random model (real ``chatft train`` subprocess, real export, real answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import chatft
from bench.lib import environment
from bench.lib import quality as q
from bench.lib import quality_measures as qm
from tests.train.conftest import tiny_qwen2_dir  # noqa: F401  (fixture)

# --------------------------------------------------------------------------- persona check

@pytest.mark.parametrize("answer, expected", [
    ("臣妾是甄嬛。", True),
    ("家父是大理寺少卿甄远道。", True),
    ("你放心，本宫到任何时候都不会自轻自贱。", True),
    ("我是一个人工智能助手，可以回答你的问题。", False),      # assistant self-description
    ("我是甄嬛，一个AI助手。", False),                      # persona word, but breaks character
    ("I am Zhen Huan, 甄嬛, a consort of the emperor.", False),  # mostly not Chinese
    ("我是一个普通人，喜欢读书。", False),                  # Chinese, no persona word
    ("", False),
])
def test_persona_check_verdicts(answer, expected):
    assert qm.persona_check(answer).in_character is expected


def test_persona_check_latin_markers_are_whole_words():
    # "said" and "maintain" contain "ai" but are not the word "AI".
    check = qm.persona_check("皇上 said to maintain 本宫")
    assert check.assistant_markers == ()
    assert qm.persona_check("我是ai").assistant_markers == ("ai",)
    assert qm.persona_check("I'm SmolLM, an AI Assistant").assistant_markers == (
        "ai", "assistant", "smollm")


def test_persona_check_cjk_share_counts_letters_only():
    # 4 ideographs + 4 Latin letters; punctuation and digits are not letters.
    assert qm.persona_check("甄嬛皇上 abcd, 123!").cjk_share == 0.5


# --------------------------------------------------------------------------- metrics

def _write_metrics(path: Path, n_steps: int) -> None:
    lines = [{"step": 0, "eval_loss": 3.5}]
    for s in range(1, n_steps + 1):
        lines.append({"step": s, "epoch": s / n_steps, "loss": 3.0 - s / 100, "lr": 1e-4,
                      "grad_norm": 1.0, "tokens": 100 + s, "trained_tokens": 30,
                      "step_time_s": 0.5, "tokens_per_s": 200.0})
        if s == n_steps // 2:
            lines.append({"step": s, "eval_loss": 2.9})
    lines.append({"step": n_steps, "eval_loss": 2.25})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_read_metrics_first_and_last_eval(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl", 250)
    m = qm.read_metrics(tmp_path / "metrics.jsonl")
    assert m.steps == 250
    assert (m.eval_loss_before, m.eval_loss_after) == (3.5, 2.25)
    assert [e["eval_loss"] for e in m.evals] == [3.5, 2.9, 2.25]
    assert m.tokens == sum(100 + s for s in range(1, 251))
    assert m.train_s == pytest.approx(125.0)
    assert m.tokens_per_s == pytest.approx(m.tokens / 125.0)
    assert m.final_train_loss == pytest.approx(0.5)
    # Curve: every 3rd step (ceil(250 / 100)) plus the last one.
    assert len(m.loss_curve) <= 101
    assert m.loss_curve[0][0] == 1 and m.loss_curve[-1][0] == 250


def test_read_metrics_without_final_eval(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 3.0}) + "\n")
    m = qm.read_metrics(tmp_path / "metrics.jsonl")
    assert m.eval_loss_before == 3.0 and m.eval_loss_after is None
    assert m.steps == 0 and m.tokens_per_s is None


# --------------------------------------------------------------------------- chatft options

@pytest.mark.parametrize("name", list(q.VARIANTS))
def test_variant_overrides_reach_the_config(name, tmp_path, chat_alpaca):
    from chatft.config_parse import load_config

    v = q.VARIANTS[name]
    cfg = load_config(None, q.train_overrides(v, model=Path("m"), data=chat_alpaca, epochs=3,
                                              precision="bf16", output_dir=tmp_path / name,
                                              seed=7))
    t, d = cfg.train, cfg.data
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.world_size == \
        v.global_batch
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_ratio) == \
        (v.learning_rate, v.lr_scheduler_type, v.warmup_ratio)
    assert (t.num_train_epochs, t.precision, t.seed, t.export) == (3.0, "bf16", 7, True)
    assert (d.system, d.eval_ratio, d.packing) == (q.SYSTEM_PROMPT, 0.1, True)
    assert t.eval_strategy == "no"  # before and after only; the last step is exported
    assert not cfg.uses_deepspeed  # one process: chatft's plain PyTorch engine
    assert t.micro_batch_tokens == 0 and d.max_length == 4096  # chatft's defaults unless capped


def test_micro_batch_cap_sets_max_length(tmp_path, chat_alpaca):
    from chatft.config_parse import load_config

    cfg = load_config(None, q.train_overrides(q.VARIANTS["recommended"], model=Path("m"),
                                              data=chat_alpaca, epochs=1, precision="fp32",
                                              output_dir=tmp_path, seed=1, micro_batch_tokens=1024))
    assert (cfg.train.micro_batch_tokens, cfg.data.max_length) == (1024, 1024)
    assert cfg.train.per_device_train_batch_size == 128  # the batch itself is unchanged


def test_limited_data_keeps_first_records(tmp_path, chat_alpaca):
    out = q.limited_data(chat_alpaca, 25, tmp_path)
    full = json.loads(chat_alpaca.read_text(encoding="utf-8"))
    assert json.loads(out.read_text(encoding="utf-8")) == full[:25]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in full[:5]))
    lines = q.limited_data(jsonl, 3, tmp_path / "w").read_text().splitlines()
    assert [json.loads(x) for x in lines] == full[:3]
    assert q.limited_data(chat_alpaca, None, tmp_path) == chat_alpaca


def test_held_out_split_is_index_mod_10(tmp_path, chat_alpaca, qwen_tokenizer_dir):
    data = q.limited_data(chat_alpaca, 40, tmp_path)
    split = q.held_out_split(q.train_overrides(q.VARIANTS["recommended"], model=qwen_tokenizer_dir,
                                               data=data, epochs=1, precision="fp32",
                                               output_dir=tmp_path / "out", seed=42))
    assert split["records"] == 40
    assert (split["train_samples"], split["held_out_samples"]) == (36, 4)
    assert split["first_held_out"] == [9, 19, 29, 39]
    assert 0 < split["held_out_trained_tokens"] < split["held_out_tokens"]


def test_acceptance_checks():
    def row(name, after, k=4):
        return {"variant": name, "eval_loss_after": after, "in_character": k}

    smoke = q.acceptance_checks([row("recommended", 1.0)], is_acceptance_setup=False)
    assert smoke["applicable"] is False
    full = q.acceptance_checks([row("recommended", 2.15, 3), row("tutorial_hp", 2.10),
                                row("reference_hp", 2.20)], is_acceptance_setup=True)
    assert full["recommended_vs_tutorial_hp"]["no_worse"] is False
    assert full["recommended_vs_tutorial_hp"]["difference"] == pytest.approx(0.05)
    assert full["recommended_vs_plain_loop"]["at_least_as_good"] is True
    assert full["recommended_vs_plain_loop"]["persona_heuristic_in_character"] == "3/4"
    assert full["reference_hp_vs_plain_loop"]["at_least_as_good"] is False


# --------------------------------------------------------------------------- end to end

def test_run_benchmark_end_to_end(tmp_path, tiny_qwen2_dir, chat_alpaca):
    opts = q.QualityOptions(model=str(tiny_qwen2_dir), data=str(chat_alpaca),
                            variants=("reference_hp",), epochs=1, limit=20, device="cpu",
                            runs_dir=tmp_path / "runs", command="test")
    result = q.run_benchmark(opts)
    assert result["held_out"]["verified"] and result["held_out"]["held_out_samples"] == 2
    (v,) = result["variants"]
    assert v["variant"] == "reference_hp" and v["global_batch"] == 16
    assert v["steps"] == 2  # ceil(18 training samples / batch 16), one epoch
    assert v["eval_loss_before"] > 0 and v["eval_loss_after"] > 0
    assert v["eval_loss_before"] != v["eval_loss_after"]
    assert v["tokens"] == result["held_out"]["train_tokens_per_epoch"]
    assert v["tokens_per_s"] > 0 and v["wall_s"] >= v["train_s"] > 0
    assert [a["question"] for a in v["answers"]] == list(q.QUESTIONS)
    assert [a["question"] for a in result["base_model_answers"]] == list(q.QUESTIONS)
    assert all(a["completion_tokens"] > 0 for a in v["answers"])
    assert "--per_device_train_batch_size 16" in v["command"]
    assert (Path(v["output_dir"]) / "final" / "config.json").is_file()
    assert result["checks"]["applicable"] is False
    assert result["versions"]["chatft"] == chatft.__version__
    assert result["versions"]["git_commit"] == environment.git_commit()
    assert result["hardware"]["cpu_cores"] and "gpu_count_visible" not in result["hardware"]
    report = q.format_report(result)
    assert report.splitlines()[1].startswith("reference_hp")
    for a in v["answers"]:
        assert a["question"] in report
    path = q.write_result(result, tmp_path / "out", "test")
    assert json.loads(path.read_text(encoding="utf-8"))["variants"][0]["steps"] == 2


def test_parallel_variants_report_progress_and_keep_order(tmp_path, tiny_qwen2_dir, chat_alpaca):
    """Variants trained at once: each finished one is reported as a partial record (complete
    False), and the final rows come back in the order asked, whatever order they finished."""
    opts = q.QualityOptions(model=str(tiny_qwen2_dir), data=str(chat_alpaca),
                            variants=("tutorial_hp", "reference_hp"), epochs=1, limit=20,
                            device="cpu", runs_dir=tmp_path / "runs", parallel=True,
                            command="test")
    partial: list[dict] = []
    result = q.run_benchmark(opts, on_progress=partial.append)
    assert len(partial) == 1 and partial[0]["complete"] is False
    assert len(partial[0]["variants"]) == 1
    assert result["complete"] is True
    assert [v["variant"] for v in result["variants"]] == ["tutorial_hp", "reference_hp"]
    steps = {v["variant"]: v["steps"] for v in result["variants"]}
    assert steps == {"tutorial_hp": 5, "reference_hp": 2}  # ceil(18 / 4), ceil(18 / 16)
    assert result["settings"]["variants_trained_in_parallel"] is True
