"""The best-checkpoint benchmark: is the exported model the best evaluated one, on a real Qwen?

Two ``chatft train`` runs of Qwen2.5-Coder-0.5B-Instruct (a Q4_K_M GGUF file, dequantized on
load) on huanhuan with records ``i % 10 == 9`` held out (``--eval_ratio 0.1``) and the
tutorial's system prompt, 3 epochs, side by side on one GPU (both are step-overhead bound):

* ``defaults``: chatft's defaults (batch 8, lr 2e-5, cosine), which with held-out data
  evaluate and save every epoch and export the best evaluated checkpoint;
* ``b16``: the same with ``--per_device_train_batch_size 16 --learning_rate 1e-5``.

Both keep at most one checkpoint besides the best (``--save_total_limit 1``: a plain-engine
checkpoint of a 0.5B model with its optimizer is ~8 GB; the result is the same at any limit).
The GGUF is dequantized once into a Hugging Face folder (chatft's own GGUF path) that all
three commands take. Then one ``chatft eval BASE defaults/final b16/final --ask ...`` measures every model's held-out
loss with training's definition and their greedy answers, and writes the Markdown report.

Checks (the issue's acceptance): each export's held-out loss, as ``chatft eval`` measures it,
equals its run's lowest evaluated value within 1e-3 (the run's ``metrics.jsonl``); at batch
16 / lr 1e-5 it is at most 4.10; the base model's equals the runs' step-0 value. The result
file holds the exact commands, wall times, every evaluation, the exported steps and why, the
answers, the report's text, versions and hardware.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lib import environment

SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛."
QUESTIONS = ("你是谁？", "你叫什么名字？", "你的父亲是谁？", "请介绍一下你自己。")
EVAL_RATIO = 0.1
#: Acceptance bounds from the issue.
MATCH_TOLERANCE = 1e-3
B16_MAX_LOSS = 4.10
#: Each run's own options (everything else is shared).
RUNS: dict[str, list[str]] = {
    "defaults": [],
    "b16": ["--per_device_train_batch_size", "16", "--learning_rate", "1e-5"],
}


def train_command(model: str, data: str, out: Path, extra: Sequence[str], epochs: float,
                  max_steps: int | None) -> list[str]:
    cmd = ["chatft", "train", "--model", model, "--data", data, "--system", SYSTEM_PROMPT,
           "--eval_ratio", str(EVAL_RATIO), "--num_train_epochs", f"{epochs:g}",
           "--save_total_limit", "1", "--output_dir", str(out), *extra]
    if max_steps:  # smoke runs only
        # CPU runs train in fp32: a bf16 export would differ from the evaluated weights by its
        # rounding (on a GPU the bf16 weights are what each evaluation sees).
        cmd += ["--max_steps", str(max_steps), "--eval_steps", str(max(1, max_steps // 2)),
                "--export_dtype", "fp32"]
    return cmd


def eval_command(model: str, data: str, finals: Sequence[Path], report: Path,
                 max_new_tokens: int) -> list[str]:
    cmd = ["chatft", "eval", model, *map(str, finals), "--data", data,
           "--eval_ratio", str(EVAL_RATIO), "--system", SYSTEM_PROMPT, "--out", str(report),
           "--max-new-tokens", str(max_new_tokens)]
    for q in QUESTIONS:
        cmd += ["--ask", q]
    return cmd


def run_logged(cmd: list[str], log: Path, timeout: float, threads: int) -> subprocess.Popen:
    """Start ``cmd`` (``chatft`` is this checkout's, run with this Python) with its output in
    ``log``, killed after ``timeout`` seconds; the caller waits. ``threads`` caps its CPU
    threads: the GPU is shared with other runs, and so are the host's cores."""
    env = dict(os.environ)
    src = str(environment.CHECKOUT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    # Several processes share the GPU: return freed blocks' fragments instead of holding them.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    argv = [sys.executable, "-m", "chatft", *cmd[1:]]
    f = log.open("w", encoding="utf-8")
    proc = subprocess.Popen(["timeout", "--kill-after=20", str(max(1, int(timeout))), *argv],
                            stdout=f, stderr=subprocess.STDOUT, env=env)
    proc.log_file = f  # type: ignore[attr-defined]
    return proc


def wait(proc: subprocess.Popen, started: float) -> dict[str, Any]:
    rc = proc.wait()
    proc.log_file.close()  # type: ignore[attr-defined]
    return {"exit_code": rc, "wall_s": round(time.perf_counter() - started, 1)}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_summary(out: Path) -> dict[str, Any]:
    """One run's evaluations, what its export holds and why, training time and steps."""
    records = read_metrics(out)
    evals = [{"step": r["step"], "epoch": r.get("epoch"), "eval_loss": r["eval_loss"]}
             for r in records if "eval_loss" in r]
    trained = [e for e in evals if e["step"] > 0]
    meta_path = out / "final" / "chatft.json"
    extra = json.loads(meta_path.read_text(encoding="utf-8"))["extra"] if meta_path.is_file() else {}
    steps = [r for r in records if "loss" in r]
    return {
        "evaluations": evals,
        "lowest_eval_loss": min((e["eval_loss"] for e in trained), default=None),
        "lowest_at_step": min(trained, key=lambda e: e["eval_loss"])["step"] if trained else None,
        "exported_step": extra.get("exported_step"),
        "exported_because": extra.get("exported_because"),
        "steps": max((r["step"] for r in steps), default=0),
        "train_time_s": round(sum(r.get("step_time_s", 0.0) for r in steps), 1),
        "last_train_loss": steps[-1]["loss"] if steps else None,
    }


def checks(runs: dict[str, dict[str, Any]], report: dict[str, Any] | None,
           finals: dict[str, str]) -> dict[str, Any]:
    """The acceptance checks; each is ``{"ok": bool, ...}`` (``ok`` None: not measured)."""
    by_model = {m["model"]: m for m in (report or {}).get("models", [])}
    out: dict[str, Any] = {}
    for name, summary in runs.items():
        measured = by_model.get(finals[name], {}).get("eval_loss")
        lowest = summary.get("lowest_eval_loss")
        ok = None if measured is None or lowest is None else abs(measured - lowest) <= MATCH_TOLERANCE
        out[f"{name}_export_equals_lowest"] = {"ok": ok, "export_eval_loss": measured,
                                               "lowest_evaluated": lowest,
                                               "tolerance": MATCH_TOLERANCE}
        if name == "b16":
            out["b16_export_at_most"] = {"ok": None if measured is None else measured <= B16_MAX_LOSS,
                                         "export_eval_loss": measured, "bound": B16_MAX_LOSS}
    base = (report or {}).get("models", [{}])[0].get("eval_loss")
    before = [s["evaluations"][0]["eval_loss"] for s in runs.values()
              if s["evaluations"] and s["evaluations"][0]["step"] == 0]
    out["base_equals_step0"] = {"ok": None if base is None or not before else
                                all(abs(base - b) <= MATCH_TOLERANCE for b in before),
                                "base_eval_loss": base, "runs_step0": before}
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'run':<9} {'steps':>5} {'evaluations (step: held-out loss)':<58} {'exported':>8} "
             f"{'chatft eval':>11}"]
    models = {m["model"]: m for m in (result.get("report") or {}).get("models", [])}
    for name, s in result["runs"].items():
        ev = ", ".join(f"{e['step']}: {e['eval_loss']:.4f}" for e in s["evaluations"])
        measured = models.get(result["finals"][name], {}).get("eval_loss")
        lines.append(f"{name:<9} {s['steps']:>5} {ev:<58} {s['exported_step']!s:>8} "
                     f"{measured if measured is None else round(measured, 4)!s:>11}")
    for key, c in result["checks"].items():
        lines.append(f"check {key}: {c['ok']}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def limited_data(data: str, limit: int, folder: Path) -> str:
    """The first ``limit`` records of ``data`` (CPU smoke runs)."""
    records = json.loads(Path(data).read_text(encoding="utf-8"))[:limit]
    path = folder / f"data_first{limit}.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="bench/eval_best_qwen.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", required=True, help="the Qwen2.5-Coder-0.5B-Instruct GGUF")
    ap.add_argument("--data", default="", help="huanhuan.json (default: $CHATFT_SHARED/data/"
                                              "huanhuan.json)")
    ap.add_argument("--label", default="qwen2.5-0.5b_h200x1")
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/chatft_eval_best"))
    ap.add_argument("--out", type=Path, default=environment.CHECKOUT / "bench" / "results")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--limit", type=int, help="first N records only (CPU smoke runs)")
    ap.add_argument("--max-steps", type=int, help="stop each run after N steps (smoke runs)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=float, default=420,
                    help="seconds for the whole benchmark: the trainings are stopped at "
                         "budget - eval-reserve, the report's chatft eval at the budget")
    ap.add_argument("--eval-reserve", type=float, default=100,
                    help="seconds of the budget kept for chatft eval (default 100)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the runs' checkpoints (deleted after export by default: disk)")
    args = ap.parse_args(argv)

    data = args.data or str(Path(os.environ.get("CHATFT_SHARED", "../shared")) / "data" / "huanhuan.json")
    root = args.runs_dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if args.limit:
        data = limited_data(data, args.limit, root)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    threads = max(1, (os.cpu_count() or 2) // 4)
    model, materialize_s = args.model_path, None
    if model.endswith(".gguf"):
        # Dequantized once into a Hugging Face folder (chatft's own GGUF path, the one the
        # built-in model takes) rather than by each of the three commands: ~half a minute
        # less on the critical path; the weights are the same.
        from chatft.model.loading import materialize_gguf

        t0 = time.perf_counter()
        model = str(materialize_gguf(Path(model), Path(model).stem))
        materialize_s = round(time.perf_counter() - t0, 1)
    # Each plain-engine checkpoint of the 0.5B model (fp32 weights and AdamW moments) is ~6-8 GB
    # and a run holds at most three at once (best, newest, the one being written).
    free_gib = round(shutil.disk_usage(root).free / 2**30, 1)
    result: dict[str, Any] = {
        "benchmark": "eval_best", "complete": False, "model": args.model_path, "model_folder": model,
        "materialize_s": materialize_s, "data": data,
        "system_prompt": SYSTEM_PROMPT, "eval_ratio": EVAL_RATIO, "epochs": args.epochs,
        "smoke": bool(args.limit or args.max_steps),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "versions": environment.versions(("liger-kernel", "gguf")),
        "hardware": environment.hardware(device, gpu_count_key="gpu_count_visible"),
        "budget_s": args.budget, "disk_free_gib_at_start": free_gib, "child_cpu_threads": threads,
        "commands": {}, "wall_s": {}, "runs": {}, "finals": {}}
    if not result["smoke"] and free_gib < 50:
        print(f"warning: {free_gib} GiB free under {root}; the two runs may need up to ~50 GiB "
              "of checkpoints at once (--runs-dir elsewhere)", flush=True)
    out_file = args.out / f"eval_best_{args.label}.json"

    # Side by side on a GPU (a 0.5B model leaves an H200 mostly idle); one after the other on
    # a CPU, where two fp32 copies with their optimizers would not fit a small machine.
    result["side_by_side"] = parallel = device == "cuda"
    started, procs = {}, {}

    def finish(name: str) -> None:
        result["wall_s"][f"train_{name}"] = wait(procs[name], started[name])
        result["runs"][name] = run_summary(root / name)
        if not args.keep_checkpoints:
            shutil.rmtree(root / name / "checkpoints", ignore_errors=True)

    for name, extra in RUNS.items():
        cmd = train_command(model, data, root / name, extra, args.epochs, args.max_steps)
        result["commands"][f"train_{name}"] = shlex.join(cmd)
        result["finals"][name] = str(root / name / "final")
        started[name] = time.perf_counter()
        train_left = args.budget - args.eval_reserve - (time.perf_counter() - t_start)
        procs[name] = run_logged(cmd, root / f"train_{name}.log", train_left, threads)
        if not parallel:
            finish(name)
    if parallel:
        for name in RUNS:
            finish(name)
    write_result(result, out_file)

    report = root / "report.md"
    finals = [Path(result["finals"][name]) for name in RUNS]
    cmd = eval_command(model, data, finals, report, args.max_new_tokens)
    result["commands"]["eval"] = shlex.join(cmd)
    t0 = time.perf_counter()
    eval_left = max(args.eval_reserve, args.budget - (t0 - t_start))
    result["wall_s"]["eval"] = wait(run_logged(cmd, root / "eval.log", eval_left, threads), t0)
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    facts = json.loads(report.with_suffix(".json").read_text()) if report.with_suffix(".json").is_file() else None
    if facts is not None:
        for m in facts["models"]:
            m.pop("metrics", None)  # in runs[...] already
    result["report"] = facts
    result["report_md"] = report.read_text(encoding="utf-8") if report.is_file() else None
    result["checks"] = checks(result["runs"], facts, result["finals"])
    result["complete"] = facts is not None and all(
        w["exit_code"] == 0 for w in result["wall_s"].values())
    write_result(result, out_file)
    print(format_table(result))
    print(f"result: {out_file}; report: {report}")
    print(json.dumps({"complete": result["complete"], "total_wall_s": result["total_wall_s"], "checks": {k: c["ok"] for k, c in result["checks"].items()},
                      "runs": {k: {"exported_step": v["exported_step"],
                                   "lowest_eval_loss": v["lowest_eval_loss"]} for k, v in result["runs"].items()}}))
    return 0 if result["complete"] else 1
