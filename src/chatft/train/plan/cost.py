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
* plain engine with memory-lean optimizer options (bf16 only; ``optim`` 8-/4-bit,
  ``master_weights none``, ``optimizer_in_bwd``, ``optimizer_states host``): the model states
  are :func:`chatft.train.optim_memory.optimizer_memory` of the parameters in gradient order
  (:meth:`ModelShape.gradient_order`): its ``device`` bytes stay for the whole run; its
  ``transient_device`` is added at the optimizer step, or, with the step in backward, at the
  start of the backward pass: ``lm_head``'s gradient, the first one complete, is updated while
  every saved activation is alive, once the loss's backward has ended (its transients freed),
  and while the last layer's backward runs (its work space), so that moment holds the larger
  of the loss and work space + updates in flight. Without whole gradients among the states,
  Liger's ``lm_head`` gradient (b*V*h, computed in the forward pass) is activation memory
  until it becomes the gradient being updated. Host: the slabs of the moments
  (``host_reserved``, pinned).
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
(16 bytes per parameter streamed through host memory once per optimizer step). Moments in
host memory cross PCIe once each way per step (``transfer_per_step``) on one side stream,
overlapped with the backward pass: only the part longer than the backward pass adds time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from chatft.train.loss import LOSS_CHUNK_ROWS
from chatft.train.optim_memory import OptimizerChoice, OptimizerMemory, optimizer_memory
from chatft.train.plan.job import (DEFAULT_CALIBRATION, DEFAULT_SPEED,  # noqa: F401 (re-exported)
                                   Attention, Calibration, DeepSpeedSizes, Job, LossKernel,
                                   Precision, SpeedModel, Strategy)
from chatft.train.plan.shape import ModelShape

GIB = 1 << 30
#: Elements DeepSpeed ZeRO-3 upcasts to fp64 at once for a gradient's norm
#: (``_constant_buffered_norm2``'s buffer size).
DS_NORM_CHUNK_NUMEL = 250_000_000


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


def activation_peak_bytes(job: Job, checkpoint_layers: int, head_grad_separate: bool,
                          in_flight: int = 0) -> tuple[int, str]:
    """Peak of activations + loss + workspace in the backward pass, and when it happens.

    Two candidate moments: the start of the backward pass (every layer's saved tensors, the
    recomputed layers' inputs, the loss), and the first recomputed layer (its activations
    rebuilt while only the other recomputed layers' inputs remain). ``in_flight``: bytes of
    the optimizer updates in backward right after the loss (they follow its transients and
    overlap the last layer's work space).
    """
    L = job.model.num_layers
    k = max(0, min(checkpoint_layers, L))
    layer = layer_activation_bytes(job)
    inputs = job.tokens * job.act_bytes * job.model.hidden_size  # one checkpointed layer's input
    work = backward_workspace_bytes(job)
    mask = shared_mask_bytes(job)
    start = (L - k) * layer + k * inputs + head_activation_bytes(job) + mask + \
        max(loss_bytes(job, head_grad_separate), work + in_flight)
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
    in_flight: int = 0  # optimizer updates in backward, at its start (see activation_peak_bytes)


def is_lean(job: Job, s: Strategy) -> bool:
    """Whether the optimizer memory of ``s`` is the lean arithmetic's (plain engine, bf16,
    some option not the default)."""
    return s.backend == "torch" and bool(s.lean_options) and job.optimizer and job.precision == "bf16"


@functools.lru_cache(maxsize=64)
def lean_memory(model: ModelShape, choice: OptimizerChoice) -> OptimizerMemory:
    """:func:`optimizer_memory` of the model's parameters in gradient order (cached: the
    planner asks for the same one while it bisects recomputation)."""
    return optimizer_memory(model.gradient_order(), choice)


def _lean_gpu_states(job: Job, s: Strategy) -> GpuStates:
    """The plain engine's GPU states with the lean options (see the module docstring)."""
    m = lean_memory(job.model, s.optimizer_choice(job.precision))
    res = {"bf16 weights": m.weights}
    if m.gradients:
        res["bf16 grads"] = m.gradients
    if m.masters:
        res["fp32 masters"] = m.masters
    if s.optimizer_states == "device":
        res["Adam moments"] = m.moments
    if not s.optimizer_in_bwd:
        return GpuStates(res, {}, {"update work space": m.transient_device}, job.micro_batches > 1)
    return GpuStates(res, {}, {}, True, in_flight=m.transient_device)


def _gpu_states(job: Job, s: Strategy) -> GpuStates:
    """What one process's engine keeps on its GPU (see the module docstring)."""
    P, N, E = job.model.n_params, job.gpus, job.model.largest_param
    ds = job.deepspeed
    opt = job.optimizer
    # Whole gradients are counted as states; the fused loss's lm_head gradient adds to them
    # only while an earlier micro-batch's gradient is being accumulated into.
    accumulating = job.micro_batches > 1
    if is_lean(job, s):
        return _lean_gpu_states(job, s)
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
    if is_lean(job, s) and s.optimizer_states == "host":
        reserved = lean_memory(job.model, s.optimizer_choice(job.precision)).host_reserved
        return reserved, reserved  # pinned 1 GiB slabs
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
    backward = dict(states.backward)
    if states.in_flight:  # what the updates add to the activations' peak (not calibrated)
        with_updates, when = activation_peak_bytes(job, strategy.checkpoint_layers,
                                                   states.head_grad_separate, states.in_flight)
        backward["updates in flight"] = with_updates - act
    return {f"forward/backward ({when})": {**states.resident, **backward,
                                           "activations": int(act * activation_factor),
                                           "fixed": fixed},
            "optimizer step": {**states.resident, **states.step, "fixed": fixed}}


def estimate(job: Job, strategy: Strategy, calibration: Calibration = DEFAULT_CALIBRATION,
             speed: SpeedModel = DEFAULT_SPEED) -> Estimate:
    """Predicted peak GPU memory (per process) and host memory (node) of ``job`` run as
    ``strategy``; see the module docstring for the model."""
    if strategy.backend == "torch" and job.gpus > 1:
        raise ValueError("the plain engine runs one process")
    if strategy.lean_options and strategy.backend != "torch":
        raise ValueError("the lean optimizer options run on the plain engine")
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
    if is_lean(job, s) and s.optimizer_states == "host":
        # the moments' round trip overlaps the backward pass (4 of the 6 P*T FLOPs, plus the
        # recomputed layers' forward)
        backward = mb * T * (4 * matmul_params + 2 * m.layer_params * k) / speed.gpu_flops
        moved = lean_memory(m, s.optimizer_choice(job.precision)).transfer_per_step
        t += max(0.0, moved / speed.pcie_bytes_per_s - backward)
    return t
