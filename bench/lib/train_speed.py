"""Training speed: a popular tutorial's full fine-tuning recipe vs chatft, same data, same machine.

The tutorial (datawhalechina/self-llm, ``models/Qwen/06-Qwen-7B-chat 全量微调.md``) fine-tunes
Qwen-7B-Chat on the 甄嬛 (huanhuan) role-play set with Hugging Face ``Trainer``, DeepSpeed ZeRO-2
with optimizer offload to the CPU, batch 1 and samples cut to 128 tokens. This module holds

* the tutorial's recipe, rewritten here from its text (``process_func``, the ``TrainingArguments``
  of its ``train.sh``, its ``ds_config.json``) and run by :func:`tutorial_worker` under DeepSpeed's
  launcher, one process per GPU;
* chatft's recommended configuration and the ablation variants, each run through the real
  ``chatft train`` command (:func:`chatft_command`);
* the measurements both share (:mod:`bench.lib.measure`: the process tree's host memory,
  step times, MFU), non-padding tokens, peak GPU memory per process
  (``torch.cuda.max_memory_allocated/reserved``) and time to the first step;
* :func:`run_variant`, which runs one variant in its own process tree (a crash or an
  out-of-memory stays inside it) and turns what it left behind into one result row.

Both sides train the Qwen2-7B shape with random weights: speed and memory do not depend on the
values. The tutorial used Qwen-7B-Chat (Qwen-1 architecture through remote code); its recipe runs
here on the same shape through transformers' native Qwen2, a model the current stack runs.
``bench/train_speed.py`` is the command-line entry that runs the variants and writes the result.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.measure import GIB, ProcessTreeSampler, step_stats
from bench.lib.tutorial_recipe import TUTORIAL_DS_CONFIG, TUTORIAL_SYSTEM, tutorial_worker


# --------------------------------------------------------------------------- chatft

#: Global batch of chatft's recommended configuration, in samples.
CHATFT_GLOBAL_BATCH = 128


@dataclass(frozen=True)
class ChatftSettings:
    """The knobs a chatft variant sets (the recommended configuration, or one flipped)."""

    attn: str = "auto"  # auto = sdpa
    liger: str = "auto"  # on with CUDA when liger-kernel is installed
    gradient_checkpointing: str | None = None  # None: the recommended choice for the GPU count
    compile: bool = False


#: Ablations: each flips one knob of the recommended configuration.
ABLATIONS: dict[str, ChatftSettings] = {
    "attn_flex": ChatftSettings(attn="flex_attention"),
    "attn_varlen": ChatftSettings(attn="varlen"),
    "liger_off": ChatftSettings(liger="off"),
    "gc_flip": ChatftSettings(gradient_checkpointing="flip"),
    "compile_on": ChatftSettings(compile=True),
}

#: One GPU holds the whole bf16 optimizer (16 bytes/parameter: 113 GiB for 7.6B), so its
#: micro-batches are capped at this many tokens. Measured on 1xH200 (Qwen2-7B shape): 129.5 GiB
#: peak without recomputation at 7,951 tokens/s, 116.0 GiB with it at 7,209: recomputation
#: stays off. With ZeRO-2 over several GPUs one micro-batch of the step's share fits too.
ONE_GPU_MICRO_BATCH_TOKENS = 4096


def recommended_checkpointing(gpus: int) -> str:
    return "off"


def chatft_batch(gpus: int, global_batch: int, accumulation: int | None) -> tuple[int, int]:
    """``(per_device_train_batch_size, gradient_accumulation_steps)`` for ``global_batch``:
    the whole step's share on each GPU (one GPU splits it by ``--micro_batch_tokens``)."""
    accumulation = accumulation or 1
    per_device, rest = divmod(global_batch, gpus * accumulation)
    if rest or per_device < 1:
        raise ValueError(f"global batch {global_batch} does not split into {gpus} GPU(s) x "
                         f"{accumulation} accumulation steps")
    return per_device, accumulation


def chatft_command(*, model: Path, data: Path, out: Path, gpus: int, settings: ChatftSettings,
                   max_steps: int | None, export: bool, global_batch: int,
                   accumulation: int | None, cpu_smoke: bool) -> list[str]:
    """``chatft train`` for the recommended configuration: one GPU on the plain PyTorch engine
    in bf16, several on DeepSpeed ZeRO-2 in bf16; packing (chatft's default); random weights."""
    per_device, accum = chatft_batch(gpus, global_batch, accumulation)
    cmd = [sys.executable, "-m", "chatft", "train", "--model", str(model), "--random_init", "true",
           "--data", str(data), "--system", TUTORIAL_SYSTEM, "--output_dir", str(out),
           "--per_device_train_batch_size", str(per_device),
           "--gradient_accumulation_steps", str(accum),
           # CPU smoke runs train in fp32 (chatft's choice on a CPU); GPUs in bf16.
           "--precision", "auto" if cpu_smoke else "bf16",
           "--logging_steps", "1", "--save_strategy", "no", "--export", str(export).lower(),
           "--attn_implementation", settings.attn, "--liger_kernel", settings.liger,
           "--gradient_checkpointing", _checkpointing(settings, gpus),
           "--compile", str(settings.compile).lower()]
    cmd += (["--backend", "torch", "--micro_batch_tokens", str(ONE_GPU_MICRO_BATCH_TOKENS)]
            if gpus == 1 else ["--nproc", str(gpus), "--zero_stage", "2"])
    if max_steps:
        cmd += ["--max_steps", str(max_steps)]
    return cmd


def _checkpointing(settings: ChatftSettings, gpus: int) -> str:
    rec = recommended_checkpointing(gpus)
    if settings.gradient_checkpointing is None:
        return rec
    if settings.gradient_checkpointing == "flip":
        return "off" if rec == "on" else "on"
    return settings.gradient_checkpointing


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of chatft's ``metrics.jsonl`` (evaluation records left out)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if "loss" in r]


# --------------------------------------------------------------------------- variants


@dataclass
class BenchContext:
    """What every variant of one benchmark run shares."""

    workdir: Path
    model_dir: Path
    data: Path
    gpus: int
    steps: int
    warmup: int
    params: int
    global_batch: int
    accumulation: int | None
    cpu_smoke: bool
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_tree(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float, gpus: bool
              ) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, sampling its tree's memory; kill the group on
    timeout. Returns exit code, wall time, start time and the memory peaks."""
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        start_unix, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        with ProcessTreeSampler(proc.pid, gpus=gpus) as sampler:
            try:
                rc = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
                rc, timed_out = proc.wait(), True
        wall = time.perf_counter() - t0
    gpu_peak = sampler.gpu_peak_above_baseline()
    return {"returncode": rc, "timed_out": timed_out, "wall_s": wall, "start_unix": start_unix,
            "peak_host_rss_gib": round(sampler.peak_rss / GIB, 3),
            "processes": sampler.peak_processes,
            "gpu_used_peak_gib_by_index": None if gpu_peak is None else
            {str(i): round(b / GIB, 3) for i, b in sorted(gpu_peak.items())}}


def remove_shm_buffers(port: int) -> list[str]:
    """Remove the ``/dev/shm`` buffers DeepSpeed's CPU all-reduce mapped for the run whose
    rendezvous was on ``port`` (``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>``, ~66 MiB
    per process). DeepSpeed never removes them, and ``/dev/shm`` is memory: a benchmark or test
    that runs the recipe many times would otherwise fill the machine's RAM."""
    removed = []
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def run_tutorial(ctx: BenchContext, out: Path) -> dict[str, Any]:
    """The tutorial's recipe for ``ctx.steps`` steps under DeepSpeed's launcher; the 3-epoch
    time is extrapolated from the step count Trainer plans and the measured step time."""
    from chatft.train.distributed import free_port

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    (out / "ds_config.json").write_text(json.dumps(TUTORIAL_DS_CONFIG, indent=4))
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ctx.gpus),
           "--master_port", str(port), "--module", "bench.lib.train_speed",
           "tutorial", "--model", str(ctx.model_dir), "--data", str(ctx.data), "--out", str(out),
           "--steps", str(ctx.steps)] + (["--cpu-smoke"] if ctx.cpu_smoke else [])
    run = _run_tree(cmd, out / "log.txt", ctx.env, ctx.timeout_s, gpus=not ctx.cpu_smoke)
    remove_shm_buffers(port)
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")),
                   key=lambda r: r["rank"])
    row: dict[str, Any] = {"variant": "tutorial", "command": shlex.join(cmd), **_run_fields(run)}
    if not ranks or not ranks[0]["step_times_s"]:
        return {**row, "status": "failed", "error": _log_tail(out / "log.txt")}
    r0 = ranks[0]
    n = min(len(r["step_times_s"]) for r in ranks)
    tokens = [sum(r["step_tokens"][i] for r in ranks) for i in range(n)]
    stats = step_stats(r0["step_times_s"][:n], tokens, ctx.gpus, ctx.params, ctx.warmup)
    ttfs = r0["step_end_unix"][0] - run["start_unix"]
    row.update(stats)
    row.update({
        "status": "ok" if run["returncode"] == 0 and r0.get("completed") else "failed",
        "time_to_first_step_s": round(ttfs, 2),
        "setup": {k: round(r0[k], 2)
                  for k in ("op_load_s", "tokenize_s", "model_init_s", "setup_s")},
        "model_dtype": r0["model_dtype"], "attn_implementation": r0["attn_implementation"],
        "samples": r0["n_samples"], "samples_at_128_tokens": r0["samples_at_max_length"],
        **_gpu_mem_fields([r.get("max_memory_allocated_bytes") for r in ranks],
                          [r.get("max_memory_reserved_bytes") for r in ranks]),
    })
    if row["status"] != "ok":
        row["error"] = _log_tail(out / "log.txt")
    total = r0.get("total_steps")
    if total and "step_time_mean_s" in stats:
        row["e2e_wall_s"] = round(ttfs + (total - 1) * stats["step_time_mean_s"], 1)
        row["e2e_kind"] = "extrapolated"
        row["e2e_note"] = (
            f"time to first step + ({total} - 1) optimizer steps x mean step time; {total} = "
            f"3 epochs x ceil({r0['n_samples']} samples / {ctx.gpus} GPU(s) x batch 1). Leaves "
            f"out the recipe's {total // 100} checkpoint saves (save_steps 100, each the fp16 "
            "model + the fp32 optimizer state), loading real weights (random init here) and "
            "its closing model.chat reply")
    return row


def run_chatft(ctx: BenchContext, name: str, settings: ChatftSettings, e2e: bool,
               out: Path) -> dict[str, Any]:
    """``chatft train`` as a subprocess: short (``ctx.steps`` steps, no export) or the whole
    3-epoch job with export (``e2e``), whose wall time is measured."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = chatft_command(model=ctx.model_dir, data=ctx.data, out=out / "run", gpus=ctx.gpus,
                         settings=settings, max_steps=None if e2e else ctx.steps, export=e2e,
                         global_batch=ctx.global_batch, accumulation=ctx.accumulation,
                         cpu_smoke=ctx.cpu_smoke)
    # A fresh data cache (tokenization is part of the job) and compile cache (a compile that
    # happens leaves files there; none means the option did nothing).
    env = {**ctx.env, "CHATFT_DATA_CACHE": str(out / "data-cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor-cache")}
    run = _run_tree(cmd, out / "log.txt", env, ctx.timeout_s, gpus=not ctx.cpu_smoke)
    steps = read_metrics(out / "run" / "metrics.jsonl")
    per_device, accum = chatft_batch(ctx.gpus, ctx.global_batch, ctx.accumulation)
    row: dict[str, Any] = {
        "variant": name, "command": shlex.join(cmd), **_run_fields(run),
        "settings": {"attn_implementation": settings.attn, "liger_kernel": settings.liger,
                     "gradient_checkpointing": _checkpointing(settings, ctx.gpus),
                     "micro_batch_tokens": ONE_GPU_MICRO_BATCH_TOKENS if ctx.gpus == 1 else 0,
                     "compile": settings.compile, "global_batch_samples": ctx.global_batch,
                     "per_device_train_batch_size": per_device,
                     "gradient_accumulation_steps": accum,
                     "engine": ("PyTorch" if ctx.gpus == 1 else "DeepSpeed ZeRO-2")
                     + (", fp32 (CPU)" if ctx.cpu_smoke else ", bf16")},
    }
    if not steps:
        return {**row, "status": "failed", "error": _log_tail(out / "log.txt")}
    row.update(step_stats([s["step_time_s"] for s in steps], [s["tokens"] for s in steps],
                          ctx.gpus, ctx.params, ctx.warmup))
    row["status"] = "ok" if run["returncode"] == 0 else "failed"
    if row["status"] != "ok":
        row["error"] = _log_tail(out / "log.txt")
    if "time" in steps[0]:
        row["time_to_first_step_s"] = round(steps[0]["time"] - run["start_unix"], 2)
    # Peaks since the start: the last record holds the largest.
    row.update(_gpu_mem_fields(steps[-1].get("gpu_mem_allocated_gib", []),
                               steps[-1].get("gpu_mem_reserved_gib", []), unit=GIB))
    summary = [line for line in _log_tail(out / "log.txt", 400).splitlines()
               if "training samples, global batch" in line]
    if summary:
        row["engine_summary"] = summary[-1].removeprefix("chatft: ")
    if settings.compile and not any((out / "inductor-cache").rglob("*")):
        row["status"] = "no_effect"
        row["note"] = ("--compile true compiled nothing (the inductor cache stayed empty): this "
                       "chatft does not act on the option, so the row equals the baseline")
    if e2e:
        row["e2e_wall_s"] = round(run["wall_s"], 1)
        row["e2e_kind"] = "measured"
        row["e2e_note"] = ("whole `chatft train` job: tokenization, random init, 3 epochs, "
                           "export of a bf16 Hugging Face folder with its reload check")
        row["exported"] = (out / "run" / "final" / "config.json").is_file()
        if not row["exported"] and row["status"] == "ok":
            row["status"] = "failed"
            row["error"] = "no exported folder: " + _log_tail(out / "log.txt")
    return row


def _run_fields(run: dict[str, Any]) -> dict[str, Any]:
    return {"returncode": run["returncode"], "timed_out": run["timed_out"],
            "process_wall_s": round(run["wall_s"], 1),
            "peak_host_rss_gib": run["peak_host_rss_gib"],
            "gpu_used_peak_gib_by_index": run["gpu_used_peak_gib_by_index"]}


def _gpu_mem_fields(allocated: list, reserved: list, unit: int = 1) -> dict[str, Any]:
    """Peak torch GPU memory per process (rank order) and the largest of them, in GiB."""
    def gib(xs: list) -> list[float]:
        return [round(x * unit / GIB, 3) for x in xs if x is not None]

    a, r = gib(allocated), gib(reserved)
    if not a:
        return {}
    return {"peak_gpu_allocated_gib": max(a), "peak_gpu_reserved_gib": max(r) if r else None,
            "peak_gpu_allocated_gib_per_rank": a, "peak_gpu_reserved_gib_per_rank": r}


def ablation_skip_reason(name: str, cpu: bool) -> str | None:
    """Why an ablation cannot run here (None: it can)."""
    import importlib.util

    from chatft.model.build import liger_available

    settings = ABLATIONS[name]
    if settings.attn == "flex_attention" and cpu:
        return "FlexAttention has no backward pass on the CPU"
    if settings.attn == "varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return "this torch has no torch.nn.attention.varlen (varlen FlashAttention)"
    if settings.liger == "off" and (cpu or not liger_available()):
        return ("Liger kernels run only on CUDA" if cpu else "liger-kernel is not installed") + \
            ": the baseline already runs without them"
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.lib.train_speed tutorial ...``: one process of the tutorial recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "tutorial" not in argv:
        print("usage: python -m bench.lib.train_speed tutorial --model DIR --data FILE "
              "--out DIR --steps K [--cpu-smoke]\n(the benchmark itself: bench/train_speed.py)",
              file=sys.stderr)
        return 2
    argv.remove("tutorial")  # DeepSpeed's launcher puts --local_rank=N before it
    return tutorial_worker(argv)


if __name__ == "__main__":
    sys.exit(main())
