"""``chatft eval``: the held-out loss and greedy answers of one or more models, side by side.

Every model is anything ``chatft train --model`` takes (GGUF file, Qwen-1 folder, Hugging
Face folder, the built-in name) or a chatft export. Its held-out loss is training's, computed
by training's code: the same data step (split, chat template, labels; the model's own
tokenizer), the model built as training builds it (precision, attention kernel, fused loss),
and :func:`chatft.train.loop.held_out_loss` over micro-batches of training's size. Answers come
from the model loaded as ``chatft chat`` loads it. For an export, its run's record (the
evaluations during training, which step it holds and why) comes along from ``chatft.json``
and, when the export sits in its run folder, ``metrics.jsonl``. :mod:`chatft.job.report`
writes it all down.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatft.config import DEFAULT_MODEL, DataArgs, ModelArgs, TrainArgs
from chatft.data.labels import trained_count
from chatft.data.prepare import builtin_meta, system_prompt
from chatft.data.steps import prepare_data
from chatft.errors import ChatftError
from chatft.export.metadata import read_meta
from chatft.job.run import ask
from chatft.model.build import build_model, use_liger
from chatft.model.loading import ModelSource, load_tokenizer, resolve_model
from chatft.train import loop
from chatft.train.engine import DTYPES, TorchForward, resolve_precision, training_device
from chatft.train.metrics import METRICS_FILE, say


@dataclass
class ModelResult:
    model: str  # as given on the command line
    kind: str  # "chatft export", "GGUF file", "Hugging Face folder", "Qwen-1 folder", ...
    eval_loss: float  # held-out mean NLL per trained token
    held_out_samples: int
    trained_tokens: int  # of the held-out samples (the loss's denominator)
    answers: dict[str, str]  # question -> greedy answer
    training: dict[str, Any] | None = None  # an export's run record (chatft.json "extra")
    metrics: list[dict[str, Any]] | None = None  # its run's metrics.jsonl, when found


@dataclass
class EvalReport:
    data: str  # the data file
    held_out: str  # how the held-out samples were chosen
    system: str | None  # system prompt of records without one, and of the answers
    precision: str
    device: str
    micro_batch: int  # samples per evaluation micro-batch (training's)
    questions: list[str]
    models: list[ModelResult] = field(default_factory=list)


def describe(name: str, source: ModelSource) -> str:
    if name == DEFAULT_MODEL:
        return "built-in model (GGUF, dequantized)"
    if source.kind == "gguf":
        return "GGUF file"
    if source.kind == "qwen1":
        return "Qwen-1 folder"
    return "chatft export" if read_meta(source.folder) is not None else "Hugging Face folder"


def run_record(source: ModelSource) -> tuple[dict | None, list[dict] | None]:
    """An export's record of its run (``chatft.json``) and, when the export is its run's
    ``output_dir/final``, the run's ``metrics.jsonl``."""
    if source.kind != "hf" or (meta := read_meta(source.folder)) is None:
        return None, None
    path = source.folder.parent / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return meta.extra or None, [json.loads(line) for line in lines if line.strip()] or None


def shared_system(names: list[str]) -> str | None:
    """The system prompt the exports among ``names`` were trained with, if they agree."""
    prompts = set()
    for name in names:
        path = Path(name)
        meta = read_meta(path) if path.is_dir() else None
        if meta is not None:
            prompts.add(meta.system_prompt)
    return prompts.pop() if len(prompts) == 1 else None


def held_out_description(data: DataArgs) -> str:
    if data.eval_file:
        return f"the file {data.eval_file}"
    n = max(2, round(1 / data.eval_ratio))
    return f"records with index i % {n} == {n - 1} (eval_ratio {data.eval_ratio:g})"


def evaluate_models(names: list[str], model_args: ModelArgs, data: DataArgs, train: TrainArgs,
                    questions: list[str], max_new_tokens: int = 128) -> EvalReport:
    """Measure every model in ``names``; ``data`` must have held-out data (eval_ratio or
    eval_file), split and rendered as training does."""
    if not data.eval_file and not data.eval_ratio:
        raise ChatftError("chatft eval needs held-out data: --eval_ratio R (the records training "
                          "held out with the same ratio) or --eval_file FILE")
    if data.system is None and system_prompt(data) is None and (common := shared_system(names)):
        data = dataclasses.replace(data, system=common)
        say(f"system prompt from the exports' chatft.json: {common}")
    system = system_prompt(data)
    questions = questions or builtin_meta(data.path).get("ask", [])
    device = training_device()
    precision, _ = resolve_precision(train.precision, device)
    report = EvalReport(data.path, held_out_description(data), system, precision, str(device),
                        train.per_device_train_batch_size * train.gradient_accumulation_steps,
                        questions)
    for name in names:
        source = resolve_model(name)
        tokenizer = load_tokenizer(source, model_args.tokenizer)
        prepared = prepare_data(data, tokenizer)
        if prepared.eval is None or len(prepared.eval) == 0:
            raise ChatftError(f"{held_out_description(data)}: no held-out samples in {data.path}")
        # fp16 keeps fp32 weights under autocast, as the training engines do.
        dtype = torch.float32 if precision == "fp16" else DTYPES[precision]
        model = build_model(dataclasses.replace(model_args, name_or_path=name), source,
                            dtype=dtype, device=device, seed=train.seed,
                            gradient_checkpointing=False, max_length=data.max_length)
        fused = "liger" if use_liger(model_args, device) else "chunked"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        loss = loop.held_out_loss(TorchForward(model, precision, device, fused),
                                  loop.TrainData(prepared.train, prepared.eval, pad_id,
                                                 data.packing), train)
        trained = sum(trained_count(prepared.eval.sample(i)[1]) for i in range(len(prepared.eval)))
        del model  # before the chat model loads: one model in memory at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"{name}: held-out loss {loss:.4f} ({len(prepared.eval)} samples, {trained:,} "
            f"trained tokens)")
        answers = ask(name, questions, device, system=system,
                      max_new_tokens=max_new_tokens) if questions else {}
        training, metrics = run_record(source)
        report.models.append(ModelResult(name, describe(name, source), loss, len(prepared.eval),
                                         trained, answers, training, metrics))
    return report
