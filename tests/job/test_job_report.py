"""``chatft eval``'s report files, from a hand-made result (no model): what each part says."""

from __future__ import annotations

import json

from chatft.job.evaluate import EvalReport, ModelResult
from chatft.job.report import report_paths, write_report


def test_report_names_models_marks_the_exported_step_and_quotes_answers(tmp_path):
    evaluations = [{"step": 0, "epoch": 0.0, "eval_loss": 5.46, "checkpoint": False},
                   {"step": 210, "epoch": 1.0, "eval_loss": 4.0902, "checkpoint": True},
                   {"step": 420, "epoch": 2.0, "eval_loss": 4.1221, "checkpoint": True}]
    tuned = ModelResult("runs/b16/final", "chatft export", 4.0902, 372, 25_012,
                        {"你是谁？": "我是甄嬛。\n家父是大理寺少卿甄远道。"},
                        training={"exported_step": 210, "evaluations": evaluations,
                                  "exported_because": "step 210 (epoch 1): lowest eval_loss "
                                                      "4.0902 of 2 evaluations"},
                        metrics=[{"step": 1, "loss": 3.0}, {"step": 210, "eval_loss": 4.0902}])
    base = ModelResult("qwen.gguf", "GGUF file", 5.46, 372, 25_012, {"你是谁？": "I am Qwen | an AI"})
    report = EvalReport("huanhuan.json", "records with index i % 10 == 9 (eval_ratio 0.1)",
                        "现在你要扮演皇帝身边的女人--甄嬛.", "bf16", "cuda:0", 16, ["你是谁？"],
                        [base, tuned])
    md = write_report(report, tmp_path / "out" / "report.md")
    assert report_paths(tmp_path / "r") == (tmp_path / "r.md", tmp_path / "r_curves.png",
                                            tmp_path / "r.json")
    text = md.read_text()
    assert "| `qwen.gguf` | GGUF file | 5.4600 | 372 | 25,012 | not a chatft run |" in text
    assert ("| `runs/b16/final` | chatft export | 4.0902 | 372 | 25,012 | exported step 210 "
            "(epoch 1): lowest eval_loss 4.0902 of 2 evaluations |") in text
    assert "| 210 | 1 | 4.0902 | exported |\n| 420 | 2 | 4.1221 |  |" in text
    assert "bf16 on cuda:0, micro-batches of 16 samples" in text
    # a multi-line answer stays one quote; the other model's answer follows under its name
    assert "**`runs/b16/final`**\n\n> 我是甄嬛。\n> 家父是大理寺少卿甄远道。" in text
    assert "**`qwen.gguf`**\n\n> I am Qwen | an AI" in text
    assert (tmp_path / "out" / "report_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["models"][1]["training"]["exported_step"] == 210
