"""Quality benchmark: does a chatft fine-tune learn a persona, and does the recommended batch
hurt learning?

Each *variant* is one full ``chatft train`` run (a subprocess, exactly as a user runs it) on
the huanhuan role-play set with a tenth held out (records whose index ``i`` has
``i % 10 == 9``, chatft's ``--eval_ratio 0.1``; :func:`held_out_split` checks that chatft
really holds out those records before anything trains). A variant differs from the others only
in global batch, peak learning rate and schedule; model, data, system prompt, epochs, seed,
optimizer betas, clipping, precision and packing are shared. From each run we read:

* held-out loss before and after training (mean NLL per trained token): the first and last
  ``eval_loss`` records of ``metrics.jsonl``;
* steps, training time and tokens/s (sums of the per-step ``step_time_s`` and ``tokens``
  records, i.e. optimizer steps only, without model loading, evaluation or export), and the
  run's whole wall time;
* greedy answers of the exported model (``output_dir/final``) to four identity questions,
  asked with the system prompt the data was trained with.

Whether an answer is "in character" is judged by :func:`persona_check`, a deliberately
simple, documented heuristic (persona vocabulary present, no AI self-description, mostly
Chinese). It is a screen, not a verdict: every answer is printed and stored so a person can
judge it, and the base model's answers to the same questions are stored alongside as the
baseline the heuristic must reject.

Library entry points: :func:`run_benchmark` (-> result dict), :func:`format_report` (table
and answers as text), :func:`write_result`. The command-line driver is
``bench/quality_smollm2.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.lib import environment
from bench.lib.quality_measures import (ASSISTANT_MARKERS, MIN_CJK_SHARE, PERSONA_MARKERS,
                                        persona_check, read_metrics)

#: The system prompt of the huanhuan tutorial; training records get it and questions use it.
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛."
#: Identity questions asked of every fine-tuned model (and of the base model, for contrast).
QUESTIONS = ("你是谁？", "你叫什么名字？", "你的父亲是谁？", "请介绍一下你自己。")
#: Held-out fraction: chatft keeps out records with index % 10 == 9.
EVAL_RATIO = 0.1
#: Answers are greedy and capped at this many new tokens (the tutorial generates 128).
MAX_NEW_TOKENS = 128
#: The acceptance setup; a run with other epochs or a record limit is a smoke run.
ACCEPTANCE_EPOCHS = 3
#: Token caps per micro-batch (``--micro_batch_tokens``; data.max_length is set to the cap
#: too, as chatft requires; huanhuan's longest sample is ~600 tokens and the split check fails
#: if any is dropped). A cap splits a step into micro-batches with the same gradient (chatft
#: normalizes the loss by the whole step's trained tokens), so held-out losses do not depend
#: on it; memory and speed do. Uncapped, a batch-128 step is one packed row of ~19k tokens:
#: * on the CPU its fp32 activations (~40 KB per token per layer: norm outputs, q/k/v, the
#:   three 1536-wide MLP tensors; ~1.2 MB per token over 30 layers, ~23 GB) do not fit a
#:   small machine (the 60-record smoke's 7.6k-token row was killed on a 24 GB box);
#: * on a GPU, SDPA with the block-diagonal mask computes the whole T x T score matrix of the
#:   row (~9e13 FLOP per step for T = 19k); 4,096-token rows cut that ~5x. 4,096 is also the
#:   cap chatft's one-GPU recommended configuration uses (bench/train_speed.py).
CPU_MICRO_BATCH_TOKENS = 1024
GPU_MICRO_BATCH_TOKENS = 4096

#: Numbers measured earlier with other code on SmolLM2-135M-Instruct and the same split;
#: stored in every result for comparison (never recomputed here).
REFERENCE: dict[str, Any] = {
    "plain_pytorch_loop": {
        "global_batch": 16, "learning_rate": 2e-5, "epochs": 3,
        "held_out_loss_before": 3.227, "held_out_loss_after": 2.179,
        "persona": "answered all four questions in character (judged by a person)",
    },
    "previous_large_batch": {
        "global_batch": 128, "learning_rate": 2e-4, "epochs": 3,
        "held_out_loss_after": 2.107,
        "note": "compared with 2.179 at batch 16, lr 2e-5",
    },
}


@dataclass(frozen=True)
class Variant:
    """One training setup; everything not named here is shared by all variants."""

    name: str
    global_batch: int
    """Samples per optimizer step (one process: per-device batch, no accumulation)."""

    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    why: str


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("recommended", 128, 2e-4, "cosine", 0.03,
                "chatft's recommendation for small models: a large batch keeps the GPU busy "
                "(about 19k tokens per step on huanhuan) and makes 3 epochs 81 steps; lr 2e-4 "
                "compensates for the 8x-32x fewer updates than batch 16 / batch 4; cosine decay "
                "with 3% warmup (3 of 81 steps) keeps AdamW's first updates, whose size does "
                "not depend on the gradient's scale, from jolting the pretrained weights"),
        Variant("tutorial_hp", 4, 1e-4, "linear", 0.0,
                "the tutorial's batch 4 and lr 1e-4, with the schedule a Hugging Face Trainer "
                "uses when none is configured: linear decay to 0, no warmup"),
        Variant("reference_hp", 16, 2e-5, "cosine", 0.03,
                "the plain PyTorch reference loop's batch 16 and lr 2e-5 (3.227 -> 2.179), "
                "same schedule as recommended, so chatft is compared at equal settings"),
    )
}
DEFAULT_VARIANTS = ("recommended", "tutorial_hp", "reference_hp")


# --------------------------------------------------------------------------- setup


@dataclass
class QualityOptions:
    model: str = "smollm2-135m-instruct"
    """Base model: the embedded alias, a .gguf file (dequantized once, then shared by all
    variants) or a Hugging Face folder."""

    data: str = ""
    """huanhuan.json (Alpaca records)."""

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    epochs: float = ACCEPTANCE_EPOCHS
    limit: int | None = None
    """Use only the first N records (smoke runs)."""

    device: str = "auto"
    """auto (CUDA when present), cuda or cpu."""

    precision: str = "auto"
    """auto: bf16 on CUDA, fp32 on CPU; or bf16 / fp32."""

    micro_batch_tokens: int | None = None
    """Cap on tokens per micro-batch (0: none); None: :data:`CPU_MICRO_BATCH_TOKENS` on the
    CPU, :data:`GPU_MICRO_BATCH_TOKENS` on CUDA."""

    runs_dir: Path = Path("runs/quality")
    """Where each variant's output_dir (metrics, loss curve, exported model) goes."""

    seed: int = 42
    parallel: bool = False
    """Train all variants at once, one subprocess each, sharing the device (small models
    leave a GPU mostly idle); their per-variant times then overlap."""

    command: str = ""
    """The command line that started the benchmark (stored in the result)."""


def default_data_path() -> Path:
    """``$CHATFT_SHARED/data/huanhuan.json``, else ``../shared/data/huanhuan.json`` next to
    the checkout."""
    shared = os.environ.get("CHATFT_SHARED")
    if shared:
        return Path(shared) / "data" / "huanhuan.json"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "huanhuan.json"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        from chatft.errors import ChatftError

        raise ChatftError(f"--device {device}: expected auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from chatft.errors import ChatftError

        raise ChatftError("--device cuda: no CUDA GPU is available")
    return device


def base_model_folder(name_or_path: str) -> Path:
    """A Hugging Face folder for the base model. A .gguf file is dequantized once into the
    cache, so the variants do not each re-read and dequantize it (and all start from
    identical weights)."""
    from chatft.errors import ChatftError
    from chatft.model.loading import materialize_gguf, resolve_model

    source = resolve_model(name_or_path)
    if source.kind == "gguf":
        return materialize_gguf(source.folder / str(source.gguf_file),
                                Path(str(source.gguf_file)).stem)
    if source.kind != "hf":
        raise ChatftError(f"{name_or_path}: the quality benchmark needs a Hugging Face folder or "
                          f"a .gguf file (got a {source.kind} model)")
    return source.folder


def limited_data(path: Path, limit: int | None, work: Path) -> Path:
    """``path`` itself, or a copy holding only its first ``limit`` records (JSON array or
    JSONL), so chatft's held-out rule applies to the same record indices."""
    if limit is None:
        return path
    text = path.read_text(encoding="utf-8")
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{path.stem}_first{limit}{path.suffix}"
    if path.suffix == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()][:limit]
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        out.write_text(json.dumps(json.loads(text)[:limit], ensure_ascii=False), encoding="utf-8")
    return out


def train_overrides(variant: Variant, *, model: Path, data: Path, epochs: float, precision: str,
                    output_dir: Path, seed: int, micro_batch_tokens: int = 0) -> list[str]:
    """``chatft train`` options of one variant (shared settings first). ``micro_batch_tokens``
    > 0 caps tokens per micro-batch (and sets max_length to the cap, which chatft requires)."""
    cap = (["--micro_batch_tokens", str(micro_batch_tokens), "--max_length", str(micro_batch_tokens)]
           if micro_batch_tokens > 0 else [])
    # --eval_strategy no: held-out loss before and after training only, no checkpoints, the
    # last step exported: what this benchmark measured (the best-checkpoint export, chatft's
    # default with held-out data, is eval_best_qwen.py's subject).
    return ["--model", str(model), "--data", str(data), "--system", SYSTEM_PROMPT, *cap,
            "--eval_ratio", str(EVAL_RATIO), "--eval_strategy", "no",
            "--num_train_epochs", f"{epochs:g}",
            "--precision", precision, "--packing", "true", "--seed", str(seed),
            "--logging_steps", "1", "--export", "true",
            "--per_device_train_batch_size", str(variant.global_batch),
            "--gradient_accumulation_steps", "1",
            "--learning_rate", f"{variant.learning_rate:g}",
            "--lr_scheduler_type", variant.lr_scheduler_type,
            "--warmup_ratio", f"{variant.warmup_ratio:g}",
            "--output_dir", str(output_dir)]


def held_out_split(overrides: list[str]) -> dict[str, Any]:
    """Tokenize as ``chatft train`` will (filling the cache its runs reuse) and check that the
    held-out samples are exactly the records with index % 10 == 9 and that no record is
    dropped. Raises AssertionError otherwise."""
    from chatft.config_parse import load_config
    from chatft.data.labels import trained_count
    from chatft.data.steps import prepare_data, tokenizer_for

    cfg = load_config(None, overrides)
    data = prepare_data(cfg.data, tokenizer_for(cfg.model))
    assert data.eval is not None, "chatft held nothing out with --eval_ratio 0.1"
    summary = data.train.summary
    n = summary.records
    expected = [i for i in range(n) if i % 10 == 9]
    held = [int(i) for i in data.eval.record_index]
    trained = [int(i) for i in data.train.record_index]
    assert summary.kept == n, f"chatft kept {summary.kept} of {n} records"
    assert held == expected, f"held-out records {held[:8]}... are not index % 10 == 9"
    assert sorted(trained + held) == list(range(n)), "train and held-out do not partition the data"
    return {"records": n, "train_samples": len(trained), "held_out_samples": len(held),
            "rule": "record index % 10 == 9", "verified": True, "first_held_out": held[:5],
            "held_out_tokens": int(data.eval.lengths.sum()),
            "held_out_trained_tokens": sum(trained_count(data.eval.sample(i)[1])
                                           for i in range(len(data.eval))),
            "train_tokens_per_epoch": int(data.train.lengths.sum())}


# --------------------------------------------------------------------------- running


def child_env(device: str) -> dict[str, str]:
    """Environment of the ``chatft train`` subprocesses: this very chatft first on the path;
    no GPU visible when the benchmark runs on the CPU."""
    import chatft

    env = dict(os.environ)
    src = str(Path(chatft.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def ask(model_dir: Path, device: str) -> list[dict[str, Any]]:
    """Greedy answers of ``model_dir`` to :data:`QUESTIONS`, each with its persona check."""
    import torch

    from chatft.serve.generate import SamplingParams, load_chat_model, reply

    cm = load_chat_model(model_dir, device=device)
    out = []
    for q in QUESTIONS:
        r = reply(cm, [{"role": "user", "content": q}],
                  SamplingParams(max_new_tokens=MAX_NEW_TOKENS), system=SYSTEM_PROMPT)
        out.append({"question": q, "answer": r.text, "finish_reason": r.finish_reason,
                    "completion_tokens": r.completion_tokens,
                    "persona": asdict(persona_check(r.text))})
    del cm
    if device == "cuda":
        torch.cuda.empty_cache()  # the next variant's training gets the whole GPU
    return out


def train_variant(variant: Variant, overrides: list[str], output_dir: Path,
                  env: dict[str, str]) -> float:
    """Train one variant in a ``chatft train`` subprocess; returns its wall time in seconds.
    Raises RuntimeError with the end of its log when it fails."""
    cmd = [sys.executable, "-m", "chatft", "train", *overrides]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").unlink(missing_ok=True)  # a re-run must not read old records
    log_path = output_dir / "bench_train.log"
    print(f"quality: training {variant.name} (batch {variant.global_batch}, lr "
          f"{variant.learning_rate:g}); log: {log_path}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        how = (f"was killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
               if code < 0 else f"exited {code}")
        raise RuntimeError(f"chatft train ({variant.name}) {how}; end of {log_path}:\n"
                           + "\n".join(tail))
    print(f"quality: {variant.name} trained in {wall:.0f} s", file=sys.stderr, flush=True)
    return wall


def describe_variant(variant: Variant, overrides: list[str], output_dir: Path, wall: float,
                     device: str) -> dict[str, Any]:
    """The result row of a trained variant: its metrics, and its exported model's answers."""
    m = read_metrics(output_dir / "metrics.jsonl")
    answers = ask(output_dir / "final", device)
    return {
        "variant": variant.name, "global_batch": variant.global_batch,
        "learning_rate": variant.learning_rate, "lr_scheduler_type": variant.lr_scheduler_type,
        "warmup_ratio": variant.warmup_ratio, "why": variant.why,
        "command": "python -m chatft train " + shlex.join(overrides),
        "steps": m.steps, "eval_loss_before": m.eval_loss_before,
        "eval_loss_after": m.eval_loss_after, "evals": m.evals,
        "final_train_loss": m.final_train_loss, "tokens": m.tokens,
        "train_s": round(m.train_s, 2), "wall_s": round(wall, 2),
        "tokens_per_s": round(m.tokens_per_s, 1) if m.tokens_per_s else None,
        "mean_step_s": round(m.train_s / m.steps, 4) if m.steps else None,
        "loss_curve": m.loss_curve, "answers": answers,
        "in_character": sum(a["persona"]["in_character"] for a in answers),
        "output_dir": str(output_dir),
    }


def run_variants(names: Sequence[str], overrides: dict[str, list[str]], runs: Path,
                 env: dict[str, str], device: str, parallel: bool,
                 on_row: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Train and describe every variant, calling ``on_row(rows so far)`` after each one (so a
    run stopped part-way keeps what finished). ``parallel`` trains all of them at once (one
    subprocess each, sharing the device): rows then come in the order they finish, and their
    times overlap, so tokens/s are not comparable between variants. Returns rows in ``names``
    order."""
    rows: list[dict[str, Any]] = []

    def done(name: str, wall: float) -> None:
        rows.append(describe_variant(VARIANTS[name], overrides[name], runs / name, wall, device))
        on_row(rows)

    if not parallel:
        for name in names:
            done(name, train_variant(VARIANTS[name], overrides[name], runs / name, env))
    else:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = {pool.submit(train_variant, VARIANTS[n], overrides[n], runs / n, env): n
                       for n in names}
            for fut in as_completed(futures):  # a failure raises here, after the others end
                done(futures[fut], fut.result())
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: order[r["variant"]])


def acceptance_checks(variants: list[dict[str, Any]], is_acceptance_setup: bool) -> dict[str, Any]:
    """The two acceptance questions, answered from the numbers (only for the full setup:
    3 epochs on all records; a smoke run says so instead of pretending)."""
    if not is_acceptance_setup:
        return {"applicable": False,
                "note": "smoke run (record limit or epochs other than 3): the comparisons with "
                        "the reference numbers are not meaningful"}
    by = {v["variant"]: v for v in variants}
    ref = REFERENCE["plain_pytorch_loop"]
    out: dict[str, Any] = {"applicable": True}
    for name in ("recommended", "reference_hp"):
        if name in by and by[name]["eval_loss_after"] is not None:
            after = by[name]["eval_loss_after"]
            out[f"{name}_vs_plain_loop"] = {
                "held_out_after": round(after, 4), "plain_loop_after": ref["held_out_loss_after"],
                "at_least_as_good": after <= ref["held_out_loss_after"],
                "persona_heuristic_in_character": f"{by[name]['in_character']}/{len(QUESTIONS)}"}
    if "recommended" in by and "tutorial_hp" in by:
        rec, tut = by["recommended"]["eval_loss_after"], by["tutorial_hp"]["eval_loss_after"]
        if rec is not None and tut is not None:
            out["recommended_vs_tutorial_hp"] = {
                "recommended_after": round(rec, 4), "tutorial_hp_after": round(tut, 4),
                "difference": round(rec - tut, 4), "no_worse": rec <= tut}
    return out


def run_benchmark(opts: QualityOptions,
                  on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Check the split, train every variant, ask every model; returns the result record.
    ``on_progress`` gets the partial record (``"complete": False``) after each variant."""
    from chatft.errors import ChatftError

    unknown = [v for v in opts.variants if v not in VARIANTS]
    if not opts.variants:
        raise ChatftError(f"no variants given; known: {', '.join(VARIANTS)}")
    if unknown:
        raise ChatftError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    device = resolve_device(opts.device)
    precision = opts.precision if opts.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    hw = environment.hardware(device, gpu_count_key="gpu_count_visible")
    data_src = Path(opts.data) if opts.data else default_data_path()
    if not data_src.is_file():
        raise ChatftError(f"data file not found: {data_src} (pass --data or set CHATFT_SHARED)")
    runs = Path(opts.runs_dir)
    data = limited_data(data_src, opts.limit, runs)
    model = base_model_folder(opts.model)
    env = child_env(device)
    cap = opts.micro_batch_tokens
    if cap is None:
        cap = CPU_MICRO_BATCH_TOKENS if device == "cpu" else GPU_MICRO_BATCH_TOKENS
    overrides = {name: train_overrides(VARIANTS[name], model=model, data=data, epochs=opts.epochs,
                                       precision=precision, output_dir=runs / name,
                                       seed=opts.seed, micro_batch_tokens=cap)
                 for name in opts.variants}

    split = held_out_split(overrides[opts.variants[0]])
    print(f"quality: {split['train_samples']} training samples, {split['held_out_samples']} "
          f"held out (index % 10 == 9, checked)", file=sys.stderr, flush=True)
    base_answers = ask(model, device)
    full = opts.limit is None and opts.epochs == ACCEPTANCE_EPOCHS

    def record(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "benchmark": "quality",
            "command": opts.command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "complete": len(rows) == len(opts.variants),
            "settings": {
                "model": opts.model, "model_folder": str(model), "data": str(data_src),
                "records_limit": opts.limit, "epochs": opts.epochs, "eval_ratio": EVAL_RATIO,
                "system_prompt": SYSTEM_PROMPT, "questions": list(QUESTIONS), "device": device,
                "precision": precision, "packing": True, "seed": opts.seed,
                "micro_batch_tokens": cap, "variants_trained_in_parallel": opts.parallel,
                "optimizer": "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0, grad-norm clip "
                             "1.0 (chatft defaults, same for every variant)",
                "generation": f"greedy, at most {MAX_NEW_TOKENS} new tokens, exported model "
                              "(bf16 weights) loaded with chatft.serve.generate.load_chat_model",
                "persona_heuristic": {"markers": list(PERSONA_MARKERS),
                                      "assistant_markers": list(ASSISTANT_MARKERS),
                                      "min_cjk_share": MIN_CJK_SHARE},
            },
            "held_out": split,
            "versions": environment.versions(("deepspeed", "liger-kernel")), "hardware": hw,
            "base_model_answers": base_answers,
            "variants": rows,
            "reference": REFERENCE,
            "checks": acceptance_checks(rows, full),
        }

    def progress(rows: list[dict[str, Any]]) -> None:
        if on_progress is not None and len(rows) < len(opts.variants):
            on_progress(record(list(rows)))  # a snapshot: rows keeps growing

    return record(run_variants(opts.variants, overrides, runs, env, device, opts.parallel,
                               progress))


# --------------------------------------------------------------------------- reporting


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(result: dict[str, Any]) -> str:
    """The table (one row per variant), then every answer with its persona check."""
    lines = [(f"{'variant':<13} {'batch':>5} {'lr':>7} {'schedule':<11} {'steps':>5} "
              f"{'held-out before':>15} {'after':>7} {'train min':>9} {'wall min':>8} "
              f"{'tokens/s':>9} {'persona':>7}")]
    for v in result["variants"]:
        warmup = f"+{v['warmup_ratio']:.0%}w" if v["warmup_ratio"] else ""
        sched = v["lr_scheduler_type"] + warmup
        lines.append(
            f"{v['variant']:<13} {v['global_batch']:>5} {v['learning_rate']:>7.0e} {sched:<11} "
            f"{v['steps']:>5} {_fmt(v['eval_loss_before'], '.4f'):>15} "
            f"{_fmt(v['eval_loss_after'], '.4f'):>7} {v['train_s'] / 60:>9.2f} "
            f"{v['wall_s'] / 60:>8.2f} {_fmt(v['tokens_per_s'], ',.0f'):>9} "
            f"{v['in_character']:>5}/{len(QUESTIONS)}")
    ref = result["reference"]["plain_pytorch_loop"]
    lines.append(f"{'(plain loop)':<13} {ref['global_batch']:>5} {ref['learning_rate']:>7.0e} "
                 f"{'':<11} {'':>5} {ref['held_out_loss_before']:>15.3f} "
                 f"{ref['held_out_loss_after']:>7.3f}   reference, measured earlier")
    lines.append("")
    blocks = [("base model (before fine-tuning)", result["base_model_answers"])] + \
        [(v["variant"], v["answers"]) for v in result["variants"]]
    lines.append(f"system prompt: {result['settings']['system_prompt']}")
    for title, answers in blocks:
        lines.append(f"== {title}")
        for a in answers:
            p = a["persona"]
            why = (f"markers {','.join(p['persona_markers']) or 'none'}; "
                   f"assistant {','.join(p['assistant_markers']) or 'none'}; "
                   f"CJK {p['cjk_share']:.0%}")
            lines.append(f"  {a['question']}")
            lines.append(f"  > {a['answer']}")
            verdict = "in character" if p["in_character"] else "NOT in character"
            lines.append(f"    [{verdict} (heuristic: {why}); {a['completion_tokens']} tokens, "
                         f"{a['finish_reason']}]")
    checks = result["checks"]
    lines.append("")
    if not checks.get("applicable"):
        lines.append(f"checks: {checks['note']}")
    else:
        for key, value in checks.items():
            if key != "applicable":
                lines.append(f"check {key}: {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], out_dir: Path, label: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quality_smollm2_{label}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line driver (``bench/quality_smollm2.py``)."""
    import argparse

    results_dir = Path(__file__).resolve().parents[2] / "bench" / "results"
    ap = argparse.ArgumentParser(
        description="Held-out loss and persona answers of chatft fine-tunes of "
                    "SmolLM2-135M-Instruct on huanhuan, per hyperparameter variant.")
    ap.add_argument("--model-path", "--model", dest="model", default="smollm2-135m-instruct",
                    help="base model: the embedded alias (default), a .gguf file or a HF folder")
    ap.add_argument("--data", default="", help="huanhuan.json (default: $CHATFT_SHARED/data/"
                                               "huanhuan.json, else ../shared/data/huanhuan.json)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--epochs", type=float, default=ACCEPTANCE_EPOCHS)
    ap.add_argument("--limit", type=int, help="use only the first N records (smoke runs)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="training precision (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--label",
                    help="result file: quality_smollm2_<label>.json (default: the device)")
    ap.add_argument("--out", type=Path, default=results_dir,
                    help="folder for the result file (default: bench/results)")
    ap.add_argument("--runs-dir", type=Path,
                    help="training output folders (default: <out>/quality_runs_<label>, or "
                         "runs/quality_<label> when --out is bench/results)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--parallel", action="store_true",
                    help="train the variants at the same time on the one device (losses and "
                         "answers are unaffected; per-variant times overlap)")
    ap.add_argument("--micro-batch-tokens", type=int,
                    help=f"cap on tokens per micro-batch (same gradient; 0: none); default: "
                         f"{CPU_MICRO_BATCH_TOKENS} on the CPU, {GPU_MICRO_BATCH_TOKENS} on CUDA")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 10:
        ap.error("--limit must be at least 10 (records 9, 19, ... are the held-out set)")

    device = resolve_device(args.device)
    label = args.label or device
    if args.runs_dir is None:
        in_repo = args.out.resolve() == results_dir
        args.runs_dir = (results_dir.parents[1] / "runs" / f"quality_{label}" if in_repo
                         else args.out / f"quality_runs_{label}")
    opts = QualityOptions(model=args.model, data=args.data,
                          variants=tuple(v for v in args.variants.split(",") if v),
                          epochs=args.epochs, limit=args.limit, device=device,
                          precision=args.precision,
                          runs_dir=args.runs_dir, seed=args.seed,
                          micro_batch_tokens=args.micro_batch_tokens, parallel=args.parallel,
                          command="python " + shlex.join([sys.argv[0], *(argv or sys.argv[1:])]))

    def partial(result: dict[str, Any]) -> None:
        result["label"] = label
        path = write_result(result, args.out, label)
        print(f"quality: wrote partial result {path}", file=sys.stderr, flush=True)

    result = run_benchmark(opts, on_progress=partial)
    result["label"] = label
    print(format_report(result))
    path = write_result(result, args.out, label)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0
