"""Ranking strategies and presenting the result: which strategies fit the budgets, which is
fastest, the recommendation, and the table and JSON ``chatft plan`` prints. Pure functions of a
:class:`~chatft.train.plan.cost.Job` and the budgets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from chatft.train.plan.cost import (DEFAULT_CALIBRATION, DEFAULT_SPEED, GIB, Calibration, Estimate,
                                    Job, SpeedModel, Strategy, estimate)


BASE_STRATEGIES = (
    Strategy("torch"),
    Strategy("deepspeed", 1),
    Strategy("deepspeed", 2),
    Strategy("deepspeed", 3),
    Strategy("deepspeed", 2, offload_optimizer=True),
    Strategy("deepspeed", 3, offload_optimizer=True),
    Strategy("deepspeed", 3, offload_optimizer=True, offload_param=True),
)
#: The plain engine's memory-lean optimizer options (one GPU, bf16), least lean first. Not
#: offered: bf16 weights with plain rounding (updates below bf16's spacing are lost: it stops
#: learning at lr 1e-5), and host states without the step in backward (chatft runs none).
LEAN_STRATEGIES = (
    Strategy("torch", optim="adamw_torch_8bit"),
    Strategy("torch", master_weights="none"),
    Strategy("torch", optim="adamw_torch_8bit", master_weights="none"),
    Strategy("torch", optim="adamw_torch_4bit", master_weights="none"),
    Strategy("torch", optim="adamw_torch_8bit", master_weights="none", optimizer_in_bwd=True),
    Strategy("torch", optim="adamw_torch_4bit", master_weights="none", optimizer_in_bwd=True),
    Strategy("torch", optim="adamw_torch_8bit", master_weights="none", optimizer_in_bwd=True,
             optimizer_states="host"),
)


@dataclass(frozen=True)
class PlanRow:
    estimate: Estimate
    fits_gpu: bool
    fits_host: bool
    relative_speed: float  # tokens/s over the fastest row's

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def strategy(self) -> Strategy:
        return self.estimate.strategy


@dataclass(frozen=True)
class Plan:
    job: Job
    gpu_budget: int  # bytes per GPU
    host_budget: int  # bytes of the node
    margin: float  # a row fits when its peaks are within (1 - margin) of the budgets
    rows: list[PlanRow]
    recommended: PlanRow | None
    asked_gpus: int = 0  # > job.gpus: nothing fit that many GPUs; this plan uses fewer
    per_device_batch: int = 0  # with asked_gpus: the samples per GPU of this plan
    asked_samples: int = 0  # with asked_gpus: the samples per step asked for (on all GPUs)

    def row(self, strategy: Strategy) -> PlanRow | None:
        return next((r for r in self.rows if r.strategy == strategy), None)


def fits_gpu(est: Estimate, budget: int, margin: float) -> bool:
    return est.gpu_device_bytes <= budget * (1 - margin)


def fewest_checkpoint_layers(job: Job, strategy: Strategy, gpu_budget: int, margin: float = 0.05,
                             calibration: Calibration = DEFAULT_CALIBRATION) -> int | None:
    """Smallest number of recomputed layers with which ``strategy`` fits the GPU (None: not even
    with all). GPU memory falls as more layers recompute, so this bisects."""
    L = job.model.num_layers

    def ok(k: int) -> bool:
        return fits_gpu(estimate(job, replace(strategy, checkpoint_layers=k), calibration),
                        gpu_budget, margin)

    if not ok(L):
        return None
    lo, hi = 0, L  # invariant: ok(hi)
    if ok(0):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def base_strategies(job: Job) -> list[Strategy]:
    """The strategies a job can run as: plain only on one GPU, its lean options only in bf16
    with an optimizer, the step in backward only when a step is one micro-batch."""
    out = [b for b in BASE_STRATEGIES if b.backend != "torch" or job.gpus == 1]
    if job.gpus == 1 and job.precision == "bf16" and job.optimizer:
        out += [s for s in LEAN_STRATEGIES if job.micro_batches == 1 or not s.optimizer_in_bwd]
    return out


def candidate_strategies(job: Job, gpu_budget: int, margin: float = 0.05,
                         calibration: Calibration = DEFAULT_CALIBRATION) -> list[Strategy]:
    """Each base strategy (:func:`base_strategies`; ZeRO-0 is not offered: ZeRO-1 does the
    same with less memory) with recomputation none, the fewest layers that fit, and all."""
    out: list[Strategy] = []
    L = job.model.num_layers
    for base in base_strategies(job):
        ks = [0]
        fewest = fewest_checkpoint_layers(job, base, gpu_budget, margin, calibration)
        if fewest not in (None, 0, L):
            ks.append(fewest)
        ks.append(L)
        out += [replace(base, checkpoint_layers=k) for k in ks]
    return out


def make_plan(job: Job, gpu_budget: int, host_budget: int, *, margin: float = 0.05,
              calibration: Calibration = DEFAULT_CALIBRATION, speed: SpeedModel = DEFAULT_SPEED,
              strategies: Sequence[Strategy] | None = None) -> Plan:
    """Every candidate strategy with its peaks and fit; the recommendation is the fastest that
    fits both budgets (ties: less GPU memory) with fp32 AdamW and fp32 masters, which stay the
    default wherever one fits; only when none does, the fastest lean optimizer choice that
    fits (ties: fewer lean options)."""
    cands = list(strategies) if strategies is not None else \
        candidate_strategies(job, gpu_budget, margin, calibration)
    ests = [estimate(job, s, calibration, speed) for s in cands]
    best = max(e.tokens_per_second for e in ests)
    rows = [PlanRow(e, fits_gpu(e, gpu_budget, margin), e.host_bytes <= host_budget * (1 - margin),
                    e.tokens_per_second / best) for e in ests]
    fitting = [r for r in rows if r.fits]
    fitting = [r for r in fitting if not r.strategy.lean_options] or fitting
    rec = max(fitting, key=lambda r: (round(r.relative_speed, 6), -r.strategy.lean_options,
                                      -r.estimate.gpu_bytes), default=None)
    return Plan(job, gpu_budget, host_budget, margin, rows, rec)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, as the table and the messages print them."""
    return f"{n / GIB:.1f}"


def format_plan(plan: Plan, notes: Sequence[str] = ()) -> str:
    """The table ``chatft plan`` prints (``notes``: extra header lines), ending with the
    recommendation."""
    job = plan.job
    kernels = "Liger kernels" if job.fused_kernels else "PyTorch kernels"
    lines = [f"model: {job.model.describe()}",
             (f"job: {job.tokens:,} tokens per micro-batch, {job.gpus} GPU(s), {job.precision}, "
              f"{job.attention} attention, {kernels}, {job.loss} loss"),
             (f"budget: {gib(plan.gpu_budget)} GiB per GPU, {gib(plan.host_budget)} GiB host "
              f"(fits = peak within {100 * (1 - plan.margin):.0f}% of both; GPU GiB is PyTorch's "
              f"allocated peak, the GPU also holds {gib(plan.rows[0].estimate.gpu_outside_bytes)} "
              "GiB outside it: CUDA context" + (", NCCL)" if job.gpus > 1 else ")")),
             *notes, ""]
    header = ("strategy", "recompute", "GPU GiB", "host GiB", "pinned GiB", "fits", "speed")
    table = [header]
    for r in plan.rows:
        e = r.estimate
        fit = "yes" if r.fits else ("no: GPU" if not r.fits_gpu else "no: host")
        if not r.fits_gpu and not r.fits_host:
            fit = "no: both"
        table.append((r.strategy.engine_label, r.strategy.recompute_label(job.model.num_layers),
                      gib(e.gpu_bytes), gib(e.host_bytes), gib(e.host_pinned_bytes), fit,
                      f"{r.relative_speed:.2f}"))
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        cells = [row[c].ljust(widths[c]) if c in (0, 1, 5) else row[c].rjust(widths[c])
                 for c in range(len(header))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append("recommended: " + recommendation_text(plan))
    return "\n".join(lines)


def recommendation_text(plan: Plan) -> str:
    L = plan.job.model.num_layers
    r = plan.recommended
    if r is None:
        least_gpu = min(plan.rows, key=lambda x: x.estimate.gpu_bytes)
        least_host = min(plan.rows, key=lambda x: x.estimate.host_bytes)
        return (f"nothing fits. Least GPU memory: {least_gpu.strategy.engine_label}, recompute "
                f"{least_gpu.strategy.recompute_label(L)} ({gib(least_gpu.estimate.gpu_bytes)} GiB GPU, "
                f"{gib(least_gpu.estimate.host_bytes)} GiB host); least host memory: "
                f"{least_host.strategy.engine_label} ({gib(least_host.estimate.host_bytes)} GiB host). "
                "Use fewer tokens per micro-batch (--micro_batch_tokens, --per_device_train_batch_size, "
                "--max_length), more GPUs, or a machine with more memory.")
    e = r.estimate
    text = (f"{r.strategy.engine_label}, recompute {r.strategy.recompute_label(L)} "
            f"({gib(e.gpu_bytes)} GiB GPU, {gib(e.host_bytes)} GiB host): "
            + " ".join(r.strategy.options(L)))
    if plan.asked_gpus > plan.job.gpus:
        n, g = plan.asked_gpus, plan.job.gpus
        samples = g * plan.per_device_batch
        same = ("the same samples per step" if samples == plan.asked_samples else
                f"a step trains {samples} samples instead of {plan.asked_samples}: "
                f"{plan.asked_samples} do not fit on {g} GPU(s) either")
        text = (f"uses {g} of {n} GPUs: no {n}-GPU layout fits {gib(plan.gpu_budget)} GiB per GPU "
                f"with {gib(plan.host_budget)} GiB host; the others stay idle. " + text
                + f" --nproc {g} --per_device_train_batch_size {plan.per_device_batch} "
                f"({same}); estimated by the planner {e.tokens_per_second:,.0f} tokens/s")
    return text


def plan_to_json(plan: Plan) -> dict[str, Any]:
    L = plan.job.model.num_layers

    def row(r: PlanRow) -> dict[str, Any]:
        e = r.estimate
        return {"strategy": asdict(r.strategy), "label": r.strategy.engine_label,
                "recompute": r.strategy.recompute_label(L), "gpu_gib": round(e.gpu_gib, 3),
                "gpu_device_gib": round(e.gpu_device_bytes / GIB, 3),
                "host_gib": round(e.host_gib, 3), "host_pinned_gib": round(e.host_pinned_bytes / GIB, 3),
                "fits_gpu": r.fits_gpu, "fits_host": r.fits_host, "fits": r.fits,
                "relative_speed": round(r.relative_speed, 4), "step_seconds": round(e.step_seconds, 4),
                "tokens_per_second": round(e.tokens_per_second),
                "gpu_phase": e.gpu_phase,
                "gpu_parts_gib": {k: round(v / GIB, 3) for k, v in e.gpu_parts.items()},
                "host_phase": e.host_phase,
                "host_parts_gib": {k: round(v / GIB, 3) for k, v in e.host_parts.items()},
                "options": r.strategy.options(L)}

    job = asdict(plan.job)
    job["model"]["n_params"] = plan.job.model.n_params
    return {"job": job, "gpu_budget_gib": round(plan.gpu_budget / GIB, 3),
            "asked_gpus": plan.asked_gpus or plan.job.gpus,
            "recommendation": recommendation_text(plan),
            "host_budget_gib": round(plan.host_budget / GIB, 3), "margin": plan.margin,
            "rows": [row(r) for r in plan.rows],
            "recommended": row(plan.recommended) if plan.recommended else None}
