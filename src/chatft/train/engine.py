"""Training engines: DeepSpeed (ZeRO 0-3, offload, many processes) or plain PyTorch (one process).

:class:`Engine` is the interface: every call the training loop (:mod:`chatft.train.loop`)
makes, so there is one loop for one CPU, one GPU and many GPUs, and the loop never asks which
engine it has. :class:`TorchEngine` and :class:`DeepSpeedEngine` implement it.

The plain engine exists because on a single GPU DeepSpeed's mixed precision keeps an extra
fp32 gradient copy (4 bytes/parameter) that does not fit a 7B model next to its optimizer on
one 141 GB GPU; :class:`~chatft.train.optim.MasterWeightAdamW` avoids it. Everything
distributed (ZeRO, offload, several processes) runs on DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch
import torch.distributed as dist

from chatft.config import TrainArgs
from chatft.errors import ChatftError, ConfigError
from chatft.export.hf import TrainedWeights
from chatft.integrity import pickles
from chatft.train.batching import Batch
from chatft.train.loss import CausalLMLoss
from chatft.train.optim import MasterWeightAdamW, adamw, param_groups
from chatft.train.optim_choice import build_optimizer, set_lr
from chatft.train.optim_memory import first_fit_slabs, moment_bytes, moment_parts

log = logging.getLogger("chatft")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Forward(Protocol):
    """What the held-out loss needs (:func:`chatft.train.loop.evaluate`): a training engine,
    or :class:`TorchForward` for a model that is only evaluated (``chatft eval``)."""

    device: torch.device
    rank: int
    world_size: int
    precision: str
    """bf16, fp16 or fp32 (resolved; never auto)."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of token losses, trained tokens)`` of one micro-batch on this process."""
        ...

    def eval_mode(self) -> ContextManager[None]:
        """Evaluation inside the block: dropout off, no autograd; training mode after it."""
        ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all processes, in place; returns it."""
        ...


class Engine(TrainedWeights, Forward, Protocol):
    """What the training loop calls. Export needs only the :class:`TrainedWeights` part
    (``model``, ``device``, ``rank``, ``full_state_dict``, ``release``, ``barrier``)."""

    description: str
    """How it trains, for the start line: "PyTorch", "DeepSpeed ZeRO-2"."""
    kind: str
    """"torch" or "deepspeed": recorded in checkpoints, whose state ``chatft export`` reads by it."""
    writes_checkpoint: bool
    """Whether this process writes a part of every checkpoint (DeepSpeed: every process its
    shard; plain: the one process)."""
    lr_managed_externally: bool
    """True when a DeepSpeed JSON brings its own scheduler: :meth:`current_lr` is then the rate."""

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate gradients; ``last_micro_batch`` closes the optimizer step's accumulation."""
        ...

    def begin_step(self, lr: float | None) -> None:
        """Before a step's first forward: engines that update during the backward pass take
        the step's learning rate ``lr`` here."""
        ...

    def step(self, lr: float | None, skip: bool = False) -> float:
        """Clip, update with learning rate ``lr`` (None: keep the scheduler's), zero gradients;
        returns the global gradient norm before clipping. With ``skip`` (the step's loss is not
        finite), or when that norm is not finite, there is no update: the gradients are
        dropped and weights and optimizer state stay as they were (under fp16 the loss
        scaler decides about the norm, lowering its scale)."""
        ...

    def finite_weights(self) -> bool:
        """Whether this process's weights (its partition under ZeRO-3) are all finite."""
        ...

    def checkpoint_bytes(self) -> int:
        """About how many bytes this process's part of a checkpoint takes: the tensors
        :meth:`save` writes, the optimizer's moments for every trainable parameter included
        whether or not they exist yet (optimizers create them at their first step, so before
        step 1 this is still the full size). Files beside them (config, tokenizer, trainer
        state, manifest) are not counted."""
        ...

    def current_lr(self) -> float:
        ...

    def save(self, folder: Path, client_state: dict) -> None:
        """Write this process's part of the model and optimizer state into ``folder``."""
        ...

    def load(self, folder: Path) -> dict:
        """Restore the state :meth:`save` wrote; returns its ``client_state``. Nothing in the
        files can run code (:mod:`chatft.integrity.pickles`)."""
        ...

    def load_weights(self, folder: Path) -> None:
        """Replace the weights with those of the checkpoint :meth:`save` wrote into ``folder``,
        in place (no second copy of the model on the device), for the export of the best
        checkpoint; the optimizer's state is not restored, so training cannot continue."""
        ...



def resolve_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """``auto`` -> bf16 where the hardware supports it, else fp16 on GPUs, fp32 on CPU.
    Returns ``(precision, message for the user or None)``."""
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision bf16: this GPU does not support bfloat16; use fp16")
        return requested, None
    if device.type != "cuda":
        return "fp32", "precision fp32 (CPU training)"
    if torch.cuda.is_bf16_supported():
        return "bf16", ("precision bf16: the GPU supports it, and unlike fp16 it needs no loss "
                        "scaling and does not overflow")
    return "fp16", "precision fp16 with dynamic loss scaling (this GPU has no bf16)"


def training_device() -> torch.device:
    if torch.cuda.is_available():
        # srun --gpus-per-task shows each process only its own GPU: index 0, not LOCAL_RANK.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


class _Shared:
    """What both engines do the same way: collectives (the plain engine's group is itself), the
    learning rate, and evaluation mode of the loss wrapper."""

    rank: int = 0
    world_size: int = 1
    wrapper: CausalLMLoss
    optimizer: Any

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        self.wrapper.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.wrapper.train()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def begin_step(self, lr: float | None) -> None:
        """Called before a step's first forward; engines that update during the backward pass
        take the step's learning rate here."""


def _all_finite(tensors) -> bool:
    """One device sync for all of them: the flags are and-ed on the device first."""
    ok = None
    for t in tensors:
        if t.numel():
            flag = torch.isfinite(t).all()
            ok = flag if ok is None else ok & flag.to(ok.device)
    return True if ok is None else bool(ok)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (an optimizer's state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0



class TorchForward(_Shared):
    """A model and its loss on one process, without an optimizer: what evaluating a model that
    is not being trained needs (``chatft eval``), and the forward pass of :class:`TorchEngine`."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device,
                 fused_kernel: str):
        self.device, self.precision = device, precision
        self.model = model.to(device)
        self.wrapper = CausalLMLoss(self.model, fused_kernel)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = (torch.autocast(self.device.type, dtype=torch.float16) if self.precision == "fp16"
               else nullcontext())
        with ctx:
            b = batch.to(self.device)
            return self.wrapper(b.input_ids, b.position_ids, b.targets, b.attention_mask)


class TorchEngine(TorchForward):
    """One process, no DeepSpeed. fp32; bf16 weights + fp32 masters (or none, see
    ``train.master_weights``); or fp16 autocast with a gradient scaler (fp32 weights). The
    optimizer is the config's choice (:mod:`chatft.train.optim_choice`), stepped here after
    backward or, with ``optimizer_in_bwd``, during it."""

    description = "PyTorch"
    kind = "torch"
    writes_checkpoint = True  # the one process
    lr_managed_externally = False

    def __init__(self, args: TrainArgs, model: torch.nn.Module, precision: str,
                 device: torch.device, fused_kernel: str):
        super().__init__(model, precision, device, fused_kernel)
        self.max_grad_norm = args.max_grad_norm
        self.optim = args.optim
        groups = param_groups(self.model, args.weight_decay)
        self.optimizer: Any = build_optimizer(args, groups, precision, device)
        self.in_backward = args.optimizer_in_bwd
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._params = [p for g in groups for p in g["params"]]

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def begin_step(self, lr: float | None) -> None:
        if self.in_backward and lr is not None:
            self.optimizer.set_lr(lr)

    def step(self, lr: float | None, skip: bool = False) -> float:
        if self.in_backward:
            # The backward pass applied the update already: a bad step cannot be skipped here;
            # the loop still counts it, stops after max_bad_steps, and never saves
            # non-finite weights.
            return self.optimizer.finish_step()
        if lr is not None:
            set_lr(self.optimizer.param_groups, lr)
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Norm in fp32 whatever the gradient dtype (bf16 sums lose precision).
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])) if grads \
            else torch.zeros((), device=self.device)
        if skip or (self.scaler is None and not torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # closes the unscale_ above (and lowers the scale on inf)
            return float(norm)
        scale = 1.0
        if self.max_grad_norm > 0:
            scale = float(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        if isinstance(self.optimizer, MasterWeightAdamW):
            self.optimizer.step(grad_scale=scale)
        else:
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder: Path, client_state: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # "model" holds the trained weights at full precision (fp32 masters in bf16 runs), so
        # export from a checkpoint loses nothing.
        torch.save({"model": self.full_state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "client_state": client_state}, folder / "engine_state.pt")

    def load(self, folder: Path) -> dict:
        # Optimizer states kept on the host are loaded there (the GPU holds one parameter's
        # at a time while they move); everything else straight onto the device.
        where = "cpu" if getattr(self.optimizer, "states_on_host", False) else self.device
        state = pickles.load_data(folder / "engine_state.pt", map_location=where)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        return state["client_state"]

    def load_weights(self, folder: Path) -> None:
        # Memory-mapped: tensors are read from the file as they are copied, one at a time,
        # into the existing weights (and fp32 masters), so neither host nor GPU memory holds
        # a second model; the optimizer's moments in the same file are never read.
        saved = torch.load(folder / "engine_state.pt", map_location="cpu", mmap=True,
                           weights_only=True)["model"]
        masters = self.optimizer.master_state() if hasattr(self.optimizer, "master_state") else {}
        with torch.no_grad():
            for name, tensor in self.model.state_dict(keep_vars=True).items():
                master = masters.get(id(tensor))
                if master is not None:
                    master.copy_(saved[name])
                tensor.copy_(saved[name])  # a bf16 weight is its master rounded, as a step does

    def finite_weights(self) -> bool:
        masters = (self.optimizer.master_state().values()
                   if hasattr(self.optimizer, "master_state") else ())
        return _all_finite([*self._params, *masters])

    def checkpoint_bytes(self) -> int:
        # "model": what full_state_dict writes, one copy per name (tied weights twice), the
        # fp32 master where a parameter has one. "optimizer": the masters again
        # (MasterWeightAdamW's state) and the Adam moments of every trainable parameter, as the
        # configured optimizer stores them (optim_memory.moment_parts: fp32, or low-bit codes,
        # scales and code map); they are counted, not read, because before step 1 they do not
        # exist. With moments in host slabs a checkpoint writes each slab whole.
        masters = self.optimizer.master_state() if hasattr(self.optimizer, "master_state") else {}
        named = dict(self.model.named_parameters(remove_duplicate=False))
        model = 0
        for name, tensor in self.model.state_dict().items():
            src = masters.get(id(named[name]), tensor) if name in named else tensor
            model += _tensor_bytes(src)
        # in about the order gradients become ready (the reverse of the model's), in which
        # host slabs are filled
        where = {id(p): i for i, p in enumerate(self.model.parameters())}
        order = sorted(self._params, key=lambda p: -where[id(p)])
        parts = [part for p in order for part in moment_parts(p.numel(), self.optim)]
        arena = getattr(getattr(self.optimizer, "host", None), "arena", None)
        if arena is not None and arena.slab_bytes:
            used, _ = first_fit_slabs(parts, arena.slab_bytes)
            moments = len(used) * arena.slab_bytes + sum(n for n, _ in parts if n > arena.slab_bytes)
        else:
            moments = sum(n for n, _ in parts)
        return model + _tensor_bytes(list(masters.values())) + moments

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Trained weights (fp32 masters when training in bf16) on the CPU, cast to ``dtype``
        on the device first when given (half the host memory and copy time for bf16)."""
        masters = self.optimizer.master_state() if hasattr(self.optimizer, "master_state") else {}
        named = dict(self.model.named_parameters(remove_duplicate=False))
        out = {}
        for name, tensor in self.model.state_dict().items():
            p = named.get(name)
            src = masters.get(id(p), tensor) if p is not None else tensor
            out[name] = src.detach().to(dtype or src.dtype).to("cpu", copy=True)
        return out

    def release(self) -> None:
        """Drop the optimizer and the model so their device memory can be reused (export)."""
        if self.in_backward:  # its gradient hooks would keep it alive
            self.optimizer.remove_hooks()
        self.optimizer = self.wrapper = self.model = None


class DeepSpeedEngine(_Shared):
    """ZeRO stage 0-3 with optional CPU offload, any number of processes and nodes."""

    kind = "deepspeed"
    writes_checkpoint = True  # every process saves its shard

    def __init__(self, args: TrainArgs, build_model: Callable[[torch.device | None], torch.nn.Module],
                 ds_config: dict, precision: str, device: torch.device, fused_kernel: str):
        import deepspeed

        self.device, self.precision = device, precision
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        zero = ds_config.get("zero_optimization", {})
        stage = self.stage = int(zero.get("stage", 0))
        self.description = f"DeepSpeed ZeRO-{stage}"
        offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
        if stage == 3:
            # Keeps transformers' ZeRO-3 integration active while the model is built, so its
            # weights are created partitioned (deepspeed.zero.Init) instead of whole per rank.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(ds_config)
        model = build_model(None if stage == 3 else device)
        self.model = model
        self.wrapper = CausalLMLoss(model, fused_kernel)
        if stage == 3 and fused_kernel == "liger":
            # Liger reads lm_head.weight outside lm_head's own forward: tell ZeRO-3 to gather it.
            deepspeed.zero.register_external_parameter(self.wrapper, model.get_output_embeddings().weight)
        optimizer = None
        if "optimizer" not in ds_config:
            groups = param_groups(model, args.weight_decay)
            betas = (args.adam_beta1, args.adam_beta2)
            if offload:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=betas,
                                             eps=args.adam_epsilon, adamw_mode=True)
            else:
                optimizer = adamw(groups, lr=args.learning_rate, betas=betas,
                                  eps=args.adam_epsilon, device=device)
        self.lr_managed_externally = "scheduler" in ds_config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.wrapper, optimizer=optimizer, config=ds_config,
            model_parameters=None if optimizer is not None else
            [p for p in self.wrapper.parameters() if p.requires_grad])
        if stage == 3:
            # Models built from here on (export, generation) must be ordinary, whole ones.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            del self._hf_ds
            unset_hf_deepspeed_config()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch.to(self.engine.device)
        return self.engine(b.input_ids, b.position_ids, b.targets, b.attention_mask)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # chatft decides the accumulation boundary (micro-batch counts may vary per step).
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        # A non-finite loss (an inf can still have finite gradients) makes every gradient NaN,
        # so DeepSpeed's ZeRO optimizers skip the update through their own overflow path,
        # which also clears their partitioned gradient buffers. x 1.0 changes no bit otherwise,
        # and the factor is computed on the device: no sync per micro-batch.
        value = loss.detach()
        poison = torch.where(torch.isfinite(value), torch.ones_like(value),
                             torch.full_like(value, float("nan")))
        self.engine.backward(loss * poison, scale_wrt_gas=False)

    def step(self, lr: float | None, skip: bool = False) -> float:
        if lr is not None and not self.lr_managed_externally:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        if self.stage == 0 and self.precision != "fp16":
            # Without ZeRO nothing in DeepSpeed checks the gradients (fp16's optimizer does):
            # they are whole on every process here, so look before stepping.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])) if grads \
                else torch.zeros(())
            if skip or not torch.isfinite(norm):
                self.engine.zero_grad()
                return float(norm)
            # DeepSpeed reports no norm here (get_global_grad_norm is None without ZeRO's or
            # fp16's optimizer): the one computed above is the step's.
            self.engine.step()
            return float(norm)
        # ZeRO 1-3: non-finite gradients (a non-finite loss made them NaN, see backward) make
        # DeepSpeed's optimizer skip the update and report an infinite norm.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def finite_weights(self) -> bool:
        # ZeRO-3 keeps each process's partition in ds_tensor (the parameter itself is empty).
        return _all_finite([getattr(p, "ds_tensor", p.data) for p in self.model.parameters()])

    def checkpoint_bytes(self) -> int:
        # The inner optimizer (torch's or DeepSpeed's AdamW) steps fp32 tensors: under ZeRO this
        # process's partitions, without it the model's own fp32 weights (or the fp32 copies of
        # DeepSpeed's fp16/bf16 wrapper). Each gets two fp32 moments, counted whether or not
        # they exist yet, and a tensor that is not a model weight is written as well. Process
        # 0 also writes the model's working weights (not under ZeRO-3, which keeps them only in
        # the partitions). Without ZeRO process 0 writes everything.
        if self.stage == 0 and self.rank != 0:
            return 0
        if self.stage == 3:  # its fp32 partitions (some may be on NVMe) meet the inner
            # optimizer only while it steps them; their sizes stay here
            copies, own = list(self.optimizer.fp16_partitioned_groups_flat_numel), []
        else:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            weights = {id(p) for p in self.model.parameters()}
            stepped = [p for g in inner.param_groups for p in g["params"]]
            copies = [p.numel() for p in stepped if id(p) not in weights]
            own = [p.numel() for p in stepped if id(p) in weights]
        total = sum(4 * n + moment_bytes(n, "adamw_torch") for n in copies)
        total += sum(moment_bytes(n, "adamw_torch") for n in own)
        if self.rank == 0 and self.stage < 3:
            total += sum(_tensor_bytes(p.data) for p in self.model.parameters())
        return total

    def save(self, folder: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine", client_state=client_state,
                                    save_latest=False)

    def load(self, folder: Path) -> dict:
        # A checkpoint of another process count or ZeRO stage is read from the universal
        # checkpoint converted next to its shards (see chatft.train.reshape).
        tag = "universal" if self.engine.load_universal_checkpoint() else "engine"
        with pickles.deepspeed_loading(sorted((folder / tag).rglob("*.pt"))):
            _, client_state = self.engine.load_checkpoint(str(folder), tag=tag)
        if client_state is None:
            raise ChatftError(f"{folder}: DeepSpeed could not load this checkpoint")
        return client_state

    def load_weights(self, folder: Path) -> None:
        # ZeRO-0/1/2: the module's weights from its model-states file, each rank copying them
        # in place; DeepSpeed then refreshes its fp32 partitions from them. ZeRO-3 keeps the
        # weights only in the partitioned optimizer state, so each rank loads its own shard
        # (with the moments: DeepSpeed's only loader of that shard that needs no gathering).
        stage3 = self.engine.zero_optimization_partition_weights()
        with pickles.deepspeed_loading(sorted((folder / "engine").glob("*.pt"))):
            path, _ = self.engine.load_checkpoint(str(folder), tag="engine",
                                                  load_optimizer_states=stage3,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise ChatftError(f"{folder}: DeepSpeed could not load this checkpoint's weights")

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All weights on rank 0 (other ranks: empty); every rank must call it (ZeRO-3 gathers).
        These are the engine's working weights (bf16 in bf16 runs): what bf16 export writes."""
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name, tensor in self.model.state_dict().items():
            p = params.get(name)
            if p is not None and hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        out[name] = p.data.detach().to(dtype or p.dtype).to("cpu", copy=True)
            elif self.rank == 0:
                out[name] = tensor.detach().to(dtype or tensor.dtype).to("cpu", copy=True)
        return out

    def release(self) -> None:
        """Drop engine, optimizer and model so their memory can be reused (export)."""
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = self.optimizer = self.wrapper = self.model = None
