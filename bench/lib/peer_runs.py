"""Running the peer tools and turning what they left behind into result rows.

Each row runs in its own process tree (a crash, an out-of-memory or a timeout loses only that
row), with the tool's packages first on ``PYTHONPATH`` (its own ``--target`` folder, never
mixed with chatft's) and ``bench/peer_hook`` after them, whose ``sitecustomize`` puts the step
recorder (``peer_hook/peer_measure.py``) into every Hugging Face ``Trainer`` the tool builds.
The process tree's host memory is sampled from ``/proc`` (chatft's
:class:`~bench.lib.train_speed.ProcessTreeSampler`).

Speed rows (:data:`SPEED_ROWS`) stop after ``steps`` optimizer steps; throughput and step times
leave out the first ``warmup`` steps. Quality rows (:data:`QUALITY_ROWS`) train 3 epochs and
save the weights at each epoch end.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib import peer_configs as pc
from bench.lib.measure import GIB, PEAK_FLOPS

HOOK_DIR = Path(__file__).resolve().parents[1] / "peer_hook"
TOOLS = ("llamafactory", "swift")


@dataclass(frozen=True)
class Row:
    """One way of running one tool."""

    name: str
    tool: str  # llamafactory | swift
    what: str  # one line for the table and the README
    packing: str = "none"  # neat | plain | none (ms-swift: neat = --packing + --padding_free)
    deepspeed: bool = False
    gradient_checkpointing: bool = True
    attn: str = "sdpa"
    torch_dtype: str | None = None  # ms-swift only; None = its choice (bf16 on a GPU)
    liger: bool = True  # the tool's Liger switch (on a GPU)


SPEED_ROWS: dict[str, Row] = {r.name: r for r in (
    Row("lf_neat", "llamafactory", "LLaMA-Factory neat_packing, gradient checkpointing (its "
        "default), Liger, sdpa", packing="neat"),
    Row("lf_neat_zero2", "llamafactory", "LLaMA-Factory neat_packing + DeepSpeed ZeRO-2 on one "
        "GPU, gradient checkpointing, Liger, sdpa", packing="neat", deepspeed=True),
    Row("lf_packing", "llamafactory", "LLaMA-Factory plain packing (attention across samples), "
        "gradient checkpointing, Liger, sdpa", packing="plain"),
    Row("lf_neat_nogc", "llamafactory", "LLaMA-Factory neat_packing without gradient "
        "checkpointing, Liger, sdpa", packing="neat", gradient_checkpointing=False),
    Row("swift_packing", "swift", "ms-swift --packing true --padding_free true "
        "--use_liger_kernel true --attn_impl flash_attn (its documented fast setting)",
        packing="neat", attn="flash_attn"),
    Row("swift_nopack", "swift", "ms-swift without packing (its packing needs flash-attn), "
        "batch 32 x 4, gradient checkpointing (its default), Liger, sdpa"),
)}
SPEED_DEFAULT = ("lf_neat", "lf_neat_zero2", "swift_packing")
SPEED_MORE = ("lf_packing", "swift_nopack", "lf_neat_nogc")
QUALITY_ROWS: dict[str, Row] = {r.name: r for r in (
    Row("llamafactory", "llamafactory", "LLaMA-Factory, batch 16, no packing, fp32 master "
        "weights + bf16 autocast (its full fine-tuning default), Liger, sdpa"),
    Row("llamafactory_noliger", "llamafactory", "LLaMA-Factory as the row above with Liger off "
        "(enable_liger_kernel: false): tells Liger's kernels apart from the rest of the tool",
        liger=False),
    Row("swift", "swift", "ms-swift, batch 16, no packing, weights in bf16 (--torch_dtype "
        "bfloat16, its documented setting), Liger, sdpa"),
    Row("swift_fp32", "swift", "ms-swift, batch 16, no packing, fp32 weights + bf16 autocast "
        "(--torch_dtype float32 --bf16 true: chatft's and LLaMA-Factory's precision), Liger, sdpa",
        torch_dtype="float32"),
)}


@dataclass
class Context:
    """What every row of one invocation shares."""

    work: Path
    model_dir: Path
    data: dict[str, Any]  # peer_configs.write_split's record
    sites: dict[str, Path]  # tool -> its --target folder
    gpu: bool
    pad_id: int
    timeout_s: float
    steps: int = 8
    warmup: int = 2
    params: int = 0
    row_length: int = 0  # packed rows' length (speed)
    data_lengths: list[int] = field(default_factory=list)  # chatft's lengths of the train file
    data_trained: list[int] | None = None  # chatft's targets per sample (answer + eot), same order
    python: str = sys.executable
    samples_per_step: int = pc.SPEED_SAMPLES_PER_STEP
    extra_path: tuple[Path, ...] = ()  # after the hook folder (CPU dry runs: stand-ins)


def tool_versions(sites: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Versions of each tool's own packages, read from its ``--target`` folder."""
    from importlib.metadata import distributions

    wanted = {"llamafactory", "ms-swift", "transformers", "accelerate", "datasets", "peft", "trl",
              "tokenizers", "deepspeed", "liger-kernel", "modelscope"}
    out: dict[str, dict[str, str]] = {}
    for tool, site in sites.items():
        found = {d.metadata["Name"].lower().replace("_", "-"): d.version
                 for d in distributions(path=[str(site)])}
        out[tool] = {n: v for n, v in sorted(found.items()) if n in wanted}
    return out


# --------------------------------------------------------------------------- commands


def speed_job(row: Row, ctx: Context, out: Path) -> tuple[list[str], dict[str, str], Path]:
    """The command, extra environment and config file of a speed row."""
    data_dir, train = Path(ctx.data["dir"]), Path(ctx.data["train"])
    packed = row.packing != "none"
    if packed:
        per_device, accum, length = pc.PACKED_ROWS_PER_STEP, 1, ctx.row_length
    else:
        per_device = min(32, ctx.samples_per_step)
        (per_device, accum), length = (pc.unpacked_batch(ctx.samples_per_step, per_device),
                                       pc.UNPACKED_CUTOFF)
    env: dict[str, str] = {}
    if row.tool == "llamafactory":
        ds = None
        if row.deepspeed:
            ds = out / "ds_z2_config.json"
            ds.write_text(json.dumps(pc.zero2_config(), indent=1) + "\n")
            # LLaMA-Factory starts DeepSpeed runs under torchrun, one process per GPU it counts
            # (none on a CPU): one process, said explicitly.
            env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="1")
        cfg = pc.lf_config(model=ctx.model_dir, data_dir=data_dir, out=out / "run",
                           per_device=per_device, accumulation=accum, cutoff_len=length,
                           packing=row.packing, gpu=ctx.gpu, epochs=3,
                           learning_rate=pc.QUALITY["learning_rate"],
                           gradient_checkpointing=row.gradient_checkpointing, deepspeed=ds)
        path = out / "llamafactory.yaml"
        path.write_text(pc.yaml_text(cfg))
        return [ctx.python, "-m", "llamafactory.cli", "train", str(path)], env, path
    args = pc.swift_args(model=ctx.model_dir, train=train, out=out / "run",
                         per_device=per_device, accumulation=accum, max_length=length,
                         packing=packed, gpu=ctx.gpu, epochs=3,
                         learning_rate=pc.QUALITY["learning_rate"], attn_impl=row.attn,
                         gradient_checkpointing=row.gradient_checkpointing,
                         torch_dtype=row.torch_dtype)
    path = out / "swift_args.json"
    path.write_text(json.dumps(args, indent=1, ensure_ascii=False) + "\n")
    return [ctx.python, "-m", "swift.cli.main", "sft", *args], env, path


def quality_job(row: Row, ctx: Context, out: Path, epochs: float = pc.QUALITY["epochs"]
                ) -> tuple[list[str], dict[str, str], Path]:
    """The command, extra environment and config file of a quality row."""
    q = {**pc.QUALITY, "epochs": epochs}
    if row.tool == "llamafactory":
        cfg = pc.lf_config(model=ctx.model_dir, data_dir=Path(ctx.data["dir"]), out=out / "run",
                           per_device=q["global_batch"], accumulation=1,
                           cutoff_len=pc.UNPACKED_CUTOFF, packing="none", gpu=ctx.gpu,
                           epochs=q["epochs"], learning_rate=q["learning_rate"],
                           eval_each_epoch=True, save_each_epoch=True, seed=q["seed"],
                           liger=row.liger)
        path = out / "llamafactory.yaml"
        path.write_text(pc.yaml_text(cfg))
        return [ctx.python, "-m", "llamafactory.cli", "train", str(path)], {}, path
    args = pc.swift_args(model=ctx.model_dir, train=Path(ctx.data["train"]), out=out / "run",
                         per_device=q["global_batch"], accumulation=1,
                         max_length=pc.UNPACKED_CUTOFF, packing=False, gpu=ctx.gpu,
                         epochs=q["epochs"], learning_rate=q["learning_rate"], attn_impl="sdpa",
                         eval_file=Path(ctx.data["eval"]), save_each_epoch=True,
                         torch_dtype=row.torch_dtype, seed=q["seed"])
    path = out / "swift_args.json"
    path.write_text(json.dumps(args, indent=1, ensure_ascii=False) + "\n")
    return [ctx.python, "-m", "swift.cli.main", "sft", *args], {}, path


def peer_env(ctx: Context, tool: str, out: Path, extra: dict[str, str],
             stop_after: int = 0) -> dict[str, str]:
    """The environment of a peer's process: its own packages, then the recorder's hook folder;
    nothing of chatft's path. Offline: no hub is reachable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ctx.sites[tool]), str(HOOK_DIR),
                                       *map(str, ctx.extra_path)]),
        "PEER_MEASURE_OUT": str(out / "measure.json"), "PEER_PAD_ID": str(ctx.pad_id),
        "PEER_MEASURE_STOP_AFTER": str(stop_after), "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "HF_HOME": str(out / "hf_home"), "MODELSCOPE_CACHE": str(out / "ms_cache"),
        # NVLink multicast stays off (shared hosts), also in the tools' own child processes.
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    })
    bindir = str(Path(ctx.python).parent)  # torchrun of this interpreter (DeepSpeed rows)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log`` (first line: the command)."""
    f = log.open("w")
    f.write("$ " + shlex.join(cmd) + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    proc.log_file = f  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, bool]:
    """Wait for ``proc`` (at most ``timeout_s``), killing its process group on timeout."""
    try:
        rc, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group start() created
        rc, timed_out = proc.wait(), True
    try:  # what the tool left behind (data-loader workers of a stopped run): the next row
        os.killpg(proc.pid, signal.SIGKILL)  # starts on an empty GPU and host
    except (ProcessLookupError, PermissionError):
        pass
    proc.log_file.close()  # type: ignore[attr-defined]
    return rc, timed_out


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def first_error(path: Path) -> str | None:
    """The line of ``path`` that names the root Python exception: an out-of-memory error
    where there is one (a launcher's own error about its failed child comes after it),
    else the last ``SomethingError: ...`` line."""
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return None
    hits = [ln.strip() for ln in lines
            if ("Error:" in ln or "Exception:" in ln) and not ln.lstrip().startswith("File ")]
    oom = [ln for ln in hits if "OutOfMemoryError" in ln]
    hit = (oom or hits or [None])[-1 if not oom else 0]
    return hit[:400] if hit else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- result rows


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))]  # nearest rank


def lengths_check(seen: list[int], data: list[int]) -> dict[str, Any]:
    """Are the samples a tool trained on exactly chatft's samples? Every length the recorder
    saw must be one of the data's lengths (as a multiset: a length seen more often than the
    data holds it counts as a mismatch).

    >>> lengths_check([3, 3, 5], [3, 5, 5])["unmatched"]
    1
    """
    extra = Counter(seen) - Counter(data)
    unmatched = sum(extra.values())
    return {"samples_seen": len(seen), "unmatched": unmatched,
            "matched_fraction": round(1 - unmatched / len(seen), 4) if seen else None,
            "mean_length_seen": round(statistics.mean(seen), 2) if seen else None,
            "mean_length_data": round(statistics.mean(data), 2) if data else None}


def trained_check(seen: list[tuple[int, int]], data: list[tuple[int, int]]) -> dict[str, Any]:
    """How many labels the tool trains per sample, against chatft's targets for a sample of the
    same length: for each ``(length, trained)`` the tool trained, the difference to the data's
    sample of that length (the smallest difference where several share it). chatft trains the
    answer and the end-of-turn token; a tool that also trains the newline after it shows +1.

    >>> trained_check([(5, 3), (6, 2)], [(5, 2), (6, 2)])["differences"]
    {'0': 1, '1': 1}
    """
    by_length: dict[int, set[int]] = {}
    for n, t in data:
        by_length.setdefault(n, set()).add(t)
    diffs: Counter = Counter()
    for n, t in seen:
        cands = by_length.get(n)
        diffs["no such length" if not cands else str(min((t - c for c in cands), key=abs))] += 1
    return {"samples": len(seen), "differences": dict(sorted(diffs.items()))}


def speed_stats(record: dict[str, Any], start_unix: float, params: int, warmup: int,
                data_lengths: list[int], gpus: int = 1,
                data_trained: list[int] | None = None) -> dict[str, Any]:
    """A speed row's numbers from the recorder's record (``peer_measure``'s JSON).

    tokens/s per GPU = non-padding tokens of the measured steps / their summed step times /
    GPUs; MFU = tokens/s x 6 x N_params / 989e12; the 3-epoch job is extrapolated as time to
    first step + (planned steps - 1) x mean step time. The tool's own count
    (``num_input_tokens_seen``, non-padding mode) is compared with the recorder's per step.
    """
    steps = record.get("steps") or []
    if not steps:
        return {"steps_recorded": 0}
    meas = steps[warmup:]
    out: dict[str, Any] = {"steps_recorded": len(steps), "warmup_steps_excluded": warmup,
                           "time_to_first_step_s": round(steps[0]["end_unix"] - start_unix, 2),
                           "first_step_time_s": round(steps[0]["time_s"], 3)}
    if meas:
        times = [s["time_s"] for s in meas]
        tokens = sum(s["nonpad"] for s in meas)
        tps = tokens / sum(times) / gpus
        out.update({
            "steps_measured": len(meas), "step_time_p50_s": round(percentile(times, 50), 4),
            "step_time_mean_s": round(statistics.mean(times), 4),
            "tokens_per_step_mean": round(tokens / len(meas), 1),
            "samples_per_step_mean": round(statistics.mean(len(s["lengths"]) for s in meas), 2),
            "padding_per_step_mean": round(statistics.mean(s["all"] - s["nonpad"] for s in meas), 1),
            "trained_tokens_per_step_mean": round(statistics.mean(s["trained"] for s in meas), 1),
            "tokens_per_s_per_gpu": round(tps, 2), "mfu": round(tps * 6 * params / PEAK_FLOPS, 5)})
        total = record.get("max_steps")
        if total:
            out["planned_steps_3_epochs"] = total
            out["e2e_wall_s"] = round(out["time_to_first_step_s"]
                                      + (total - 1) * out["step_time_mean_s"], 1)
            out["e2e_kind"] = "extrapolated"
    out.update(own_count_check(steps))
    out["lengths_check"] = lengths_check([n for s in steps for n in s["lengths"]], data_lengths)
    if data_trained is not None:
        out["trained_check"] = trained_check(
            [(n, t) for s in steps for n, t in zip(s["lengths"], s.get("trained_per_sample", []))],
            list(zip(data_lengths, data_trained)))
    alloc = [s.get("max_memory_allocated") for s in steps if s.get("max_memory_allocated")]
    resv = [s.get("max_memory_reserved") for s in steps if s.get("max_memory_reserved")]
    if alloc:
        out["peak_gpu_allocated_gib"] = round(max(alloc) / GIB, 3)
        out["peak_gpu_reserved_gib"] = round(max(resv) / GIB, 3)
    return out


def own_count_check(steps: list[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """The recorder's non-padding tokens against Hugging Face Trainer's own count
    (``num_input_tokens_seen`` in ``non_padding`` mode: the attention mask's sum where the batch
    has one, else tokens that are not the pad id), over the recorded steps."""
    if not steps or steps[-1].get("num_input_tokens_seen") is None:
        return {"own_count": None}
    ours = sum(s["nonpad"] for s in steps)
    theirs = steps[-1]["num_input_tokens_seen"]  # cumulative since the first step
    ratio = theirs / ours if ours else None
    ok = ratio is not None and abs(ratio - 1) <= tolerance
    note = None
    if not ok:
        note = ("Trainer's count is not a token count here: it sums the attention mask, which "
                "is a 4D block-diagonal float mask (neat packing) or marks padding as attended "
                "(plain packing); the row uses the recorder's count, and lengths_check compares "
                "the samples with the data")
    return {"own_count": {"trainer_num_input_tokens_seen": theirs, "recorder_nonpad": ours,
                          "ratio": None if ratio is None else round(ratio, 5),
                          "within_1_percent": ok, "note": note}}


def run_speed_row(row: Row, ctx: Context, sampler_cls) -> dict[str, Any]:
    """Run one speed row for ``ctx.steps`` steps and describe it."""
    out = ctx.work / "speed" / row.name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd, extra, config = speed_job(row, ctx, out)
    env = peer_env(ctx, row.tool, out, extra, stop_after=ctx.steps)
    start_unix = time.time()
    proc = start(cmd, env, out / "log.txt")
    with sampler_cls(proc.pid, gpus=ctx.gpu) as sampler:
        rc, timed_out = finish(proc, ctx.timeout_s)
    record = read_json(out / "measure.json") or {}
    result: dict[str, Any] = {
        "row": row.name, "tool": row.tool, "what": row.what, "command": shlex.join(cmd),
        "config_file": str(config), "config": config.read_text(),
        "env": {k: v for k, v in extra.items()}, "returncode": rc, "timed_out": timed_out,
        "process_wall_s": round(time.time() - start_unix, 1),
        "peak_host_rss_gib": round(sampler.peak_rss / GIB, 3),
        "settings": {k: record.get(k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps",
            "gradient_checkpointing", "bf16", "deepspeed", "attn_implementation", "model_dtype",
            "model_class")},
        "row_length": ctx.row_length if row.packing != "none" else pc.UNPACKED_CUTOFF,
    }
    # Per GPU: the recorder's step tokens are rank 0's; every rank trains as many (ZeRO/DDP
    # data parallel), so tokens/s per GPU is rank 0's rate whatever the world size.
    result.update(speed_stats(record, start_unix, ctx.params, ctx.warmup, ctx.data_lengths,
                              data_trained=ctx.data_trained))
    result["world_size"] = record.get("world_size")
    done = len(record.get("steps") or []) >= ctx.steps
    result["status"] = "ok" if done and rc == 0 else "failed"
    if result["status"] != "ok":
        result["error"] = first_error(out / "log.txt") or ("timed out" if timed_out else
                                                           f"exit code {rc}")
        result["log_tail"] = log_tail(out / "log.txt")
    return result


def epoch_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders holding weights, by step."""
    found = [p for p in run_dir.rglob("checkpoint-*") if p.is_dir()
             and p.name.split("-")[-1].isdigit()
             and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))
