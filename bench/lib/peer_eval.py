"""One evaluator for every tool's checkpoints, built from chatft's own data and loss code.

Held-out loss here is chatft's definition: the mean negative log-likelihood per trained token
over the held-out file, where the trained tokens are each assistant answer plus the
end-of-turn token, rendered with the *base* model's chat template (the same token ids for
every tool's checkpoint) by chatft's data step (:func:`chatft.data.render.render_many`), the
targets shifted by :func:`chatft.data.labels.shifted_targets`, and the loss summed by
:class:`chatft.train.loss.CausalLMLoss` (``chunked`` kernel, any device) and divided by the
number of targets once, over the whole file. Samples are batched by length with padding and a
padding mask; the sum does not depend on how they are batched.

This stands in for a ``chatft eval`` command: :func:`held_out_loss` takes a model folder and
the held-out file, which is what such a command takes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

#: Tokens per evaluation batch (padded positions included).
EVAL_BATCH_TOKENS = 16384
#: Files of a model folder that belong to its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json", "qwen.tiktoken")


def render_file(path: Path, tokenizer) -> list:
    """chatft's rendering of a data file (any format chatft reads; the system prompt is in the
    file): one :class:`chatft.data.render.Rendered` per record, labels verified."""
    from chatft.data.formats import load_conversations
    from chatft.data.render import chat_format, render_many

    loaded = load_conversations(path)
    return render_many(loaded.conversations, chat_format(tokenizer))


def _batches(samples: list, max_tokens: int) -> list[list]:
    """Samples sorted by length, grouped so that rows x longest <= ``max_tokens``."""
    order = sorted(samples, key=len)
    out: list[list] = []
    cur: list = []
    for s in order:
        if cur and (len(cur) + 1) * len(s) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    return out


def loss_sum(model, samples: list, device, max_tokens: int = EVAL_BATCH_TOKENS
             ) -> tuple[float, int]:
    """``(sum of token NLLs, number of targets)`` of ``samples`` (Rendered) under ``model``."""
    import numpy as np
    import torch

    from chatft.data.labels import IGNORE_INDEX, shifted_targets
    from chatft.train.loss import CausalLMLoss

    wrapper = CausalLMLoss(model, fused_kernel="chunked")
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in _batches(samples, max_tokens):
            width = max(len(s) for s in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)  # [B, T]; pad id irrelevant
            targets = np.full((len(batch), width), IGNORE_INDEX, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for r, s in enumerate(batch):
                n = len(s)
                ids[r, :n] = s.input_ids
                targets[r, :n] = shifted_targets(np.asarray(s.input_ids),
                                                 np.asarray(s.loss_mask, dtype=bool))
                mask[r, :n] = 1
            positions = np.broadcast_to(np.arange(width), ids.shape).copy()
            t = {k: torch.from_numpy(v).to(device) for k, v in
                 (("ids", ids), ("targets", targets), ("mask", mask), ("pos", positions))}
            s_sum, n = wrapper(t["ids"], t["pos"], t["targets"], attention_mask=t["mask"])
            total += float(s_sum)
            count += int(n)
    return total, count


def held_out_loss(model_dir: Path, samples: list, device: str = "auto",
                  max_tokens: int = EVAL_BATCH_TOKENS) -> dict[str, Any]:
    """chatft's held-out loss of the weights in ``model_dir`` on already rendered ``samples``
    (render once with the base tokenizer, evaluate every checkpoint on the same ids). bf16 on
    CUDA (what chatft's bf16 training evaluates with), fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev)
    total, count = loss_sum(model, samples, dev, max_tokens)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"loss": round(total / count, 6) if count else None, "targets": count,
            "samples": len(samples), "dtype": str(dtype).removeprefix("torch."),
            "device": dev.type}


def with_base_tokenizer(weights_dir: Path, base_dir: Path, out: Path) -> Path:
    """A model folder of ``weights_dir``'s config and weights and ``base_dir``'s tokenizer
    and chat template (links), so every tool's model is prompted with the same ids."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in weights_dir.iterdir():
        if f.is_file() and f.name not in TOKENIZER_FILES and f.name != "chatft.json":
            os.symlink(f.resolve(), out / f.name)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            os.symlink((base_dir / name).resolve(), out / name)
    return out
