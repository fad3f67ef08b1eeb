"""A 7B full fine-tune in a 24 GiB GPU budget (``bench/lean_7b.py``): the probe, the training
rows and, beside each measured peak, what chatft's memory planner predicts for the same run.

* :func:`probe`: what the arithmetic of :mod:`chatft.train.optim_memory` cannot know without a
  GPU: the work space torchao's compiled update allocates on CUDA for the largest tensor
  (``lm_head``, 152064 x 3584) per optimizer, and the pinned host <-> GPU copy rate. They are
  the values of ``UPDATE_WORKSPACE_BYTES`` (chatft.train.optim_memory) and
  ``SpeedModel.pcie_bytes_per_s`` (chatft.train.plan.job) on that GPU.
* :func:`run_row`: ``chatft train`` on the Qwen2-7B shape (random weights), huanhuan, one
  micro-batch per step, in its own process tree with a timeout; tokens/s, peak GPU
  allocated/reserved (torch), peak host RSS of the tree (sampled from /proc), time to the
  first step.
* :func:`planner_prediction`: the planner's estimate for the row's own configuration (tokens
  from the data, the kernels this machine will use), and what it recommends for the budget.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib import REPO, checkout_env, shapes
from bench.lib import train_speed as ts
from bench.lib.measure import step_stats
from bench.lib.tutorial_recipe import TUTORIAL_SYSTEM

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
    "lean8_host_b32": ["--optim", "adamw_torch_8bit", "--optimizer_states", "host",
                       "--per_device_train_batch_size", "32"],
    "lean4_device": ["--optim", "adamw_torch_4bit", "--optimizer_states", "device",
                     "--per_device_train_batch_size", "128"],
}
TARGET = {"peak_gpu_allocated_gib": 24.0, "peak_host_rss_gib": 64.0, "tokens_per_s": 3000.0}
#: lm_head of Qwen2-7B: the tensor whose update needs the most work space
PROBE_TENSOR = (152064, 3584)


def default_shared() -> Path:
    env = os.environ.get("CHATFT_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def probe(optims: list[str], device: str = "cuda") -> dict[str, Any]:
    """Work space of one torchao update of ``lm_head`` (bytes above what is allocated before
    the step: weight, gradient, moments), per optimizer; pinned copy rate each way."""
    import torch

    from chatft.config import TrainArgs
    from chatft.train.optim_choice import optimizer_factory

    rows, cols = PROBE_TENSOR
    out: dict[str, Any] = {"tensor": list(PROBE_TENSOR), "workspace": {}}
    for optim in optims:
        t = TrainArgs(optim=optim, master_weights="none", learning_rate=1e-5)
        p = torch.nn.Parameter(torch.randn(rows, cols, device=device, dtype=torch.bfloat16))
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
        out["workspace"][optim] = {"bytes": extra, "bytes_per_element": round(extra / (rows * cols), 3),
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


def train_args(name: str, model: Path, data: Path, run_dir: Path, steps: int, cap: str | None) -> list[str]:
    """``chatft train`` options of a row (after ``chatft train``)."""
    args = ["--model", str(model), "--random_init", "true", "--data", str(data),
            "--system", TUTORIAL_SYSTEM, "--output_dir", str(run_dir), "--max_steps", str(steps),
            "--logging_steps", "1", "--save_strategy", "no", "--export", "false", *LEAN, *ROWS[name]]
    return args + (["--max_gpu_memory", cap] if cap else [])


def planner_prediction(args: list[str], gpu_budget: int, host_budget: int) -> dict[str, Any]:
    """The planner on the row's own configuration: its estimate for exactly this strategy
    (tokens from the data) and its recommendation for the budgets."""
    from chatft.config_parse import load_config
    from chatft.train.plan.apply import (current_strategy, data_lengths, job_from_config,
                                         micro_batch_layout, model_config_for)
    from chatft.train.plan.cost import estimate
    from chatft.train.plan.report import fits_gpu, make_plan, recommendation_text

    cfg = load_config(None, args)
    lengths, why = data_lengths(cfg)
    tokens, m = micro_batch_layout(cfg, lengths)
    job = job_from_config(cfg, model_config_for(cfg.model), tokens, micro_batches=m)
    strategy = current_strategy(cfg, job.model.num_layers)
    e = estimate(job, strategy)
    plan = make_plan(job, gpu_budget, host_budget)
    return {"strategy": strategy.engine_label,
            "recompute": strategy.recompute_label(job.model.num_layers),
            "tokens": tokens, "tokens_source": why,
            "kernels": {"attention": job.attention, "liger": job.fused_kernels, "loss": job.loss},
            "gpu_allocated_gib": round(e.gpu_bytes / GIB, 3),
            "gpu_with_context_gib": round(e.gpu_device_bytes / GIB, 3), "gpu_phase": e.gpu_phase,
            "gpu_parts_gib": {k: round(v / GIB, 3) for k, v in e.gpu_parts.items()},
            "host_gib": round(e.host_bytes / GIB, 3), "host_phase": e.host_phase,
            "host_parts_gib": {k: round(v / GIB, 3) for k, v in e.host_parts.items()},
            "tokens_per_s": round(e.tokens_per_second),
            "fits_budget": fits_gpu(e, gpu_budget, plan.margin) and
            e.host_bytes <= host_budget * (1 - plan.margin),
            "budget_gib": {"gpu": gpu_budget / GIB, "host": host_budget / GIB},
            "recommended": recommendation_text(plan),
            "row_is_recommended": plan.recommended is not None and plan.recommended.strategy == strategy}


def run_row(name: str, model: Path, data: Path, work: Path, steps: int, cap: str | None,
            timeout: float, cpu: bool, prediction: dict[str, Any] | None) -> dict[str, Any]:
    """Train one row in its own process tree; its measurements beside the planner's."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "chatft", "train",
           *train_args(name, model, data, out / "run", steps, cap)]
    env = checkout_env({**os.environ, "CHATFT_DATA_CACHE": str(work / "data-cache")})
    run = ts._run_tree(cmd, out / "log.txt", env, timeout, gpus=not cpu)
    steps_done = ts.read_metrics(out / "run" / "metrics.jsonl")
    row: dict[str, Any] = {"row": name, "command": shlex.join(cmd), "returncode": run["returncode"],
                           "timed_out": run["timed_out"], "process_wall_s": round(run["wall_s"], 1),
                           "peak_host_rss_gib": run["peak_host_rss_gib"],
                           "gpu_used_peak_gib_by_index": run["gpu_used_peak_gib_by_index"],
                           "planner": prediction}
    if steps_done:
        stats = step_stats([s["step_time_s"] for s in steps_done], [s["tokens"] for s in steps_done],
                           1, shapes.n_params(json.loads((model / "config.json").read_text())), warmup=2)
        last = steps_done[-1]
        row.update(stats)
        row.update({
            "tokens_per_s": stats.get("tokens_per_s_per_gpu"),
            "peak_gpu_allocated_gib": (last.get("gpu_mem_allocated_gib") or [None])[0],
            "peak_gpu_reserved_gib": (last.get("gpu_mem_reserved_gib") or [None])[0],
            "time_to_first_step_s": round(steps_done[0]["time"] - run["start_unix"], 1),
            "losses": [round(s["loss"], 4) for s in steps_done],
        })
    row["status"] = "ok" if steps_done and run["returncode"] == 0 else "failed"
    if row["status"] != "ok":
        row["error"] = ts._log_tail(out / "log.txt", 40)
    row["meets_target"] = {k: (row.get(k) is not None and
                               (row[k] >= v if k == "tokens_per_s" else row[k] <= v))
                           for k, v in TARGET.items()}
    if prediction:
        row["measured_vs_planner"] = {
            "gpu_allocated_gib": [row.get("peak_gpu_allocated_gib"), prediction["gpu_allocated_gib"]],
            "host_rss_gib": [row.get("peak_host_rss_gib"), prediction["host_gib"]],
            "tokens_per_s": [row.get("tokens_per_s"), prediction["tokens_per_s"]]}
    return row


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'row':16} {'status':8} {'tok/s':>8} {'plan':>6} {'GPU alloc':>9} {'plan':>6} "
             f"{'GPU resv':>8} {'host RSS':>8} {'plan':>6} {'1st step':>8}"]
    for name, r in rows.items():
        p = r.get("planner") or {}

        def f(d: dict, k: str, spec: str) -> str:
            return "-" if d.get(k) is None else format(d[k], spec)

        lines.append(f"{name:16} {r['status']:8} {f(r, 'tokens_per_s', ',.0f'):>8} "
                     f"{f(p, 'tokens_per_s', ',.0f'):>6} {f(r, 'peak_gpu_allocated_gib', '.1f'):>9} "
                     f"{f(p, 'gpu_allocated_gib', '.1f'):>6} {f(r, 'peak_gpu_reserved_gib', '.1f'):>8} "
                     f"{f(r, 'peak_host_rss_gib', '.1f'):>8} {f(p, 'host_gib', '.1f'):>6} "
                     f"{f(r, 'time_to_first_step_s', '.0f'):>8}")
    return "\n".join(lines)
