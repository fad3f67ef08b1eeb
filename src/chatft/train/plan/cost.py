"""The memory planner's cost model: predicted peak memory and step time of a job run one way.

:func:`estimate` is a pure function of a :class:`Job` (model shape, tokens per micro-batch,
GPU count, precision, kernels) and a :class:`Strategy` (plain PyTorch or DeepSpeed ZeRO stage,
offload, how many decoder layers recompute their activations). It returns the predicted peak
GPU memory per process (what ``torch.cuda.max_memory_allocated`` reports, the figure chatft
logs per step) and peak host memory of the machine, each with its breakdown. No torch is
weights are needed: everything is arithmetic on the model's config, checkable by hand.

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
(cuBLAS workspaces and other small buffers PyTorch's allocator sees) is added. The benchmark
``bench/plan_calibration.py`` refits both from measured peaks. The defaults were fitted on ten runs
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

import math
from dataclasses import dataclass, field
from typing import Literal

from chatft.train.loss import LOSS_CHUNK_ROWS
from chatft.train.plan.shape import ModelShape

GIB = 1 << 30
#: Elements DeepSpeed ZeRO-3 upcasts to fp64 at once for a gradient's norm
#: (``_constant_buffered_norm2``'s buffer size).
DS_NORM_CHUNK_NUMEL = 250_000_000

Attention = Literal["sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"]
Precision = Literal["bf16", "fp16", "fp32"]
LossKernel = Literal["chunked", "fused", "full"]


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
    """Constants fitted to measured peaks (``fit_calibration`` of the calibration benchmark).

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


def gpu_phases(job: Job, strategy: Strategy, activation_factor: float, fixed: int
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
    gpu_phase, gpu_parts = max(gpu_phases(job, strategy, cal.activation_factor, fixed).items(),
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
