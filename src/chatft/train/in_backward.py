"""The optimizer step fused into the backward pass (``train.optimizer_in_bwd``).

Each trainable parameter gets its own optimizer (built by the same factory as the ordinary
step: torch's AdamW, torchao's low-bit AdamW, with or without fp32 masters) and a
post-accumulate-grad hook: as soon as autograd has finished a parameter's gradient, the hook
adds the gradient's squared norm to the step's total (for logging), updates the parameter and
frees the gradient. Full gradients therefore never exist; at any time the GPU holds the
gradients of the parameters autograd is still working on.

What it excludes, enforced by the config: several micro-batches per step (the first
micro-batch's backward would already update the weights), clipping by the global gradient
norm (it is known only after the last update; the norm is still computed and logged), fp16's
loss scaler (it must see every gradient before any update), DeepSpeed (one process). The
learning rate of a step must be set before its backward pass (:meth:`set_lr` from the engine's
``begin_step``).

With ``states_on_host`` the moments live in host memory and travel to the GPU for each
parameter's update (:class:`~chatft.train.host_states.HostStates`).
"""

from __future__ import annotations

from typing import Any

import torch

from chatft.train.optim_choice import OptimizerFactory, set_lr


class InBackwardOptimizer:
    """One optimizer per parameter, stepped by gradient hooks during backward."""

    def __init__(self, groups: list[dict], factory: OptimizerFactory, device: torch.device,
                 states_on_host: bool = False, max_in_flight: int = 2):
        self.device = device
        self.optimizers: dict[torch.Tensor, Any] = {}
        for g in groups:
            for p in g["params"]:
                self.optimizers[p] = factory([{"params": [p], "weight_decay": g["weight_decay"]}])
        self.states_on_host = states_on_host
        self.host = None
        if states_on_host:
            from chatft.train.host_states import HostStates

            self.host = HostStates(device, max_in_flight)
        self._sq_norm = torch.zeros((), dtype=torch.float32, device=device)
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self.optimizers]

    @property
    def param_groups(self) -> list[dict]:
        # Read each time: loading a state dict replaces each optimizer's group dicts.
        return [pg for o in self.optimizers.values() for pg in o.param_groups]

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        self._sq_norm += torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        optimizer = self.optimizers[p]
        if self.host is not None:
            self.host.update(p, optimizer)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        set_lr(self.param_groups, lr)

    def finish_step(self) -> float:
        """After the backward pass: the global norm of the gradients the step applied."""
        if self.host is not None:
            self.host.finish()
        norm = float(self._sq_norm.sqrt())
        self._sq_norm.zero_()
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.optimizers:
            p.grad = None

    def state_dict(self) -> dict:
        if self.host is not None:
            self.host.wait()
        return {"in_backward": [o.state_dict() for o in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["in_backward"]
        if len(saved) != len(self.optimizers):
            from chatft.errors import ChatftError

            raise ChatftError(f"checkpoint has optimizer states for {len(saved)} parameters, "
                              f"this model has {len(self.optimizers)}")
        for (p, optimizer), s in zip(self.optimizers.items(), saved):
            optimizer.load_state_dict(s)
            if self.host is not None:
                self.host.adopt(p, optimizer)  # one parameter's moments on the GPU at a time

    def master_state(self) -> dict[int, torch.Tensor]:
        """fp32 master weight of each parameter (empty without masters), keyed by ``id``."""
        out: dict[int, torch.Tensor] = {}
        for optimizer in self.optimizers.values():
            if hasattr(optimizer, "master_state"):
                out.update(optimizer.master_state())
        return out

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
