"""The memory planner's inputs: a training :class:`Job` (what does not change between ways of
running it), a :class:`Strategy` (engine, ZeRO stage, offload, recomputation, optimizer
options), and the constants fitted to or assumed for the hardware (:class:`Calibration`,
:class:`SpeedModel`). Plain data; the arithmetic is :mod:`chatft.train.plan.cost`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chatft.train.optim_memory import OptimizerChoice
from chatft.train.plan.shape import ModelShape

Attention = Literal["sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"]
Precision = Literal["bf16", "fp16", "fp32"]
LossKernel = Literal["chunked", "fused", "full"]


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
    # Memory-lean optimizer options (chatft's train.* names; plain engine, bf16 only).
    optim: str = "adamw_torch"
    master_weights: str = "fp32"
    optimizer_in_bwd: bool = False
    optimizer_states: str = "device"

    @property
    def lean_options(self) -> int:
        """How many optimizer options differ from the default (fp32 AdamW with fp32 masters,
        stepped after backward, states on the GPU): a tie in speed goes to the fewest."""
        return sum((self.optim != "adamw_torch", self.master_weights != "fp32",
                    self.optimizer_in_bwd, self.optimizer_states != "device"))

    def optimizer_choice(self, precision: str) -> OptimizerChoice:
        return OptimizerChoice(precision=precision, optim=self.optim,
                               master_weights=self.master_weights,
                               optimizer_in_bwd=self.optimizer_in_bwd,
                               optimizer_states=self.optimizer_states)

    @property
    def engine_label(self) -> str:
        if self.backend == "torch":
            parts = [{"adamw_torch_8bit": "8-bit Adam", "adamw_torch_4bit": "4-bit Adam"}.get(
                self.optim, ""), "bf16 SR" if self.master_weights == "none" else "",
                "step in bwd" if self.optimizer_in_bwd else "",
                "host states" if self.optimizer_states == "host" else ""]
            parts = [x for x in parts if x]
            return "plain" + (" + " + ", ".join(parts) if parts else "")
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
        if self.lean_options:
            opts += ["--optim", self.optim, "--master_weights", self.master_weights,
                     "--optimizer_in_bwd", str(self.optimizer_in_bwd).lower(),
                     "--optimizer_states", self.optimizer_states]
            if self.optimizer_in_bwd:  # it cannot clip by the global norm
                opts += ["--max_grad_norm", "0"]
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
    # assumed; bench/lean_7b.py's probe measures the pinned copy rate each way
    # (h2d_gb_per_s, d2h_gb_per_s of bench/results/lean_7b_h200x1.json): set it from there
    host_adam_bytes_per_s: float = 40e9  # host memory streamed by the CPU Adam step (whole node)
    cpu_adam_bytes_per_param: int = 16  # fp32 master, grad, two moments read/written once


DEFAULT_CALIBRATION = Calibration()
DEFAULT_SPEED = SpeedModel()
