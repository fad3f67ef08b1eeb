"""Held-out loss per epoch of each memory-lean optimizer against fp32 AdamW, on a real model.

Trains the Qwen2.5-Coder-0.5B-Instruct GGUF (``--model``) on huanhuan with records
``i % 10 == 9`` held out, global batch 16, lr 1e-5, 3 epochs, bf16, evaluating at each epoch's
end, once per variant; the variants run side by side on one GPU (each needs a few GiB). The
reference with fp32 masters and clipping measured 5.4602 before, 4.0902 / 4.1220 / 4.4310 after
epochs 1-3 at these settings. ``optimizer_in_bwd`` cannot clip by the global norm, so
``adamw_torch_noclip`` (fp32 AdamW with ``--max_grad_norm 0``) is its like-for-like reference.

    python3 bench/lean_quality.py --model /path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python3 bench/lean_quality.py --model ... --variants adamw_torch_noclip,lean_24gib  # adds rows

Writes ``bench/results/lean_quality_qwen2.5-0.5b_<label>.json`` (commands, per-epoch held-out
losses, differences from the references, wall times); prints a table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib import environment  # noqa: E402

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
#: variant -> (extra options, the variant it is compared with)
VARIANTS = {
    "adamw_torch": ([], None),
    "adamw_torch_noclip": (["--max_grad_norm", "0"], None),
    "adamw_torch_8bit": (["--optim", "adamw_torch_8bit"], "adamw_torch"),
    "adamw_torch_4bit": (["--optim", "adamw_torch_4bit"], "adamw_torch"),
    "bf16_sr": (["--master_weights", "none"], "adamw_torch"),
    "lean_24gib": (["--optim", "adamw_torch_8bit", "--master_weights", "none", "--optimizer_in_bwd",
                    "true", "--max_grad_norm", "0", "--optimizer_states", "host"],
                   "adamw_torch_noclip"),
}
TOLERANCE = 0.02


def command(model: Path, data: Path, out: Path, extra: list[str], steps_per_epoch: int) -> list[str]:
    return [sys.executable, "-m", "chatft", "train", "--model", str(model), "--data", str(data),
            "--system", SYSTEM, "--eval_ratio", "0.1", "--eval_steps", str(steps_per_epoch),
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-5",
            "--num_train_epochs", "3", "--precision", "bf16", "--export", "false",
            "--output_dir", str(out), *extra]


def eval_losses(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("CHATFT_SHARED", REPO.parent / "shared")))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/chatft-lean-quality"))
    ap.add_argument("--label", default="h200x1")
    ap.add_argument("--timeout", type=float, default=560)
    args = ap.parse_args(argv)
    data = args.shared / "data" / "huanhuan.json"
    records = len(json.loads(data.read_text(encoding="utf-8")))
    train_records = records - records // 10  # i % 10 == 9 held out
    steps_per_epoch = -(-train_records // 16)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    procs, cmds, t0 = {}, {}, time.time()
    for name in names:
        out = args.workdir / name
        out.mkdir(parents=True, exist_ok=True)
        cmds[name] = command(args.model, data, out / "run", VARIANTS[name][0], steps_per_epoch)
        env = {**os.environ, "CHATFT_DATA_CACHE": str(args.workdir / f"data-cache-{name}"),
               "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs[name] = subprocess.Popen(cmds[name], stdout=(out / "log.txt").open("w"),
                                       stderr=subprocess.STDOUT, env=env)
    path = REPO / "bench" / "results" / f"lean_quality_qwen2.5-0.5b_{args.label}.json"
    # Rows of earlier invocations with the same label stay (variants may run in groups).
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        losses = eval_losses(args.workdir / name / "run")
        rows[name] = {"command": shlex.join(cmds[name]), "returncode": rc,
                      "wall_s": round(time.time() - t0, 1),
                      "eval_loss_before": losses[0] if losses else None,
                      "eval_loss_per_epoch": [round(x, 4) for x in losses[1:]]}
    for name, row in rows.items():
        ref = VARIANTS[name][1]
        if ref and rows.get(ref, {}).get("eval_loss_per_epoch"):
            diff = [round(a - b, 4) for a, b in zip(row["eval_loss_per_epoch"],
                                                    rows[ref]["eval_loss_per_epoch"])]
            row.update({"reference": ref, "diff_per_epoch": diff,
                        "within_tolerance": len(diff) == 3 and all(abs(d) <= TOLERANCE for d in diff)})
    result = {"benchmark": "lean_quality", "commands": sorted({*(json.loads(path.read_text()).get(
                  "commands", []) if path.is_file() else []), shlex.join([sys.executable, *sys.argv])}),
              "model": str(args.model), "steps_per_epoch": steps_per_epoch, "tolerance": TOLERANCE,
              "versions": environment.versions(["torchao", "liger-kernel"]),
              "hardware": environment.hardware("cuda"), "rows": rows,
              "notes": ["Variants ran at the same time on one GPU: wall times are not speeds.",
                        "eval_loss: mean NLL per trained token over the held-out records."]}
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    for name, row in rows.items():
        print(f"{name:20} rc={row['returncode']} before={row['eval_loss_before']} "
              f"epochs={row['eval_loss_per_epoch']} diff={row.get('diff_per_epoch')}")
    print(json.dumps({"result": str(path.relative_to(REPO)),
                      "rows": {k: v["eval_loss_per_epoch"] for k, v in rows.items()}}))
    return 0 if all(rows[n]["returncode"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
