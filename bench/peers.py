"""chatft side by side with LLaMA-Factory and ms-swift: same GPU, same job.

    python bench/peers.py speed   --lf-site /tmp/peer-lf --swift-site /tmp/peer-swift --label h200x1
    python bench/peers.py quality --gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --lf-site /tmp/peer-lf --swift-site /tmp/peer-swift --label h200x1

``speed``: the Qwen2-7B shape with random weights (one safetensors folder written once and
loaded by every row), huanhuan with the tutorial's system prompt, 128 samples per optimizer
step; each row (``--rows``, see :data:`peer_runs.SPEED_ROWS`) runs ``--steps`` steps in its own
process tree and becomes a row of ``bench/results/peers_<label>.json`` (rewritten after each
row; rows of earlier invocations with the same label stay unless run again). ``--chatft``
adds chatft's recommended one-GPU row (``bench.lib.train_speed``).

``quality``: Qwen2.5-Coder-0.5B-Instruct (the GGUF, dequantized once by chatft), records with
index % 10 == 9 held out, global batch 16, lr 1e-5, 3 epochs, cosine with 3% warmup, bf16;
the tools train side by side on the one GPU, save weights at each epoch end, and one evaluator
(``peer_eval``: chatft's data and loss code) computes the held-out loss of every checkpoint;
each tool's own eval loss, training wall time and greedy answers are stored beside it in
``bench/results/peers_quality_<label>.json``.

Prints a table, then a last line of JSON. ``--cpu`` (implied without CUDA) runs the same
code on a tiny random Qwen2 in fp32 with Liger and bf16 off: a dry run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import peer_configs as pc  # noqa: E402
from bench.lib import peer_eval  # noqa: E402
from bench.lib import peer_runs as pr  # noqa: E402

from bench.lib import environment  # noqa: E402
from bench.lib import shapes  # noqa: E402
from bench.lib import train_speed as ts  # noqa: E402

RESULTS = BENCH / "results"


def default_shared() -> Path:
    env = os.environ.get("CHATFT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def write_random_weights(folder: Path, shape: dict, tiktoken: Path, gpu: bool) -> dict:
    """config.json, the Qwen tokenizer and random bf16 weights (fp32 on the CPU) of ``shape``,
    written once: every row loads this folder instead of initializing 7.6B weights itself
    (initialized on the GPU: seconds; on the CPU for 7B: minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes.write_model_folder(folder, shape, tiktoken)
    if any(folder.glob("*.safetensors")):
        return {"weights": "reused"}
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if gpu else torch.float32)
    init_s = time.perf_counter() - t0
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    if gpu:
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"weights": "written", "init_s": round(init_s, 1),
            "write_s": round(time.perf_counter() - t0 - init_s, 1), "bytes": size}


def fmt(x, spec: str, unit: str = "") -> str:
    return "-" if x is None else format(x, spec) + unit


def print_speed(rows: list[dict]) -> None:
    head = (f"{'row':<15} {'status':<7} {'tok/s/GPU':>10} {'MFU':>7} {'step p50':>9} "
            f"{'samples/step':>12} {'GPU alloc':>9} {'GPU resv':>8} {'host RSS':>8} "
            f"{'1st step':>8} {'3-epoch (est)':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['row']:<15} {r['status']:<7} {fmt(r.get('tokens_per_s_per_gpu'), ',.0f'):>10} "
              f"{fmt(r.get('mfu'), '.1%'):>7} {fmt(r.get('step_time_p50_s'), '.3f', 's'):>9} "
              f"{fmt(r.get('samples_per_step_mean'), '.1f'):>12} "
              f"{fmt(r.get('peak_gpu_allocated_gib'), '.1f'):>9} "
              f"{fmt(r.get('peak_gpu_reserved_gib'), '.1f'):>8} "
              f"{fmt(r.get('peak_host_rss_gib'), '.1f'):>8} "
              f"{fmt(r.get('time_to_first_step_s'), '.0f', 's'):>8} "
              f"{fmt(r.get('e2e_wall_s'), ',.0f', 's'):>13}")
        if r["status"] != "ok":
            print(f"    error: {r.get('error')}")
    print("(memory in GiB; tokens = non-padding tokens the model was fed; 3-epoch job "
          "extrapolated from the measured steps)")


def save(path: Path, result: dict) -> None:
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def chatft_speed_row(ctx: pr.Context, model_dir: Path, data: Path, steps: int, warmup: int,
                     timeout: float) -> dict:
    """chatft's recommended one-GPU setting through ``bench.lib.train_speed``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    bctx = ts.BenchContext(workdir=ctx.work, model_dir=model_dir, data=data, gpus=1, steps=steps,
                           warmup=warmup, params=ctx.params, global_batch=ctx.samples_per_step,
                           accumulation=None, cpu_smoke=not ctx.gpu, timeout_s=timeout, env=env)
    row = ts.run_chatft(bctx, "chatft", ts.ChatftSettings(), e2e=False, out=ctx.work / "speed" / "chatft")
    row["row"], row["tool"] = "chatft", "chatft"
    row["what"] = ("chatft recommended 1-GPU setting: plain PyTorch engine, bf16 with fp32 master "
                   "weights, packed 4,096-token micro-batches, varlen FlashAttention, Liger, no "
                   "recompute")
    if row.get("step_time_mean_s") and row.get("time_to_first_step_s"):
        per_epoch = -(-len(ctx.data_lengths) // ctx.samples_per_step)
        row["planned_steps_3_epochs"] = 3 * per_epoch
        row["e2e_wall_s"] = round(row["time_to_first_step_s"]
                                  + (3 * per_epoch - 1) * row["step_time_mean_s"], 1)
        row["e2e_kind"] = "extrapolated"
    return row


def speed(args, sites: dict[str, Path], gpu: bool, shared: Path) -> int:
    from transformers import AutoTokenizer

    work = args.work.resolve()
    records = json.loads(args.data.read_text(encoding="utf-8"))
    if args.limit:
        records = records[:args.limit]
    # Speed rows train on every record (the whole file, as chatft's speed row does).
    all_data = pc.write_split(records, work / "data_all", hold_out=False)
    shape = shapes.MODEL_CONFIGS[args.model_config]
    model_dir = work / "models" / args.model_config
    prep = write_random_weights(model_dir, shape, args.tiktoken, gpu)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = peer_eval.render_file(Path(all_data["train"]), tok)
    lengths = [len(r) for r in rendered]
    trained = [int(sum(r.loss_mask[1:])) for r in rendered]  # chatft's targets per sample
    trained_mean = sum(trained) / len(trained)
    mean = sum(lengths) / len(lengths)
    ctx = pr.Context(work=work, model_dir=model_dir, data=all_data, sites=sites, gpu=gpu,
                     pad_id=tok.pad_token_id, timeout_s=args.timeout, steps=args.steps,
                     warmup=args.warmup, params=shapes.n_params(shape),
                     row_length=pc.packed_row_length(mean, args.samples_per_step),
                     data_lengths=lengths, data_trained=trained,
                     python=args.peer_python,
                     samples_per_step=args.samples_per_step, extra_path=tuple(args.peer_extra_path))
    label = args.label or ("h200x1" if gpu else "cpu_dry_run")
    path = args.out / f"peers_{label}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    names = [r for r in args.rows.split(",") if r] or list(pr.SPEED_DEFAULT)
    unknown = [n for n in names if n not in pr.SPEED_ROWS and n != "chatft"]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(pr.SPEED_ROWS)}, chatft")
    if args.chatft and "chatft" not in names:
        names.insert(0, "chatft")
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["row"]: r for r in old.get("rows", []) if r["row"] not in names}
    result = {
        "benchmark": "peers_speed", "label": label, "command": "python " + shlex.join(sys.argv),
        "complete": False, "dry_run": not gpu,
        "model": {"name": args.model_config, "n_params": ctx.params, "weights": "random",
                  "folder": str(model_dir), "config": shape},
        "data": {"file": str(args.data), "records": len(records), "system_prompt": pc.SYSTEM_PROMPT,
                 "tokens": sum(lengths), "mean_sample_tokens": round(mean, 2),
                 "trained_tokens_per_sample": round(trained_mean, 3),
                 "max_sample_tokens": max(lengths), "counted_by": "chatft's rendering with the "
                 "model folder's tokenizer and chat template"},
        "settings": {"samples_per_step": args.samples_per_step,
                     "packed_rows_per_step": pc.PACKED_ROWS_PER_STEP,
                     "packed_row_length": ctx.row_length, "unpacked_cutoff": pc.UNPACKED_CUTOFF,
                     "unpacked_batch": pc.unpacked_batch(args.samples_per_step,
                                                         min(32, args.samples_per_step)),
                     "steps": args.steps,
                     "warmup_steps_excluded": args.warmup, "peak_flops_per_gpu": pr.PEAK_FLOPS,
                     "why_row_length": f"{pc.PACKED_ROWS_PER_STEP} packed rows of "
                     f"{ctx.row_length} tokens hold {args.samples_per_step} samples of the "
                     f"mean length {mean:.2f}"},
        "prep": prep, "tool_versions": pr.tool_versions(sites),
        "versions": environment.versions(("accelerate", "liger-kernel")),
        "hardware": environment.hardware("cuda" if gpu else "cpu", gpu_count_key="gpus_visible"),
        "rows": [],
    }
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "chatft":
            row = chatft_speed_row(ctx, model_dir, args.data, args.steps,
                                   args.warmup, args.timeout)
        else:
            row = pr.run_speed_row(pr.SPEED_ROWS[name], ctx, ts.ProcessTreeSampler)
        rows[name] = row
        result["rows"] = list(rows.values())
        save(path, result)
    result["complete"] = True
    save(path, result)
    print_speed(result["rows"])
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("phase", choices=["speed", "quality"])
    ap.add_argument("--lf-site", type=Path, default=Path("/tmp/peer-lf"),
                    help="LLaMA-Factory's --target folder")
    ap.add_argument("--swift-site", type=Path, default=Path("/tmp/peer-swift"),
                    help="ms-swift's --target folder")
    ap.add_argument("--rows", default="", help="comma-separated rows (default: the phase's set)")
    ap.add_argument("--chatft", action="store_true", help="add chatft's own row")
    ap.add_argument("--data", type=Path, help="huanhuan.json (default: $CHATFT_SHARED/data/)")
    ap.add_argument("--tiktoken", type=Path, help="qwen.tiktoken (default: $CHATFT_SHARED/assets/)")
    ap.add_argument("--limit", type=int, help="first N records only (dry runs)")
    ap.add_argument("--model-config", choices=sorted(shapes.MODEL_CONFIGS), default=None,
                    help="speed: model shape (default qwen2-7b; tiny on the CPU)")
    ap.add_argument("--gguf", type=Path, help="quality: the Qwen2.5-Coder-0.5B-Instruct GGUF")
    ap.add_argument("--model", type=Path, help="quality: a Hugging Face folder instead of --gguf")
    ap.add_argument("--steps", type=int, default=8, help="speed: optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="speed: first steps left out")
    ap.add_argument("--epochs", type=float, default=pc.QUALITY["epochs"], help="quality: epochs")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per row")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter the tools run with (default: this one)")
    ap.add_argument("--peer-extra-path", type=Path, action="append", default=[],
                    help="folder added after the tools' own (CPU dry runs: stand-in modules)")
    ap.add_argument("--samples-per-step", type=int, default=pc.SPEED_SAMPLES_PER_STEP,
                    help="speed: samples per optimizer step (128; smaller for CPU dry runs)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU (implied without CUDA)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chatft-peers"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--label")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    shared = default_shared()
    args.data = args.data or shared / "data" / "huanhuan.json"
    args.tiktoken = args.tiktoken or shared / "assets" / "qwen.tiktoken"
    sites = {"llamafactory": args.lf_site.resolve(), "swift": args.swift_site.resolve()}
    if args.phase == "speed":
        args.model_config = args.model_config or ("qwen2-7b" if gpu else "tiny")
        return speed(args, sites, gpu, shared)
    from bench.lib import peer_quality

    return peer_quality.run(args, sites, gpu)


if __name__ == "__main__":
    sys.exit(main())
