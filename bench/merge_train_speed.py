"""Merge train_speed results of one hardware setup (same GPU kind and count) into one file.

A device session may measure the variants of ``bench/train_speed.py`` in several invocations
(for instance the recipe and chatft in parallel on different GPUs of one machine, ablations
later). This keeps every row with the file, command and date it came from, recomputes the
speedups against the tutorial recipe's row, prints the table and a last line of JSON, and
writes ``bench/results/train_speed_<label>.json``.

    python bench/merge_train_speed.py --label h200x1 --recommended attn_varlen \
        run_a.json run_b.json run_c.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("train_speed_cli", HERE / "train_speed.py")
ts_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts_cli)  # it puts this checkout's chatft and bench.lib on the path


def merge(files: list[Path], recommended: str | None, notes: list[str] | None = None) -> dict:
    results = [json.loads(p.read_text()) for p in files]
    gpus = {r["gpus"] for r in results}
    gpu_names = {r["hardware"].get("gpu") for r in results}
    if len(gpus) != 1 or len(gpu_names) != 1:
        raise SystemExit(f"results are from different setups: gpus {gpus}, GPUs {gpu_names}")
    rows: dict[str, dict] = {}
    for path, res in zip(files, results):
        for row in res["rows"]:
            if row.get("status") != "ok" and row["variant"] in rows:
                continue  # keep a successful measurement over a failed repeat
            # a row of an earlier merge keeps the file it was first measured in
            row = dict(row, source=row.get("source") or {
                "file": path.name, "command": res["command"], "date": res.get("date"),
                "hardware": res["hardware"], "versions": res.get("versions")})
            rows[row["variant"]] = row
    ref = results[0].get("reference_1xh200")
    ts_cli.add_speedups(rows, ref["tutorial_recipe_tokens_per_s"] if ref else None,
                        "reference_1xh200 (measured earlier)" if ref else None)
    base = dict(results[-1])
    base.update(rows=[rows[v] for v in ts_cli.ALL_VARIANTS if v in rows],
                merged_from=[p.name for p in files], recommended_variant=recommended,
                notes=list(base.get("notes", [])) + [n for n in notes or [] if n not in base.get("notes", [])],
                command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--recommended", help="the variant that is chatft's recommended configuration")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--note", action="append", default=[],
                    help="a sentence added to the result's notes (repeatable)")
    args = ap.parse_args()
    merged = merge(args.files, args.recommended, args.note)
    merged["label"] = args.label
    ts_cli.print_table(merged["rows"])
    path = args.out / f"train_speed_{args.label}.json"
    path.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(merged, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
