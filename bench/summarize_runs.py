"""Summarize `chatft train` runs from their metrics.jsonl (and export check) into one result.

For runs started directly with ``chatft train`` (not through a benchmark driver), e.g. the
DeepSpeed engine checks of ``bench/gpu_suite.sh``: steps, wall time of the optimizer steps,
tokens/s per GPU, MFU, loss at the first and last step, peak GPU memory per rank, and the
export's reload check. Prints a table and a last line of JSON; writes
``bench/results/<name>.json``.

    python bench/summarize_runs.py --name engine_7b_h200 --params 7615616512 --hardware "4x H200" \
        --run "zero3_4gpu|4|metrics.jsonl|export_check.json|chatft train ..." ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PEAK_FLOPS = 989e12  # H200 dense bf16 datasheet


def summarize(name: str, gpus: int, metrics: Path, check: Path | None, command: str,
              params: int) -> dict:
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    later = steps[1:] or steps  # the first step includes warm-up work
    tokens, seconds = sum(r["tokens"] for r in later), sum(r["step_time_s"] for r in later)
    tps_gpu = tokens / seconds / gpus
    out = {
        "run": name, "gpus": gpus, "command": command, "steps": len(steps),
        "epochs": steps[-1]["epoch"] if steps else None,
        "train_step_seconds_total": round(sum(r["step_time_s"] for r in steps), 1),
        "tokens_per_s_per_gpu": round(tps_gpu, 1),
        "mfu": round(tps_gpu * 6 * params / PEAK_FLOPS, 4),
        "loss_first_step": round(steps[0]["loss"], 4), "loss_last_step": round(steps[-1]["loss"], 4),
        "peak_gpu_allocated_gib_per_rank": steps[-1].get("gpu_mem_allocated_gib"),
        "peak_gpu_reserved_gib_per_rank": steps[-1].get("gpu_mem_reserved_gib"),
        "eval_loss": [(r["step"], round(r["eval_loss"], 4)) for r in evals] or None,
    }
    if check is not None and check.is_file():
        out["export_check"] = json.loads(check.read_text())
        out["exported_and_reloaded"] = out["export_check"]["max_rel_diff"] <= out["export_check"]["tolerance"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="result file name (without .json)")
    ap.add_argument("--params", type=int, required=True, help="model parameters (for MFU)")
    ap.add_argument("--hardware", required=True)
    ap.add_argument("--versions", default="", help="software versions of the runs")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--run", action="append", required=True,
                    help="name|gpus|metrics.jsonl|export_check.json or -|the chatft command")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    runs = []
    for spec in args.run:
        name, gpus, metrics, check, command = spec.split("|", 4)
        runs.append(summarize(name, int(gpus), Path(metrics), None if check == "-" else Path(check),
                              command, args.params))
    print(f"{'run':24} {'GPUs':>4} {'steps':>5} {'tok/s/GPU':>10} {'MFU':>7} {'loss first->last':>18} "
          f"{'GPU alloc GiB (max)':>19} {'export':>7}")
    for r in runs:
        alloc = max(r["peak_gpu_allocated_gib_per_rank"] or [0])
        print(f"{r['run']:24} {r['gpus']:>4} {r['steps']:>5} {r['tokens_per_s_per_gpu']:>10,.1f} "
              f"{r['mfu']:>7.2%} {r['loss_first_step']:>8.3f} -> {r['loss_last_step']:<7.3f} "
              f"{alloc:>19.1f} {str(r.get('exported_and_reloaded', '-')):>7}")
    result = {"benchmark": args.name, "command": "python " + " ".join(sys.argv),
              "hardware": args.hardware, "versions": args.versions, "notes": args.note,
              "runs": runs, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
