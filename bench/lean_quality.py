"""Held-out loss per epoch of each memory-lean optimizer against fp32 AdamW, on a real model.

Trains the Qwen2.5-Coder-0.5B-Instruct GGUF (``--model``) on huanhuan with records
``i % 10 == 9`` held out, global batch 16, lr 1e-5, 3 epochs, bf16, evaluating at each epoch's
end, once per variant; the variants run side by side as separate process trees on whatever GPU
is visible (each needs a few GiB; other jobs may share the GPU). The reference with fp32
masters and clipping measured 5.4602 before, 4.0902 / 4.1220 / 4.4310 after epochs 1-3 at
these settings. ``optimizer_in_bwd`` cannot clip by the global norm, so ``adamw_torch_noclip``
(fp32 AdamW with ``--max_grad_norm 0``) is its like-for-like reference.

    python3 bench/lean_quality.py --model /path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python3 bench/lean_quality.py --model ... --variants adamw_torch_noclip,lean_24gib  # adds rows

Writes ``bench/results/lean_quality_qwen2.5-0.5b_<label>.json`` (commands, per-epoch held-out
losses, differences from the references, wall times; rows of earlier runs with the same label
stay); prints a table and a last JSON line. Library side: :mod:`bench.lib.lean_quality`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import environment  # noqa: E402
from bench.lib import lean_quality as lq  # noqa: E402
from bench.lib.lean_7b import default_shared  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the GGUF file (or an HF folder)")
    ap.add_argument("--shared", type=Path, default=default_shared())
    ap.add_argument("--variants", default=",".join(lq.VARIANTS), help=", ".join(lq.VARIANTS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/chatft-lean-quality"))
    ap.add_argument("--label", default="h200x1")
    ap.add_argument("--timeout", type=float, default=560, help="seconds for all variants together")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in lq.VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(lq.VARIANTS)}")
    path = REPO / "bench" / "results" / f"lean_quality_qwen2.5-0.5b_{args.label}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = old.get("rows", {})  # variants may run in groups
    rows.update(lq.run_variants(names, args.model, args.shared / "data" / "huanhuan.json",
                                args.workdir, args.timeout))
    lq.compare(rows)
    result = {"benchmark": "lean_quality",
              "commands": sorted({*old.get("commands", []), shlex.join([sys.executable, *sys.argv])}),
              "model": str(args.model), "tolerance": lq.TOLERANCE, "reference_measured_before": lq.REFERENCE,
              "versions": environment.versions(["torchao", "liger-kernel"]),
              "hardware": environment.hardware("cuda"), "rows": rows,
              "notes": ["Variants ran at the same time on one GPU, possibly beside other jobs: "
                        "wall times are not speeds.",
                        "eval_loss: mean NLL per trained token over the held-out records."]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for name, row in rows.items():
        print(f"{name:20} rc={row['returncode']} before={row['eval_loss_before']} "
              f"epochs={row['eval_loss_per_epoch']} diff={row.get('diff_per_epoch')}")
    print(json.dumps({"result": str(path.relative_to(REPO)),
                      "rows": {k: v["eval_loss_per_epoch"] for k, v in rows.items()}}))
    return 0 if all(rows[n]["returncode"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
