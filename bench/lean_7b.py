"""A 7B full fine-tune in a 24 GiB GPU budget: bf16 weights, 8-bit AdamW moments in host memory,
the optimizer step in backward (one H200 capped with ``--max_gpu_memory 24GiB``).

One result file, ``bench/results/lean_7b_<label>.json``, rewritten after each part:

1. the probe (in this process, before training; ``bench.lib.lean_7b.probe``): torchao's update
   work space on CUDA for ``lm_head`` and the pinned copy rate, the two numbers the planner
   takes from the CPU or assumes;
2. the rows, in order, until one succeeds (``--rows``; later rows are the fallbacks of the
   first: a row that fails, out of memory or past its timeout, is recorded with its error and
   the next one runs): ``chatft train`` on the Qwen2-7B shape (random weights), huanhuan, one
   micro-batch per step, recomputation on, ``--steps`` steps, each beside the memory planner's
   prediction for the same configuration (``planner``, ``measured_vs_planner``).

    python3 bench/lean_7b.py                       # probe + lean8_host (fallback lean8_host_b64)
    python3 bench/lean_7b.py --rows lean8_host_b32 --no-probe
    python3 bench/lean_7b.py --model-config tiny --rows lean8_host --steps 3 --no-probe  # CPU smoke

Prints a table and a last line of JSON.
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

from bench.lib import environment  # noqa: E402
from bench.lib import lean_7b as lean  # noqa: E402
from bench.lib import shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="lean8_host,lean8_host_b64",
                    help=f"comma list, tried in order until one succeeds: {', '.join(lean.ROWS)}")
    ap.add_argument("--all-rows", action="store_true", help="run every row, not only until one succeeds")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-gpu-memory", default="24GiB")
    ap.add_argument("--host-budget", default="64GiB", help="host memory the planner plans for")
    ap.add_argument("--model-config", default="qwen2-7b", choices=list(shapes.MODEL_CONFIGS))
    ap.add_argument("--shared", type=Path, default=lean.default_shared())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/chatft-lean-7b"))
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--probe-optims", default="adamw_torch_8bit",
                    help="optimizers whose update work space the probe measures")
    ap.add_argument("--row-timeout", type=float, default=200, help="seconds per row")
    ap.add_argument("--budget", type=float, default=340, help="seconds for everything")
    ap.add_argument("--label", default=None, help="result file suffix (default h200x1 / cpu)")
    args = ap.parse_args(argv)
    t_start = time.time()
    import torch

    from chatft.train.plan.hardware import parse_size

    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in lean.ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; known: {', '.join(lean.ROWS)}")
    cpu = not torch.cuda.is_available()
    label = args.label or ("cpu" if cpu else "h200x1")
    cap = None if cpu else args.max_gpu_memory
    shape = shapes.MODEL_CONFIGS[args.model_config]
    model = shapes.write_model_folder(args.workdir / f"model-{args.model_config}", shape,
                                  args.shared / "assets" / "qwen.tiktoken")
    data = args.shared / "data" / "huanhuan.json"
    result = {"benchmark": "lean_7b", "command": shlex.join([sys.executable, *sys.argv]),
              "model_config": args.model_config, "max_gpu_memory": cap,
              "target": lean.TARGET, "versions": environment.versions(["torchao", "liger-kernel"]),
              "hardware": environment.hardware("cpu" if cpu else "cuda"),
              "notes": ["Weights are random (built from the config on the GPU): speed and memory "
                        "do not depend on their values.",
                        "tokens_per_s: non-padding tokens per second over the steps after the "
                        "first 2; peaks since the start of the run (the last step's record).",
                        "planner: chatft's memory planner for the row's own configuration "
                        "(tokens from the data), budget = max_gpu_memory and --host-budget; "
                        "measured_vs_planner: [measured, predicted]."],
              "probe": None, "rows": {}}
    path = lean.RESULTS / f"lean_7b_{label}.json"
    lean.RESULTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    if not args.no_probe and not cpu:
        try:
            result["probe"] = lean.probe([o for o in args.probe_optims.split(",") if o])
        except Exception as e:  # keep the training rows even when the probe fails
            result["probe"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    gpu_budget = parse_size(cap or "24GiB")
    host_budget = parse_size(args.host_budget)
    for name in names:
        left = args.budget - (time.time() - t_start)
        if left < 60:
            result["rows"][name] = {"row": name, "status": "skipped", "error": "no time left"}
            break
        row_args = lean.train_args(name, model, data, args.workdir / name / "run", args.steps, cap)
        try:
            prediction = lean.planner_prediction(row_args, gpu_budget, host_budget)
        except Exception as e:  # the row still runs; the file says why there is no prediction
            prediction = {"error": f"{type(e).__name__}: {e}"}
        result["rows"][name] = lean.run_row(name, model, data, args.workdir, args.steps, cap,
                                            min(args.row_timeout, left), cpu, prediction)
        save()
        if result["rows"][name]["status"] == "ok" and not args.all_rows:
            break
    print(lean.format_table(result["rows"]))
    print(json.dumps({"result": str(path.relative_to(REPO)), "probe": result["probe"],
                      "rows": {k: {kk: v.get(kk) for kk in ("status", "tokens_per_s",
                                                           "peak_gpu_allocated_gib",
                                                           "peak_host_rss_gib", "measured_vs_planner")}
                               for k, v in result["rows"].items()}}))
    return 0 if any(r["status"] == "ok" for r in result["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
