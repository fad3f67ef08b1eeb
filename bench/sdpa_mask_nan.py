"""Why LLaMA-Factory's quality run (``bench/results/peers_quality_h200x1.json``) turns NaN at
step 131: SDPA's cuDNN backward with an explicit mask at a sequence length with
``T % 128 == 64`` (pytorch/pytorch#196678, a regression in torch 2.11 on H100/H200).

LLaMA-Factory pads each batch on the right to a multiple of 8, so SDPA gets a boolean
padding mask; its step 131 (seed 42, batch 16) is the run's first batch whose padded length is
192 (= 128 + 64). That bug also needs a query row whose log-sum-exp is below -88.7; Qwen2.5's
attention-sink heads give such rows in every batch (measured on the CPU at the base weights:
layers 0, 1, 2, 4 and 8).

Two checks, each with every SDPA backend choice:

* ``kernel``: torch only. Random bf16 q/k/v of Qwen2.5-0.5B's attention shape (16 x 14 heads x
  T x 64), one key dimension shifted so every row's log-sum-exp is about -120, a causal and
  right-padding boolean mask; non-finite ``grad_q`` counted for T in --lengths.
* ``model`` (with --model): the base model (fp32 weights, bf16 autocast, sdpa, as
  LLaMA-Factory trained it) on the batch of LLaMA-Factory's step --step, rebuilt from
  huanhuan the way LLaMA-Factory 0.9.5 builds it (its sampler: ``torch.randperm`` seeded with
  42 + epoch; its Qwen template; prompt tokens labelled -100); once padded as LLaMA-Factory
  padded it, once padded 8 tokens further. Gradient norm and parameters with non-finite
  gradients per backend.

Prints a table and a last line of JSON, writes --out. About a minute on 1xH200 (plus the
GGUF's dequantization when --model is a .gguf file); on a CPU only the kernel check's math
and efficient rows are meaningful.

    python bench/sdpa_mask_nan.py --model qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

PAD_ID = 151643  # <|endoftext|>, LLaMA-Factory's pad token for Qwen
IGNORE = -100
BACKENDS = ("default", "cudnn_off", "efficient", "math")


def backend_context(name: str):
    """SDPA kernels allowed for ``name``: ``default`` is torch's own choice; ``cudnn_off``
    every kernel but cuDNN's (the one-line workaround); ``efficient`` and ``math`` one each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        return nullcontext()
    if name == "cudnn_off":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH])
    return sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if name == "efficient" else SDPBackend.MATH)


def kernel_check(length: int, backend: str, device: str) -> dict:
    """Non-finite ``grad_q`` of one masked SDPA call at sequence length ``length``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, d = 16, 14, 64
    shape = (b, h, length, d)
    q = (torch.randn(shape, generator=g) * 0.1).to(device, torch.bfloat16)
    k = (torch.randn(shape, generator=g) * 0.1).to(device, torch.bfloat16)
    v = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    # Every score gets about -120 (q_0 * k_0 / sqrt(d)): each row's log-sum-exp < -88.7, the
    # pattern Qwen2.5's sink heads produce.
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(d)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    real = torch.randint(length // 4, length + 1, (b,), generator=g)  # [B] right padding
    real[0] = length
    keep = torch.arange(length)[None, :] < real[:, None]  # [B, T]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [T, T]
    mask = (causal[None] & keep[:, None, :])[:, None].to(device)  # [B, 1, T, T]
    try:
        with backend_context(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(torch.randn(out.shape, generator=g).to(device, out.dtype))
    except RuntimeError as e:  # a backend that cannot take these inputs
        return {"error": str(e).splitlines()[0][:120]}
    return {"out_nonfinite": int((~torch.isfinite(out)).sum()),
            "grad_q_nonfinite": int((~torch.isfinite(q.grad)).sum()),
            "grad_k_nonfinite": int((~torch.isfinite(k.grad)).sum())}


def lf_tokenize(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """LLaMA-Factory 0.9.5's ``qwen`` template for one system/user/assistant sample: the
    prompt (system + user + assistant header) and the response (content + ``<|im_end|>\\n``)
    are encoded separately; prompt tokens get label -100."""
    system, user, answer = (m["content"] for m in messages)
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
              "<|im_start|>assistant\n")
    p = tok.encode(prompt, add_special_tokens=False)
    r = tok.encode(f"{answer}<|im_end|>\n", add_special_tokens=False)
    return p + r, [IGNORE] * len(p) + r


def lf_batch_indices(step: int, n: int, batch: int = 16, seed: int = 42) -> list[int]:
    """Training-file indices of LLaMA-Factory's step ``step`` (1-based): accelerate's seedable
    sampler re-seeds a CPU generator with ``seed + epoch`` and draws ``torch.randperm(n)``."""
    import torch

    per_epoch = math.ceil(n / batch)
    epoch, k = divmod(step - 1, per_epoch)
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=gen).tolist()[k * batch:(k + 1) * batch]


def lf_collate(samples: list[tuple[list[int], list[int]]], extra: int = 0):
    """Right padding to a multiple of 8 (LLaMA-Factory's collator), plus ``extra`` tokens."""
    import torch

    t = -(-max(len(ids) for ids, _ in samples) // 8) * 8 + extra
    ids = torch.full((len(samples), t), PAD_ID)
    mask = torch.zeros((len(samples), t), dtype=torch.long)
    labels = torch.full((len(samples), t), IGNORE)
    for r, (i, lab) in enumerate(samples):
        ids[r, :len(i)], mask[r, :len(i)], labels[r, :len(i)] = (
            torch.tensor(i), 1, torch.tensor(lab))
    return ids, mask, labels


def model_check(model, batch, backend: str, device: str) -> dict:
    """One forward and backward (bf16 autocast on CUDA) of ``batch``; the gradient's norm and
    the parameters whose gradient holds non-finite values."""
    import torch

    ids, mask, labels = (t.to(device) for t in batch)
    model.zero_grad(set_to_none=True)
    n_items = int((labels[:, 1:] != IGNORE).sum())
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else nullcontext())
    with backend_context(backend), autocast:
        out = model(input_ids=ids, attention_mask=mask, labels=labels,
                    num_items_in_batch=torch.tensor(n_items, device=device))
        out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad = [n for n, p in model.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    norm = torch.linalg.vector_norm(torch.stack([gr.float().norm() for gr in grads]))
    return {"T": ids.shape[1], "loss": round(out.loss.item(), 4), "grad_norm": norm.item(),
            "nonfinite_params": len(bad), "first_nonfinite": bad[:3]}


def main() -> int:
    import torch

    from bench.lib import environment
    from bench.lib.peer_configs import is_held_out, to_messages

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .gguf file or a Hugging Face folder (model check)")
    p.add_argument("--data", help="huanhuan.json (default: $CHATFT_SHARED/data/huanhuan.json)")
    p.add_argument("--step", type=int, default=131, help="LLaMA-Factory's step to rebuild")
    p.add_argument("--lengths", default="184,192,200,256,320",
                   help="sequence lengths of the kernel check")
    p.add_argument("--out", default=None, help="result file (default: "
                   "bench/results/sdpa_mask_nan_{h200x1,cpu}.json)")
    args = p.parse_args()
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"bench/results/sdpa_mask_nan_{'h200x1' if device == 'cuda' else 'cpu'}.json")

    kernel = []
    for length in (int(x) for x in args.lengths.split(",")):
        for backend in BACKENDS:
            kernel.append({"T": length, "T_mod_128": length % 128, "backend": backend,
                           **kernel_check(length, backend, device)})

    model_rows, batch_info = [], None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bench.lib.quality import base_model_folder

        shared = Path(os.environ.get("CHATFT_SHARED", REPO.parent / "shared"))
        records = json.loads(Path(args.data or shared / "data" / "huanhuan.json").read_text())
        train = [to_messages(r)["messages"] for i, r in enumerate(records) if not is_held_out(i)]
        folder = base_model_folder(args.model)
        tok = AutoTokenizer.from_pretrained(folder)
        idx = lf_batch_indices(args.step, len(train))
        samples = [lf_tokenize(tok, train[i]) for i in idx]
        batch_info = {"step": args.step, "train_indices": idx,
                      "lengths": [len(s[0]) for s in samples],
                      "trained": [sum(x != IGNORE for x in s[1][1:]) for s in samples]}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device)
        model.train()
        for extra in (0, 8):
            for backend in BACKENDS if device == "cuda" else ("default",):
                model_rows.append({"padding": f"LLaMA-Factory's + {extra}", "backend": backend,
                                   **model_check(model, lf_collate(samples, extra), backend,
                                                 device)})

    result = {"benchmark": "sdpa_mask_nan", "command": "python " + shlex.join(sys.argv),
              "device": device, "kernel": kernel, "batch": batch_info, "model": model_rows,
              "versions": environment.versions(),
              "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
              "hardware": environment.hardware(device), "wall_s": round(time.time() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{'T':>5} {'T%128':>5} {'backend':>10} {'grad_q non-finite':>18}")
    for r in kernel:
        print(f"{r['T']:>5} {r['T_mod_128']:>5} {r['backend']:>10} "
              f"{r.get('grad_q_nonfinite', r.get('error')):>18}")
    for r in model_rows:
        print(f"model T={r['T']:>4} {r['backend']:>10} loss {r['loss']:.4f} grad_norm "
              f"{r['grad_norm']:.3f} non-finite params {r['nonfinite_params']}")
    print(json.dumps({"kernel": [{k: r.get(k) for k in ("T", "backend", "grad_q_nonfinite")}
                                 for r in kernel],
                      "model": [{k: r[k] for k in ("T", "backend", "grad_norm",
                                                   "nonfinite_params")} for r in model_rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
