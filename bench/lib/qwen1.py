"""The tutorial's model as users download it: a Qwen-7B-Chat folder (Qwen-1), end to end.

The tutorial (datawhalechina/self-llm, ``models/Qwen/06-Qwen-7B-chat 全量微调.md``) fine-tunes
Qwen-7B-Chat, a Qwen-1 folder (``model_type: qwen``, ``qwen.tiktoken``, remote code). This
benchmark proves that chatft takes that folder as it is, at full size, on one GPU:

1. ``write``: a Qwen-1 folder of Qwen-7B-Chat's exact shape (its ``config.json`` keys, bf16
   safetensors shards under Qwen-1's tensor names with an index, the real ``qwen.tiktoken``)
   filled with random values, written shard by shard so the whole model is never in memory;
   values come from ``torch.randn`` on the GPU when there is one (each tensor copied to the
   host before its shard is saved), else from a cheap generator (:class:`PoolRandom`).
2. ``convert``: ``chatft convert SRC DST --dtype bf16``: wall time, the peak RSS the command
   reports, the peak RSS of its process tree sampled from ``/proc``, the folder's size.
3. ``train``: the tutorial's job on the Qwen-1 folder itself (``chatft train --model SRC``:
   converted in memory, no remote code) with the one-GPU recommended settings for a few steps,
   exported at the end: time to first step, tokens/s, MFU, peak GPU memory (chatft's
   ``metrics.jsonl``), peak host RSS of the process tree, export time.
4. ``reload``: the exported folder loaded with plain ``AutoModelForCausalLM.from_pretrained``
   (through :func:`chatft.serve.generate.load_chat_model`) answering "你是谁" in ChatML.

Every phase runs in its own process (``python -m bench.lib.qwen1 write|reload`` for the two
that are not chatft commands), so each one's time and memory are its own and a crash loses only
that phase. Weights are random: speed and memory do not depend on their values.
``bench/qwen1_7b.py`` is the command-line entry.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from bench.lib import REPO, checkout_env, environment
from bench.lib.phase_run import PhaseRun, last_json, run_phase
from bench.lib.qwen1_folder import SHAPES, VALUE_BYTES, folder_bytes, n_params, write_random_qwen1
from bench.lib.measure import GIB, PEAK_FLOPS, step_stats
from bench.lib.tutorial_recipe import TUTORIAL_SYSTEM
from bench.lib.train_speed import read_metrics

RESULTS = REPO / "bench" / "results"

# --------------------------------------------------------------------------- reload


def reload_and_reply(folder: Path, question: str, max_new_tokens: int) -> dict[str, Any]:
    """Load an exported folder with plain ``AutoModelForCausalLM.from_pretrained`` (through
    :func:`load_chat_model`: bf16 on CUDA, fp32 on the CPU) and answer ``question`` greedily
    with the folder's ChatML template and its saved system prompt."""
    import torch

    from chatft.serve.generate import SamplingParams, load_chat_model, reply

    t0 = time.perf_counter()
    cm = load_chat_model(folder)
    if cm.device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": question}]
    prompt = cm.tokenizer.decode(cm.prompt_ids(messages))
    t0 = time.perf_counter()
    answer = reply(cm, messages, SamplingParams(max_new_tokens=max_new_tokens))
    generate_s = time.perf_counter() - t0
    chatml = prompt.startswith("<|im_start|>system\n") and \
        prompt.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    out = {"model_class": type(cm.model).__name__,
           "dtype": str(cm.model.dtype).removeprefix("torch."),
           "device": str(cm.device), "load_s": round(load_s, 2), "generate_s": round(generate_s, 2),
           "question": question, "prompt": prompt, "prompt_is_chatml": chatml,
           "reply": answer.text, "finish_reason": answer.finish_reason,
           "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}
    if cm.device.type == "cuda":
        out["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    out["ok"] = bool(chatml and answer.completion_tokens > 0 and
                     out["model_class"] == "Qwen2ForCausalLM")
    return out


_PEAK_RSS_RE = re.compile(r"peak RSS:\s+([0-9.]+) GiB")


def convert_summary(run: PhaseRun, dst: Path) -> dict[str, Any]:
    """The convert phase's row: the command's own peak-RSS report and the folder written."""
    reported = next((float(m.group(1)) for _, line in run.lines
                     if (m := _PEAK_RSS_RE.search(line))), None)
    return {**run.fields(), "status": "ok" if run.returncode == 0 else "failed",
            "peak_host_rss_gib_reported": reported,
            "folder_bytes": folder_bytes(dst),
            "shards": len(list(dst.glob("*.safetensors"))),
            **({} if run.returncode == 0 else {"error": run.tail()})}


@dataclass(frozen=True)
class TrainSettings:
    """The tutorial's job with the one-GPU recommended settings (PyTorch engine, bf16 with
    fp32 master weights and Adam states on the GPU, 128 samples per step in packed
    micro-batches of at most 4,096 tokens, recomputation on), cut to ``max_steps`` steps."""

    max_steps: int = 8
    per_device_train_batch_size: int = 128
    micro_batch_tokens: int = 4096
    precision: str = "bf16"  # "auto" on the CPU (fp32)
    gradient_checkpointing: str = "on"
    learning_rate: float = 2e-5


def train_command(model: Path, data: Path, out: Path, s: TrainSettings) -> list[str]:
    """``chatft train`` on the Qwen-1 folder itself: no checkpoints (one would hold the fp32
    optimizer state, ~115 GiB for 7B), one metrics line per step, export at the end."""
    return [sys.executable, "-m", "chatft", "train", "--model", str(model), "--data", str(data),
            "--system", TUTORIAL_SYSTEM, "--output_dir", str(out),
            "--backend", "torch", "--precision", s.precision,
            "--per_device_train_batch_size", str(s.per_device_train_batch_size),
            "--micro_batch_tokens", str(s.micro_batch_tokens),
            "--gradient_checkpointing", s.gradient_checkpointing,
            "--learning_rate", str(s.learning_rate), "--lr_scheduler_type", "cosine",
            "--warmup_ratio", "0.03", "--max_steps", str(s.max_steps),
            "--logging_steps", "1", "--save_strategy", "no", "--export", "true"]


def train_summary(run: PhaseRun, out: Path, params: int) -> dict[str, Any]:
    """The train phase's row, from ``metrics.jsonl`` and the stamped output.

    Throughput leaves out the first step (allocation, kernel autotuning). Export time is
    from the line that reports the training time to the line that reports the export
    (the loss-curve plot, well under a second, falls in between).
    """
    steps = read_metrics(out / "metrics.jsonl")
    row: dict[str, Any] = {**run.fields()}
    if not steps:
        return {**row, "status": "failed", "error": run.tail()}
    row.update(step_stats([s["step_time_s"] for s in steps], [s["tokens"] for s in steps],
                          1, params, 1))
    row["steps_done"] = len(steps)
    row["loss_first"], row["loss_last"] = round(steps[0]["loss"], 4), round(steps[-1]["loss"], 4)
    if "time" in steps[0]:
        row["time_to_first_step_s"] = round(steps[0]["time"] - run.start_unix, 2)
    last = steps[-1]  # peaks since the start: the last record holds the largest
    if last.get("gpu_mem_allocated_gib"):
        row["peak_gpu_allocated_gib"] = max(last["gpu_mem_allocated_gib"])
        row["peak_gpu_reserved_gib"] = max(last["gpu_mem_reserved_gib"])
    trained_at = run.first_line_time(r"chatft: trained \d+ steps")
    exported_at = run.first_line_time(r"chatft: exported ")
    if trained_at is not None and exported_at is not None:
        row["export_s"] = round(exported_at - trained_at, 2)
    summary = [line for _, line in run.lines if "training samples, global batch" in line]
    if summary:
        row["engine_summary"] = summary[-1].removeprefix("chatft: ")
    check = out / "final" / "chatft_export_check.json"
    if check.is_file():
        row["export_check"] = json.loads(check.read_text())
    row["export_bytes"] = folder_bytes(out / "final")
    row["exported"] = (out / "final" / "config.json").is_file()
    row["status"] = "ok" if run.returncode == 0 and row["exported"] else "failed"
    if row["status"] != "ok":
        row["error"] = run.tail()
    return row


# --------------------------------------------------------------------------- the benchmark

NOTES = [
    "Weights are random (N(0, 0.02) bf16 values, RMSNorm weights 1): speed and memory do not "
    "depend on their values, and the reloaded model's reply is therefore meaningless text.",
    "The source folder has Qwen-7B-Chat's exact config.json keys and tensor names/shapes "
    "(bf16 set true because the shards are bf16), the real qwen.tiktoken, no remote code.",
    "mfu = non-padding tokens/s x 6 x N_params / 989e12 (H200 dense bf16 datasheet peak), over "
    "the steps after the first; attention's quadratic term is left out.",
    "peak_gpu_*_gib: torch.cuda.max_memory_allocated/reserved of the training process "
    "(metrics.jsonl); peak_host_rss_gib_sampled: summed VmRSS of the phase's process tree "
    "every 0.5 s; convert's peak_host_rss_gib_reported: the command's own ru_maxrss.",
    "time_to_first_step_s: from the start of `chatft train` (model load and in-memory Qwen-1 "
    "conversion, tokenization included) to the end of optimizer step 1. export_s: from the "
    "'trained' line to the 'exported' line (gathering, writing the bf16 folder, its reload "
    "check).",
]


@dataclass
class BenchOptions:
    shape: str
    workdir: Path
    data: Path
    tiktoken: Path
    out: Path
    label: str
    steps: int
    batch: int
    limit: int | None
    shards: int
    keep: bool
    reuse_source: bool
    timeout_s: float
    command: str
    question: str = "你是谁"
    max_new_tokens: int = 32


def _shared_dir() -> Path:
    env = os.environ.get("CHATFT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _child_env(workdir: Path) -> dict[str, str]:
    """This checkout's chatft first on the path; a fresh data cache (tokenizing is part of
    the job); output line by line (the stamps time the phases)."""
    env = checkout_env()
    env["PYTHONUNBUFFERED"] = "1"
    env["CHATFT_DATA_CACHE"] = str(workdir / "data-cache")
    return env


def hardware(device: str, workdir: Path) -> dict[str, Any]:
    """The machine (:func:`bench.lib.environment.hardware`) and the disk under ``workdir``,
    which holds the random folder, the converted one and the export (each ~15 GB for 7B)."""
    hw = environment.hardware(device, gpu_count_key="gpu_count_visible")
    disk = shutil.disk_usage(workdir)
    hw["workdir_disk_total_gib"] = round(disk.total / GIB, 1)
    hw["workdir_disk_free_gib_at_start"] = round(disk.free / GIB, 1)
    return hw


def _data_file(opts: BenchOptions) -> Path:
    """The data file to train on: huanhuan itself, or its first ``limit`` records."""
    if opts.limit is None:
        return opts.data
    records = json.loads(opts.data.read_text(encoding="utf-8"))[:opts.limit]
    path = opts.workdir / f"data_first{opts.limit}.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Write, convert, train, reload; the result is rewritten to ``opts.out`` after each phase."""
    import torch

    cfg = SHAPES[opts.shape]
    params = n_params(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    opts.workdir.mkdir(parents=True, exist_ok=True)
    src, dst = opts.workdir / "Qwen-7B-Chat", opts.workdir / "converted"
    run_dir = opts.workdir / "run"
    for old in (dst, run_dir, opts.workdir / "data-cache"):
        shutil.rmtree(old, ignore_errors=True)
    env = _child_env(opts.workdir)
    settings = TrainSettings(max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                             precision="bf16" if gpu else "auto")
    weight_bytes = params * VALUE_BYTES
    result: dict[str, Any] = {
        "benchmark": "qwen1_7b", "label": opts.label, "command": opts.command,
        "complete": False, "notes": NOTES,
        "model": {"shape": opts.shape, "config": cfg, "n_params": params,
                  "weight_bytes_bf16": weight_bytes, "weights": "random"},
        "data": {"path": str(opts.data), "limit": opts.limit},
        "settings": {**asdict(settings), "backend": "torch", "peak_flops": PEAK_FLOPS,
                     "shards": opts.shards, "system": TUTORIAL_SYSTEM,
                     "question": opts.question, "max_new_tokens": opts.max_new_tokens},
        "versions": environment.versions(("deepspeed", "liger-kernel", "accelerate", "safetensors")),
        "hardware": hardware(device, opts.workdir),
        "workdir": str(opts.workdir), "phases": {}, "deleted_before_training": [],
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"qwen1_7b_{opts.label}.json"
    phases: dict[str, Any] = result["phases"]

    def save() -> None:
        result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def say(msg: str) -> None:
        print(f"== {msg}", file=sys.stderr, flush=True)

    # 1. the random Qwen-1 folder
    if opts.reuse_source and (src / "config.json").is_file() and \
            json.loads((src / "config.json").read_text()) == cfg:
        say(f"write: reusing {src}")
        phases["write"] = {"status": "reused", "folder_bytes": folder_bytes(src)}
    else:
        shutil.rmtree(src, ignore_errors=True)
        say(f"write: {src}")
        need = 2 * weight_bytes + 2 * GIB  # source + converted; the export comes later
        free = shutil.disk_usage(opts.workdir).free
        if free < need:
            raise SystemExit(f"{opts.workdir}: {free / GIB:.1f} GiB free, the source and "
                             f"converted folders need ~{need / GIB:.1f} GiB (--workdir elsewhere)")
        cmd = [sys.executable, "-m", "bench.lib.qwen1", "write", str(src), "--shape",
               opts.shape, "--shards", str(opts.shards), "--tiktoken", str(opts.tiktoken)]
        run = run_phase(cmd, opts.workdir / "write.log", env, opts.timeout_s, gpu)
        written = last_json(run)
        phases["write"] = {**run.fields(), "status": "ok" if run.returncode == 0 and written else
                           "failed", **(written or {"error": run.tail()}),
                           "folder_bytes": folder_bytes(src)}
    save()
    if phases["write"]["status"] == "failed":
        return _finish(result, save, opts, ok=False)

    # 2. chatft convert
    say(f"convert: {src} -> {dst}")
    cmd = [sys.executable, "-m", "chatft", "convert", str(src), str(dst), "--dtype", "bf16"]
    run = run_phase(cmd, opts.workdir / "convert.log", env, opts.timeout_s, gpu)
    phases["convert"] = convert_summary(run, dst)
    save()

    # 3. chatft train on the Qwen-1 folder, with export
    data = _data_file(opts)
    free = shutil.disk_usage(opts.workdir).free
    # Not kept: gone now rather than at the end. Kept: gone anyway when the export (another
    # copy of the weights) would not fit beside it.
    if dst.exists() and (not opts.keep or free < weight_bytes + 2 * GIB):
        shutil.rmtree(dst)
        result["deleted_before_training"].append(str(dst))
    cmd = train_command(src, data, run_dir, settings)
    say("train: " + shlex.join(cmd[1:]))
    run = run_phase(cmd, opts.workdir / "train.log", env, opts.timeout_s, gpu)
    phases["train"] = train_summary(run, run_dir, params)
    save()

    # 4. reload the export and answer
    if phases["train"].get("exported"):
        say(f"reload: {run_dir / 'final'}")
        cmd = [sys.executable, "-m", "bench.lib.qwen1", "reload", str(run_dir / "final"),
               "--question", opts.question, "--max-new-tokens", str(opts.max_new_tokens)]
        run = run_phase(cmd, opts.workdir / "reload.log", env, opts.timeout_s, gpu)
        answer = last_json(run)
        phases["reload"] = {**run.fields(), **(answer or {"ok": False, "error": run.tail()}),
                            "status": "ok" if run.returncode == 0 and answer and answer["ok"]
                            else "failed"}
    else:
        phases["reload"] = {"status": "skipped", "reason": "training exported no folder"}
    save()
    ok = all(phases[p]["status"] in ("ok", "reused")
             for p in ("write", "convert", "train", "reload"))
    return _finish(result, save, opts, ok=ok)


def _finish(result: dict[str, Any], save, opts: BenchOptions, ok: bool) -> dict[str, Any]:
    """Headline figures, then the folders are deleted (unless ``--keep``, or a phase failed:
    a rerun with ``--reuse-source`` then skips writing the source again)."""
    p = result["phases"]
    w, c, t, r = (p.get(k, {}) for k in ("write", "convert", "train", "reload"))
    result["summary"] = {
        "write_s": w.get("wall_s"), "source_gb": _gb(w.get("folder_bytes")),
        "convert_s": c.get("wall_s"),
        "convert_peak_rss_gib_reported": c.get("peak_host_rss_gib_reported"),
        "convert_peak_rss_gib_sampled": c.get("peak_host_rss_gib_sampled"),
        "converted_gb": _gb(c.get("folder_bytes")),
        "time_to_first_step_s": t.get("time_to_first_step_s"),
        "tokens_per_s": t.get("tokens_per_s_per_gpu"), "mfu": t.get("mfu"),
        "peak_gpu_allocated_gib": t.get("peak_gpu_allocated_gib"),
        "peak_gpu_reserved_gib": t.get("peak_gpu_reserved_gib"),
        "train_peak_host_rss_gib": t.get("peak_host_rss_gib_sampled"),
        "export_s": t.get("export_s"), "export_gb": _gb(t.get("export_bytes")),
        "train_wall_s": t.get("wall_s"), "reload_ok": r.get("ok"),
        "all_ok": ok,
    }
    result["complete"] = True
    if ok and not opts.keep:
        for name in ("Qwen-7B-Chat", "converted", "run", "data-cache"):
            shutil.rmtree(opts.workdir / name, ignore_errors=True)
        result["folders_deleted"] = True
    else:
        result["folders_deleted"] = False
    save()
    return result


def _gb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e9, 2)


def format_table(result: dict[str, Any]) -> str:
    """One line per phase: wall time, peak host RSS and the phase's own figures."""
    p = result["phases"]

    def f(x: Any, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    rows = [("phase", "status", "wall s", "host RSS GiB", "figures")]
    w = p.get("write", {})
    rows.append(("write", w.get("status", "-"), f(w.get("wall_s")), f(w.get("peak_rss_gib"), ".2f"),
                 f"{_gb(w.get('folder_bytes'))} GB, {len(w.get('shards', []))} shards, random "
                 f"values on {w.get('random_device', '-')}"))
    c = p.get("convert", {})
    rows.append(("convert", c.get("status", "-"), f(c.get("wall_s")),
                 f"{f(c.get('peak_host_rss_gib_reported'), '.2f')} (sampled "
                 f"{f(c.get('peak_host_rss_gib_sampled'), '.2f')})",
                 f"{_gb(c.get('folder_bytes'))} GB, {c.get('shards', '-')} shards"))
    t = p.get("train", {})
    rows.append(("train", t.get("status", "-"), f(t.get("wall_s")),
                 f(t.get("peak_host_rss_gib_sampled"), ".2f"),
                 f"first step at {f(t.get('time_to_first_step_s'))} s, "
                 f"{f(t.get('tokens_per_s_per_gpu'), ',.0f')} tok/s, MFU {f(t.get('mfu'), '.3f')}, "
                 f"GPU {f(t.get('peak_gpu_allocated_gib'))}/{f(t.get('peak_gpu_reserved_gib'))} "
                 f"GiB alloc/reserved, export {f(t.get('export_s'))} s "
                 f"({_gb(t.get('export_bytes'))} GB)"))
    r = p.get("reload", {})
    rows.append(("reload", r.get("status", "-"), f(r.get("wall_s")),
                 f(r.get("peak_host_rss_gib_sampled"), ".2f"),
                 f"{r.get('model_class', '-')} {r.get('dtype', '')} on {r.get('device', '-')}, "
                 f"load {f(r.get('load_s'))} s, "
                 f"reply {json.dumps(r.get('reply'), ensure_ascii=False)[:60]}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return "\n".join("  ".join(str(row[i]).ljust(widths[i]) for i in range(4)) + "  " + row[4]
                     for row in rows)


# --------------------------------------------------------------------------- command lines

#: Per-shape defaults: the full shape runs the tutorial's job as configured; the tiny one is a
#: CPU smoke run (small batch, a slice of the data, 3 shards since its embeddings dominate).
SHAPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "7b": {"steps": 8, "batch": 128, "limit": None, "shards": 8},
    "tiny": {"steps": 2, "batch": 8, "limit": 40, "shards": 3},
}


def main(argv: Sequence[str] | None = None) -> int:
    """The benchmark (``bench/qwen1_7b.py``)."""
    import torch

    ap = argparse.ArgumentParser(
        prog="bench/qwen1_7b.py",
        description="A random Qwen-7B-Chat-shaped (Qwen-1) folder: write it, `chatft convert` "
                    "it, run the tutorial's job on it with `chatft train` (exported), reload the "
                    "export and answer; times, memory and throughput per phase.")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b",
                    help="7b: Qwen-7B-Chat's exact shape; tiny: a small one for CPU smoke runs")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen1_7b"),
                    help="where the folders go (7b: 15.4 GB each for source, converted, export)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: 8; tiny 2)")
    ap.add_argument("--batch", type=int, help="samples per step (default: 128; tiny 8)")
    ap.add_argument("--limit", type=int,
                    help="train on the first N records (default: all; tiny 40)")
    ap.add_argument("--shards", type=int, help="shards of the source folder (default: 8; tiny 3)")
    ap.add_argument("--data", type=Path,
                    help="huanhuan.json (default: $CHATFT_SHARED/data/huanhuan.json)")
    ap.add_argument("--tiktoken", type=Path,
                    help="qwen.tiktoken (default: $CHATFT_SHARED/assets/qwen.tiktoken)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result file")
    ap.add_argument("--label", help="result file qwen1_7b_<label>.json (default: the device, "
                                    "tiny_<device> for the tiny shape)")
    ap.add_argument("--keep", action="store_true", help="keep the folders (default: delete them "
                                                        "at the end when every phase succeeded)")
    ap.add_argument("--reuse-source", action="store_true",
                    help="reuse a source folder of the same shape left in --workdir")
    ap.add_argument("--timeout", type=float, default=1800, help="per phase, seconds")
    args = ap.parse_args(argv)
    defaults = SHAPE_DEFAULTS[args.shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = _shared_dir()
    opts = BenchOptions(
        shape=args.shape, workdir=args.workdir.resolve(),
        data=(args.data or shared / "data" / "huanhuan.json").resolve(),
        tiktoken=(args.tiktoken or shared / "assets" / "qwen.tiktoken").resolve(),
        out=args.out, label=args.label or (device if args.shape == "7b" else f"tiny_{device}"),
        steps=args.steps or defaults["steps"], batch=args.batch or defaults["batch"],
        limit=args.limit if args.limit is not None else defaults["limit"],
        shards=args.shards or defaults["shards"], keep=args.keep,
        reuse_source=args.reuse_source, timeout_s=args.timeout,
        command="python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]))
    for what, p in (("data", opts.data), ("qwen.tiktoken", opts.tiktoken)):
        if not p.is_file():
            ap.error(f"{what} not found at {p} (set CHATFT_SHARED or pass --data/--tiktoken)")
    result = run_benchmark(opts)
    print(format_table(result))
    print(f"wrote {opts.out / f'qwen1_7b_{opts.label}.json'}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result["summary"]["all_ok"] else 1


def child_main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.lib.qwen1 write|reload ...``: one phase, its result as the last
    line of JSON."""
    ap = argparse.ArgumentParser(prog="python -m bench.lib.qwen1")
    sub = ap.add_subparsers(dest="phase", required=True)
    w = sub.add_parser("write", help="write a random Qwen-1 folder")
    w.add_argument("folder", type=Path)
    w.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    w.add_argument("--shards", type=int, default=8)
    w.add_argument("--tiktoken", type=Path, required=True)
    w.add_argument("--device", default="auto", help="auto, cuda or cpu: where values are drawn")
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("reload", help="load an exported folder and answer one question")
    r.add_argument("folder", type=Path)
    r.add_argument("--question", default="你是谁")
    r.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.phase == "write":
        res = write_random_qwen1(args.folder, SHAPES[args.shape], args.tiktoken,
                                 n_shards=args.shards, device=args.device, seed=args.seed)
        print(json.dumps(asdict(res)))
    else:
        print(json.dumps(reload_and_reply(args.folder, args.question, args.max_new_tokens),
                         ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
