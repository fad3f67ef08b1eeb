"""How many weights a bf16 update of a given size leaves unchanged: each weight of a model,
rounded to bf16, plus an update of ``lr x k`` (Adam's normalized step is about the learning
rate per element), rounded to bf16 again (round to nearest even, what a plain bf16 weight
update does); an element whose bf16 value does not change lost that update. The reference in
the same run is the same sum in fp32 (fp32 master weights, chatft's default, and
LLaMA-Factory's). This explains why a tool that trains bf16 weights without fp32 masters
(ms-swift with ``--torch_dtype bfloat16``) learns more slowly at lr 1e-5
(``bench/results/peers_quality_h200x1.json``). Prints a table and a last line of JSON,
writes ``bench/results/bf16_lost_updates_cpu.json``. CPU only, about a minute for 0.5B.

    python bench/bf16_lost_updates.py --model qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib


def lost_fraction(weights, update: float, dtype) -> tuple[int, int]:
    """(elements whose value in ``dtype`` does not change when ``update`` is added, all
    elements) over an iterable of tensors."""
    lost = total = 0
    for w in weights:
        base = w.to(dtype)
        lost += int(((base.float() + update).to(dtype) == base).sum())
        total += w.numel()
    return lost, total


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from bench.lib import environment
    from bench.lib.quality import base_model_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a .gguf file or a Hugging Face folder")
    p.add_argument("--lr", type=float, default=1e-5, help="the learning rate of the quality runs")
    p.add_argument("--multiples", default="1,3,10", help="update sizes as multiples of --lr")
    p.add_argument("--out", default="bench/results/bf16_lost_updates_cpu.json")
    args = p.parse_args()
    t0 = time.time()
    folder = base_model_folder(args.model)
    tensors = [t for f in sorted(folder.glob("*.safetensors")) for t in load_file(f).values()
               if t.is_floating_point()]
    rows = []
    for k in (float(x) for x in args.multiples.split(",")):
        update = args.lr * k
        row = {"update": update}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            lost, total = lost_fraction(tensors, update, dtype)
            row[f"{name}_lost_fraction"] = round(lost / total, 4)
        rows.append(row)
    result = {"benchmark": "bf16_lost_updates", "command": "python " + shlex.join(sys.argv),
              "model": args.model, "folder": str(folder), "elements": sum(t.numel() for t in tensors),
              "rows": rows, "versions": environment.versions(),
              "hardware": environment.hardware("cpu"), "wall_s": round(time.time() - t0, 1),
              "notes": ["Weights as the model ships them (before any training); the reference "
                        "row is fp32 (fp32 master weights)."]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{'update':>10} {'bf16 lost':>10} {'fp32 lost':>10}")
    for r in rows:
        print(f"{r['update']:>10.0e} {r['bf16_lost_fraction']:>10.1%} {r['fp32_lost_fraction']:>10.1%}")
    print(json.dumps({"elements": result["elements"], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
