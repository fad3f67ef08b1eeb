"""The planner applied to chatft's configuration: a :class:`~chatft.config.Config` (and the data's
sample lengths) becomes the planner's :class:`~chatft.train.plan.cost.Job`; ``chatft plan``
prints the plan for it; ``--plan auto`` (or ``gradient_checkpointing auto``) sets the
recommended strategy in the config before training; an out-of-memory error during training is
answered with what the planner recommends for this machine.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatft.config import Config, DeepSpeedArgs, ModelArgs
from chatft.errors import ChatftError
from chatft.train.batching import CUDA_TOKEN_MULTIPLE
from chatft.train.plan.cost import DeepSpeedSizes, Job, LossKernel, Strategy, estimate
from chatft.train.plan.hardware import detected_budgets, parse_size
from chatft.train.plan.report import (Plan, fewest_checkpoint_layers, format_plan, gib, make_plan,
                                      plan_to_json, recommendation_text)
from chatft.train.plan.shape import ModelShape
from chatft.train.schedule import run_length


def resolve_kernels(model: ModelArgs, precision: str) -> tuple[str, bool, LossKernel]:
    """(attention, Liger kernels, loss) the engine will use on a GPU for this config."""
    import torch

    from chatft.model.build import liger_available, resolve_attention

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16  # auto: bf16 on GPUs
    attention = resolve_attention(model.attn_implementation, torch.device("cuda"), dtype)
    if attention not in ("sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"):
        attention = "sdpa"
    liger = model.liger_kernel == "on" or (model.liger_kernel == "auto" and liger_available())
    return attention, liger, "fused" if liger else "chunked"


def token_budget(cfg: Config, lengths: Sequence[int] | None = None, gpus: int | None = None) -> int:
    """Tokens of the largest micro-batch one GPU will see.

    With the sample lengths, the exact maximum over the run's steps (the same pure planner the
    training loop uses; at most 20,000 steps are scanned). Without them, the bound the config
    allows: ``per_device_train_batch_size x max_length``, or ``micro_batch_tokens + max_length``
    when a cap is set. Packed rows round up to 64 tokens, as on CUDA.
    """
    return micro_batch_layout(cfg, lengths, gpus)[0]


def micro_batch_layout(cfg: Config, lengths: Sequence[int] | None = None,
                       gpus: int | None = None) -> tuple[int, int]:
    """(tokens of the largest micro-batch, most micro-batches per GPU in one step).

    The count is the configured accumulation, or more under ``micro_batch_tokens``: from the
    lengths, the most any step of the run needs; without them, the bound for samples of
    ``max_length`` tokens. See :func:`token_budget` for the tokens.
    """
    t, d = cfg.train, cfg.data
    world = gpus or cfg.world_size
    accumulation = t.gradient_accumulation_steps

    def padded(n: int) -> int:
        return -(-n // CUDA_TOKEN_MULTIPLE) * CUDA_TOKEN_MULTIPLE if d.packing else n

    if lengths is None or len(lengths) == 0:
        bound = t.per_device_train_batch_size * d.max_length
        m = accumulation
        if t.micro_batch_tokens:
            bound = min(bound, t.micro_batch_tokens + d.max_length)
            m = max(m, math.ceil(t.per_device_train_batch_size * accumulation * d.max_length
                                 / t.micro_batch_tokens))
        return padded(bound), m
    import numpy as np

    from chatft.train.batching import deal_into_bins, micro_batches_per_rank, step_samples

    lengths = np.asarray(lengths)
    length = run_length(t, len(lengths), world)  # the loop's own step count
    worst, most = 0, accumulation
    for step in range(min(length.total_steps, 20_000)):
        epoch, in_epoch = divmod(step, length.steps_per_epoch)
        samples = step_samples(len(lengths), length.global_batch, t.seed, epoch, in_epoch)
        m = micro_batches_per_rank(int(lengths[samples].sum()), world, accumulation, t.micro_batch_tokens)
        most = max(most, m)
        for b in deal_into_bins(samples, lengths, world * m):
            if b:
                size = int(lengths[b].sum()) if d.packing else len(b) * int(lengths[b].max())
                worst = max(worst, size)
    return padded(worst), most


def job_from_config(cfg: Config, model_config: Any, tokens: int, gpus: int | None = None,
                    micro_batches: int | None = None) -> Job:
    """The planner's Job for a chatft config (precision auto = bf16: the plan is for GPUs).
    ``micro_batches``: per GPU per step (see :func:`micro_batch_layout`); by default the
    bound without sample lengths."""
    attention, liger, loss = resolve_kernels(cfg.model, cfg.train.precision)
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    gpus = gpus or cfg.world_size
    if micro_batches is None:
        micro_batches = micro_batch_layout(cfg, None, gpus)[1]
    shape = ModelShape.from_config(model_config)
    gqa = False
    if attention == "varlen":
        from chatft.model.attention import varlen_takes_gqa

        gqa = varlen_takes_gqa()
    return Job(model=shape, tokens=tokens, gpus=gpus,
               gpus_per_node=gpus // max(1, cfg.launch.num_nodes) if cfg.launch.num_nodes > 1 else 0,
               precision=precision, attention=attention, fused_kernels=liger, loss=loss,
               micro_batches=micro_batches,
               pretrained=not cfg.model.random_init, export=cfg.train.export,
               export_bytes=4 if cfg.train.export_dtype == "fp32" else 2,
               deepspeed=deepspeed_sizes(cfg.deepspeed, shape), varlen_takes_gqa=gqa)


def deepspeed_sizes(ds: DeepSpeedArgs, shape: ModelShape) -> DeepSpeedSizes:
    """Bucket sizes from the user's DeepSpeed JSON when there is one ("auto" as chatft fills it)."""
    sizes = DeepSpeedSizes()
    zero = _user_zero(ds)
    h2 = shape.hidden_size * shape.hidden_size
    autos = {"reduce_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2)}
    values = {}
    for key, name in (("reduce_bucket_size", "reduce_bucket_size"),
                      ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
                      ("stage3_max_live_parameters", "max_live_parameters"),
                      ("sub_group_size", "sub_group_size")):
        v = zero.get(key)
        if v == "auto" and key in autos:
            values[name] = autos[key]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            values[name] = int(v)
    return replace(sizes, **values)


def _user_zero(ds: DeepSpeedArgs) -> dict[str, Any]:
    """The ``zero_optimization`` section of the user's DeepSpeed JSON ({} without one)."""
    if not ds.config:
        return {}
    try:
        zero = json.loads(Path(ds.config).read_text(encoding="utf-8")).get("zero_optimization")
    except (OSError, ValueError, AttributeError):
        return {}
    return zero if isinstance(zero, dict) else {}


def current_strategy(cfg: Config, num_layers: int) -> Strategy:
    """The strategy a config runs as (ZeRO settings from the user's DeepSpeed JSON if given)."""
    ds = cfg.deepspeed
    k = 0
    if cfg.model.gradient_checkpointing == "on":
        k = num_layers if cfg.model.checkpoint_layers < 0 else cfg.model.checkpoint_layers
    if not cfg.uses_deepspeed:
        t = cfg.train
        return Strategy("torch", checkpoint_layers=k, optim=t.optim, master_weights=t.master_weights,
                        optimizer_in_bwd=t.optimizer_in_bwd, optimizer_states=t.optimizer_states)
    stage, opt, param = ds.zero_stage, ds.offload_optimizer == "cpu", ds.offload_param == "cpu"
    zero = _user_zero(ds)
    if zero:
        stage = int(zero.get("stage", 0))
        opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
        param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    return Strategy("deepspeed", stage, opt, param and stage == 3, k)


def model_config_for(model: ModelArgs) -> Any:
    from chatft.model.loading import model_config, resolve_model

    try:
        return model_config(resolve_model(model.name_or_path))
    except (OSError, ValueError) as e:
        raise ChatftError(f"{model.name_or_path}: cannot read the model config ({e})") from None


def data_lengths(cfg: Config) -> tuple[Any, str]:
    """Training sample lengths (tokenizing into the cache if needed), or None and why not."""
    try:
        from chatft.data.steps import prepare_data, tokenizer_for

        return prepare_data(cfg.data, tokenizer_for(cfg.model)).train.lengths, "from the data"
    except (ChatftError, OSError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first if len(first) <= 100 else first[:97] + "..."
        return None, f"the config's bound; the data was not read: {first}"


def plan_command(cfg: Config, *, gpus: int | None, gpu_mem: str | None, cpu_mem: str | None,
                 tokens: int | None, as_json: bool, out=sys.stdout) -> int:
    """``chatft plan``: the table (or JSON) for this config on this machine (or the given one)."""
    gpu_budget, host_budget, source = detected_budgets()
    if gpu_mem:
        gpu_budget, source = parse_size(gpu_mem), "given"
    if cpu_mem:
        host_budget = parse_size(cpu_mem)
    if gpus is not None and gpus < 1:
        raise ChatftError(f"--gpus {gpus}: expected at least 1")
    model_cfg = model_config_for(cfg.model)
    if tokens is not None:
        if tokens < 1:
            raise ChatftError(f"--tokens {tokens}: expected at least 1")
        (T, m), why = (tokens, micro_batch_layout(cfg, None, gpus)[1]), "given"
        lengths = None
    else:
        lengths, why = data_lengths(cfg)
        T, m = micro_batch_layout(cfg, lengths, gpus)
    job = job_from_config(cfg, model_cfg, T, gpus, micro_batches=m)
    plan = make_plan(job, gpu_budget, host_budget)
    fewer = None
    if plan.recommended is None and job.gpus > 1:
        fewer = fewer_gpus_plan(cfg, model_cfg, job.gpus, gpu_budget, host_budget,
                                lengths=lengths, tokens=tokens)
    if as_json:
        data = {**plan_to_json(plan), "tokens_source": why, "budget_source": source}
        if fewer is not None:
            data["fewer_gpus"] = plan_to_json(fewer)
        print(json.dumps(data, indent=1), file=out)
    else:
        notes = [f"tokens per micro-batch: {why}", f"budget source: {source}"]
        text = format_plan(plan, notes)
        if fewer is not None:
            text += (f"\n\nOn fewer GPUs ({fewer.job.gpus} of {job.gpus}, the same samples per "
                     "step):\n" + format_plan(fewer, notes))
        print(text, file=out)
    return 0


def fewer_gpus_plan(cfg: Config, model_config: Any, gpus: int, gpu_budget: int, host_budget: int,
                    *, lengths: Sequence[int] | None = None, tokens: int | None = None) -> Plan | None:
    """When nothing fits ``gpus`` GPUs: the plan on fewer of them (same budgets per GPU and
    host) with the most tokens/s, or None. First each of ``g`` GPUs takes
    ``per_device_train_batch_size x gpus / g`` samples, so a step trains the same samples
    (skipped where ``g`` does not divide them); only when no ``g`` fits that way, each GPU
    keeps ``per_device_train_batch_size`` (a step trains fewer samples; the plan says so).
    Tokens per micro-batch: from the lengths, or ``tokens`` (per GPU at ``gpus`` GPUs) scaled
    by the samples per GPU."""
    samples = cfg.train.per_device_train_batch_size * gpus
    for same_samples in (True, False):
        best: Plan | None = None
        for g in range(gpus - 1, 0, -1):
            per_device = samples // g if same_samples else cfg.train.per_device_train_batch_size
            if same_samples and samples % g:
                continue
            sub = copy.deepcopy(cfg)
            sub.train.per_device_train_batch_size = per_device
            sub.launch.nproc, sub.launch.num_nodes = g, 1
            if tokens is not None:
                T = -(-tokens * per_device // cfg.train.per_device_train_batch_size)
                m = micro_batch_layout(sub, None, g)[1]
            else:
                T, m = micro_batch_layout(sub, lengths, g)
            plan = make_plan(job_from_config(sub, model_config, T, g, micro_batches=m),
                             gpu_budget, host_budget)
            if plan.recommended is not None and (
                    best is None or best.recommended is None or
                    plan.recommended.estimate.tokens_per_second >
                    best.recommended.estimate.tokens_per_second):
                best = replace(plan, asked_gpus=gpus, per_device_batch=per_device,
                               asked_samples=samples)
        if best is not None:
            return best
    return None


# --------------------------------------------------------------------------- applying a plan


def apply_strategy(cfg: Config, strategy: Strategy, num_layers: int) -> list[str]:
    """Set ``cfg`` to run as ``strategy``; returns the changed settings as ``name old -> new``."""
    ds, model = cfg.deepspeed, cfg.model
    k = strategy.checkpoint_layers
    new = [
        (ds, "backend", strategy.backend),
        (ds, "zero_stage", strategy.zero_stage),
        (ds, "offload_optimizer", "cpu" if strategy.offload_optimizer else "none"),
        (ds, "offload_param", "cpu" if strategy.offload_param else "none"),
        (model, "gradient_checkpointing", "on" if k > 0 else "off"),
        (model, "checkpoint_layers", -1 if k <= 0 or k >= num_layers else k),
        # every strategy sets the optimizer options: ZeRO never keeps a lean one
        (cfg.train, "optim", strategy.optim),
        (cfg.train, "master_weights", strategy.master_weights),
        (cfg.train, "optimizer_in_bwd", strategy.optimizer_in_bwd),
        (cfg.train, "optimizer_states", strategy.optimizer_states),
    ]
    if strategy.optimizer_in_bwd:  # no clipping by the global norm in backward
        new.append((cfg.train, "max_grad_norm", 0.0))
    changes = []
    for obj, name, value in new:
        old = getattr(obj, name)
        if old != value:
            setattr(obj, name, value)
            changes.append(f"{name} {old} -> {value}")
    return changes


def apply_plan(cfg: Config, model_config: Any, tokens: int, gpu_budget: int,
               host_budget: int, micro_batches: int | None = None) -> tuple[Plan, list[str]]:
    """``--plan auto`` (or ``gradient_checkpointing auto``): choose and apply the strategy.

    ``train.plan auto`` applies the recommended strategy. Without it, ``gradient_checkpointing
    auto`` keeps the configured engine and picks the fewest recomputed layers that fit.
    Raises ChatftError when nothing fits.
    """
    job = job_from_config(cfg, model_config, tokens, micro_batches=micro_batches)
    L = job.model.num_layers
    if cfg.train.plan == "auto" and not cfg.deepspeed.config:
        plan = make_plan(job, gpu_budget, host_budget)
    else:
        base = replace(current_strategy(cfg, L), checkpoint_layers=0)
        k = fewest_checkpoint_layers(job, base, gpu_budget)
        plan = make_plan(job, gpu_budget, host_budget,
                         strategies=[replace(base, checkpoint_layers=k if k is not None else L)])
    if plan.recommended is None:
        fewer = None
        if job.gpus > 1 and cfg.train.plan == "auto":
            fewer = fewer_gpus_plan(cfg, model_config, job.gpus, gpu_budget, host_budget,
                                    tokens=tokens)
        raise ChatftError("the memory planner finds no strategy that fits this machine "
                          f"({gib(gpu_budget)} GiB per GPU, {gib(host_budget)} GiB host) for "
                          f"{tokens:,} tokens per micro-batch on {job.gpus} GPU(s): "
                          + (recommendation_text(fewer) if fewer is not None else
                             recommendation_text(plan)) + " (see `chatft plan`)")
    changes = apply_strategy(cfg, plan.recommended.strategy, L)
    cfg.validate()
    return plan, changes


def auto_plan(cfg: Config, lengths: Sequence[int] | None) -> None:
    """What ``chatft train`` does before launching when the config asks the planner."""
    if cfg.train.plan != "auto" and cfg.model.gradient_checkpointing != "auto":
        return
    gpu_budget, host_budget, source = detected_budgets()
    if source.startswith("no GPU"):
        if cfg.model.gradient_checkpointing == "auto":
            cfg.model.gradient_checkpointing = "off"
        print("chatft: plan: no GPU, training on the CPU as configured", file=sys.stderr)
        return
    if cfg.train.plan == "auto" and cfg.deepspeed.config:
        print("chatft: plan: a DeepSpeed JSON sets ZeRO and offload; planning recomputation only",
              file=sys.stderr)
    tokens, m = micro_batch_layout(cfg, lengths)
    plan, changes = apply_plan(cfg, model_config_for(cfg.model), tokens, gpu_budget, host_budget, m)
    rec = plan.recommended
    assert rec is not None
    L = plan.job.model.num_layers
    print(f"chatft: plan ({source}; {gib(gpu_budget)} GiB per GPU, {gib(host_budget)} GiB host, "
          f"{tokens:,} tokens per micro-batch): {rec.strategy.engine_label}, recompute "
          f"{rec.strategy.recompute_label(L)}: predicted {gib(rec.estimate.gpu_bytes)} GiB GPU, "
          f"{gib(rec.estimate.host_bytes)} GiB host, the fastest of "
          f"{sum(r.fits for r in plan.rows)} that fit" + (f"; set {', '.join(changes)}" if changes else ""),
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- out of memory


def out_of_memory_message(cfg: Config, error_text: str, *, device: str, gpus: int, tokens: int,
                          model_config: Any, gpu_budget: int, host_budget: int,
                          micro_batches: int | None = None) -> str:
    """What a process says when the GPU ran out: what ran out, what the planner predicted for
    this configuration, and what it recommends for this machine instead."""
    first = error_text.strip().splitlines()[0] if error_text.strip() else "out of memory"
    job = job_from_config(cfg, model_config, tokens, gpus, micro_batches)
    L = job.model.num_layers
    current = current_strategy(cfg, L)
    now = estimate(job, current)
    plan = make_plan(job, gpu_budget, host_budget)
    lines = [f"out of GPU memory on {device} ({first})",
             (f"This run: {current.engine_label}, recompute {current.recompute_label(L)}, "
              f"{tokens:,} tokens in the largest micro-batch; the planner predicts "
              f"{gib(now.gpu_bytes)} GiB per GPU of {gib(gpu_budget)} GiB.")]
    if plan.recommended is not None and plan.recommended.strategy != current:
        lines.append("For this machine the planner recommends " + recommendation_text(plan)
                     + " (or run with --plan auto).")
    elif plan.recommended is not None:
        lines.append("The planner expected this configuration to fit; its estimate was low. "
                     "Recompute more layers (--gradient_checkpointing on) or cap the micro-batch "
                     "(--micro_batch_tokens).")
    else:
        lines.append("Nothing fits this machine: " + recommendation_text(plan))
    return "\n".join(lines)


@contextmanager
def explain_out_of_memory(cfg: Config, lengths: Sequence[int] | None = None) -> Iterator[None]:
    """Turn ``torch.OutOfMemoryError`` inside the block into a ChatftError (exit code 2) that
    says what ran out and what the planner recommends for this machine."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        gpu_budget, host_budget, _ = detected_budgets()
        try:
            tokens, m = micro_batch_layout(cfg, lengths)
            message = out_of_memory_message(cfg, str(e), device=str(device), gpus=cfg.world_size,
                                            tokens=tokens, model_config=model_config_for(cfg.model),
                                            gpu_budget=gpu_budget, host_budget=host_budget,
                                            micro_batches=m)
        except ChatftError as why:  # the advice itself failed: still say what ran out
            message = f"out of GPU memory on {device} ({str(e).splitlines()[0]}); no plan: {why}"
        raise ChatftError(message) from None
