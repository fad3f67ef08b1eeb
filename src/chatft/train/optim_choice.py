"""The optimizer a training config asks for, built for the plain PyTorch engine.

Four options choose it (``chatft.config.TrainArgs``):

* ``optim`` (Hugging Face's names): ``adamw_torch`` is torch's AdamW with fp32 moments;
  ``adamw_torch_8bit`` / ``adamw_torch_4bit`` are torchao's AdamW8bit / AdamW4bit, whose
  moments are block-quantized tensor subclasses (8 bits + one fp32 scale per 256 elements;
  4 bits + one per 128). torchao quantizes a tensor only when it has >= 4096 elements and
  a multiple of the block; it keeps the others' moments in the weight's dtype, which chatft
  raises to fp32 (:func:`_fp32_plain_states`): bf16 second moments of norm weights and biases
  would lose most of their precision, for a few kilobytes saved.
* ``master_weights`` (bf16 runs): ``fp32`` wraps the optimizer in
  :class:`~chatft.train.optim.MasterWeightAdamW` (the update goes to fp32 masters); ``none``
  updates the bf16 weights directly and writes the fp32 result back with torchao's
  ``bf16_stochastic_round``. Stochastic rounding was chosen over Kahan summation because it
  needs no memory: a Kahan compensation buffer is one more bf16 tensor per weight (2 bytes per
  parameter, 14.2 GiB for a 7.6B model), which is what a 24 GiB GPU cannot spare.
* ``optimizer_in_bwd`` steps one optimizer per parameter from a gradient hook
  (:mod:`chatft.train.in_backward`); ``optimizer_states host`` keeps their moments in host
  memory (:mod:`chatft.train.host_states`).

torchao's update (``single_param_adam``) is plain PyTorch that torchao compiles with
``torch.compile`` (triton kernels on CUDA, C++ on CPU); its compiled C++/CUDA extensions are
for other features and are not loaded. What cannot run on this machine
is a :class:`~chatft.errors.ConfigError`, never a traceback.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from chatft.config import TrainArgs
from chatft.errors import ConfigError
from chatft.train.optim import MasterWeightAdamW, adamw

#: torchao's class for each low-bit ``optim`` choice.
LOW_BIT = {"adamw_torch_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit"}

OptimizerFactory = Callable[[list[dict]], Any]


@functools.cache
def torchao_optim():
    """``torchao.optim``, or a ConfigError saying what is missing. (Its compiled extensions,
    which the optimizers do not use, are never loaded: see ``chatft/__init__.py``.)"""
    try:
        import torchao.optim as ao
    except ImportError as e:
        raise ConfigError(f"train.optim: torchao cannot be imported ({e}); install it with "
                          "pip install 'chatft[lean]' (torchao==0.18.0)") from None
    except Exception as e:  # an incompatible torch: torchao fails while importing
        raise ConfigError(f"train.optim: torchao does not work with torch {torch.__version__} "
                          f"({type(e).__name__}: {e})") from None
    # torch warns once per state class that it cannot hash it for its compile cache.
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching.*")
    return ao


def check_compiler(device: torch.device) -> None:
    """torchao compiles its update; say so clearly when this machine cannot compile."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.optim / master_weights none: torchao compiles its update "
                              "with torch.compile, which needs triton on CUDA (pip install "
                              "triton matching your torch)")
    elif device.type == "cpu":
        import shutil

        from torch._inductor import config as inductor

        cxx = inductor.cpp.cxx[-1] if isinstance(inductor.cpp.cxx, tuple) else inductor.cpp.cxx
        if not any(shutil.which(c) for c in (cxx, "g++", "c++", "clang++") if c):
            raise ConfigError("train.optim / master_weights none: torchao compiles its update "
                              "with torch.compile, which needs a C++ compiler on CPU (g++)")


def compile_in_process() -> None:
    """Compile torchao's update in this process. Inductor otherwise starts a pool of compile
    workers, one per CPU core (16 on a 16-core GPU host), each holding a few hundred MB of host
    memory for the whole run: host memory the lean choices exist to save, for an update of a
    handful of kernels. Measured on the 2-core CPU (tiny model, 8-bit moments on the host): peak
    RSS of the process tree 4.2-4.3 GiB with the default two workers, 3.9 GiB without.
    ``TORCHINDUCTOR_COMPILE_THREADS``, when set, still decides."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        from torch._inductor import config as inductor

        inductor.compile_threads = 1


def _fp32_plain_states(cls: type) -> type:
    """``cls`` (a torchao AdamW) with the moments it leaves unquantized kept in fp32."""

    class Fp32PlainStates(cls):
        def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
            out = super()._new_buffer(p, signed)
            return out.float() if type(out) is torch.Tensor else out

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            # torch casts floating state tensors to their parameter's dtype while loading:
            # put the fp32 moments of bf16 parameters back as they were saved.
            params = [p for g in self.param_groups for p in g["params"]]
            for index, saved in state_dict["state"].items():
                p = params[index]
                for key, value in saved.items():
                    if (type(value) is torch.Tensor and value.dtype == torch.float32
                            and value.shape == p.shape and p.dtype != torch.float32):
                        self.state[p][key] = value.to(p.device)

    Fp32PlainStates.__name__ = Fp32PlainStates.__qualname__ = f"{cls.__name__}Fp32PlainStates"
    return Fp32PlainStates


@functools.cache
def _torchao_class(optim: str) -> type:
    """torchao's AdamW for ``optim``; ``adamw_torch`` means its unquantized ``_AdamW`` (used
    only without master weights, for its stochastic rounding)."""
    ao = torchao_optim()
    return _fp32_plain_states(getattr(ao, LOW_BIT.get(optim, "_AdamW")))


def set_lr(param_groups: list[dict], lr: float) -> None:
    """Set the learning rate; torchao keeps it as a tensor (so changing it does not recompile
    its update), which must be filled in place."""
    for g in param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def optimizer_factory(t: TrainArgs, precision: str, device: torch.device) -> OptimizerFactory:
    """``factory(param_groups) -> optimizer`` for the config's choice at the resolved
    ``precision``; a ConfigError where the choice cannot run here."""
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.master_weights == "none" and precision != "bf16":
        raise ConfigError(f"train.master_weights none needs bf16 weights; this run trains in "
                          f"{precision} (set precision bf16)")
    if t.optimizer_in_bwd and precision == "fp16":
        raise ConfigError("train.optimizer_in_bwd does not run with fp16 (precision auto chose "
                          "it: this GPU has no bf16); set precision fp32")
    if t.optimizer_states == "host" and precision == "bf16" and t.master_weights == "fp32":
        raise ConfigError("train.optimizer_states host needs master_weights none in bf16 runs")
    uses_torchao = t.optim in LOW_BIT or t.master_weights == "none"
    if uses_torchao:
        torchao_optim()
        check_compiler(device)
        compile_in_process()

    def on_weights(groups: list[dict]) -> Any:
        """The optimizer stepping ``groups`` directly (fp32 weights or fp32 masters, or bf16
        weights with stochastic rounding)."""
        if t.optim == "adamw_torch" and not (precision == "bf16" and t.master_weights == "none"):
            return adamw(groups, device=device, **kw)
        return _torchao_class(t.optim)(groups, bf16_stochastic_round=precision == "bf16", **kw)

    if precision == "bf16" and t.master_weights == "fp32":
        def with_masters(groups: list[dict]) -> MasterWeightAdamW:
            inner = None if t.optim == "adamw_torch" else \
                lambda g: _torchao_class(t.optim)(g, **kw)
            return MasterWeightAdamW(groups, device=device, inner=inner, **kw)
        return with_masters
    return on_weights


def build_optimizer(t: TrainArgs, groups: list[dict], precision: str, device: torch.device) -> Any:
    """The plain engine's optimizer over ``groups``: stepped by the engine after backward, or,
    with ``optimizer_in_bwd``, by gradient hooks during it."""
    factory = optimizer_factory(t, precision, device)
    if not t.optimizer_in_bwd:
        return factory(groups)
    from chatft.train.in_backward import InBackwardOptimizer

    return InBackwardOptimizer(groups, factory, device, states_on_host=t.optimizer_states == "host")
