"""The training loop: one function, the same for one CPU process and many GPUs.

Loss normalization. A step's loss is the mean negative log-likelihood per trained token of the
*whole global batch*: every micro-batch contributes ``sum(token losses) / N_step``, where
``N_step`` (targets in the step, over all processes) is known in advance from the plan. The
gradient is thus identical however the step is split into micro-batches, processes or packed
rows, which is what makes (micro-batch 4 x accumulation 1) == (2 x 2) == 2 processes, and
packed == unpacked. DeepSpeed averages gradients over processes, so each process scales its
loss by ``world_size`` to turn that average back into the sum.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from chatft import __version__
from chatft.config import Config
from chatft.data.labels import trained_count
from chatft.data.prepare import TokenizedDataset, builtin_meta
from chatft.data.steps import prepare_data
from chatft.model.build import build_model, use_liger
from chatft.model.loading import load_tokenizer, model_config, resolve_model
from chatft.train import checkpoint as ckpt
from chatft.train.batching import (StepPlan, eval_plans, pack, pad, plan_step, steps_per_epoch)
from chatft.train.engine import (DTYPES, DeepSpeedEngine, Engine, TorchEngine, resolve_precision,
                                 training_device)
from chatft.train.metrics import CURVE_FILE, MetricsLog, plot_loss_curve
from chatft.train.plan import explain_out_of_memory
from chatft.train.schedule import lr_at, warmup_steps_for

log = logging.getLogger("chatft")


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    export_dir: Path | None
    answers: dict[str, str]  # question -> the exported model's answer


def _say(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"chatft: {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> tuple[int, int]:
    """Join the process group the launcher set up (or a one-process group for DeepSpeed)."""
    if not cfg.uses_deepspeed:
        return 0, 1
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Leave the process group at the end of a process's training (without it, torch warns
    at exit that resources may leak)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Data:
    """A tokenized dataset with the per-sample arrays the planner needs."""

    def __init__(self, ds: TokenizedDataset):
        self.ds = ds
        self.lengths = ds.lengths
        self.trained = np.array([trained_count(ds.sample(i)[1]) for i in range(len(ds))])

    def batch(self, indices: list[int], packing: bool, pad_id: int, multiple: int) -> "object":
        samples = [self.ds.sample(i) for i in indices]
        return pack(samples, multiple, pad_id) if packing else pad(samples, pad_id)


def make_engine(cfg: Config, source, precision: str, device: torch.device, total_steps: int,
                warmup: int) -> Engine:
    """Build the model and wrap it in the engine the config asks for."""
    dtype = DTYPES[precision]
    # fp16 keeps fp32 weights (autocast / DeepSpeed's fp16 optimizer makes the half copies).
    model_dtype = torch.float32 if precision == "fp16" else dtype
    gc = cfg.model.gradient_checkpointing == "on"
    fused = "liger" if use_liger(cfg.model, device) else "chunked"

    def build(create_on):
        return build_model(cfg.model, source, dtype=model_dtype,
                           device=create_on if create_on is not None else device,
                           seed=cfg.train.seed, gradient_checkpointing=gc,
                           max_length=cfg.data.max_length)

    if not cfg.uses_deepspeed:
        return TorchEngine(cfg, build(device), precision, device, fused)
    from chatft.train.ds_config import fill_auto, generated_config, load_user_config

    raw = load_user_config(cfg.deepspeed.config) if cfg.deepspeed.config else generated_config(cfg, precision)
    ds_config, warnings = fill_auto(raw, cfg, precision=precision, total_steps=total_steps,
                                    warmup_steps=warmup,
                                    hidden_size=getattr(model_config(source), "hidden_size", None))
    for w in warnings:
        _say(f"warning: {w}", dist.get_rank())
    return DeepSpeedEngine(cfg, build, ds_config, precision, device, fused)


def evaluate(engine: Engine, data: _Data, cfg: Config, pad_id: int, multiple: int) -> float:
    """Mean NLL per trained token over the held-out set (all processes take part)."""
    t = cfg.train
    plans = eval_plans(data.lengths, data.trained,
                       global_batch=t.per_device_train_batch_size * t.gradient_accumulation_steps * engine.world_size,
                       world_size=engine.world_size, rank=engine.rank,
                       accumulation=t.gradient_accumulation_steps, micro_batch_tokens=t.micro_batch_tokens)
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.wrapper.eval()
    with torch.no_grad():
        for plan in plans:
            for mb in plan.micro_batches:
                loss_sum, n = engine.forward(data.batch(mb, cfg.data.packing, pad_id, multiple))
                total += torch.stack([loss_sum.double(), n.double()]).to(total.device)
    engine.wrapper.train()
    engine.all_reduce_sum(total)
    return float(total[0] / total[1])


def run_step(engine: Engine, data: _Data, plan: StepPlan, cfg: Config, pad_id: int,
             multiple: int) -> torch.Tensor:
    """Forward/backward over this process's micro-batches; returns the local loss sum."""
    local = torch.zeros((), dtype=torch.float32, device=engine.device)
    last = len(plan.micro_batches) - 1
    for k, mb in enumerate(plan.micro_batches):
        loss_sum, _ = engine.forward(data.batch(mb, cfg.data.packing, pad_id, multiple))
        engine.backward(loss_sum * (engine.world_size / plan.trained_tokens), k == last)
        local += loss_sum.detach().float()
    return local


def gpu_memory_peaks(engine: Engine) -> dict[str, list[float]]:
    """Peak GPU memory of every process so far, in GiB and rank order: what torch allocated
    and what its caching allocator reserved. Empty off CUDA. Every process must call it."""
    if engine.device.type != "cuda":
        return {}
    mine = torch.tensor([torch.cuda.max_memory_allocated(engine.device),
                         torch.cuda.max_memory_reserved(engine.device)],
                        dtype=torch.float64, device=engine.device) / 2**30  # [2]
    if engine.world_size > 1:
        every = torch.empty(2 * engine.world_size, dtype=torch.float64, device=engine.device)
        dist.all_gather_into_tensor(every, mine)  # [world * 2], rank-major
        mine = every
    pairs = mine.view(-1, 2).tolist()
    return {"gpu_mem_allocated_gib": [round(a, 3) for a, _ in pairs],
            "gpu_mem_reserved_gib": [round(r, 3) for _, r in pairs]}


def train(cfg: Config) -> TrainResult:
    """Train as ``cfg`` says; resume, checkpoint, evaluate, export. Every process calls this."""
    rank, world = init_distributed(cfg)
    device = training_device()
    if cfg.train.max_gpu_memory and device.type == "cuda":
        from chatft.train.plan import parse_size

        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(cfg.train.max_gpu_memory) / total), device)
    torch.manual_seed(cfg.train.seed)
    precision, note = resolve_precision(cfg.train.precision, device)
    if note:
        _say(note, rank)
    source = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg.model.tokenizer)
    prepared = prepare_data(cfg, tokenizer)  # from the cache the launcher filled
    train_data = _Data(prepared.train)
    eval_data = _Data(prepared.eval) if prepared.eval is not None and len(prepared.eval) else None
    t = cfg.train
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    per_epoch = steps_per_epoch(len(train_data.lengths), global_batch)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = 64 if device.type == "cuda" else 1  # fewer distinct shapes for GPU kernels

    with explain_out_of_memory(cfg, train_data.lengths):  # out of GPU memory: say what fits
        engine = make_engine(cfg, source, precision, device, total_steps, warmup)
    out = Path(t.output_dir)
    start_step, resumed_from = 0, None
    if t.resume:
        folder = ckpt.latest_checkpoint(out) if t.resume == "auto" else Path(t.resume)
        if folder is not None:
            client = engine.load(folder)
            start_step, resumed_from = int(client["step"]), folder
            _say(f"resumed from {folder} at step {start_step}", rank)
        elif rank == 0:
            _say(f"resume auto: no checkpoint in {ckpt.checkpoints_dir(out)}, starting fresh")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _say(f"{len(train_data.lengths)} training samples, global batch {global_batch}, "
             f"{per_epoch} steps/epoch, {total_steps} steps, {world} process(es) on {device.type}, "
             f"{'DeepSpeed ZeRO-' + str(getattr(engine, 'stage', 0)) if cfg.uses_deepspeed else 'PyTorch'}, {precision}")
    metrics = MetricsLog(out, enabled=rank == 0, total_steps=total_steps, start_step=start_step,
                         tensorboard=t.report_to == "tensorboard")

    eval_before = None
    if eval_data is not None and start_step == 0:
        eval_before = evaluate(engine, eval_data, cfg, pad_id, multiple)
        metrics.log({"step": 0, "eval_loss": eval_before})
    step_loss = None
    tokens_done = 0
    t0 = time.perf_counter()
    for step in range(start_step, total_steps):
        torch.manual_seed(t.seed + step)  # resume-proof randomness (dropout, if any)
        epoch, in_epoch = divmod(step, per_epoch)
        plan = plan_step(train_data.lengths, train_data.trained, global_batch=global_batch,
                         seed=t.seed, epoch=epoch, step_in_epoch=in_epoch, world_size=world,
                         rank=rank, accumulation=t.gradient_accumulation_steps,
                         micro_batch_tokens=t.micro_batch_tokens)
        step_start = time.perf_counter()
        lr = lr_at(step, peak=t.learning_rate, total_steps=total_steps, warmup=warmup,
                   kind=t.lr_scheduler_type)
        if engine.lr_managed_externally:  # a DeepSpeed JSON scheduler sets the rate
            lr = engine.current_lr()
        engine.begin_step(lr)  # an optimizer stepping in backward needs the rate before it
        with explain_out_of_memory(cfg, train_data.lengths):
            local = run_step(engine, train_data, plan, cfg, pad_id, multiple)
        with explain_out_of_memory(cfg, train_data.lengths):
            grad_norm = engine.step(lr)
        step_loss = float(engine.all_reduce_sum(local)) / plan.trained_tokens
        elapsed = time.perf_counter() - step_start
        tokens_done += plan.tokens
        done = step + 1
        if done % t.logging_steps == 0 or done == total_steps:
            memory = gpu_memory_peaks(engine)  # every process takes part
            if rank == 0:
                metrics.log({"step": done, "epoch": round(step / per_epoch + 1 / per_epoch, 4),
                             "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                             "tokens": plan.tokens, "trained_tokens": plan.trained_tokens,
                             "step_time_s": elapsed, "tokens_per_s": plan.tokens / elapsed,
                             "time": time.time(), **memory})
        metrics.advance()
        if eval_data is not None and t.eval_steps and done % t.eval_steps == 0 and done != total_steps:
            metrics.log({"step": done, "eval_loss": evaluate(engine, eval_data, cfg, pad_id, multiple)})
        if t.save_steps and (done % t.save_steps == 0 or done == total_steps):
            save_checkpoint(engine, cfg, done, tokenizer, source)
    metrics.close()
    train_time = time.perf_counter() - t0

    eval_after = None
    if eval_data is not None and total_steps > start_step:
        eval_after = evaluate(engine, eval_data, cfg, pad_id, multiple)
        metrics.log({"step": total_steps, "eval_loss": eval_after})
    if rank == 0:
        _say(f"trained {total_steps - start_step} steps in {train_time:.1f} s "
             f"({tokens_done / max(train_time, 1e-9):,.0f} tokens/s)"
             + (f"; held-out loss {eval_before:.4f} -> {eval_after:.4f}" if eval_before is not None and eval_after is not None else ""))
        plot_loss_curve(metrics.records(), out / CURVE_FILE)

    export_dir, answers = None, {}
    if t.export:
        from chatft.export.hf import export_from_engine

        export_dir = export_from_engine(engine, cfg, tokenizer, source, out / "final",
                                        train_summary={"steps": total_steps, "final_loss": step_loss,
                                                       "eval_loss_before": eval_before,
                                                       "eval_loss_after": eval_after,
                                                       "resumed_from": str(resumed_from) if resumed_from else None})
        questions = [t.ask] if t.ask else builtin_meta(cfg.data.path).get("ask", [])
        if rank == 0 and questions:
            from chatft.serve.generate import SamplingParams, load_chat_model, reply

            chat_model = load_chat_model(export_dir, device=str(device))
            for question in questions:
                answers[question] = reply(chat_model, [{"role": "user", "content": question}],
                                          SamplingParams(max_new_tokens=128)).text
                print(f"\n{question}\n> {answers[question]}", flush=True)
    engine.barrier()
    return TrainResult(total_steps, step_loss, eval_before, eval_after, export_dir, answers)


def save_checkpoint(engine: Engine, cfg: Config, step: int, tokenizer, source) -> None:
    """Every process writes its part into the partial folder; process 0 finalizes."""
    out = Path(cfg.train.output_dir)
    if engine.rank == 0:
        ckpt.clean_partials(out)
    engine.barrier()
    part = ckpt.partial_path(out, step)
    client = {"step": step}
    if isinstance(engine, DeepSpeedEngine):
        engine.save(part, client)
    elif engine.rank == 0:
        engine.save(part, client)
    engine.barrier()
    if engine.rank == 0:
        model_dir = part / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        engine.model.config.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        ckpt.finalize(out, step, {"step": step, "config": cfg.to_dict(), "engine":
                                  "deepspeed" if isinstance(engine, DeepSpeedEngine) else "torch",
                                  "base_model": source.label, "chatft_version": __version__},
                      cfg.train.save_total_limit)
    engine.barrier()
