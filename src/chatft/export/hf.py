"""Export: one consolidated Hugging Face model folder, checked by reloading it.

The folder holds safetensors weights (bf16 by default), ``config.json``, the tokenizer with
its chat template, ``generation_config.json`` that stops on the end-of-turn token, and
``chatft.json`` (system prompt, end-of-turn token; see :mod:`chatft.export.metadata`). Plain
``AutoModelForCausalLM.from_pretrained(folder)`` loads it.

Export checks itself: probe logits of the trained weights are computed *before* the engine is
released (with every process taking part, so ZeRO-3 can gather), then the written folder is
reloaded and its logits on the same probe compared; a mismatch raises :class:`ExportError`
and the folder is not put in place.

Export knows nothing of training: at the end of a run it takes any object with the few calls of
:class:`TrainedWeights` (a training engine has them), and ``chatft export`` reads a checkpoint
folder (:mod:`chatft.checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from chatft import checkpoint as ckpt
from chatft.errors import ChatftError
from chatft.export.metadata import ChatMeta, write_meta

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROBE = [{"role": "user", "content": "Hello! Who are you, and what do you do? 你好，请介绍一下你自己。"},
         {"role": "assistant", "content": "I am a checkpoint being checked. 我正在被检查。"}]


class ExportError(ChatftError):
    """The exported folder does not reproduce the trained model."""


class TrainedWeights(Protocol):
    """What the end-of-training export needs of the trained model, on every process."""

    model: torch.nn.Module
    """The plain transformers model (its config, generation config, and probe logits)."""
    device: torch.device
    rank: int

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All weights on the CPU of process 0, cast to ``dtype`` (other processes: empty);
        every process calls it."""
        ...

    def release(self) -> None:
        """Free what training holds (optimizer, model) so the export has the memory."""
        ...

    def barrier(self) -> None:
        ...


def probe_ids(tokenizer, system: str | None) -> torch.Tensor:
    """A fixed conversation rendered with the model's template: ``[1, T]`` token ids."""
    msgs = ([{"role": "system", "content": system}] if system else []) + PROBE
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _tolerance(a: torch.dtype, b: torch.dtype) -> float:
    """Allowed max|diff| / max|logit|: fp32 both sides is near-exact; any half-precision side
    rounds weights and activations (a wrong weight mapping differs by ~100%)."""
    return 1e-4 if a == b == torch.float32 else 1e-1


def compare_logits(reference: torch.Tensor, reloaded: torch.Tensor, tol: float) -> dict[str, float]:
    """Relative max difference and top-1 agreement; raises ExportError beyond ``tol``."""
    ref, got = reference.float().cpu(), reloaded.float().cpu()
    rel = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    report = {"max_rel_diff": rel, "top1_agreement": agree, "tolerance": tol}
    if not rel <= tol or agree < 0.9:
        raise ExportError(f"export check failed: the reloaded model's logits differ from the "
                          f"trained weights' (max relative difference {rel:.3g} > {tol:g}, top-1 "
                          f"agreement {agree:.1%}); the folder was not written")
    return report


def generation_config(base, tokenizer, eot_id: int):
    """The base model's generation settings, stopping on the end-of-turn token as well as
    every eos the base model or tokenizer knows (Qwen-1: <|im_end|> and <|endoftext|>)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    base_stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stops = [eot_id]  # the end-of-turn token first, then the base model's and tokenizer's eos
    for tok_id in [*base_stops, tokenizer.eos_token_id]:
        if tok_id is not None and tok_id not in stops:
            stops.append(tok_id)
    gen.eos_token_id = stops
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return gen


def write_folder(state: dict[str, torch.Tensor], config, tokenizer, meta: ChatMeta, out_dir: Path,
                 *, dtype: str, reference_logits: torch.Tensor, reference_dtype: torch.dtype,
                 probe: torch.Tensor, device: torch.device, base_generation=None) -> dict[str, Any]:
    """Write the folder next to ``out_dir``, verify it, then move it into place."""
    from transformers import AutoModelForCausalLM

    from chatft.data.render import chat_format

    torch_dtype = DTYPES[dtype]
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = True
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    model = _empty_model(config, torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"export: weights do not fit the model config (missing "
                          f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        tokenizer.save_pretrained(tmp)
        eot_id = chat_format(tokenizer).eot_id
        generation_config(base_generation, tokenizer, eot_id).save_pretrained(tmp)
        write_meta(tmp, meta)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(device).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=probe.to(device), use_cache=False).logits
        del reloaded
        report = compare_logits(reference_logits, logits, _tolerance(reference_dtype, torch_dtype))
        (tmp / "chatft_export_check.json").write_text(json.dumps(report, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _empty_model(config, dtype: torch.dtype):
    """The architecture with weights on the meta device: ``load_state_dict(assign=True)``
    then puts the real tensors in. Initializing 7B random weights on the CPU only to
    overwrite them would take minutes. Attention is plain SDPA, which any loader has."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Buffers computed at init (rotary ``inv_freq``) stay on meta after ``assign``; rebuild
    them by running each rotary module's own initialization on the CPU."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if hasattr(module, "rope_init_fn") or "inv_freq" in meta:
            fresh = type(module)(config=module.config) if hasattr(module, "config") else None
            for n in meta:
                module.register_buffer(n, getattr(fresh, n), persistent=False)
        else:
            raise ExportError(f"cannot rebuild buffer(s) {meta} of {type(module).__name__}")


def _probe_logits(model: torch.nn.Module, probe: torch.Tensor, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


def export_trained(trained: TrainedWeights, tokenizer, out_dir: Path, *, dtype: str,
                   system: str | None, base_model: str, train_on: str, summary: dict) -> Path:
    """End of training: every process calls this; process 0 writes ``out_dir`` (weights in
    ``dtype``, ``chatft.json`` with the system prompt, ``base_model``, ``train_on`` and the run's
    ``summary``). ``trained`` is released on the way: it cannot train further."""
    from chatft.data.render import chat_format

    probe = probe_ids(tokenizer, system)
    reference = _probe_logits(trained.model, probe, trained.device)  # all ranks (ZeRO-3 gathers)
    ref_dtype = next(trained.model.parameters()).dtype
    state = trained.full_state_dict(DTYPES[dtype])
    config = trained.model.config
    base_gen = getattr(trained.model, "generation_config", None)
    trained.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if trained.rank == 0:
        meta = ChatMeta(system_prompt=system, eot_token=chat_format(tokenizer).eot_token,
                        base_model=base_model, train_on=train_on, extra=summary)
        report = write_folder(state, config, tokenizer, meta, out_dir, dtype=dtype,
                              reference_logits=reference, reference_dtype=ref_dtype, probe=probe,
                              device=trained.device, base_generation=base_gen)
        print(f"chatft: exported {out_dir} ({dtype}; reload check: max relative "
              f"logit difference {report['max_rel_diff']:.2e}, top-1 agreement "
              f"{report['top1_agreement']:.0%})", flush=True)
    trained.barrier()
    return out_dir


def checkpoint_state_dict(folder: Path, engine: str) -> dict[str, torch.Tensor]:
    """Full-precision weights of a checkpoint, keyed like the transformers model."""
    if engine == "torch":
        state = torch.load(folder / "engine_state.pt", map_location="cpu", weights_only=False)["model"]
    elif list((folder / "engine").glob("*optim_states.pt")) and \
            list((folder / "engine").glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        wrapped = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="engine")
        state = {k.removeprefix("model."): v for k, v in wrapped.items()}
    else:  # DeepSpeed without ZeRO: the module's own state dict
        module = torch.load(folder / "engine" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)["module"]
        state = {k.removeprefix("model."): v.float() for k, v in module.items()}
    return state


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path | None = None,
                      dtype: str | None = None) -> Path:
    """``chatft export``: a checkpoint folder (or a run folder: its latest) -> model folder."""
    from transformers import AutoConfig, AutoTokenizer

    from chatft.config_parse import config_from_dict
    from chatft.data.prepare import system_prompt
    from chatft.data.render import chat_format

    folder = Path(checkpoint)
    if not ckpt.is_checkpoint(folder):
        latest = ckpt.latest_checkpoint(folder)
        if latest is None:
            raise ChatftError(f"{checkpoint}: not a chatft checkpoint (no {ckpt.MARKER}) and no "
                              f"complete checkpoint under {ckpt.checkpoints_dir(folder)}")
        folder = latest
    trainer = ckpt.read_state(folder)
    cfg = config_from_dict(trainer["config"])
    dtype = dtype or cfg.train.export_dtype
    out = Path(out_dir) if out_dir else folder.parent.parent / f"export-{folder.name}"
    config = AutoConfig.from_pretrained(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    state = checkpoint_state_dict(folder, trainer["engine"])
    reference = _empty_model(config, torch.float32)
    reference.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    reference.tie_weights()
    _materialize_buffers(reference)
    system = system_prompt(cfg.data)
    probe = probe_ids(tokenizer, system)
    logits = _probe_logits(reference, probe, torch.device("cpu"))
    del reference
    meta = ChatMeta(system_prompt=system, eot_token=chat_format(tokenizer).eot_token,
                    base_model=trainer.get("base_model", ""), train_on=cfg.data.train_on,
                    extra={"steps": trainer["step"], "exported_from": str(folder)})
    report = write_folder(state, config, tokenizer, meta, out, dtype=dtype, reference_logits=logits,
                          reference_dtype=torch.float32, probe=probe, device=torch.device("cpu"))
    print(f"chatft: exported {folder} -> {out} ({dtype}; reload check: max relative logit "
          f"difference {report['max_rel_diff']:.2e})")
    return out
