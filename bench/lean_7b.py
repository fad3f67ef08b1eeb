"""A 7B full fine-tune in a 24 GiB GPU budget: bf16 weights, 8-bit AdamW moments in host memory,
the optimizer step in backward (one H200 capped with ``--max_gpu_memory 24GiB``).

Two parts, one result file (``bench/results/lean_7b_<label>.json``, rewritten after each part):

1. ``probe`` (in this process, before training): what the memory arithmetic of
   :mod:`chatft.train.optim_memory` cannot know without a GPU -- the work space torchao's
   compiled update allocates on CUDA for the largest tensor (``lm_head``, 152064 x 3584; 8-bit
   and 4-bit moments, bf16 weights with stochastic rounding), and the pinned host <-> GPU copy
   bandwidth (1 GiB each way).
2. ``train`` rows: ``chatft train`` on the Qwen2-7B shape (random weights), huanhuan, one micro-
   batch of 128 samples per step (about 8.7k tokens), recomputation on, ``--steps`` steps; the
   measured tokens/s, peak GPU allocated/reserved (torch), peak host RSS of the process tree
   (sampled from /proc) and time to the first step, beside the optimizer memory chatft's
   arithmetic predicts (weights, moments on the host and their slabs, in-flight transient,
   PCIe bytes per step). Activations are the memory planner's part (not predicted here).

    python3 bench/lean_7b.py                       # probe + the lean row, ~6 min on 1xH200
    python3 bench/lean_7b.py --rows lean8_host,lean8_host_b64 --steps 8
    python3 bench/lean_7b.py --model-config tiny --rows lean8_host --steps 3 --no-probe  # CPU smoke

Prints a table and a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import environment  # noqa: E402
from bench.lib import train_speed as ts  # noqa: E402

GIB = 1 << 30
RESULTS = REPO / "bench" / "results"
#: The lean options every row shares (bf16, no fp32 masters, update in backward).
LEAN = ["--backend", "torch", "--precision", "bf16", "--master_weights", "none",
        "--optimizer_in_bwd", "true", "--max_grad_norm", "0", "--gradient_checkpointing", "on",
        "--gradient_accumulation_steps", "1"]
#: Rows: extra options (optim, where the moments live, samples per step).
ROWS = {
    "lean8_host": ["--optim", "adamw_torch_8bit", "--optimizer_states", "host",
                   "--per_device_train_batch_size", "128"],
    "lean8_host_b64": ["--optim", "adamw_torch_8bit", "--optimizer_states", "host",
                       "--per_device_train_batch_size", "64"],
    "lean4_device": ["--optim", "adamw_torch_4bit", "--optimizer_states", "device",
                     "--per_device_train_batch_size", "128"],
}
TARGET = {"peak_gpu_allocated_gib": 24.0, "peak_host_rss_gib": 64.0, "tokens_per_s": 3000.0}


def default_shared() -> Path:
    env = os.environ.get("CHATFT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def probe(device: str = "cuda") -> dict:
    """Work space of one torchao update of ``lm_head`` (bytes above what is allocated before
    the step: weights, gradient, moments), per choice; pinned copy bandwidth."""
    import torch

    from chatft.config import TrainArgs
    from chatft.train.optim_choice import optimizer_factory

    out: dict = {"tensor": [152064, 3584], "workspace": {}}
    n = 152064 * 3584
    for optim in ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_torch"):
        t = TrainArgs(optim=optim, master_weights="none", learning_rate=1e-5)
        p = torch.nn.Parameter(torch.randn(152064, 3584, device=device, dtype=torch.bfloat16))
        opt = optimizer_factory(t, "bf16", torch.device(device))([{"params": [p], "weight_decay": 0.0}])
        p.grad = torch.randn_like(p)
        t0 = time.perf_counter()
        opt.step()  # compiles, creates the moments
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        out["workspace"][optim] = {"bytes": extra, "bytes_per_element": round(extra / n, 3),
                                   "update_s": round(time.perf_counter() - t0, 4),
                                   "first_step_with_compile_s": round(first, 2)}
        del p, opt
        torch.cuda.empty_cache()
    host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(GIB, dtype=torch.uint8, device=device)
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[f"{name}_gb_per_s"] = round(4 * GIB / (time.perf_counter() - t0) / 1e9, 2)
    del host, dev
    torch.cuda.empty_cache()
    return out


def predicted(shape: dict, row: str) -> dict:
    """chatft's optimizer-memory arithmetic for the row (GiB), tensors in gradient order."""
    from chatft.train.optim_memory import OptimizerChoice, optimizer_memory

    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    layer = [h * i, i * h, i * h, h, h * h, kv * h, kv, kv * h, kv, h * h, h, h]
    numels = [v * h, h] + layer * shape["num_hidden_layers"] + [v * h]
    opts = ROWS[row]
    choice = OptimizerChoice("bf16", opts[opts.index("--optim") + 1], "none", True,
                             opts[opts.index("--optimizer_states") + 1])
    return optimizer_memory(numels, choice).gib()


def run_row(name: str, model: Path, data: Path, work: Path, steps: int, cap: str | None,
            timeout: float, cpu: bool) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "chatft", "train", "--model", str(model), "--random_init", "true",
           "--data", str(data), "--system", ts.TUTORIAL_SYSTEM, "--output_dir", str(out / "run"),
           "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "0",
           "--export", "false", *LEAN, *ROWS[name]]
    if cap:
        cmd += ["--max_gpu_memory", cap]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CHATFT_DATA_CACHE": str(work / "data-cache"),
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = ts._run_tree(cmd, out / "log.txt", env, timeout, gpus=not cpu)
    steps_done = ts.read_metrics(out / "run" / "metrics.jsonl")
    row = {"row": name, "command": shlex.join(cmd), "returncode": run["returncode"],
           "timed_out": run["timed_out"], "process_wall_s": round(run["wall_s"], 1),
           "peak_host_rss_gib": run["peak_host_rss_gib"],
           "gpu_used_peak_gib_by_index": run["gpu_used_peak_gib_by_index"]}
    if not steps_done:
        return {**row, "status": "failed", "error": ts._log_tail(out / "log.txt", 40)}
    stats = ts.step_stats([s["step_time_s"] for s in steps_done], [s["tokens"] for s in steps_done],
                          1, ts.n_params(json.loads((model / "config.json").read_text())), warmup=2)
    last = steps_done[-1]
    row.update(stats)
    row.update({
        "status": "ok" if run["returncode"] == 0 else "failed",
        "tokens_per_s": stats.get("tokens_per_s_per_gpu"),
        "peak_gpu_allocated_gib": (last.get("gpu_mem_allocated_gib") or [None])[0],
        "peak_gpu_reserved_gib": (last.get("gpu_mem_reserved_gib") or [None])[0],
        "time_to_first_step_s": round(steps_done[0]["time"] - run["start_unix"], 1),
        "losses": [round(s["loss"], 4) for s in steps_done],
    })
    if row["status"] != "ok":
        row["error"] = ts._log_tail(out / "log.txt", 40)
    row["meets_target"] = {k: (row.get(k) is not None and
                               (row[k] >= v if k == "tokens_per_s" else row[k] <= v))
                           for k, v in TARGET.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="lean8_host", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-gpu-memory", default="24GiB")
    ap.add_argument("--model-config", default="qwen2-7b", choices=list(ts.MODEL_CONFIGS))
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/chatft-lean-7b"))
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--timeout", type=float, default=540)
    ap.add_argument("--label", default=None, help="result file suffix (default h200x1 / cpu)")
    args = ap.parse_args(argv)
    import torch

    cpu = not torch.cuda.is_available()
    label = args.label or ("cpu" if cpu else "h200x1")
    shape = ts.MODEL_CONFIGS[args.model_config]
    model = ts.write_model_folder(args.workdir / f"model-{args.model_config}", shape,
                                  args.shared / "assets" / "qwen.tiktoken")
    data = args.shared / "data" / "huanhuan.json"
    result = {"benchmark": "lean_7b", "command": shlex.join([sys.executable, *sys.argv]),
              "model_config": args.model_config, "max_gpu_memory": None if cpu else args.max_gpu_memory,
              "target": TARGET, "versions": environment.versions(["torchao", "liger-kernel"]),
              "hardware": environment.hardware("cpu" if cpu else "cuda"),
              "notes": ["Weights are random (built from the config on the GPU): speed and memory "
                        "do not depend on their values.",
                        "tokens_per_s: non-padding tokens per second over the steps after the "
                        "first 2; peaks since the start of the run (the last step's record).",
                        "predicted_*: chatft.train.optim_memory for the optimizer alone (weights, "
                        "moments, in-flight gradients and update work space, PCIe bytes per step)."],
              "probe": None, "rows": {}}
    path = RESULTS / f"lean_7b_{label}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    if not args.no_probe and not cpu:
        try:
            result["probe"] = probe()
        except Exception as e:  # keep the training rows even when the probe fails
            result["probe"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    for name in (r.strip() for r in args.rows.split(",") if r.strip()):
        if name not in ROWS:
            sys.exit(f"unknown row {name!r}; known: {', '.join(ROWS)}")
        row = run_row(name, model, data, args.workdir, args.steps,
                      None if cpu else args.max_gpu_memory, args.timeout, cpu)
        row["predicted_optimizer_gib"] = predicted(shape, name)
        result["rows"][name] = row
        save()
    print(f"{'row':16} {'status':8} {'tok/s':>8} {'GPU alloc':>9} {'GPU resv':>9} "
          f"{'host RSS':>9} {'pred host':>9} {'1st step':>8}")
    for name, r in result["rows"].items():
        f = lambda k, spec: "-" if r.get(k) is None else format(r[k], spec)  # noqa: E731
        print(f"{name:16} {r['status']:8} {f('tokens_per_s', ',.0f'):>8} "
              f"{f('peak_gpu_allocated_gib', '.1f'):>9} {f('peak_gpu_reserved_gib', '.1f'):>9} "
              f"{f('peak_host_rss_gib', '.1f'):>9} "
              f"{r['predicted_optimizer_gib']['host_reserved']:>9.1f} "
              f"{f('time_to_first_step_s', '.0f'):>8}")
    print(json.dumps({"result": str(path.relative_to(REPO)), "probe": result["probe"],
                      "rows": {k: {kk: v.get(kk) for kk in ("status", "tokens_per_s",
                                                           "peak_gpu_allocated_gib",
                                                           "peak_host_rss_gib")}
                               for k, v in result["rows"].items()}}))
    return 0 if all(r["status"] == "ok" for r in result["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
