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

import argparse
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
#: System prompt the tutorial writes into every sample.
TUTORIAL_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."

# --------------------------------------------------------------------------- model shapes

#: Qwen2-7B exactly (Qwen2-7B-Instruct's config.json: 32k context, untied embeddings).
QWEN2_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "hidden_act": "silu", "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16", "use_cache": True,
}
#: A Qwen2 small enough for CPU smoke runs; same vocabulary, so the real tokenizer fits.
TINY: dict[str, Any] = {**QWEN2_7B, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_window_layers": 2}
MODEL_CONFIGS = {"qwen2-7b": QWEN2_7B, "tiny": TINY}


def n_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Qwen2 config, counted from its shape (Qwen2-7B: 7,615,616,512)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (+bias), k and v (+bias), o
    mlp = 3 * h * inter  # gate, up, down
    layer = attn + mlp + 2 * h  # + two RMSNorm weights
    embeddings = v * h * (1 if cfg["tie_word_embeddings"] else 2)
    return cfg["num_hidden_layers"] * layer + embeddings + h  # + final norm


def write_model_folder(folder: Path, shape: dict[str, Any], tiktoken_file: Path) -> Path:
    """A model folder with only ``config.json`` and the real Qwen tokenizer (no weights):
    both sides build random weights from it."""
    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=1) + "\n")
    if not (folder / "tokenizer.json").is_file():
        build_qwen_tokenizer(tiktoken_file).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- the tutorial's recipe
# Source: datawhalechina/self-llm, models/Qwen/06-Qwen-7B-chat 全量微调.md (train.py, train.sh and
# ds_config.json as printed there). Written out again below; the values are the tutorial's.

#: ds_config.json, key for key (ZeRO-2, optimizer and parameter offload to the CPU, "auto" values
#: that Trainer fills; offload_param has no effect at stage 2, as in the tutorial).
TUTORIAL_DS_CONFIG: dict[str, Any] = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {
        "last_batch_iteration": -1, "total_num_steps": "auto", "warmup_min_lr": "auto",
        "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": True,
        "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True},
    "activation_checkpointing": {
        "partition_activations": False, "cpu_checkpointing": False,
        "contiguous_memory_optimization": False, "number_checkpoints": None,
        "synchronize_checkpoint_boundary": False, "profile": False},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "min_lr": 5e-7,
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}

#: train.sh's TrainingArguments (everything else is Trainer's default: no gradient
#: checkpointing, no --fp16 flag, so DeepSpeed's fp16 "auto" resolves to off while the model
#: itself is loaded in torch.half). The one change: warmup_steps 1, because DeepSpeed's
#: WarmupDecayLR refuses the 0 warmup steps Trainer would fill in.
TUTORIAL_TRAINING_ARGS: dict[str, Any] = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "num_train_epochs": 3,
    "save_steps": 100,
    "learning_rate": 1e-4,
    "save_on_each_node": True,
    "warmup_steps": 1,
}
TUTORIAL_MAX_LENGTH = 128
#: What the tutorial's launcher line is (for the record; this benchmark runs the same recipe
#: through ``python -m deepspeed.launcher.runner``, which is what ``deepspeed`` runs).
TUTORIAL_LAUNCH = ("deepspeed --num_gpus $num_gpus train.py --deepspeed ./ds_config.json "
                   "--output_dir=./output/Qwen --per_device_train_batch_size=1 "
                   "--gradient_accumulation_steps=1 --logging_steps=10 --num_train_epochs=3 "
                   "--save_steps=100 --learning_rate=1e-4 --save_on_each_node=True")


def tutorial_host_memory_needed(params: int) -> int:
    """Host memory the recipe takes, in bytes: 141 GiB measured for Qwen2-7B on one H200
    (fp32 master weights and Adam moments offloaded to the CPU, pinned buffers), scaled by size."""
    return int(141 * GIB * params / n_params(QWEN2_7B))


def tutorial_process_func(example: dict[str, str], tokenizer) -> dict[str, list[int]]:
    """The tutorial's ``process_func``: ChatML written by hand, prompt tokens masked with
    -100, the pad token (``<|endoftext|>``) appended and trained, everything cut at 128."""
    instruction = tokenizer("\n".join(["<|im_start|>system", TUTORIAL_SYSTEM + "<|im_end|>"
                                       + "\n<|im_start|>user\n" + example["instruction"]
                                       + example["input"] + "<|im_end|>\n"]).strip(),
                            add_special_tokens=False)
    response = tokenizer("<|im_start|>assistant\n" + example["output"] + "<|im_end|>\n",
                         add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > TUTORIAL_MAX_LENGTH:
        input_ids = input_ids[:TUTORIAL_MAX_LENGTH]
        attention_mask = attention_mask[:TUTORIAL_MAX_LENGTH]
        labels = labels[:TUTORIAL_MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class StepRecorder:
    """Per-step wall time and non-padding tokens of a Trainer run; stops it after ``max_steps``.

    A step's time is the interval between consecutive ``on_step_end`` calls (the first one from
    ``on_train_begin``), so it covers everything the loop does per step: data, forward, backward,
    the offloaded optimizer step and logging. The CUDA queue is drained before each reading.
    Tokens are the ``attention_mask`` sums of the model's inputs, seen by a forward pre-hook.
    The rank's record is rewritten after every step, so a crash keeps the steps done.
    """

    def __init__(self, out: Path, rank: int, world: int, max_steps: int, device,
                 facts: dict[str, Any]):
        import torch

        self.torch = torch
        self.out, self.max_steps, self.device = out, max_steps, device
        self.pending: list[Any] = []  # this step's attention-mask sums (0-d tensors, no sync)
        self.record: dict[str, Any] = {"rank": rank, "world_size": world, "step_times_s": [],
                                       "step_tokens": [], "step_end_unix": [], **facts}
        self.last = 0.0

    def count_tokens(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.pending.append(mask.sum() if mask is not None else kwargs["input_ids"].numel())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def train_begin(self) -> None:
        self._sync()
        self.last = time.perf_counter()
        self.record["train_begin_unix"] = time.time()

    def step_end(self, state, control) -> None:
        """After each optimizer step (``state``/``control``: Trainer's)."""
        self._sync()
        now = time.perf_counter()
        r = self.record
        r["step_times_s"].append(now - self.last)
        r["step_end_unix"].append(time.time())
        r["step_tokens"].append(int(sum(int(t) for t in self.pending)))
        r["total_steps"] = state.max_steps  # Trainer's count for the whole job (3 epochs)
        self.pending.clear()
        if self.device.type == "cuda":
            r["max_memory_allocated_bytes"] = self.torch.cuda.max_memory_allocated(self.device)
            r["max_memory_reserved_bytes"] = self.torch.cuda.max_memory_reserved(self.device)
        _write_json_atomic(self.out, r)
        if state.global_step >= self.max_steps:
            control.should_training_stop = True
        self.last = time.perf_counter()


def tutorial_worker(argv: list[str]) -> int:
    """One process of the tutorial's recipe (started by DeepSpeed's launcher, one per GPU).

    Steps as in the tutorial's train.py: load CPUAdam, tokenize huanhuan with process_func, build
    the model in half precision on this process's GPU (random weights instead of loading them,
    created on the GPU: initializing 7B parameters on the CPU takes minutes), train with
    Trainer + the DeepSpeed JSON, stopping after ``--steps`` steps; the rank's measurements go
    to ``<out>/rank<R>.json``. ``--cpu-smoke`` keeps the model in fp32 (no fp16 on the CPU).
    """
    p = argparse.ArgumentParser(prog="bench.lib.train_speed tutorial")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--local_rank", type=int, default=0)  # passed by DeepSpeed's launcher
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    import deepspeed
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                              DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments)

    local_rank = int(os.environ.get("LOCAL_RANK", str(args.local_rank)))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # every rank sees all GPUs; touch only its own
    out = Path(args.out)
    t0 = time.perf_counter()
    deepspeed.ops.op_builder.CPUAdamBuilder().load()  # as the tutorial does at import
    op_load_s = time.perf_counter() - t0

    # HfArgumentParser in the tutorial; the same values, given directly.
    ds_json = out / "ds_config.json"
    # use_cpu (smoke runs only) makes accelerate set up a CPU process group; DeepSpeed still
    # runs the training.
    training_args = TrainingArguments(output_dir=str(out / "trainer"), deepspeed=str(ds_json),
                                      report_to="none", use_cpu=args.cpu_smoke,
                                      **TUTORIAL_TRAINING_ARGS)

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # Qwen's eod_id
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    tokenized = [tutorial_process_func(r, tokenizer) for r in records]
    tokenize_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    dtype = torch.float32 if args.cpu_smoke else torch.half
    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(42)
    with torch.device(device):  # the tutorial: from_pretrained(..., device_map={"": LOCAL_RANK})
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model_init_s = time.perf_counter() - t0

    facts = {"op_load_s": op_load_s, "tokenize_s": tokenize_s, "model_init_s": model_init_s,
             "setup_s": time.perf_counter() - t_start,
             "model_dtype": str(dtype).removeprefix("torch."), "device": str(device),
             "n_samples": len(tokenized),
             # cut to 128 tokens (or exactly that long)
             "samples_at_max_length": sum(len(r["input_ids"]) == TUTORIAL_MAX_LENGTH
                                          for r in tokenized),
             "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    recorder = StepRecorder(out / f"rank{rank}.json", rank, world, args.steps, device, facts)

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.train_begin()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.step_end(state, control)

    model.register_forward_pre_hook(recorder.count_tokens, with_kwargs=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
                      callbacks=[Measure()])
    trainer.train()
    recorder.record["completed"] = True
    _write_json_atomic(recorder.out, recorder.record)
    return 0


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
           "--logging_steps", "1", "--save_steps", "0", "--export", str(export).lower(),
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


def run_tutorial(ctx: BenchContext, out: Path) -> dict[str, Any]:
    """The tutorial's recipe for ``ctx.steps`` steps under DeepSpeed's launcher; the 3-epoch
    time is extrapolated from the step count Trainer plans and the measured step time."""
    from chatft.train.distributed import free_port

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    (out / "ds_config.json").write_text(json.dumps(TUTORIAL_DS_CONFIG, indent=4))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ctx.gpus),
           "--master_port", str(free_port()), "--module", "bench.lib.train_speed",
           "tutorial", "--model", str(ctx.model_dir), "--data", str(ctx.data), "--out", str(out),
           "--steps", str(ctx.steps)] + (["--cpu-smoke"] if ctx.cpu_smoke else [])
    run = _run_tree(cmd, out / "log.txt", ctx.env, ctx.timeout_s, gpus=not ctx.cpu_smoke)
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
