"""Instantiating the model to train: weights, dtype, attention kernel, fused kernels.

Weights are created on the CPU (or directly on the GPU for random-init benchmarks, which would
otherwise spend minutes initializing 7B parameters on the host); the training engine moves or
partitions them. No ``device_map``: it fights ZeRO-3's own partitioning.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from chatft.config import ModelArgs
from chatft.model.loading import ModelSource, model_config

log = logging.getLogger("chatft")



def resolve_attention(requested: str, device: torch.device,
                      dtype: torch.dtype = torch.bfloat16) -> str:
    """``auto`` -> the fastest kernel for packed batches on this device: varlen FlashAttention
    on CUDA in bf16/fp16 when torch has it (FlashAttention has no fp32 kernel; measured on 1xH200, Qwen2-7B shape, packed micro-batches of at
    most 4,096 tokens: 9,368 tokens/s vs 6,848 with SDPA; flex attention, which recompiles for
    each new packed length, ran at 2,441 vs SDPA's 7,209 with recomputation on); SDPA elsewhere
    (it derives the block-diagonal mask from position_ids)."""
    if requested != "auto":
        return requested
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("torch.nn.attention.varlen") is not None):
        return "varlen"
    return "sdpa"


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(args: ModelArgs, device: torch.device) -> bool:
    if args.liger_kernel == "off" or device.type != "cuda":
        return False
    if args.liger_kernel == "on" and not liger_available():
        from chatft.errors import ChatftError

        raise ChatftError("liger_kernel on: the liger-kernel package is not installed "
                          "(pip install liger-kernel)")
    return liger_available()


def build_model(args: ModelArgs, source: ModelSource, *, dtype: torch.dtype,
                device: torch.device, seed: int, gradient_checkpointing: bool,
                max_length: int | None = None):
    """The ``*ForCausalLM`` to train, in ``dtype``, in training mode.

    ``device`` is where random weights are created (real weights always load on the CPU);
    ``max_length`` lets a Qwen-1 model warn when training goes past its trained context.
    """
    from transformers import AutoModelForCausalLM

    attn = resolve_attention(args.attn_implementation, device, dtype)
    if attn == "varlen":
        from chatft.model.attention import register

        register()
    if args.random_init:
        config = model_config(source)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = load_pretrained(source, dtype=dtype, attn_implementation=attn,
                                max_length=max_length)
    model.config.use_cache = False
    if use_liger(args, device):
        if args.compile:
            # Dynamo cannot trace Liger's autograd Functions (torch 2.11 fails with an
            # assertion in the first RMSNorm); inductor fuses RMSNorm, SwiGLU and RoPE itself.
            log.info("compile: Liger's layer kernels left out (inductor fuses those ops)")
        else:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

            # The loss is chatft's own (train/loss.py); only the layer kernels are swapped.
            _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True,
                                            cross_entropy=False, fused_linear_cross_entropy=False)
            log.info("liger kernels: fused RMSNorm, SwiGLU and RoPE")
    if args.compile:
        # Layer by layer, so graph breaks elsewhere (loss, packing) do not matter, and with
        # dynamic shapes so each new packed length does not trigger a recompilation.
        for layer in model.base_model.layers:
            layer.compile(dynamic=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        limit_checkpointed_layers(model, args.checkpoint_layers)
    model.train()
    return model


def load_pretrained(source: ModelSource, *, dtype: torch.dtype, attn_implementation: str,
                    max_length: int | None = None):
    """The pretrained weights of any model ``--model`` accepts (Hugging Face folder, GGUF file,
    Qwen-1 folder), as a plain transformers ``*ForCausalLM`` on the CPU: for training
    (:func:`build_model`) and for chatting with a model that was never exported."""
    from transformers import AutoModelForCausalLM

    if source.kind == "qwen1":
        from chatft.model.qwen1 import load_qwen1_model

        return load_qwen1_model(source.folder, dtype=dtype, attn_implementation=attn_implementation,
                                max_length=max_length)
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype,
                                                 attn_implementation=attn_implementation, **extra)
    if source.gguf_file:  # dequantized on load: a plain model from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def limit_checkpointed_layers(model: torch.nn.Module, k: int) -> int:
    """Keep recomputation on the first ``k`` decoder layers only (``k < 0``: all); returns how
    many recompute.

    transformers' decoder layers are ``GradientCheckpointingLayer``s, each checking its own
    ``gradient_checkpointing`` flag, so switching the flag off on the later layers makes them
    keep their activations. Recomputing the *first* layers is the cheaper choice: when the
    backward pass reaches them, the later layers' activations are already freed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if k < 0:
        return len(layers)
    for n, layer in enumerate(layers):
        layer.gradient_checkpointing = n < k
    return min(k, len(layers))


def n_params(model: torch.nn.Module) -> int:
    """Parameters, counting tied weights once (ZeRO-3 partitioned params by their full size)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", p.numel())
    return total
