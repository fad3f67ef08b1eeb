"""The memory planner against measured peaks: per-run errors, and the constants refitted.

``bench/results/plan_measurements_h200.json`` holds chatft training runs measured on NVIDIA
H200 (peak ``torch.cuda.max_memory_allocated`` of the largest rank, reserved memory, nvidia-smi's
used memory, peak host RSS of the process tree), each with the chatft options that define the
job and where its numbers were read. For every run this module rebuilds the planner's
:class:`~chatft.train.plan.cost.Job` from those options exactly as ``chatft plan`` does (the
token budget of the largest micro-batch comes from
:func:`~chatft.train.plan.apply.micro_batch_layout` on the real data with the Qwen tokenizer),
then compares :func:`~chatft.train.plan.cost.estimate` with the measurement twice: with the
planner's committed calibration (the constants in ``chatft/train/plan/cost.py``) and with one
refitted on these runs (:func:`fit_calibration`; the CUDA context and NCCL's buffers, which
PyTorch's allocator does not see, from nvidia-smi's used memory minus torch's reserved memory).

``bench/plan_calibration.py`` is the command-line entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.lib import REPO, environment
from chatft.train.plan.apply import (current_strategy, data_lengths, job_from_config,
                                     micro_batch_layout)
from chatft.train.plan.cost import (DEFAULT_CALIBRATION, GIB, Calibration, Job, Strategy, estimate,
                                    gpu_phases)

RESULTS = REPO / "bench" / "results"
DEFAULT_RUNS = RESULTS / "plan_measurements_h200.json"
#: Acceptance: every prediction within this relative error of the measurement.
TOLERANCE = 0.15


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class Measurement:
    """One benchmarked run: what ran and the peaks seen (GiB; host None when not measured)."""

    job: Job
    strategy: Strategy
    gpu_gib: float
    host_gib: float | None = None


def fit_calibration(rows: Sequence[Measurement], base: Calibration = DEFAULT_CALIBRATION) -> Calibration:
    """Refit the constants from measured peaks.

    GPU: each row's peak is ``states + fixed + factor * activations`` (the parts of its peak
    phase; a peak at the optimizer step has no activations), a line in (factor, fixed). With
    two or more distinct activation sizes both are solved by least squares on the relative
    errors (each row weighted by 1/measured^2, so a 7 GiB run counts as much as a 130 GiB one),
    with one only the factor (the fixed part kept). Which phase peaks depends on the constants,
    so the fit repeats until no row changes phase. Host: the per-process baseline is the mean of
    ``(measured - the rest) / processes``.
    """
    if not rows:
        return base
    # Per row: (states of the backward phase, raw activations, states of the step phase), GiB.
    pieces = []
    for r in rows:
        phases = gpu_phases(r.job, r.strategy, 1.0, 0)
        (_, back), (_, step) = phases.items()
        act = back["activations"]
        pieces.append(((sum(back.values()) - act) / GIB, act / GIB, sum(step.values()) / GIB))
    factor, fixed = base.activation_factor, base.gpu_fixed_gib
    in_step: list[bool] | None = None
    for _ in range(20):
        now = [b + factor * a < st for b, a, st in pieces]  # the step is this row's peak
        if now == in_step:
            break
        in_step = now
        xs = [0.0 if st_peak else a for (b, a, st), st_peak in zip(pieces, in_step)]
        ys = [r.gpu_gib - (st if st_peak else b) for r, (b, a, st), st_peak in zip(rows, pieces, in_step)]
        ws = [1.0 / max(r.gpu_gib, 1e-9) ** 2 for r in rows]
        sw = sum(ws)
        mx = sum(w * x for w, x in zip(ws, xs)) / sw
        my = sum(w * y for w, y in zip(ws, ys)) / sw
        sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
        if len(rows) >= 2 and sxx > 1e-9 * sw * max(1.0, mx * mx):
            factor = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
            fixed = my - factor * mx
            if fixed < 0:  # memory cannot be negative: the best line through no fixed part
                fixed = 0.0
                sxx0 = sum(w * x * x for w, x in zip(ws, xs))
                factor = sum(w * x * y for w, x, y in zip(ws, xs, ys)) / sxx0 if sxx0 else factor
        else:
            fixed = base.gpu_fixed_gib
            factor = (my - fixed) / mx if mx > 0 else base.activation_factor
    out = replace(base, activation_factor=factor, gpu_fixed_gib=fixed)
    host = [r for r in rows if r.host_gib is not None]
    if host:
        per = []
        for r in host:
            probe = estimate(r.job, r.strategy, replace(out, host_process_gib=0.0))
            per.append((r.host_gib - probe.host_gib) / r.job.procs_per_node)
        out = replace(out, host_process_gib=sum(per) / len(per))
    return out


# --------------------------------------------------------------------------- the measured runs


@dataclass(frozen=True)
class MeasuredRun:
    """One row of the measurements file."""

    id: str
    what: str
    model: str  # key into the file's "models"
    options: list[str]  # chatft options that define the job ("auto" kernels as resolved there)
    command: str  # the exact command that ran
    source: str  # where the numbers were read
    tokens: int  # tokens of the largest micro-batch on one GPU (chatft plan's token budget)
    micro_batches: int  # most micro-batches per GPU in one step
    gpu_gib: float  # peak allocated, largest rank
    reserved_gib: float
    used_gib: float | None  # nvidia-smi, on this run's GPUs
    host_gib: float | None  # peak RSS of the process tree
    host_in_fit: bool  # False: the host figure includes something the planner does not model
    host_note: str | None = None
    validation: bool = False  # measured after the calibration was fitted: checked, never fitted


@dataclass(frozen=True)
class Measurements:
    meta: dict[str, Any]  # description, hardware, versions, kernels, data, models, excluded
    runs: list[MeasuredRun]


def load_measurements(path: Path = DEFAULT_RUNS) -> Measurements:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    runs = []
    for r in data["rows"]:
        m = r["measured"]
        runs.append(MeasuredRun(
            id=r["id"], what=r["what"], model=r["model"], options=list(r["options"]),
            command=r["command"], source=r["source"], tokens=int(r["tokens"]),
            micro_batches=int(r["micro_batches"]), gpu_gib=float(m["gpu_allocated_gib"]),
            reserved_gib=float(m["gpu_reserved_gib"]), used_gib=m.get("gpu_used_gib_nvidia_smi"),
            host_gib=m.get("host_rss_gib"), host_in_fit=bool(r.get("host_in_fit", False)),
            host_note=r.get("host_note"), validation=bool(r.get("validation", False))))
    return Measurements({k: v for k, v in data.items() if k != "rows"}, runs)


def derive_layouts(ms: Measurements, data: Path, tiktoken: Path, workdir: Path
                   ) -> dict[str, tuple[int, int]]:
    """(token budget, micro-batches) of every run, the way ``chatft plan`` derives them: the
    config's step plan replayed over the real sample lengths (huanhuan rendered by the Qwen
    tokenizer with the run's system prompt and ``max_length``)."""
    from bench.lib.shapes import write_model_folder
    from chatft.config_parse import load_config

    folder = write_model_folder(workdir / "qwen2-7b", ms.meta["models"]["qwen2-7b"], tiktoken)
    out = {}
    for run in ms.runs:
        cfg = load_config(None, ["--model", str(folder), "--data", str(data), *run.options])
        lengths, why = data_lengths(cfg)
        if lengths is None:
            raise RuntimeError(f"{run.id}: the data could not be read ({why})")
        out[run.id] = micro_batch_layout(cfg, lengths)
    return out


def job_and_strategy(ms: Measurements, run: MeasuredRun, tokens: int | None = None,
                     micro_batches: int | None = None) -> tuple[Job, Strategy]:
    """The planner's view of a run: its config's Job and Strategy, with the kernels of the
    machine it ran on (``kernels`` of the file) rather than this one's."""
    from chatft.config_parse import load_config

    cfg = load_config(None, run.options)
    job = job_from_config(cfg, ms.meta["models"][run.model], tokens or run.tokens, cfg.world_size,
                          micro_batches or run.micro_batches)
    job = replace(job, varlen_takes_gqa=bool(ms.meta["kernels"]["varlen_takes_gqa"]))
    return job, current_strategy(cfg, job.model.num_layers)


def outside_allocator_gib(runs: Sequence[MeasuredRun]) -> tuple[float, float]:
    """(CUDA context, NCCL buffers) per process in GiB: nvidia-smi's used memory minus torch's
    reserved memory, the largest over one-process runs, and what multi-GPU runs add to it."""
    single = [r.used_gib - r.reserved_gib for r in runs
              if r.used_gib is not None and "--nproc" not in r.options]
    multi = [r.used_gib - r.reserved_gib for r in runs
             if r.used_gib is not None and "--nproc" in r.options]
    context = max(single) if single else DEFAULT_CALIBRATION.context_gib
    comm = max(multi) - context if multi else DEFAULT_CALIBRATION.comm_gib
    return context, max(0.0, comm)


def refit(ms: Measurements, jobs: dict[str, tuple[Job, Strategy]]) -> Calibration:
    """The calibration fitted on the runs that are not validation runs."""
    fitting = [r for r in ms.runs if not r.validation]
    rows = [Measurement(*jobs[r.id], r.gpu_gib, r.host_gib if r.host_in_fit else None)
            for r in fitting]
    context, comm = outside_allocator_gib(fitting)
    return replace(fit_calibration(rows), context_gib=context, comm_gib=comm)


def rounded(cal: Calibration, digits: int = 3) -> Calibration:
    return Calibration(**{k: round(v, digits) for k, v in asdict(cal).items()})


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def evaluate(ms: Measurements, jobs: dict[str, tuple[Job, Strategy]], cal: Calibration
             ) -> list[dict[str, Any]]:
    """Per run: predicted vs measured GPU peak (and host peak where measured), with the
    planner's breakdown at its predicted GPU peak."""
    out = []
    for run in ms.runs:
        job, strategy = jobs[run.id]
        e = estimate(job, strategy, cal)
        row: dict[str, Any] = {
            "id": run.id, "gpu_predicted_gib": round(e.gpu_gib, 3), "gpu_measured_gib": run.gpu_gib,
            "gpu_error": round(_error(e.gpu_gib, run.gpu_gib), 4), "gpu_phase": e.gpu_phase,
            "gpu_parts_gib": {k: round(v / GIB, 3) for k, v in e.gpu_parts.items()},
            "gpu_device_predicted_gib": round(e.gpu_device_bytes / GIB, 3),
            "gpu_device_measured_gib": run.used_gib,
            "host_predicted_gib": round(e.host_gib, 3), "host_measured_gib": run.host_gib,
            "host_phase": e.host_phase, "validation": run.validation,
        }
        if run.host_gib is not None:
            row["host_error"] = round(_error(e.host_gib, run.host_gib), 4)
            row["host_checked"] = run.host_in_fit
        out.append(row)
    return out


def within(rows: Sequence[dict[str, Any]], tol: float = TOLERANCE) -> bool:
    """Every GPU peak, and every host peak the planner models, within ``tol``."""
    return all(abs(r["gpu_error"]) <= tol and
               (not r.get("host_checked") or abs(r["host_error"]) <= tol) for r in rows)


@dataclass
class CalibrationOptions:
    runs: Path = DEFAULT_RUNS
    data: Path | None = None  # huanhuan.json; None: use the token budgets stored in the file
    tiktoken: Path | None = None
    out: Path = RESULTS / "plan_calibration_h200.json"


def run_calibration(opts: CalibrationOptions, command: str) -> dict[str, Any]:
    ms = load_measurements(opts.runs)
    layouts: dict[str, tuple[int, int]] = {}
    tokens_source = "stored in the measurements file"
    if opts.data is not None and opts.tiktoken is not None:
        with tempfile.TemporaryDirectory(prefix="chatft-plan-cal-") as tmp:
            layouts = derive_layouts(ms, opts.data, opts.tiktoken, Path(tmp))
        tokens_source = f"derived now from {opts.data.name} with the Qwen tokenizer"
    jobs = {r.id: job_and_strategy(ms, r, *layouts.get(r.id, (None, None))) for r in ms.runs}
    fitted = rounded(refit(ms, jobs))
    current = evaluate(ms, jobs, DEFAULT_CALIBRATION)
    refitted = evaluate(ms, jobs, fitted)
    runs = []
    for run, cur, new in zip(ms.runs, current, refitted):
        job = jobs[run.id][0]
        stored = (run.tokens, run.micro_batches)
        derived = layouts.get(run.id)
        runs.append({"id": run.id, "what": run.what, "command": run.command, "source": run.source,
                     "tokens": job.tokens, "micro_batches": job.micro_batches,
                     "tokens_match_stored": None if derived is None else derived == stored,
                     "attention": job.attention, "strategy": asdict(jobs[run.id][1]),
                     "host_note": run.host_note, "current": cur, "refitted": new})
    return {
        "benchmark": "plan_calibration", "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": [
            ("GPU peaks are torch.cuda.max_memory_allocated of the largest rank; the planner "
             "predicts that figure. gpu_device_* adds the memory outside PyTorch's allocator "
             "(CUDA context, NCCL buffers): predicted = allocated + context (+ NCCL), measured = "
             "nvidia-smi's used memory on the run's GPUs (taken above its value at start)."),
            ("Host peaks: summed RSS of the run's process tree; host_checked false rows are "
             "shown but not held to the tolerance (see host_note)."),
            ("validation rows were measured after the calibration was fitted: they are held to "
             "the tolerance but take no part in the refit, so they test the planner out of "
             "sample."),
            (f"tokens: {tokens_source}; the largest micro-batch of the run as chatft plan "
             "computes it for the run's config (padded to 64 on CUDA)."),
        ],
        "measurements": {"file": str(opts.runs.relative_to(REPO)) if opts.runs.is_relative_to(REPO)
                         else str(opts.runs),
                         **{k: ms.meta[k] for k in ("hardware", "versions", "kernels", "excluded")
                            if k in ms.meta}},
        "versions": environment.versions(("deepspeed",)),
        "tolerance": TOLERANCE,
        "calibration_current": asdict(DEFAULT_CALIBRATION),
        "calibration_refitted": asdict(fitted),
        "all_within_tolerance_current": within(current),
        "all_within_tolerance_refitted": within(refitted),
        "max_abs_gpu_error_current": max(abs(r["gpu_error"]) for r in current),
        "max_abs_gpu_error_refitted": max(abs(r["gpu_error"]) for r in refitted),
        "runs": runs,
    }


def format_table(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:+.1f}%"

    header = ("run", "tokens", "mb", "measured", "current", "err", "refitted", "err",
              "host meas", "host pred", "err")
    table = [header]
    for r in result["runs"]:
        cur, new = r["current"], r["refitted"]
        host_err = pct(cur.get("host_error")) + ("" if cur.get("host_checked", True) else " (n/a)")
        table.append((r["id"] + (" (validation)" if cur.get("validation") else ""),
                      f"{r['tokens']:,}", str(r["micro_batches"]),
                      f"{cur['gpu_measured_gib']:.1f}", f"{cur['gpu_predicted_gib']:.1f}",
                      pct(cur["gpu_error"]), f"{new['gpu_predicted_gib']:.1f}", pct(new["gpu_error"]),
                      "" if cur["host_measured_gib"] is None else f"{cur['host_measured_gib']:.1f}",
                      f"{cur['host_predicted_gib']:.1f}", host_err))
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(row[c].ljust(widths[c]) if c == 0 else row[c].rjust(widths[c])
                       for c in range(len(header))).rstrip() for row in table]
    lines.insert(1, "-" * len(lines[0]))
    cur, new = result["calibration_current"], result["calibration_refitted"]
    lines += ["", ("(GiB; GPU = peak allocated of the largest rank; mb = micro-batches per GPU per "
                   "step; current = the planner's committed calibration, refitted = fitted on these "
                   "runs)"),
              "current:  " + ", ".join(f"{k} {v:g}" for k, v in cur.items()),
              "refitted: " + ", ".join(f"{k} {v:g}" for k, v in new.items()),
              (f"all within ±{100 * result['tolerance']:.0f}%: current "
               f"{result['all_within_tolerance_current']}, refitted "
               f"{result['all_within_tolerance_refitted']}")]
    return "\n".join(lines)


def _shared_dir() -> Path | None:
    for cand in (os.environ.get("CHATFT_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "assets" / "qwen.tiktoken").is_file():
            return Path(cand)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="measurements file")
    ap.add_argument("--shared", type=Path, default=None,
                    help="folder with data/huanhuan.json and assets/qwen.tiktoken (default: "
                         "$CHATFT_SHARED or ../shared); without it the stored token budgets are used")
    ap.add_argument("--out", type=Path, default=RESULTS / "plan_calibration_h200.json")
    args = ap.parse_args(argv)
    shared = args.shared or _shared_dir()
    opts = CalibrationOptions(runs=args.runs, out=args.out,
                              data=shared / "data" / "huanhuan.json" if shared else None,
                              tiktoken=shared / "assets" / "qwen.tiktoken" if shared else None)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    result = run_calibration(opts, shlex.join(["python", "bench/plan_calibration.py", *argv_used]))
    print(format_table(result))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {opts.out}")
    print(json.dumps({k: result[k] for k in ("benchmark", "all_within_tolerance_current",
                                             "all_within_tolerance_refitted",
                                             "max_abs_gpu_error_current",
                                             "max_abs_gpu_error_refitted", "calibration_refitted")}))
    return 0 if result["all_within_tolerance_current"] else 1
