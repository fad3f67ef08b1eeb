"""Quality parity: every tool trains the real Qwen2.5-Coder-0.5B-Instruct at equal settings,
and one evaluator (``peer_eval``) scores every tool's epoch checkpoints.

Steps: check and dequantize the GGUF (chatft, once, into its model cache); write the two
shared files; start every tool's training at once (a 0.5B model leaves an H200 mostly idle),
each in its own process tree with its own time limit; then, in this process, render the
held-out file once with the base model's tokenizer and template, compute the held-out loss of
the base model and of each checkpoint, and ask each tool's final model the four questions
(chatft's generation, greedy, 128 new tokens, with the system prompt). The result file is
rewritten after each tool's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib import peer_configs as pc
from bench.lib import peer_eval
from bench.lib import peer_runs as pr

from bench.lib import environment
from bench.lib import quality as cq
from bench.lib import train_speed as ts

REPO = Path(__file__).resolve().parents[2]
#: chatft's own quality row, measured earlier at these settings (chatft train --model GGUF
#: --eval_ratio 0.1 --per_device_train_batch_size 16 --learning_rate 1e-5 --num_train_epochs 3).
CHATFT_QUALITY_REFERENCE = {"held_out_before": 5.4602,
                            "held_out_after_epochs": [4.0902, 4.1220, 4.4310],
                            "steps": 630, "train_s": 113, "tokens_per_s": 6068}
QWEN_GGUF_BYTES = 491_400_064
QWEN_GGUF_SHA256_PREFIX = "1d9614638d18"


def check_gguf(path: Path, expected_bytes: int, sha_prefix: str) -> dict[str, Any]:
    """Size and sha256 of the GGUF (the file travels in pieces; a bad join must not train)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    digest = h.hexdigest()
    ok = size == expected_bytes and digest.startswith(sha_prefix)
    return {"path": str(path), "bytes": size, "sha256": digest, "ok": ok}


def own_eval_losses(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool's own held-out losses (``eval_loss`` of its logs), one per step (a tool that
    evaluates again after the last epoch logs that step twice).

    >>> own_eval_losses({"logs": [{"step": 4, "eval_loss": 2.0}, {"step": 4, "eval_loss": 2.0},
    ...                           {"step": 2, "loss": 3.0}]})
    [{'step': 4, 'eval_loss': 2.0}]
    """
    by_step = {r["step"]: r["eval_loss"] for r in record.get("logs", []) if "eval_loss" in r}
    return [{"step": k, "eval_loss": v} for k, v in sorted(by_step.items())]


def first_nonfinite_grad_norm(record: dict[str, Any]) -> dict[str, Any] | None:
    """The first logged step whose gradient norm is NaN or infinite (the tools go on training
    on NaN weights without a word; the row must say so), or None.

    >>> first_nonfinite_grad_norm({"logs": [{"step": 1, "grad_norm": 2.0, "loss": 4.0},
    ...                                     {"step": 2, "grad_norm": float("nan"), "loss": 3.9},
    ...                                     {"step": 3, "grad_norm": float("nan"), "loss": 0.0}]})
    {'step': 2, 'loss_logged': 3.9, 'nonfinite_steps_logged': 2}
    """
    bad = [r for r in record.get("logs", [])
           if isinstance(r.get("grad_norm"), (int, float)) and not math.isfinite(r["grad_norm"])]
    if not bad:
        return None
    return {"step": bad[0]["step"], "loss_logged": bad[0].get("loss"),
            "nonfinite_steps_logged": len(bad)}


def chatft_train_time(log: Path) -> tuple[float | None, int | None]:
    """chatft's training loop time and steps from its closing line ("trained 630 steps in
    115.7 s ..."; evaluations inside the loop included, as in the tools' ``train_time``)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = re.findall(r"trained (\d+) steps in ([\d.]+) s", text)
    return (float(found[-1][1]), int(found[-1][0])) if found else (None, None)


def train_time(record: dict[str, Any]) -> float | None:
    """Training loop wall time: ``on_train_begin`` to ``on_train_end`` (evaluations and
    checkpoint saves inside the loop included, model loading and tokenization not)."""
    if record.get("train_begin_unix") and record.get("train_end_unix"):
        return round(record["train_end_unix"] - record["train_begin_unix"], 1)
    return None


def chatft_job(args, base: Path, out: Path, train_samples: int, data: Path) -> list[str]:
    """chatft's own row at the same settings: its own held-out loss at each epoch end, no
    checkpoints, and the last step exported (as the tools' final models), not the best."""
    return [sys.executable, "-m", "chatft", "train", "--model", str(args.gguf or base),
            "--data", str(data), "--system", pc.SYSTEM_PROMPT, "--eval_ratio", "0.1",
            "--per_device_train_batch_size", str(pc.QUALITY["global_batch"]),
            "--learning_rate", f"{pc.QUALITY['learning_rate']:g}",
            "--num_train_epochs", f"{args.epochs:g}", "--eval_strategy", "epoch",
            "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--output_dir", str(out / "run"), "--logging_steps", "10"]


def describe(name: str, row, out: Path, rc: int, timed_out: bool, wall: float, rss: float,
             samples: list, base_loss: dict, base: Path, device: str) -> dict[str, Any]:
    """One tool's quality row: held-out loss per epoch checkpoint (the shared evaluator), its own
    eval losses, times, and the final model's answers."""
    record = pr.read_json(out / "measure.json") or {}
    res: dict[str, Any] = {"row": name, "tool": row.tool if row else "chatft",
                           "what": row.what if row else "chatft train at the same settings",
                           "returncode": rc, "timed_out": timed_out,
                           "process_wall_s": round(wall, 1), "train_loop_s": train_time(record),
                           "peak_host_rss_gib": round(rss / pr.GIB, 3),
                           "steps": (record.get("steps") or [{}])[-1].get("step"),
                           "own_eval_loss": own_eval_losses(record),
                           "settings": {k: record.get(k) for k in (
                               "per_device_train_batch_size", "gradient_accumulation_steps",
                               "num_train_epochs", "bf16", "model_dtype", "attn_implementation",
                               "gradient_checkpointing")},
                           "held_out_before": base_loss,
                           "first_nonfinite_grad_norm": first_nonfinite_grad_norm(record)}
    ckpts = pr.epoch_checkpoints(out / "run")
    if name == "chatft":
        metrics = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()
                   if x.strip()] if (out / "run" / "metrics.jsonl").is_file() else []
        res["own_eval_loss"] = [{"step": m["step"], "eval_loss": m["eval_loss"]}
                                for m in metrics if "eval_loss" in m]
        ckpts = [out / "run" / "final"] if (out / "run" / "final" / "config.json").is_file() else []
        res["train_loop_s"], res["steps"] = chatft_train_time(out / "log.txt")
    res["held_out_per_epoch"] = []
    for ck in ckpts:
        loss = peer_eval.held_out_loss(ck, samples, device)
        res["held_out_per_epoch"].append({"checkpoint": str(ck), **loss})
    res["status"] = "ok" if rc == 0 and ckpts else "failed"
    finite = all(math.isfinite(x.get("loss", math.nan)) for x in res["held_out_per_epoch"])
    if res["status"] == "ok" and (res["first_nonfinite_grad_norm"] or not finite):
        res["status"] = "diverged"  # finished, but its weights are NaN: no model to compare
    if res["status"] != "ok":
        res["error"] = pr.first_error(out / "log.txt") or ("timed out" if timed_out else f"exit code {rc}")
        res["log_tail"] = pr.log_tail(out / "log.txt")
    if ckpts:
        folder = peer_eval.with_base_tokenizer(ckpts[-1], base, out / "answer_model")
        res["answers"] = cq.ask(folder, device)
    return res


def print_quality(result: dict[str, Any]) -> None:
    print(f"{'row':<13} {'status':<7} {'before':>7} {'epoch losses (shared evaluator)':<28} "
          f"{'own eval losses':<26} {'train loop':>10} {'wall':>6}")
    for r in result["rows"]:
        ours = " / ".join(f"{e['loss']:.4f}" for e in r.get("held_out_per_epoch", []))
        own = " / ".join(f"{e['eval_loss']:.4f}" for e in r.get("own_eval_loss", []))
        before = r.get("held_out_before", {}).get("loss")
        print(f"{r['row']:<13} {r['status']:<7} {pr_fmt(before, '.4f'):>7} {ours:<28} {own:<26} "
              f"{pr_fmt(r.get('train_loop_s'), '.0f', 's'):>10} "
              f"{pr_fmt(r.get('process_wall_s'), '.0f', 's'):>6}")
        if r["status"] != "ok":
            print(f"    error: {r.get('error')}")
    ref = result["chatft_reference"]
    print(f"{'(chatft ref)':<13} {'':<7} {ref['held_out_before']:>7.4f} "
          f"{' / '.join(f'{x:.4f}' for x in ref['held_out_after_epochs']):<28} measured earlier")
    for r in result["rows"]:
        for a in r.get("answers", []):
            print(f"[{r['row']}] {a['question']} > {a['answer']}")


def pr_fmt(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def run(args, sites: dict[str, Path], gpu: bool) -> int:
    from transformers import AutoTokenizer

    work = args.work.resolve()
    device = "cuda" if gpu else "cpu"
    gguf_check = None
    if args.gguf:
        gguf_check = check_gguf(args.gguf, QWEN_GGUF_BYTES, QWEN_GGUF_SHA256_PREFIX)
        if not gguf_check["ok"] and not args.model:
            sys.exit(f"{args.gguf}: {gguf_check['bytes']} bytes, sha256 {gguf_check['sha256']}: "
                     "not the expected GGUF (a bad join?)")
        base = cq.base_model_folder(str(args.gguf))
    elif args.model:
        base = args.model.resolve()
    else:
        sys.exit("quality needs --gguf (or --model for a dry run)")
    records = json.loads(args.data.read_text(encoding="utf-8"))
    if args.limit:
        records = records[:args.limit]
    data = pc.write_split(records, work / "quality_data")
    source = args.data
    if args.limit:  # chatft's row reads the same records (its own split of them)
        source = work / "quality_data" / "huanhuan_limited.json"
        source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(base)
    ctx = pr.Context(work=work, model_dir=base, data=data, sites=sites, gpu=gpu,
                     pad_id=tok.pad_token_id if tok.pad_token_id is not None else -1,
                     timeout_s=args.timeout, python=args.peer_python,
                     extra_path=tuple(args.peer_extra_path))
    names = [r for r in args.rows.split(",") if r] or list(pr.QUALITY_ROWS)
    if args.chatft and "chatft" not in names:
        names.insert(0, "chatft")
    label = args.label or ("h200x1" if gpu else "cpu_dry_run")
    path = args.out / f"peers_quality_{label}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier invocation with the same label stay unless run again.
    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = [r for r in old.get("rows", []) if r.get("row") not in names]
    result: dict[str, Any] = {
        "benchmark": "peers_quality", "label": label, "complete": False, "dry_run": not gpu,
        "command": "python " + shlex.join(sys.argv), "gguf": gguf_check, "base_folder": str(base),
        "data": data, "settings": {**pc.QUALITY, "epochs": args.epochs, "system_prompt": pc.SYSTEM_PROMPT,
                                   "questions": list(cq.QUESTIONS),
                                   "max_new_tokens": cq.MAX_NEW_TOKENS,
                                   "evaluator": "bench/peer_eval.py: chatft's rendering (base "
                                   "tokenizer and template), shifted targets and summed CE; mean "
                                   "NLL per trained token over the held-out file; bf16 on CUDA"},
        "chatft_reference": CHATFT_QUALITY_REFERENCE,
        "tool_versions": pr.tool_versions(sites),
        "versions": environment.versions(("accelerate", "liger-kernel")),
        "hardware": environment.hardware(device, gpu_count_key="gpu_count_visible"), "rows": kept,
    }
    # All tools at once: one process tree each, each with its own time limit.
    jobs = {}
    for name in names:
        out = work / "quality" / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.mkdir(parents=True)
        if name == "chatft":
            cmd, extra, cfg = chatft_job(args, base, out, data["train_samples"], source), {}, None
            env = dict(os.environ)
            env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        else:
            row = pr.QUALITY_ROWS[name]
            cmd, extra, cfg = pr.quality_job(row, ctx, out, args.epochs)
            env = pr.peer_env(ctx, row.tool, out, extra)
        t0 = time.time()
        proc = pr.start(cmd, env, out / "log.txt")
        sampler = ts.ProcessTreeSampler(proc.pid, gpus=False).__enter__()
        jobs[name] = (proc, sampler, t0, out, cmd, cfg)
        print(f"== started {name}", file=sys.stderr, flush=True)
    ended = {}
    deadline = time.time() + args.timeout
    for name, (proc, sampler, t0, out, cmd, cfg) in jobs.items():
        rc, timed_out = pr.finish(proc, max(1.0, deadline - time.time()))
        sampler.__exit__(None, None, None)
        ended[name] = (rc, timed_out, time.time() - t0, sampler.peak_rss)
        print(f"== {name} ended: exit {rc}{' (timed out)' if timed_out else ''}", file=sys.stderr,
              flush=True)
    samples = peer_eval.render_file(Path(data["eval"]), tok)
    base_loss = peer_eval.held_out_loss(base, samples, device)
    result["held_out_before"] = base_loss
    result["base_model_answers"] = cq.ask(base, device)
    for name, (proc, sampler, t0, out, cmd, cfg) in jobs.items():
        rc, timed_out, wall, rss = ended[name]
        row = pr.QUALITY_ROWS.get(name)
        r = describe(name, row, out, rc, timed_out, wall, rss, samples, base_loss, base, device)
        r["command"] = shlex.join(cmd)
        if cfg is not None:
            r["config_file"], r["config"] = str(cfg), cfg.read_text()
        result["rows"].append(r)
        save_result(path, result)
    result["complete"] = True
    save_result(path, result)
    print_quality(result)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def save_result(path: Path, result: dict[str, Any]) -> None:
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
