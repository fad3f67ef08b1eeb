"""What every training process does: train -> export -> ask, composed in one place.

The single-process path (:func:`chatft.job.launch.run`) and every DeepSpeed worker
(:mod:`chatft.job.worker`) call :func:`run_job`. It joins the process group, tokenizes (from
the cache the launcher filled), builds the engine the config asks for, lets the loop train,
exports the trained weights into ``output_dir/final`` and prints the exported model's answers to
the run's questions.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from chatft import checkpoint as ckpt
from chatft.config import Config
from chatft.data.prepare import builtin_meta, system_prompt
from chatft.data.steps import prepare_data
from chatft.export.gguf import export_after_training
from chatft.export.hf import export_trained
from chatft.job import heartbeat, preflight
from chatft.job.cluster import Placement
from chatft.model.attention import avoid_cudnn_sdpa
from chatft.model.build import build_model, use_liger
from chatft.model.loading import ModelSource, load_tokenizer, model_config, resolve_model
from chatft.train import loop, reshape
from chatft.train.distributed import init_distributed
from chatft.train.engine import (DTYPES, DeepSpeedEngine, Engine, TorchEngine, resolve_precision,
                                 training_device)
from chatft.train.metrics import say
from chatft.train.plan.apply import explain_out_of_memory
from chatft.train.plan.hardware import parse_size
from chatft.train.schedule import RunLength, run_length

#: Set by ``chatft train`` for its workers: the host on which it prepared the data.
PREPARED_ON_ENV = "CHATFT_PREPARED_ON"


@dataclass
class JobResult:
    trained: loop.TrainResult
    export_dir: Path | None  # output_dir/final (None with export off)
    answers: dict[str, str]  # question -> the exported model's answer (process 0)


def deepspeed_config(cfg: Config, source: ModelSource, precision: str, length: RunLength,
                     universal: bool) -> dict:
    """The DeepSpeed JSON of this run: generated from the config or the user's own, "auto"
    values filled; ``universal`` loads the checkpoint's universal form (chatft.train.reshape)."""
    from chatft.train.ds_config import fill_auto, generated_config, load_user_config

    raw = (load_user_config(cfg.deepspeed.config) if cfg.deepspeed.config
           else generated_config(cfg.deepspeed, precision))
    ds_config, warnings = fill_auto(raw, cfg.train, cfg.world_size, precision=precision,
                                    total_steps=length.total_steps,
                                    warmup_steps=length.warmup_steps,
                                    hidden_size=getattr(model_config(source), "hidden_size", None))
    for w in warnings:
        say(f"warning: {w}", dist.get_rank())
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def make_engine(cfg: Config, source: ModelSource, precision: str, device: torch.device,
                ds_config: dict | None) -> Engine:
    """Build the model and wrap it in the engine the config asks for (DeepSpeed when
    ``ds_config`` is given)."""
    dtype = DTYPES[precision]
    # fp16 keeps fp32 weights (autocast / DeepSpeed's fp16 optimizer makes the half copies).
    model_dtype = torch.float32 if precision == "fp16" else dtype
    gc = cfg.model.gradient_checkpointing == "on"
    fused = "liger" if use_liger(cfg.model, device) else "chunked"
    if device.type == "cuda":
        avoid_cudnn_sdpa()  # its masked backward can return NaN (model/attention.py)

    def build(create_on: torch.device | None) -> torch.nn.Module:
        return build_model(cfg.model, source, dtype=model_dtype,
                           device=create_on if create_on is not None else device,
                           seed=cfg.train.seed, gradient_checkpointing=gc,
                           max_length=cfg.data.max_length)

    if ds_config is None:
        return TorchEngine(cfg.train, build(device), precision, device, fused)
    return DeepSpeedEngine(cfg.train, build, ds_config, precision, device, fused)


def resume_layout(cfg: Config, world: int, rank: int) -> bool:
    """Fit this run to the checkpoint it resumes (same global batch; universal checkpoint
    for another process count or ZeRO stage); returns whether to load the universal form."""
    t = cfg.train
    folder = (ckpt.latest_checkpoint(t.output_dir) if t.resume == "auto"
              else Path(t.resume) if t.resume else None)
    if folder is None:
        return False
    stage = cfg.deepspeed.zero_stage
    if cfg.deepspeed.config:
        from chatft.train.ds_config import load_user_config, zero_stage

        stage = zero_stage(load_user_config(cfg.deepspeed.config))
    plan = reshape.plan_resume(folder, t, cfg.uses_deepspeed, stage, world)
    for note in plan.notes:
        say(note, rank)
    if plan.universal:
        reshape.ensure_universal(folder, rank, log=lambda m: say(m, rank))
    return plan.universal


def ask(model: str | Path, questions: list[str], device: torch.device, system: str | None = None,
        max_new_tokens: int = 128) -> dict[str, str]:
    """Greedy answers of ``model`` (an export, or anything training starts from) to
    ``questions``, printed as they come; ``system`` replaces the model's own persona."""
    from chatft.serve.generate import SamplingParams, load_chat_model, reply

    chat_model = load_chat_model(model, device=str(device))
    answers = {}
    for question in questions:
        answers[question] = reply(chat_model, [{"role": "user", "content": question}],
                                  SamplingParams(max_new_tokens=max_new_tokens), system=system).text
        print(f"\n{question}\n> {answers[question]}", flush=True)
    return answers


def run_job(cfg: Config, place: Placement | None = None) -> JobResult:
    """Train as ``cfg`` says, then export and ask. Every process calls this; ``place`` (None
    for one process) names it in messages and lets it watch the others (heartbeat)."""
    timeout = cfg.launch.ddp_timeout
    rank, world = init_distributed(cfg.uses_deepspeed, timeout)
    if torch.cuda.is_available():  # collectives of Python objects (below) use this device
        torch.cuda.set_device(training_device())
    with heartbeat.watching(place, timeout):
        if place is not None and world > 1:
            preflight.check_same_config(cfg.to_dict(), place)
            preflight.check_shared_output(cfg.train.output_dir, place)
        return _train_export_ask(cfg, rank, world)


def _train_export_ask(cfg: Config, rank: int, world: int) -> JobResult:
    device = training_device()
    if cfg.train.max_gpu_memory and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, parse_size(cfg.train.max_gpu_memory) / total), device)
    torch.manual_seed(cfg.train.seed)
    precision, note = resolve_precision(cfg.train.precision, device)
    if note:
        say(note, rank)
    source = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg.model.tokenizer)
    # From the cache the launcher filled on this node; workers on other hosts of a hostfile
    # (whose launcher ran on node 0) tokenize for their node, one process at a time.
    prepared = prepare_data(cfg.data, tokenizer,
                            cached_only=os.environ.get(PREPARED_ON_ENV, socket.gethostname())
                            == socket.gethostname())
    data = loop.TrainData(prepared.train, prepared.eval, packing=cfg.data.packing,
                          pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    universal = resume_layout(cfg, world, rank)
    record = loop.RunRecord(tokenizer, cfg.to_dict(), source.label, data_key=prepared.folder.name)
    length = run_length(cfg.train, len(prepared.train), world)
    with explain_out_of_memory(cfg, prepared.train.lengths):  # out of GPU memory: say what fits
        engine = make_engine(cfg, source, precision, device,
                             deepspeed_config(cfg, source, precision, length, universal)
                             if cfg.uses_deepspeed else None)
        result = loop.train(engine, data, cfg.train, record)

    export_dir, answers = None, {}
    t = cfg.train
    say(f"export: {result.export_reason}" if t.export else
        f"export off; it would hold {result.export_reason}", rank)
    if t.export:
        if result.export_from is not None:
            say(f"loading the weights of {result.export_from} for the export", rank)
            engine.load_weights(result.export_from)
        export_dir = export_trained(
            engine, tokenizer, Path(t.output_dir) / "final", dtype=t.export_dtype,
            system=system_prompt(cfg.data), base_model=source.label, train_on=cfg.data.train_on,
            summary={"steps": result.steps, "final_loss": result.final_loss,
                     "eval_loss_before": result.eval_loss_before,
                     "eval_loss_after": result.eval_loss_after,
                     "exported_step": result.export_step, "exported_because": result.export_reason,
                     "evaluations": result.history.to_dict()["evaluations"],
                     "resumed_from": str(result.resumed_from) if result.resumed_from else None})
        questions = [t.ask] if t.ask else builtin_meta(cfg.data.path).get("ask", [])
        if rank == 0 and questions:
            answers = ask(export_dir, questions, device)
        if rank == 0 and t.export_format != "hf":  # GGUF of the folder (export_format gguf|both)
            export_after_training(export_dir, t.export_format, t.gguf_quant)
    engine.barrier()
    return JobResult(result, export_dir, answers)
