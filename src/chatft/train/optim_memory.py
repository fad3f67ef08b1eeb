"""Memory of each optimizer choice, per parameter tensor: pure arithmetic for the planner.

A choice is :class:`OptimizerChoice` (``train.optim``, ``master_weights``,
``optimizer_in_bwd``, ``optimizer_states`` at a resolved precision). For a model given as the
element counts of its parameter tensors, :func:`optimizer_memory` returns what lives on the GPU
for the whole run, what lives in host memory, what exists only for a moment during a step, and
how many bytes cross PCIe per step. No torch needed.

Bytes of one parameter tensor of ``n`` elements (``w``: the training weight, 2 in bf16, 4 in
fp32 and in fp16 runs, which keep fp32 weights):

* weights ``w*n``; gradients ``w*n`` (none with ``optimizer_in_bwd``: each is freed once its
  parameter is updated); fp32 master weights ``4n`` (bf16 with ``master_weights fp32``).
* Adam moments (:func:`moment_bytes`): ``adamw_torch`` two fp32 tensors, ``8n``. torchao's
  8-bit AdamW quantizes a tensor with ``n >= 4096`` and ``n % 256 == 0``: per moment ``n``
  uint8 codes, one fp32 scale per 256 elements and a 256-entry fp32 code map, i.e.
  ``2 * (n + 4n/256 + 1024)``. 4-bit (block 128): ``2 * (n/2 + 4n/128 + 64)``. Tensors it
  does not quantize keep fp32 moments (``8n``; chatft's rule, see chatft.train.optim_choice).
  On the GPU, or in host memory with ``optimizer_states host``, where they are carved from
  1 GiB slabs (:func:`first_fit_slabs`, the same placement as
  :class:`chatft.train.host_states.HostArena`).
* A step counter per tensor (4 bytes) is ignored.

Transient GPU memory (on top of weights, states and activations), for the largest tensor
``E``: the ordinary step holds every gradient already (counted above) plus the update's work
space; in backward, a parameter's gradient exists from the moment autograd finishes it until
its update ran. With host states up to ``max_in_flight + 1`` parameters are in flight (the
hook waits for the oldest before queuing another), each with its gradient and a GPU copy of
its moments. The update's work space: torch's fused AdamW works in place (0); fp32 masters
upcast a chunk of gradients (``4`` bytes per element of the chunk, the tensor itself in
backward; a chunk holds up to ``2^28 + E`` elements); torchao's compiled update allocates
``UPDATE_WORKSPACE_BYTES`` per element of the tensor it updates (read from the code inductor
generates). In backward the parameters in flight are consecutive in gradient order, so the
bound is taken over windows of ``max_in_flight + 1`` consecutive tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
#: Block size of torchao's quantized moments, per low-bit choice.
BLOCK = {"adamw_torch_8bit": 256, "adamw_torch_4bit": 128}
#: torchao quantizes only tensors with at least this many elements.
MIN_QUANTIZED_NUMEL = 4096
#: Host slab size and alignment (chatft.train.host_states).
SLAB_BYTES = 1 << 30
ALIGN = 512
#: Work space of torchao's compiled update, bytes per element of the updated tensor: the
#: buffers inductor's generated code allocates (torch 2.13, CPU: two fp32 tensors for 8-bit;
#: two fp32, two int64 and two packed uint8 for 4-bit; none for the unquantized update). The
#: CUDA code may fuse more; ``bench/lean_7b.py`` measures it on the GPU: once it has run, set
#: each value from ``probe.workspace.<optim>.bytes_per_element`` of
#: ``bench/results/lean_7b_h200x1.json`` (the memory planner's lean rows use this table).
UPDATE_WORKSPACE_BYTES = {"adamw_torch_8bit": 8, "adamw_torch_4bit": 25, "adamw_torch": 0}
#: MasterWeightAdamW's chunk: it upcasts parameters to fp32 until a chunk has this many
#: elements (``chunk_numel`` in chatft.train.optim).
MASTER_CHUNK_NUMEL = 1 << 28
#: bytes per element of the weights being trained, per resolved precision
WEIGHT_BYTES = {"bf16": 2, "fp16": 4, "fp32": 4}


def is_quantized(numel: int, optim: str) -> bool:
    """Whether torchao stores this tensor's moments block-quantized."""
    block = BLOCK.get(optim)
    return block is not None and numel >= MIN_QUANTIZED_NUMEL and numel % block == 0


def moment_parts(numel: int, optim: str) -> list[tuple[int, str]]:
    """``(bytes, dtype)`` of each stored tensor of one parameter's two moments (codes, scales,
    code map, or the plain fp32 tensors): what is allocated and moved."""
    if not is_quantized(numel, optim):
        return [(4 * numel, "float32")] * 2
    block = BLOCK[optim]
    if optim == "adamw_torch_8bit":  # uint8 codes, fp32 scales, fp32 map
        moment = [(numel, "uint8"), (4 * numel // block, "float32"), (4 * 256, "float32")]
    else:  # packed 4-bit codes, scales, map
        moment = [(numel // 2, "uint8"), (4 * numel // block, "float32"), (4 * 16, "float32")]
    return moment + moment


def moment_bytes(numel: int, optim: str) -> int:
    """Bytes of one parameter tensor's Adam moments (both of them)."""
    return sum(size for size, _ in moment_parts(numel, optim))


def place_in_slab(used: list[int], size: int, slab_bytes: int = SLAB_BYTES,
                  align: int = ALIGN) -> tuple[int, int] | None:
    """First fit of a tensor of ``size`` bytes: ``(slab index, start offset)``, with ``used``
    (bytes used of each slab so far) updated and a new slab appended when none has room;
    None for a tensor larger than a slab (it gets an allocation of its own). Every tensor
    starts at a multiple of ``align``."""
    if size > slab_bytes:
        return None
    for i, u in enumerate(used):
        start = -(-u // align) * align
        if start + size <= slab_bytes:
            used[i] = start + size
            return i, start
    used.append(size)
    return len(used) - 1, 0


def pinned_block(nbytes: int) -> int:
    """Host memory PyTorch's pinned allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def first_fit_slabs(parts: Sequence[tuple[int, str]], slab_bytes: int = SLAB_BYTES,
                    align: int = ALIGN) -> tuple[list[int], int]:
    """Place tensors of ``parts`` (``(bytes, dtype)``; each dtype has slabs of its own, as in
    the arena) in arrival order with :func:`place_in_slab`; returns (bytes used of each slab,
    dtype by dtype in order of first appearance; pinned bytes of the tensors allocated alone)."""
    used: dict[str, list[int]] = {}
    own = 0
    for size, kind in parts:
        if place_in_slab(used.setdefault(kind, []), size, slab_bytes, align) is None:
            own += pinned_block(size)
    return [u for kind_used in used.values() for u in kind_used], own


@dataclass(frozen=True)
class OptimizerChoice:
    """The optimizer options of a run at its resolved precision."""

    precision: str = "bf16"
    optim: str = "adamw_torch"
    master_weights: str = "fp32"
    optimizer_in_bwd: bool = False
    optimizer_states: str = "device"
    max_in_flight: int = 2

    @classmethod
    def from_train_args(cls, t: Any, precision: str) -> "OptimizerChoice":
        return cls(precision=precision, optim=t.optim, master_weights=t.master_weights,
                   optimizer_in_bwd=t.optimizer_in_bwd, optimizer_states=t.optimizer_states)

    @property
    def has_masters(self) -> bool:
        return self.precision == "bf16" and self.master_weights == "fp32"

    @property
    def uses_torchao(self) -> bool:
        return self.optim in BLOCK or (self.precision == "bf16" and self.master_weights == "none")


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes for a whole model (see the module docstring for each term)."""

    weights: int
    gradients: int  # 0 with optimizer_in_bwd
    masters: int
    moments: int  # wherever they live
    device: int  # on the GPU for the whole run: weights + gradients + masters (+ moments)
    host: int  # moments in host memory (0 unless optimizer_states host)
    host_reserved: int  # host memory the slabs take (>= host)
    transient_device: int  # largest extra GPU memory during a step
    transfer_per_step: int  # host <-> GPU bytes per optimizer step (both directions)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.__dict__.items()}


def optimizer_memory(numels: Sequence[int], c: OptimizerChoice) -> OptimizerMemory:
    """Memory of training a model whose parameter tensors have ``numels`` elements (in the
    order their gradients become ready: the reverse of the forward order) with choice ``c``."""
    w = WEIGHT_BYTES[c.precision]
    total = sum(numels)
    weights = w * total
    gradients = 0 if c.optimizer_in_bwd else w * total
    masters = 4 * total if c.has_masters else 0
    moments = sum(moment_bytes(n, c.optim) for n in numels)
    on_host = c.optimizer_states == "host"
    device = weights + gradients + masters + (0 if on_host else moments)
    host = moments if on_host else 0
    if on_host:
        used, own = first_fit_slabs([p for n in numels for p in moment_parts(n, c.optim)])
        host_reserved = len(used) * SLAB_BYTES + own
    else:
        host_reserved = 0
    largest = max(numels)
    workspace = UPDATE_WORKSPACE_BYTES[c.optim] * largest if c.uses_torchao else 0
    if c.has_masters:  # fp32 gradients of one chunk (ordinary step) or one tensor (in backward)
        workspace += 4 * (largest if c.optimizer_in_bwd else min(total, MASTER_CHUNK_NUMEL + largest))
    if not c.optimizer_in_bwd:
        transient = workspace
    elif on_host:  # gradient + GPU copy of the moments of each parameter in flight
        k = min(c.max_in_flight + 1, len(numels))
        transient = workspace + max(sum(w * n + moment_bytes(n, c.optim) for n in numels[i:i + k])
                                    for i in range(len(numels) - k + 1))
    else:  # the hook updates synchronously: one gradient at a time
        transient = w * largest + workspace
    return OptimizerMemory(weights=weights, gradients=gradients, masters=masters, moments=moments,
                           device=device, host=host, host_reserved=host_reserved,
                           transient_device=transient,
                           transfer_per_step=2 * moments if on_host else 0)
