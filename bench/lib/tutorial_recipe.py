"""The tutorial's full fine-tuning recipe, rewritten from its text, as one DeepSpeed worker.

Source: datawhalechina/self-llm, ``models/Qwen/06-Qwen-7B-chat 全量微调.md`` (train.py, train.sh
and ds_config.json as printed there); the values are the tutorial's. :func:`tutorial_worker` is
one process of it under DeepSpeed's launcher (``python -m bench.lib.train_speed tutorial ...``),
recording each step's time and non-padding tokens for :mod:`bench.lib.train_speed`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.lib.measure import GIB
from bench.lib.shapes import QWEN2_7B, n_params

#: System prompt the tutorial writes into every sample.
TUTORIAL_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."

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
