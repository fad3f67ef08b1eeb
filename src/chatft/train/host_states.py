"""Optimizer moments kept in host memory and brought to the GPU one parameter at a time.

Used with the optimizer step in backward (:mod:`chatft.train.in_backward`): when a
parameter's gradient is ready, :meth:`HostStates.update` copies that parameter's moments
host -> GPU, lets the parameter's own optimizer (torch's or torchao's: its state format and
update math) step on the GPU, and copies the moments back, all on a side CUDA stream, so the
copies and the update overlap the rest of the backward pass on the main stream. chatft only
moves tensors: a torchao state is a tensor subclass (``OptimState8bit``: ``codes`` uint8 of
the parameter's shape, ``scale`` fp32 ``[numel / 256]``, ``qmap`` fp32 ``[256]``), moved by
moving its inner tensors (``__tensor_flatten__`` / ``__tensor_unflatten__``).

At most ``max_in_flight`` updates are queued on the side stream: the hook waits for the
oldest before queuing another, so the GPU holds one or two parameters' gradients and moments
in flight, never a growing backlog.

On a machine without CUDA the same code runs, with the copies made on the CPU (there is no
pinned memory and no side stream), so it is tested on CPU.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from chatft.train.optim_memory import SLAB_BYTES, place_in_slab


class HostArena:
    """Host tensors carved from large slabs, pinned when CUDA is there.

    PyTorch's pinned-memory allocator rounds every allocation up to a power of two; allocating
    each moment on its own would nearly double the host memory of a Qwen2-7B's 8-bit moments
    (an MLP matrix's 67.9 MB of codes takes a 128 MiB block). Slabs of a power-of-two size
    waste nothing to that rounding; tensors are placed first-fit and never freed (the
    optimizer's moments live as long as training). A tensor larger than a slab gets its own
    allocation. Each slab holds tensors of one dtype (uint8 codes, fp32 scales, ...):
    ``torch.save`` refuses a storage viewed as two dtypes, and a checkpoint stores the
    optimizer's moments as views of their slabs (each slab written once, whole). ``slab_bytes``
    0: no slabs, every tensor its own (unpinned) allocation -- what a machine without CUDA
    uses."""

    def __init__(self, pin: bool, slab_bytes: int = SLAB_BYTES):
        self.pin, self.slab_bytes = pin, slab_bytes
        self.slabs: dict[torch.dtype, list[torch.Tensor]] = {}  # dtype -> [slab_bytes / itemsize] each
        self.used: dict[torch.dtype, list[int]] = {}  # bytes placed in each slab of a dtype
        self.own_bytes = 0  # tensors too large for a slab

    @property
    def reserved_bytes(self) -> int:
        """Host memory this arena holds."""
        return sum(map(len, self.slabs.values())) * self.slab_bytes + self.own_bytes

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialized host tensor of ``t``'s shape and dtype (contiguous)."""
        size = t.element_size()
        nbytes = t.numel() * size
        used = self.used.setdefault(t.dtype, [])
        where = place_in_slab(used, nbytes, self.slab_bytes) if self.slab_bytes else None
        if where is None:
            self.own_bytes += nbytes
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        index, start = where  # start: a multiple of ALIGN bytes, so of the element size
        slabs = self.slabs.setdefault(t.dtype, [])
        if index == len(slabs):
            slabs.append(torch.empty(self.slab_bytes // size, dtype=t.dtype, pin_memory=self.pin))
        return slabs[index][start // size:start // size + t.numel()].view(t.shape)


def _inner(t: torch.Tensor) -> tuple[list[str], Any]:
    return t.__tensor_flatten__()


def copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` (plain or a traceable tensor subclass) on ``device``, asynchronous from
    pinned memory. Always a copy, also to the same device."""
    if is_traceable_wrapper_subclass(t):
        names, ctx = _inner(t)
        inner = {n: copy_to(getattr(t, n), device) for n in names}
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    return t.to(device, non_blocking=True, copy=True)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for plain tensors and, inner tensor by inner tensor, for subclasses
    (their own ``copy_`` may re-quantize; this copies the stored bits)."""
    if is_traceable_wrapper_subclass(dst):
        for n in _inner(dst)[0]:
            copy_into(getattr(dst, n), getattr(src, n))
    else:
        dst.copy_(src, non_blocking=True)


def empty_host_like(t: torch.Tensor, arena: HostArena) -> torch.Tensor:
    """Host storage for ``t`` (subclasses: for each inner tensor) from ``arena``."""
    if is_traceable_wrapper_subclass(t):
        names, ctx = _inner(t)
        inner = {n: empty_host_like(getattr(t, n), arena) for n in names}
        return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    return arena.empty_like(t)


def nbytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclass) tensor stores."""
    if is_traceable_wrapper_subclass(t):
        return sum(nbytes(getattr(t, n)) for n in _inner(t)[0])
    return t.numel() * t.element_size()


class HostStates:
    """Moments of each parameter in host memory; :meth:`update` steps a parameter on the GPU."""

    def __init__(self, device: torch.device, max_in_flight: int = 2):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.arena = HostArena(pin=self.cuda, slab_bytes=SLAB_BYTES if self.cuda else 0)
        self.max_in_flight = max_in_flight
        self._in_flight: deque = deque()  # CUDA events of queued updates, oldest first
        self.moved_bytes = 0  # host <-> GPU traffic so far (both directions)
        self._host: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # param -> its host moments

    @property
    def host_bytes(self) -> int:
        """Bytes of the moments held in host memory."""
        return sum(nbytes(t) for moments in self._host.values() for t in moments.values())

    @staticmethod
    def _moments(p: torch.Tensor, state: dict) -> list[str]:
        """State entries shaped like the parameter (the moments); step counters stay put."""
        return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape]

    def _to_host(self, p: torch.Tensor, state: dict) -> None:
        """Copy the moments in ``state`` (on the GPU) into their host storage and point the
        optimizer's state at the host copies; the GPU copies are freed after their last use
        on the side stream."""
        host = self._host.setdefault(p, {})
        for k in self._moments(p, state):
            if state[k] is host.get(k):
                continue  # already the host copy
            if k not in host:
                host[k] = empty_host_like(state[k], self.arena)
            copy_into(host[k], state[k])
            self.moved_bytes += nbytes(state[k])
            state[k] = host[k]

    def _to_device(self, p: torch.Tensor, state: dict) -> None:
        for k, host in self._host.get(p, {}).items():
            state[k] = copy_to(host, self.device)
            self.moved_bytes += nbytes(host)

    def _side_stream(self):
        """The side stream, after the work queued so far on the current one (a gradient or
        loaded moments are ready); a no-op context without CUDA."""
        if not self.cuda:
            return nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def update(self, p: torch.Tensor, optimizer: Any) -> None:
        """Step ``optimizer`` (which holds only ``p``) with ``p.grad``, then free the grad."""
        state = optimizer.state[p]
        with self._side_stream():
            self._to_device(p, state)
            if self.cuda:
                p.grad.record_stream(self.stream)  # its memory is reused only after the update
            optimizer.step()  # first step: creates the moments, on the GPU
            optimizer.zero_grad(set_to_none=True)
            self._to_host(p, state)
            if self.cuda:
                self._in_flight.append(self.stream.record_event())
        while len(self._in_flight) > self.max_in_flight:
            self._in_flight.popleft().synchronize()

    def adopt(self, p: torch.Tensor, optimizer: Any) -> None:
        """Move moments just loaded onto the GPU (a resumed checkpoint) to the host."""
        with self._side_stream():
            self._to_host(p, optimizer.state[p])
        self.wait()

    def finish(self) -> None:
        """The main stream waits for every queued update (next forward reads the weights)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._in_flight.clear()

    def wait(self) -> None:
        """The host waits for every queued copy (before the host reads the moments)."""
        if self.cuda:
            self.stream.synchronize()
            self._in_flight.clear()
