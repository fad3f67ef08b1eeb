"""Memory planner: will a training job fit a machine, and which strategy is fastest that does.

:func:`estimate` is a pure function of a :class:`Job` (model shape, tokens per micro-batch,
GPU count, precision, kernels) and a :class:`Strategy` (plain PyTorch or DeepSpeed ZeRO stage,
offload, how many decoder layers recompute their activations). It returns the predicted peak
GPU memory per process (what ``torch.cuda.max_memory_allocated`` reports, the figure chatft
logs per step) and peak host memory of the machine, each with its breakdown. No torch is
needed: everything is arithmetic on the model's config.

Notation (bytes unless said): ``P`` parameters, ``N`` data-parallel GPUs, ``L`` decoder layers,
``h`` hidden size, ``i`` MLP width, ``nh``/``nkv`` query/key-value heads of width ``hd``
(``qd = nh*hd``, ``kvd = nkv*hd``), ``V`` vocabulary, ``T`` tokens of the largest micro-batch on
one GPU, ``b`` bytes of an activation element (2 in bf16/fp16, 4 in fp32), ``E`` the largest
parameter tensor (the embedding or ``lm_head``: ``V*h``).

**Model states** (exact tensor sizes; DeepSpeed 0.19's buffers were counted on a CPU run and
read from its source):

* plain engine (one process, :class:`~chatft.train.optim.MasterWeightAdamW`), bf16: weights 2P +
  grads 2P + fp32 masters 4P + Adam moments 8P; at the step one chunk of fp32 gradients (the
  largest group of parameters MasterWeightAdamW upcasts at once, >= 2^28 elements); no fp32
  gradients otherwise. fp32: 4P + 4P + 8P.
* DeepSpeed, bf16 (``lp = 2``; fp32 ``lp = 4``): stage 0 keeps everything whole plus fp32 grads
  at the step (4P). Stage >= 1 partitions the fp32 masters (4P/N) and Adam (8P/N); stage 1/2
  build an fp32 gradient partition at the step (4P/N; before it, each gradient slice's norm is
  taken in fp64, 8 x min(E, P/N), the larger when N > P/2E); stage 2 keeps the bf16 gradient
  partition (2P/N) instead of whole gradients; stage 3 also partitions the bf16 parameters
  (2P/N) and gathers a working set (``stage3_max_live_parameters +
  stage3_prefetch_bucket_size`` elements, plus the full gradient of one module, 2E, before it
  is reduced). Reduce buckets: stage 1/2 two of ``reduce_bucket_size`` elements
  (``overlap_comm`` double-buffers), stage 3 one.
* ``offload_optimizer cpu`` moves masters, Adam and gradients to the host: stage 1/2 hold
  fp32 masters 4P/N + a bf16 parameter copy 2P/N + fp32 gradients 4P/N (pinned) + Adam 8P/N
  + a pinned 2E staging buffer (the GPU keeps a 2E one too); stage 3 holds masters 4P/N + Adam
  8P/N + fp32 gradients 4P/N (pinned) + a bf16 gradient buffer 2P/N (pinned). ``offload_param
  cpu`` adds the bf16 parameter partition 2P/N (pinned); the GPU keeps only the working set.
  That is 18-20 bytes per parameter of host memory: a 7.6B model needs 128-142 GiB for its
  offloaded states alone.
* Offloading costs GPU memory in the backward pass: DeepSpeed takes each gradient's norm in
  fp64 on the GPU before copying it to the host. Stage 1/2 upcast a parameter's whole gradient
  slice (8 bytes x E for ``lm_head``, whose gradient is the first one ready, while every
  activation is alive); stage 3 copies the gradient partition back to the GPU (lp x E/N) and
  upcasts it in chunks of 250M elements (8 bytes each).

**Activations** per decoder layer and token, without recomputation (the tensors autograd saves
in transformers' Llama/Qwen2 layer; checked against a real layer in the tests):

* RMSNorm, twice per layer: its fp32 input copy 4h + normalized value b*h + output b*h (the
  projections' input) + 4 (rstd); Liger's fused RMSNorm saves its input b*h instead of the fp32
  copy and normalized value.
* attention: rotated q b*qd; k and v b*kvd each with a GQA-native kernel (flex, flash, and
  varlen where torch's varlen kernel takes grouped heads), but b*qd each with SDPA on packed
  rows (a mask is passed, so transformers repeats k/v per query head) and with varlen on a torch
  whose kernel has no ``enable_gqa`` (chatft repeats k/v itself); output b*qd; logsumexp 4*nh.
  SDPA also saves its mask converted to the activation dtype (b*T per token, i.e. ``b*T^2`` per
  layer); varlen has no mask; eager saves the ``nh x T x T`` probabilities.
* SwiGLU MLP: gate, SiLU(gate), up and their product, 4*b*i; Liger's fused SwiGLU 3*b*i.

With recomputation of ``k`` layers (the first ``k``), those keep only their input (b*h per
token) and one layer is rematerialized at a time during the backward pass. The loss never
materializes full logits: chatft's chunked cross-entropy holds ~12 bytes x 2048 rows x V at
once (fp32 log-probabilities, their gradient and the logits' gradient); Liger's fused version
only a small chunk, the gradient of its input, and ``lm_head``'s gradient (b*V*h), which it
computes in the forward pass. That gradient is a tensor of its own whenever it is not already
counted among the model states: with accumulation (the previous micro-batches' gradient
exists), and under ZeRO-2, whose whole gradients pass through buckets.

**Calibration** (:class:`Calibration`). Activations, the loss and backward workspaces are
multiplied by :attr:`Calibration.activation_factor`; a fixed :attr:`Calibration.gpu_fixed_gib`
(cuBLAS workspaces and other small buffers PyTorch's allocator sees) is added.
:func:`fit_calibration` refits both from measured peaks. The defaults were fitted on ten runs
on one and four H200 (``bench/plan_calibration.py``, ``bench/results/plan_calibration_h200.json``):
every GPU peak is reproduced within 2%, with the activations as counted here (factor 0.99).
The CUDA context and NCCL's buffers are outside PyTorch's allocator, so they are not in the
predicted peak; a strategy fits a GPU when peak + context (+ NCCL with several GPUs) is within
the budget's margin.

**Host memory**: a baseline per process (Python, torch, CUDA libraries) and one for the
launcher when several processes run; the model load (each process holds the whole model in
its dtype on the CPU while loading, except under ZeRO-3 where ``zero.Init`` partitions it);
the offloaded states; and the export at the end (process 0 copies the full weights to the host
in the export dtype while the engine's buffers are still alive, then writes the folder and
reloads it to check it: a second copy).

**Speed** (for ranking only, see :class:`SpeedModel`): compute 6*P*T FLOPs per micro-batch plus
2*P_layer*T per recomputed layer (a third of that layer's forward+backward), collectives over
NVLink, parameter and gradient copies over PCIe when offloading, and the CPU Adam step
(16 bytes per parameter streamed through host memory once per optimizer step).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from chatft.errors import ChatftError

if TYPE_CHECKING:
    from chatft.config import Config

GIB = 1 << 30
#: Elements MasterWeightAdamW upcasts to fp32 at once (``chunk_numel`` in chatft.train.optim).
MASTER_CHUNK_NUMEL = 1 << 28
#: Rows of chatft's chunked cross-entropy (``CausalLMLoss.chunk_size``).
LOSS_CHUNK_ROWS = 2048
#: Packed rows are padded to a multiple of this on CUDA (chatft.train.loop).
CUDA_TOKEN_MULTIPLE = 64
#: Elements DeepSpeed ZeRO-3 upcasts to fp64 at once for a gradient's norm
#: (``_constant_buffered_norm2``'s buffer size).
DS_NORM_CHUNK_NUMEL = 250_000_000

Attention = Literal["sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"]
Precision = Literal["bf16", "fp16", "fp32"]
LossKernel = Literal["chunked", "fused", "full"]


# --------------------------------------------------------------------------- model shape


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only Llama/Qwen-style model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False  # Llama with attention_bias: every projection does
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over q and k heads (2*hd weights)
    model_type: str = ""

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config object or its dict (``config.json``)."""
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            config = config.to_dict()
        text = _get(config, "text_config")
        if text is not None and _get(config, "hidden_size") is None:
            config = text if isinstance(text, Mapping) else text.to_dict()
        for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
            if _get(config, moe):
                raise ChatftError(f"chatft plan models dense decoders; this config has {moe}="
                                  f"{_get(config, moe)} (mixture of experts)")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if _get(config, k) is None]
        if missing:
            raise ChatftError(f"the model config lacks {', '.join(missing)}: chatft plan needs a "
                              "Llama/Qwen-style decoder config")
        model_type = str(_get(config, "model_type", "") or "")
        heads = int(_get(config, "num_attention_heads"))
        hidden = int(_get(config, "hidden_size"))
        attention_bias = bool(_get(config, "attention_bias", False))
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_get(config, "intermediate_size")),
            num_layers=int(_get(config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(config, "num_key_value_heads") or heads),
            vocab_size=int(_get(config, "vocab_size")),
            tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            head_dim=int(_get(config, "head_dim") or hidden // heads),
            # Qwen2's attention always has q/k/v biases (its config has no switch for it).
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(_get(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            model_type=model_type,
        )

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def parameters(self) -> list[tuple[str, int, int]]:
        """``(name, numel, ndim)`` of every parameter, in ``named_parameters()`` order of the
        transformers ``*ForCausalLM`` (tied ``lm_head`` counted once, as the embedding)."""
        h, i, qd, kvd = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        out: list[tuple[str, int, int]] = [("model.embed_tokens.weight", self.vocab_size * h, 2)]
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            for name, rows, bias in (("q_proj", qd, self.qkv_bias), ("k_proj", kvd, self.qkv_bias),
                                     ("v_proj", kvd, self.qkv_bias)):
                out.append((f"{p}self_attn.{name}.weight", rows * h, 2))
                if bias:
                    out.append((f"{p}self_attn.{name}.bias", rows, 1))
            out.append((f"{p}self_attn.o_proj.weight", h * qd, 2))
            if self.o_bias:
                out.append((f"{p}self_attn.o_proj.bias", h, 1))
            if self.qk_norm:
                out += [(f"{p}self_attn.q_norm.weight", self.hd, 1),
                        (f"{p}self_attn.k_norm.weight", self.hd, 1)]
            for name, rows, cols in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                out.append((f"{p}mlp.{name}.weight", rows * cols, 2))
                if self.mlp_bias:
                    out.append((f"{p}mlp.{name}.bias", rows, 1))
            out += [(f"{p}input_layernorm.weight", h, 1),
                    (f"{p}post_attention_layernorm.weight", h, 1)]
        out.append(("model.norm.weight", h, 1))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", self.vocab_size * h, 2))
        return out

    @functools.cached_property
    def n_params(self) -> int:
        return sum(n for _, n, _ in self.parameters())

    @functools.cached_property
    def layer_params(self) -> int:
        return sum(n for name, n, _ in self.parameters() if name.startswith("model.layers.0."))

    @functools.cached_property
    def largest_param(self) -> int:
        return max(n for _, n, _ in self.parameters())

    def master_chunk_numel(self, chunk_numel: int = MASTER_CHUNK_NUMEL) -> int:
        """Largest group MasterWeightAdamW steps at once: parameters split into decay (>= 2-D)
        and no-decay groups, each cut into runs that close once they reach ``chunk_numel``."""
        largest = 0
        for group in ([n for _, n, d in self.parameters() if d >= 2],
                      [n for _, n, d in self.parameters() if d < 2]):
            size = 0
            for n in group:
                size += n
                if size >= chunk_numel:
                    largest, size = max(largest, size), 0
            largest = max(largest, size)
        return largest

    def describe(self) -> str:
        kind = self.model_type or "decoder"
        return (f"{kind} {self.n_params / 1e9:.2f}B params (hidden {self.hidden_size}, "
                f"{self.num_layers} layers, {self.num_heads}/{self.num_kv_heads} heads, "
                f"vocab {self.vocab_size})")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DeepSpeedSizes:
    """DeepSpeed's buffer sizes in elements (defaults: DeepSpeed 0.19, which chatft's generated
    config keeps)."""

    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000


@dataclass(frozen=True)
class Job:
    """Everything about a training job that does not change between strategies."""

    model: ModelShape
    tokens: int  # T: tokens of the largest micro-batch on one GPU (packed row incl. padding)
    gpus: int = 1  # N: data-parallel processes (one per GPU), all nodes
    gpus_per_node: int = 0  # processes sharing one host; 0: all of them
    precision: Precision = "bf16"
    attention: Attention = "sdpa"
    fused_kernels: bool = False  # Liger RMSNorm/SwiGLU/RoPE
    loss: LossKernel = "chunked"  # chunked (PyTorch), fused (Liger), full (whole logits)
    micro_batches: int = 1  # per GPU per optimizer step (accumulation, or more under a token cap)
    pretrained: bool = True  # weights are loaded from files (host copy while loading)
    export: bool = True  # the run ends by gathering the full weights on process 0
    export_bytes: int = 2  # bytes per weight of the exported folder (bf16)
    optimizer: bool = True  # False: forward+backward only (benchmarks, calibration rows)
    deepspeed: DeepSpeedSizes = field(default_factory=DeepSpeedSizes)
    varlen_takes_gqa: bool = False  # torch's varlen kernel attends grouped k/v (no repeat)

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or self.gpus

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Strategy:
    """How the job runs: engine, ZeRO stage, offload, recomputation."""

    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    checkpoint_layers: int = 0  # decoder layers that recompute their activations (the first k)

    @property
    def engine_label(self) -> str:
        if self.backend == "torch":
            return "plain"
        label = f"ZeRO-{self.zero_stage}"
        if self.offload_optimizer and self.offload_param:
            return label + " + offload opt+param"
        return label + (" + offload opt" if self.offload_optimizer else "")

    def recompute_label(self, num_layers: int) -> str:
        if self.checkpoint_layers <= 0:
            return "none"
        return "all" if self.checkpoint_layers >= num_layers else f"{self.checkpoint_layers}/{num_layers}"

    def options(self, num_layers: int) -> list[str]:
        """chatft command-line options that select this strategy."""
        opts = ["--backend", self.backend, "--zero_stage", str(self.zero_stage),
                "--offload_optimizer", "cpu" if self.offload_optimizer else "none",
                "--offload_param", "cpu" if self.offload_param else "none"]
        if self.checkpoint_layers <= 0:
            return opts + ["--gradient_checkpointing", "off"]
        k = -1 if self.checkpoint_layers >= num_layers else self.checkpoint_layers
        return opts + ["--gradient_checkpointing", "on", "--checkpoint_layers", str(k)]


@dataclass(frozen=True)
class Calibration:
    """Constants fitted to measured peaks (see :func:`fit_calibration`).

    The defaults were fitted on 2026-11-28 by ``bench/plan_calibration.py`` to the ten runs of
    ``bench/results/plan_measurements_h200.json`` (1 and 4 NVIDIA H200, torch 2.11, DeepSpeed
    0.19.8, Liger; Qwen2-7B and Qwen-7B shapes; plain, ZeRO-2, ZeRO-3 and offload): every GPU
    peak is predicted within 2% (``bench/results/plan_calibration_h200.json``).
    """

    activation_factor: float = 0.993
    """Multiplies activations, loss and backward workspaces (allocator rounding, kernel scratch)."""
    gpu_fixed_gib: float = 0.0
    """Allocator-visible memory of a GPU process besides states and activations (cuBLAS
    workspaces, small buffers); fitted at its floor, 0."""
    context_gib: float = 0.751
    """CUDA context of a GPU process: device memory outside PyTorch's allocator, so not in the
    predicted peak but in the budget check (nvidia-smi's used memory minus torch's reserved
    memory, the largest of the one-process runs: 0.64-0.75 GiB)."""
    comm_gib: float = 1.299
    """NCCL's buffers per process when several GPUs talk, also outside PyTorch's allocator
    (4 GPUs: 2.05 GiB used beyond torch's reserved memory, less the context)."""
    host_process_gib: float = 1.904
    """Host memory of one training process before any model state: Python, torch, CUDA."""
    host_launcher_gib: float = 1.0
    """The ``chatft train`` parent and DeepSpeed's launcher when workers are separate processes
    (not fitted: one measured multi-process run cannot tell it from the per-process part)."""


@dataclass(frozen=True)
class SpeedModel:
    """Rough rates for ranking strategies (H200 machine; only ratios between strategies matter)."""

    gpu_flops: float = 400e12  # sustained training FLOP/s (about half the 790 TFLOP/s matmul rate)
    collective_bytes_per_s: float = 150e9  # NVLink bus bandwidth per GPU in all-gather/reduce-scatter
    local_copy_bytes_per_s: float = 1.5e12  # ZeRO-3 "gathers" on one GPU are device copies
    pcie_bytes_per_s: float = 25e9  # pinned host <-> GPU copies per GPU
    host_adam_bytes_per_s: float = 40e9  # host memory streamed by the CPU Adam step (whole node)
    cpu_adam_bytes_per_param: int = 16  # fp32 master, grad, two moments read/written once


DEFAULT_CALIBRATION = Calibration()
DEFAULT_SPEED = SpeedModel()


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(job: Job) -> int:
    """Bytes one decoder layer saves for backward over ``job.tokens`` tokens (no recomputation)."""
    m, b, T = job.model, job.act_bytes, job.tokens
    h, i, qd, kvd, nh = m.hidden_size, m.intermediate_size, m.q_dim, m.kv_dim, m.num_heads
    if job.fused_kernels:
        norm = b * h + b * h + 4  # input, output, rstd
        mlp = 3 * b * i  # gate, up, product
    else:
        norm = 4 * h + b * h + b * h + 4  # fp32 input copy, normalized, output, rstd
        mlp = 4 * b * i  # gate, SiLU(gate), up, product
    if kv_repeated(job):
        qkv = 3 * b * qd  # k and v repeated per query head
    else:
        qkv = b * qd + 2 * b * kvd
    per_token = 2 * norm + qkv + b * qd + mlp  # + attention output
    if job.attention == "eager":
        probs = 4 * nh * T + (b * nh * T if b != 4 else 0)  # fp32 softmax (+ its cast)
        return T * (per_token + probs)
    per_token += 4 * nh  # logsumexp
    if job.attention == "sdpa":
        per_token += b * T  # the mask, converted to the activation dtype in every layer
    return T * per_token


def kv_repeated(job: Job) -> bool:
    """Whether attention saves k and v expanded to every query head: SDPA on packed rows and
    eager (transformers repeats them), varlen when torch's kernel has no grouped-head mode
    (chatft repeats them; measured on torch 2.11: varlen saved exactly SDPA's bytes less the
    mask)."""
    return job.attention in ("sdpa", "eager") or (job.attention == "varlen" and not job.varlen_takes_gqa)


def head_activation_bytes(job: Job) -> int:
    """Final norm and the gathered hidden states the loss keeps (per micro-batch)."""
    m, b, T = job.model, job.act_bytes, job.tokens
    norm = (2 * b * m.hidden_size + 4) if job.fused_kernels else (4 + 2 * b) * m.hidden_size + 4
    return T * (norm + b * m.hidden_size)


def shared_mask_bytes(job: Job) -> int:
    """SDPA's boolean block-diagonal mask ``[1, 1, T, T]``, built once per forward."""
    return job.tokens * job.tokens if job.attention == "sdpa" else 0


def backward_workspace_bytes(job: Job) -> int:
    """Gradients of one layer's intermediates alive at once in its backward pass."""
    m = job.model
    return job.tokens * job.act_bytes * (3 * m.intermediate_size + 2 * m.hidden_size)


def loss_bytes(job: Job, head_grad_separate: bool) -> int:
    """Peak transient of the loss (forward + backward of the output layer).

    ``head_grad_separate``: the ``lm_head`` gradient Liger's fused loss computes in its forward
    is a tensor of its own, not one the model states already count (see :func:`_gpu_states`).
    """
    m, T, V, b = job.model, job.tokens, job.model.vocab_size, job.act_bytes
    if job.loss == "full":
        return 12 * T * V  # fp32 log-probs, their gradient, the logits' gradient
    if job.loss == "fused":
        # Liger: gradient of the hidden states and of lm_head computed in the forward; logits
        # only for a chunk of 2^ceil(log2(T / ceil(V/h))) rows.
        chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(T / math.ceil(V / m.hidden_size))))))
        return b * T * m.hidden_size + b * chunk * V + (b * V * m.hidden_size if head_grad_separate else 0)
    rows = min(T, LOSS_CHUNK_ROWS)
    # A later chunk's lm_head gradient is a fresh V x h tensor before it is added to .grad.
    return max(12 * rows * V, 6 * rows * V + (b * V * m.hidden_size if T > rows else 0))


def activation_peak_bytes(job: Job, checkpoint_layers: int, head_grad_separate: bool) -> tuple[int, str]:
    """Peak of activations + loss + workspace in the backward pass, and when it happens.

    Two candidate moments: the start of the backward pass (every layer's saved tensors, the
    recomputed layers' inputs, the loss), and the first recomputed layer (its activations
    rebuilt while only the other recomputed layers' inputs remain).
    """
    L = job.model.num_layers
    k = max(0, min(checkpoint_layers, L))
    layer = layer_activation_bytes(job)
    inputs = job.tokens * job.act_bytes * job.model.hidden_size  # one checkpointed layer's input
    work = backward_workspace_bytes(job)
    mask = shared_mask_bytes(job)
    start = (L - k) * layer + k * inputs + head_activation_bytes(job) + mask + \
        max(loss_bytes(job, head_grad_separate), work)
    if k == 0:
        return start, "backward start"
    remat = k * inputs + mask + layer + work  # the loss and the head are freed by then
    return (start, "backward start") if start >= remat else (remat, "recompute")


# --------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class Estimate:
    """Predicted peaks of one strategy, with the parts that make them up."""

    strategy: Strategy
    gpu_bytes: int  # per GPU process: peak of PyTorch's allocated memory
    gpu_outside_bytes: int  # CUDA context (+ NCCL buffers): device memory outside the allocator
    host_bytes: int  # whole node
    host_pinned_bytes: int  # of host_bytes, page-locked (offload buffers)
    gpu_parts: dict[str, int]  # at the GPU peak
    gpu_phase: str
    host_parts: dict[str, int]  # at the host peak
    host_phase: str
    step_seconds: float
    tokens_per_second: float

    @property
    def gpu_gib(self) -> float:
        return self.gpu_bytes / GIB

    @property
    def gpu_device_bytes(self) -> int:
        """What the GPU must hold: the allocator's peak plus the memory outside it."""
        return self.gpu_bytes + self.gpu_outside_bytes

    @property
    def host_gib(self) -> float:
        return self.host_bytes / GIB


@dataclass(frozen=True)
class GpuStates:
    """Model-state memory of one GPU process, by when it exists."""

    resident: dict[str, int]  # all the time
    backward: dict[str, int]  # transients of the backward pass, alive with the activations
    step: dict[str, int]  # transients of the optimizer step
    head_grad_separate: bool  # the fused loss's lm_head gradient is not among the parts above


def _gpu_states(job: Job, s: Strategy) -> GpuStates:
    """What one process's engine keeps on its GPU (see the module docstring)."""
    P, N, E = job.model.n_params, job.gpus, job.model.largest_param
    ds = job.deepspeed
    opt = job.optimizer
    # Whole gradients are counted as states; the fused loss's lm_head gradient adds to them
    # only while an earlier micro-batch's gradient is being accumulated into.
    accumulating = job.micro_batches > 1
    if s.backend == "torch":
        if job.precision == "bf16":
            res = {"bf16 weights": 2 * P, "bf16 grads": 2 * P}
            if opt:
                res |= {"fp32 masters": 4 * P, "Adam moments": 8 * P}
            step = {"fp32 grad chunk": 4 * job.model.master_chunk_numel()} if opt else {}
        else:
            res = {"fp32 weights": 4 * P, "fp32 grads": 4 * P}
            if opt:
                res["Adam moments"] = 8 * P
            if job.precision == "fp16":
                res["fp16 weight casts"] = 2 * P  # autocast's per-forward copies
            step = {}
        return GpuStates(res, {}, step, accumulating)
    lp = 4 if job.precision == "fp32" else 2
    z = s.zero_stage
    if z == 0:
        res = {"weights": lp * P, "grads": lp * P}
        if opt and lp == 2:
            res |= {"fp32 masters": 4 * P, "Adam moments": 8 * P}
            step = {"fp32 grads": 4 * P}
        else:
            res |= {"Adam moments": 8 * P} if opt else {}
            step = {}
        return GpuStates(res, {}, step, accumulating)
    part = -(-P // N)
    res: dict[str, int] = {}
    backward: dict[str, int] = {}
    step: dict[str, int] = {}
    res["weights" if z < 3 else "weight partition"] = lp * P if z < 3 else (
        0 if s.offload_param else -(-lp * P // N))
    if z == 1:
        res["grads"] = lp * P
    elif not s.offload_optimizer:
        res["grad partition"] = -(-lp * P // N)
    if opt and not s.offload_optimizer:
        res |= {"fp32 masters": -(-4 * P // N), "Adam moments": -(-8 * P // N)}
        if z < 3:
            # The step first takes each gradient slice's norm in fp64, then builds the fp32
            # gradient partition; the larger of the two is the step's peak.
            norm, fp32 = 8 * min(E, part), 4 * part
            step = {"grad norm (fp64)": norm} if norm > fp32 else {"fp32 grad partition": fp32}
        else:
            step["fp32 grad partition"] = 4 * min(ds.sub_group_size, part)
    if z < 3:
        res["reduce buckets"] = 2 * lp * ds.reduce_bucket_size
        if s.offload_optimizer:
            res["offload staging"] = lp * E
            if opt:
                # lm_head's gradient slice upcast to fp64 for its norm at backward start
                backward["grad norm (fp64)"] = 8 * min(E, part)
    else:
        res["reduce bucket"] = lp * ds.reduce_bucket_size
        res["gathered params"] = lp * min(P, ds.max_live_parameters + ds.prefetch_bucket_size)
        res["module grads"] = lp * E  # with the fused loss: the lm_head gradient it computes
        if s.offload_optimizer and opt:
            # Each gradient partition comes back from the host buffer to the GPU and has its
            # norm taken in fp64 chunks; the largest module's partition is the worst.
            module_part = -(-E // N)
            backward["grad partition copy"] = lp * module_part
            backward["grad norm chunk (fp64)"] = 8 * min(DS_NORM_CHUNK_NUMEL, module_part)
    return GpuStates(res, backward, step, z == 2 or (z == 1 and accumulating))


def _host_offload(job: Job, s: Strategy) -> tuple[int, int]:
    """(bytes, pinned bytes) one process keeps on the host for offloaded states."""
    P, N, E = job.model.n_params, job.gpus, job.model.largest_param
    lp = 4 if job.precision == "fp32" else 2
    part = -(-P // N)
    if s.backend == "torch" or not (s.offload_optimizer or s.offload_param) or not job.optimizer:
        if s.offload_param and s.zero_stage == 3:
            return lp * part, lp * part
        return 0, 0
    if s.zero_stage < 3:
        pinned = 4 * part + lp * part + 4 * part + lp * E  # masters, bf16 copy, fp32 grads, staging
        return pinned + 8 * part, pinned
    pinned = 4 * part + lp * part  # fp32 grads, bf16 gradient buffer
    total = pinned + 4 * part + 8 * part  # + masters, Adam moments (ordinary memory)
    if s.offload_param:
        total, pinned = total + lp * part, pinned + lp * part
    return total, pinned


def _gpu_phases(job: Job, strategy: Strategy, activation_factor: float, fixed: int
                ) -> dict[str, dict[str, int]]:
    """The parts of each candidate GPU peak: the backward pass (states, its transients and the
    activations) and the optimizer step (states and the step's transients)."""
    states = _gpu_states(job, strategy)
    act, when = activation_peak_bytes(job, strategy.checkpoint_layers, states.head_grad_separate)
    return {f"forward/backward ({when})": {**states.resident, **states.backward,
                                           "activations": int(act * activation_factor),
                                           "fixed": fixed},
            "optimizer step": {**states.resident, **states.step, "fixed": fixed}}


def estimate(job: Job, strategy: Strategy, calibration: Calibration = DEFAULT_CALIBRATION,
             speed: SpeedModel = DEFAULT_SPEED) -> Estimate:
    """Predicted peak GPU memory (per process) and host memory (node) of ``job`` run as
    ``strategy``; see the module docstring for the model."""
    if strategy.backend == "torch" and job.gpus > 1:
        raise ValueError("the plain engine runs one process")
    cal = calibration
    fixed = int(cal.gpu_fixed_gib * GIB)
    outside = int(cal.context_gib * GIB) + (int(cal.comm_gib * GIB) if job.gpus > 1 else 0)
    gpu_phase, gpu_parts = max(_gpu_phases(job, strategy, cal.activation_factor, fixed).items(),
                               key=lambda kv: sum(kv[1].values()))

    # Host: per-process baseline, then the largest of load / train / export.
    n = job.procs_per_node
    P, lp = job.model.n_params, (4 if job.precision in ("fp32", "fp16") else 2)
    base = int(n * cal.host_process_gib * GIB) + (int(cal.host_launcher_gib * GIB) if job.gpus > 1 else 0)
    offload, pinned = _host_offload(job, strategy)
    load = 0
    if job.pretrained:
        load = lp * P if strategy.zero_stage < 3 or strategy.backend == "torch" else \
            -(-lp * P // job.gpus) + lp * job.model.largest_param
    host = {"load": {"processes": base, "weights loading": n * load},
            "train": {"processes": base, "offloaded states": n * offload}}
    if job.export:
        # Process 0 copies the weights to the host in the export dtype while the engine (and
        # its offloaded states) still exists; then the engine is dropped, the folder is written
        # from that copy and reloaded (a second copy) to check it.
        gathered = job.export_bytes * P
        host["export"] = {"processes": base, "offloaded states": n * offload,
                          "gathered weights": gathered}
        host["export write"] = {"processes": base, "gathered weights": gathered,
                                "export model": gathered}
    host_phase, host_parts = max(host.items(), key=lambda kv: sum(kv[1].values()))
    step_s = step_seconds(job, strategy, speed)
    return Estimate(strategy, sum(gpu_parts.values()), outside, sum(host_parts.values()),
                    n * pinned, gpu_parts, gpu_phase, host_parts, host_phase, step_s,
                    job.gpus * job.micro_batches * job.tokens / step_s)


def step_seconds(job: Job, s: Strategy, speed: SpeedModel = DEFAULT_SPEED) -> float:
    """Rough wall time of one optimizer step (see :class:`SpeedModel`)."""
    m = job.model
    P, N, T, mb = m.n_params, job.gpus, job.tokens, job.micro_batches
    lp = 4 if job.precision == "fp32" else 2
    k = max(0, min(s.checkpoint_layers, m.num_layers))
    matmul_params = P - m.vocab_size * m.hidden_size * (0 if m.tie_word_embeddings else 1)
    flops = mb * T * (6 * matmul_params + 2 * m.layer_params * k)
    t = flops / speed.gpu_flops
    share = (N - 1) / N
    if s.backend == "deepspeed" and N > 1:
        grads = lp * P * share / speed.collective_bytes_per_s
        gather = lp * P * share / speed.collective_bytes_per_s
        if s.zero_stage == 0:
            t += 2 * grads  # all-reduce once per step
        elif s.zero_stage == 1:
            t += grads + gather  # reduce-scatter at the boundary, all-gather after the update
        elif s.zero_stage == 2:
            t += mb * grads + gather
        else:
            t += mb * (grads + (2 + k / m.num_layers) * gather)
    elif s.backend == "deepspeed" and s.zero_stage == 3:
        t += mb * (2 + k / m.num_layers) * lp * P / speed.local_copy_bytes_per_s
    if s.offload_optimizer and job.optimizer:
        t += mb * lp * P / N / speed.pcie_bytes_per_s  # reduced gradients to the host
        t += lp * P / N / speed.pcie_bytes_per_s  # updated parameters back
        t += speed.cpu_adam_bytes_per_param * P / speed.host_adam_bytes_per_s
    if s.offload_param:
        t += mb * (2 + k / m.num_layers) * lp * P / N / speed.pcie_bytes_per_s
    return t


# --------------------------------------------------------------------------- the plan


BASE_STRATEGIES = (
    Strategy("torch"),
    Strategy("deepspeed", 1),
    Strategy("deepspeed", 2),
    Strategy("deepspeed", 3),
    Strategy("deepspeed", 2, offload_optimizer=True),
    Strategy("deepspeed", 3, offload_optimizer=True),
    Strategy("deepspeed", 3, offload_optimizer=True, offload_param=True),
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


def candidate_strategies(job: Job, gpu_budget: int, margin: float = 0.05,
                         calibration: Calibration = DEFAULT_CALIBRATION) -> list[Strategy]:
    """Each base strategy (plain only on one GPU; ZeRO-0 is not offered: ZeRO-1 does the same
    with less memory) with recomputation none, the fewest layers that fit, and all."""
    out: list[Strategy] = []
    L = job.model.num_layers
    for base in BASE_STRATEGIES:
        if base.backend == "torch" and job.gpus > 1:
            continue
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
    fits both budgets (ties: less GPU memory)."""
    cands = list(strategies) if strategies is not None else \
        candidate_strategies(job, gpu_budget, margin, calibration)
    ests = [estimate(job, s, calibration, speed) for s in cands]
    best = max(e.tokens_per_second for e in ests)
    rows = [PlanRow(e, fits_gpu(e, gpu_budget, margin), e.host_bytes <= host_budget * (1 - margin),
                    e.tokens_per_second / best) for e in ests]
    fitting = [r for r in rows if r.fits]
    rec = max(fitting, key=lambda r: (round(r.relative_speed, 6), -r.estimate.gpu_bytes),
              default=None)
    return Plan(job, gpu_budget, host_budget, margin, rows, rec)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def format_plan(plan: Plan, notes: Sequence[str] = ()) -> str:
    """The table ``chatft plan`` prints (``notes``: extra header lines), ending with the
    recommendation."""
    job = plan.job
    kernels = "Liger kernels" if job.fused_kernels else "PyTorch kernels"
    lines = [f"model: {job.model.describe()}",
             (f"job: {job.tokens:,} tokens per micro-batch, {job.gpus} GPU(s), {job.precision}, "
              f"{job.attention} attention, {kernels}, {job.loss} loss"),
             (f"budget: {_gib(plan.gpu_budget)} GiB per GPU, {_gib(plan.host_budget)} GiB host "
              f"(fits = peak within {100 * (1 - plan.margin):.0f}% of both; GPU GiB is PyTorch's "
              f"allocated peak, the GPU also holds {_gib(plan.rows[0].estimate.gpu_outside_bytes)} "
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
                      _gib(e.gpu_bytes), _gib(e.host_bytes), _gib(e.host_pinned_bytes), fit,
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
                f"{least_gpu.strategy.recompute_label(L)} ({_gib(least_gpu.estimate.gpu_bytes)} GiB GPU, "
                f"{_gib(least_gpu.estimate.host_bytes)} GiB host); least host memory: "
                f"{least_host.strategy.engine_label} ({_gib(least_host.estimate.host_bytes)} GiB host). "
                "Use fewer tokens per micro-batch (--micro_batch_tokens, --per_device_train_batch_size, "
                "--max_length), more GPUs, or a machine with more memory.")
    e = r.estimate
    return (f"{r.strategy.engine_label}, recompute {r.strategy.recompute_label(L)} "
            f"({_gib(e.gpu_bytes)} GiB GPU, {_gib(e.host_bytes)} GiB host): "
            + " ".join(r.strategy.options(L)))


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
                "gpu_phase": e.gpu_phase,
                "gpu_parts_gib": {k: round(v / GIB, 3) for k, v in e.gpu_parts.items()},
                "host_phase": e.host_phase,
                "host_parts_gib": {k: round(v / GIB, 3) for k, v in e.host_parts.items()},
                "options": r.strategy.options(L)}

    job = asdict(plan.job)
    job["model"]["n_params"] = plan.job.model.n_params
    return {"job": job, "gpu_budget_gib": round(plan.gpu_budget / GIB, 3),
            "host_budget_gib": round(plan.host_budget / GIB, 3), "margin": plan.margin,
            "rows": [row(r) for r in plan.rows],
            "recommended": row(plan.recommended) if plan.recommended else None}


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Measurement:
    """One benchmarked run: what ran and the peaks seen (GiB; host None when not measured)."""

    job: Job
    strategy: Strategy
    gpu_gib: float
    host_gib: float | None = None


def fit_calibration(rows: Sequence[Measurement], base: Calibration = DEFAULT_CALIBRATION) -> Calibration:
    """Refit the constants from measured peaks.

    GPU: each row's peak is ``states + fixed + factor * activations`` (the parts of its peak
    phase; a peak at the optimizer step has no activations), a line in (factor, fixed). With
    two or more distinct activation sizes both are solved by least squares on the relative
    errors (each row weighted by 1/measured^2, so a 7 GiB run counts as much as a 130 GiB one),
    with one only the factor (the fixed part kept). Which phase peaks depends on the constants,
    so the fit repeats until no row changes phase. Host: the per-process baseline is the mean of
    ``(measured - the rest) / processes``.
    """
    if not rows:
        return base
    # Per row: (states of the backward phase, raw activations, states of the step phase), GiB.
    pieces = []
    for r in rows:
        phases = _gpu_phases(r.job, r.strategy, 1.0, 0)
        (_, back), (_, step) = phases.items()
        act = back["activations"]
        pieces.append(((sum(back.values()) - act) / GIB, act / GIB, sum(step.values()) / GIB))
    factor, fixed = base.activation_factor, base.gpu_fixed_gib
    in_step: list[bool] | None = None
    for _ in range(20):
        now = [b + factor * a < st for b, a, st in pieces]  # the step is this row's peak
        if now == in_step:
            break
        in_step = now
        xs = [0.0 if st_peak else a for (b, a, st), st_peak in zip(pieces, in_step)]
        ys = [r.gpu_gib - (st if st_peak else b) for r, (b, a, st), st_peak in zip(rows, pieces, in_step)]
        ws = [1.0 / max(r.gpu_gib, 1e-9) ** 2 for r in rows]
        sw = sum(ws)
        mx = sum(w * x for w, x in zip(ws, xs)) / sw
        my = sum(w * y for w, y in zip(ws, ys)) / sw
        sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
        if len(rows) >= 2 and sxx > 1e-9 * sw * max(1.0, mx * mx):
            factor = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
            fixed = my - factor * mx
            if fixed < 0:  # memory cannot be negative: the best line through no fixed part
                fixed = 0.0
                sxx0 = sum(w * x * x for w, x in zip(ws, xs))
                factor = sum(w * x * y for w, x, y in zip(ws, xs, ys)) / sxx0 if sxx0 else factor
        else:
            fixed = base.gpu_fixed_gib
            factor = (my - fixed) / mx if mx > 0 else base.activation_factor
    out = replace(base, activation_factor=factor, gpu_fixed_gib=fixed)
    host = [r for r in rows if r.host_gib is not None]
    if host:
        per = []
        for r in host:
            probe = estimate(r.job, r.strategy, replace(out, host_process_gib=0.0))
            per.append((r.host_gib - probe.host_gib) / r.job.procs_per_node)
        out = replace(out, host_process_gib=sum(per) / len(per))
    return out


# --------------------------------------------------------------------------- from chatft's config


def resolve_kernels(cfg: "Config") -> tuple[str, bool, LossKernel]:
    """(attention, Liger kernels, loss) the engine will use on a GPU for this config."""
    import torch

    from chatft.model.build import liger_available, resolve_attention

    dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16  # auto: bf16 on GPUs
    attention = resolve_attention(cfg.model.attn_implementation, torch.device("cuda"), dtype)
    if attention not in ("sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"):
        attention = "sdpa"
    liger = cfg.model.liger_kernel == "on" or (cfg.model.liger_kernel == "auto" and liger_available())
    return attention, liger, "fused" if liger else "chunked"


def token_budget(cfg: "Config", lengths: Sequence[int] | None = None, gpus: int | None = None) -> int:
    """Tokens of the largest micro-batch one GPU will see.

    With the sample lengths, the exact maximum over the run's steps (the same pure planner the
    training loop uses; at most 20,000 steps are scanned). Without them, the bound the config
    allows: ``per_device_train_batch_size x max_length``, or ``micro_batch_tokens + max_length``
    when a cap is set. Packed rows round up to 64 tokens, as on CUDA.
    """
    return micro_batch_layout(cfg, lengths, gpus)[0]


def micro_batch_layout(cfg: "Config", lengths: Sequence[int] | None = None,
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

    from chatft.train.batching import deal_into_bins, micro_batches_per_rank, step_samples, steps_per_epoch

    lengths = np.asarray(lengths)
    global_batch = t.per_device_train_batch_size * accumulation * world
    per_epoch = steps_per_epoch(len(lengths), global_batch)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    worst, most = 0, accumulation
    for step in range(min(total, 20_000)):
        epoch, in_epoch = divmod(step, per_epoch)
        samples = step_samples(len(lengths), global_batch, t.seed, epoch, in_epoch)
        m = micro_batches_per_rank(int(lengths[samples].sum()), world, accumulation, t.micro_batch_tokens)
        most = max(most, m)
        for b in deal_into_bins(samples, lengths, world * m):
            if b:
                size = int(lengths[b].sum()) if d.packing else len(b) * int(lengths[b].max())
                worst = max(worst, size)
    return padded(worst), most


def job_from_config(cfg: "Config", model_config: Any, tokens: int, gpus: int | None = None,
                    micro_batches: int | None = None) -> Job:
    """The planner's Job for a chatft config (precision auto = bf16: the plan is for GPUs).
    ``micro_batches``: per GPU per step (see :func:`micro_batch_layout`); by default the
    bound without sample lengths."""
    attention, liger, loss = resolve_kernels(cfg)
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
               deepspeed=deepspeed_sizes(cfg, shape), varlen_takes_gqa=gqa)


def deepspeed_sizes(cfg: "Config", shape: ModelShape) -> DeepSpeedSizes:
    """Bucket sizes from the user's DeepSpeed JSON when there is one ("auto" as chatft fills it)."""
    sizes = DeepSpeedSizes()
    zero = _user_zero(cfg)
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


def _user_zero(cfg: "Config") -> dict[str, Any]:
    """The ``zero_optimization`` section of the user's DeepSpeed JSON ({} without one)."""
    if not cfg.deepspeed.config:
        return {}
    try:
        zero = json.loads(Path(cfg.deepspeed.config).read_text(encoding="utf-8")).get("zero_optimization")
    except (OSError, ValueError, AttributeError):
        return {}
    return zero if isinstance(zero, dict) else {}


def current_strategy(cfg: "Config", num_layers: int) -> Strategy:
    """The strategy a config runs as (ZeRO settings from the user's DeepSpeed JSON if given)."""
    ds = cfg.deepspeed
    k = 0
    if cfg.model.gradient_checkpointing == "on":
        k = num_layers if cfg.model.checkpoint_layers < 0 else cfg.model.checkpoint_layers
    if not cfg.uses_deepspeed:
        return Strategy("torch", checkpoint_layers=k)
    stage, opt, param = ds.zero_stage, ds.offload_optimizer == "cpu", ds.offload_param == "cpu"
    zero = _user_zero(cfg)
    if zero:
        stage = int(zero.get("stage", 0))
        opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
        param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    return Strategy("deepspeed", stage, opt, param and stage == 3, k)


def detected_budgets() -> tuple[int, int, str]:
    """(GPU bytes, host bytes, where they came from): the smallest GPU's memory and this
    machine's RAM (or its cgroup limit), or 80 GiB / 64 GiB when there is no GPU."""
    gpu = _gpu_memory()
    if gpu is None:
        return 80 * GIB, 64 * GIB, "no GPU here: assumed 80 GiB per GPU, 64 GiB host"
    return gpu[0], host_memory(), f"detected {gpu[1]} and this machine's RAM"


def host_memory() -> int:
    """Physical RAM, or the container's memory limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text(encoding="ascii").strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _gpu_memory() -> tuple[int, str] | None:
    """(bytes, name) of the smallest visible GPU. Uses torch only where CUDA is already
    initialized (a training process), else nvidia-smi, so that planning in the launcher does
    not create a CUDA context that would hold GPU memory for the whole run."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, props.name
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,name",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = []
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        mib, _, name = line.partition(",")
        if mib.strip().isdigit():
            gpus.append((int(mib.strip()) << 20, name.strip()))
    return min(gpus) if gpus else None


def parse_size(text: str) -> int:
    """'24GiB', '24G', '24 GB' (10^9), '24' (GiB) -> bytes."""
    s = text.strip().replace(" ", "")
    units = {"tib": 1 << 40, "t": 1 << 40, "gib": GIB, "g": GIB, "mib": 1 << 20, "m": 1 << 20,
             "tb": 10 ** 12, "gb": 10 ** 9, "mb": 10 ** 6, "": GIB}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    try:
        value = float(num)
    except ValueError:
        raise ChatftError(f"{text!r}: expected a size such as 24GiB, 80GB or 64") from None
    if unit not in units or value <= 0:
        raise ChatftError(f"{text!r}: expected a size such as 24GiB, 80GB or 64")
    return int(value * units[unit])


def model_config_for(cfg: "Config") -> Any:
    from chatft.model.loading import model_config, resolve_model

    try:
        return model_config(resolve_model(cfg.model.name_or_path))
    except (OSError, ValueError) as e:
        raise ChatftError(f"{cfg.model.name_or_path}: cannot read the model config ({e})") from None


def data_lengths(cfg: "Config") -> tuple[Any, str]:
    """Training sample lengths (tokenizing into the cache if needed), or None and why not."""
    try:
        from chatft.data.steps import prepare_data, tokenizer_for

        return prepare_data(cfg, tokenizer_for(cfg)).train.lengths, "from the data"
    except (ChatftError, OSError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first if len(first) <= 100 else first[:97] + "..."
        return None, f"the config's bound; the data was not read: {first}"


def plan_command(cfg: "Config", *, gpus: int | None, gpu_mem: str | None, cpu_mem: str | None,
                 tokens: int | None, as_json: bool, out=sys.stdout) -> int:
    """``chatft plan``: the table (or JSON) for this config on this machine (or the given one)."""
    gpu_budget, host_budget, source = detected_budgets()
    if gpu_mem:
        gpu_budget, source = parse_size(gpu_mem), "given"
    if cpu_mem:
        host_budget = parse_size(cpu_mem)
    if gpus is not None and gpus < 1:
        raise ChatftError(f"--gpus {gpus}: expected at least 1")
    model_cfg = model_config_for(cfg)
    if tokens is not None:
        if tokens < 1:
            raise ChatftError(f"--tokens {tokens}: expected at least 1")
        (T, m), why = (tokens, micro_batch_layout(cfg, None, gpus)[1]), "given"
    else:
        lengths, why = data_lengths(cfg)
        T, m = micro_batch_layout(cfg, lengths, gpus)
    job = job_from_config(cfg, model_cfg, T, gpus, micro_batches=m)
    plan = make_plan(job, gpu_budget, host_budget)
    if as_json:
        print(json.dumps({**plan_to_json(plan), "tokens_source": why, "budget_source": source},
                         indent=1), file=out)
    else:
        print(format_plan(plan, [f"tokens per micro-batch: {why}", f"budget source: {source}"]), file=out)
    return 0


# --------------------------------------------------------------------------- applying a plan


def apply_strategy(cfg: "Config", strategy: Strategy, num_layers: int) -> list[str]:
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
    ]
    changes = []
    for obj, name, value in new:
        old = getattr(obj, name)
        if old != value:
            setattr(obj, name, value)
            changes.append(f"{name} {old} -> {value}")
    return changes


def apply_plan(cfg: "Config", model_config: Any, tokens: int, gpu_budget: int,
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
        raise ChatftError("the memory planner finds no strategy that fits this machine "
                          f"({_gib(gpu_budget)} GiB per GPU, {_gib(host_budget)} GiB host) for "
                          f"{tokens:,} tokens per micro-batch on {job.gpus} GPU(s): "
                          + recommendation_text(plan) + " (see `chatft plan`)")
    changes = apply_strategy(cfg, plan.recommended.strategy, L)
    cfg.validate()
    return plan, changes


def auto_plan(cfg: "Config", lengths: Sequence[int] | None) -> None:
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
    plan, changes = apply_plan(cfg, model_config_for(cfg), tokens, gpu_budget, host_budget, m)
    rec = plan.recommended
    assert rec is not None
    L = plan.job.model.num_layers
    print(f"chatft: plan ({source}; {_gib(gpu_budget)} GiB per GPU, {_gib(host_budget)} GiB host, "
          f"{tokens:,} tokens per micro-batch): {rec.strategy.engine_label}, recompute "
          f"{rec.strategy.recompute_label(L)}: predicted {_gib(rec.estimate.gpu_bytes)} GiB GPU, "
          f"{_gib(rec.estimate.host_bytes)} GiB host, the fastest of "
          f"{sum(r.fits for r in plan.rows)} that fit" + (f"; set {', '.join(changes)}" if changes else ""),
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- out of memory


def out_of_memory_message(cfg: "Config", error_text: str, *, device: str, gpus: int, tokens: int,
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
              f"{_gib(now.gpu_bytes)} GiB per GPU of {_gib(gpu_budget)} GiB.")]
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
def explain_out_of_memory(cfg: "Config", lengths: Sequence[int] | None = None) -> Iterator[None]:
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
                                            tokens=tokens, model_config=model_config_for(cfg),
                                            gpu_budget=gpu_budget, host_budget=host_budget,
                                            micro_batches=m)
        except ChatftError as why:  # the advice itself failed: still say what ran out
            message = f"out of GPU memory on {device} ({str(e).splitlines()[0]}); no plan: {why}"
        raise ChatftError(message) from None
