"""Which tensors' q8_0 rounding moves a model's top token?

In process, no GGUF file: the model folder's weights are rounded as a GGUF file would store
them (q8_0 through the ``gguf`` package's own ``quants.quantize``/``dequantize``, blocks of 32
along each row with one f16 scale; f16 through torch's half), one choice of per-tensor types at
a time, and the logits compared with the folder's fp32 model on the same ids. Choices differ in
which tensor groups keep f16: the token embedding (``token_embd``; SmolLM2 ties it to the
output), the attention matrices, the feed-forward matrices. Norms are f32 in every choice (as
the export writes them).

Probe sets, teacher-forced (every position of the rendered conversation is scored):

* ``persona``: the built-in persona dataset's first conversations (its prompts and answers) with the
  persona's system prompt -- what the default job trains;
* ``probe``: the export's own read-back probe conversation (:data:`chatft.export.hf.PROBE`);
* ``huanhuan``: the first huanhuan records with their system prompt (Chinese; for SmolLM2 a
  language it barely models, so near-ties are common).

Reported per choice and set: top-1 agreement with the fp32 folder, max |diff| / max |logit|,
mean |diff|; and per choice the tensor data size in MiB (metadata not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

#: choice -> tensor groups kept in f16 (the rest of the 2-D weights q8_0)
CHOICES = {
    "all_q8_0": (),
    "token_embd_f16": ("token_embd",),
    "attn_f16": ("attn",),
    "ffn_f16": ("ffn",),
    "only_token_embd_q8_0": ("attn", "ffn"),
}


def group(hf_name: str) -> str:
    if "embed_tokens" in hf_name or hf_name.startswith("lm_head"):
        return "token_embd" if "embed_tokens" in hf_name else "output"
    if ".self_attn." in hf_name:
        return {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                "o_proj": "attn_output"}[hf_name.split(".")[-2]]
    if ".mlp." in hf_name:
        return "ffn"
    return "other"


def q8_0_rounded(w: torch.Tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    return torch.from_numpy(dequantize(quantize(w.float().numpy(), Q.Q8_0), Q.Q8_0)).reshape(w.shape)


def rounded_state(state: dict[str, torch.Tensor], f16_groups: tuple[str, ...],
                  tied: bool) -> tuple[dict, int]:
    """(state with each 2-D weight rounded as the choice stores it, tensor bytes)."""
    out, nbytes = {}, 0
    for name, w in state.items():
        if w.dim() != 2:
            out[name], nbytes = w, nbytes + 4 * w.numel()
            continue
        g = group(name)
        if g == "output" and tied:
            continue  # tied: written once, as token_embd (tie_weights() copies it back)
        if any(g == f or g.startswith(f + "_") for f in f16_groups) or \
                (g == "output" and "token_embd" in f16_groups):
            out[name], nbytes = w.half().float(), nbytes + 2 * w.numel()
        else:
            out[name], nbytes = q8_0_rounded(w), nbytes + w.numel() // 32 * 34
    return out, nbytes


def probe_sets(tokenizer, n_persona: int, huanhuan: Path | None,
               n_huanhuan: int) -> dict[str, list[list[int]]]:
    from chatft.data.prepare import builtin_meta
    from chatft.export.hf import PROBE

    system = builtin_meta("builtin:persona")["system"]
    lines = (resources.files("chatft.data") / "assets" / "persona.jsonl").read_text(
        encoding="utf-8").splitlines()[:n_persona]
    convs = {"persona": [[{"role": "system", "content": system}, *json.loads(x)["messages"]]
                         for x in lines],
             "probe": [[{"role": "system", "content": system}, *PROBE]]}
    if huanhuan is not None and huanhuan.is_file():
        recs = json.loads(huanhuan.read_text(encoding="utf-8"))[:n_huanhuan]
        convs["huanhuan"] = [[{"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛."},
                              {"role": "user", "content": r["instruction"] + r.get("input", "")},
                              {"role": "assistant", "content": r["output"]}] for r in recs]

    def ids(conv):
        text = tokenizer.apply_chat_template(conv, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return {k: [ids(c) for c in v] for k, v in convs.items()}


def logits(model, seqs: list[list[int]], batch: int = 16) -> list[torch.Tensor]:
    """[T_i, vocab] per sequence (right padding, masked)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            n = max(map(len, chunk))
            ids = torch.tensor([s + [0] * (n - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk])
            lg = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            out += [lg[j, :len(s)] for j, s in enumerate(chunk)]
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    same = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).float()
    diff = torch.cat([(r - g).abs().flatten() for r, g in zip(ref, got)])
    top = max(float(r.abs().max()) for r in ref)
    return {"top1_agreement": float(same.mean()), "positions": same.numel(),
            "flips": int((1 - same).sum()), "max_rel_diff": float(diff.max()) / top,
            "mean_abs_diff": float(diff.mean())}


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.lib.environment import hardware, versions

    folder = Path(args.folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sets = probe_sets(tok, args.persona_records, Path(args.huanhuan) if args.huanhuan else None, args.huanhuan_records)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    ref = {k: logits(model, v) for k, v in sets.items()}
    rows = []
    for choice in args.choices.split(","):
        f16_groups = CHOICES[choice]
        t0 = time.perf_counter()
        rounded, nbytes = rounded_state(state, f16_groups, tied)
        model.load_state_dict(rounded, strict=False)
        if tied:
            model.tie_weights()
        row = {"choice": choice, "f16_groups": list(f16_groups),
               "tensor_mib": round(nbytes / 2**20, 1)}
        for k, v in sets.items():
            row[k] = compare(ref[k], logits(model, v))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.gguf:  # the exported file itself, read by transformers (gguf_file=)
        t0 = time.perf_counter()
        gguf = Path(args.gguf)
        del model
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
        row = {"choice": "gguf_file", "file": str(gguf), "file_mib": round(gguf.stat().st_size / 2**20, 1)}
        for k, v in sets.items():
            row[k] = compare(ref[k], logits(model, v))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"bench": "gguf_q8_choices", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "versions": versions(extra=("gguf",)), "hardware": hardware("cpu"),
            "inputs": {"folder": str(folder), "note": args.note,
                       "tokens": {k: sum(map(len, v)) for k, v in sets.items()},
                       "sequences": {k: len(v) for k, v in sets.items()}},
            "rows": rows}


def print_table(result: dict) -> None:
    sets = [k for k in ("persona", "probe", "huanhuan") if k in result["rows"][0]]
    head = "".join(f" {s + ' top-1':>15} {'max rel':>8} {'mean|d|':>8}" for s in sets)
    print(f"\n{'choice':<22} {'MiB':>6}{head}")
    for r in result["rows"]:
        cells = "".join(f" {r[s]['top1_agreement']:>9.2%} ({r[s]['flips']:>3}) "
                        f"{r[s]['max_rel_diff']:>8.2e} {r[s]['mean_abs_diff']:>8.4f}" for s in sets)
        print(f"{r['choice']:<22} {r.get('tensor_mib', r.get('file_mib')):>6.1f}{cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, help="an exported model folder (e.g. runs/chatft/final)")
    p.add_argument("--persona-records", type=int, default=100,
                   help="the first N conversations of the built-in persona data")
    p.add_argument("--huanhuan", default="../shared/data/huanhuan.json")
    p.add_argument("--huanhuan-records", type=int, default=20)
    p.add_argument("--note", default="", help="recorded in the result (where the folder came from)")
    p.add_argument("--choices", default=",".join(CHOICES),
                   help=f"comma-separated, of {', '.join(CHOICES)} (default: all)")
    p.add_argument("--gguf", help="also compare a GGUF file exported from --folder, as "
                   "transformers reads it (gguf_file=)")
    p.add_argument("--out", default="bench/results/gguf_q8_choices_cpu.json")
    args = p.parse_args(argv)
    unknown = set(args.choices.split(",")) - set(CHOICES)
    if unknown:
        p.error(f"--choices: unknown {', '.join(sorted(unknown))}")
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print_table(result)
    print(json.dumps({r["choice"]: {"mib": r.get("tensor_mib", r.get("file_mib")),
                                    **{k: round(r[k]["top1_agreement"], 4)
                      for k in ("persona", "probe", "huanhuan") if k in r}} for r in result["rows"]}))
    return 0
