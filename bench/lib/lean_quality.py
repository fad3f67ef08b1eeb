"""Held-out loss per epoch of each memory-lean optimizer against fp32 AdamW
(``bench/lean_quality.py``): the variants, their ``chatft train`` commands, running them side
by side, and the comparison with their references.

Every variant is its own ``chatft train`` process tree (own session, own data cache and output
folder under the work directory) started at once; they share whatever GPU is visible with each
other and with anything else running there (each needs a few GiB for the 0.5B model; nothing
here sets a memory fraction or assumes the GPU is free). A variant past the deadline is killed
with its whole process group; its row says so.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib import REPO, checkout_env

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
#: variant -> (extra options, the variant it is compared with)
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "adamw_torch": ([], None),
    "adamw_torch_noclip": (["--max_grad_norm", "0"], None),
    "adamw_torch_8bit": (["--optim", "adamw_torch_8bit"], "adamw_torch"),
    "adamw_torch_4bit": (["--optim", "adamw_torch_4bit"], "adamw_torch"),
    "bf16_sr": (["--master_weights", "none"], "adamw_torch"),
    "lean_24gib": (["--optim", "adamw_torch_8bit", "--master_weights", "none", "--optimizer_in_bwd",
                    "true", "--max_grad_norm", "0", "--optimizer_states", "host"],
                   "adamw_torch_noclip"),
}
#: the issue's bound on each epoch's held-out loss difference from the reference
TOLERANCE = 0.02
#: fp32 masters with clipping at these settings, measured before (before training, epochs 1-3)
REFERENCE = {"eval_loss_before": 5.4602, "eval_loss_per_epoch": [4.0902, 4.1220, 4.4310]}


def steps_per_epoch(records: int, batch: int = 16) -> int:
    """Optimizer steps of one epoch with ``i % 10 == 9`` held out."""
    return -(-(records - records // 10) // batch)


def command(model: Path, data: Path, out: Path, extra: list[str], epoch_steps: int) -> list[str]:
    return [sys.executable, "-m", "chatft", "train", "--model", str(model), "--data", str(data),
            "--system", SYSTEM, "--eval_ratio", "0.1", "--eval_strategy", "steps",
            "--eval_steps", str(epoch_steps), "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--per_device_train_batch_size", "16",
            "--learning_rate", "1e-5", "--num_train_epochs", "3", "--precision", "bf16",
            "--export", "false", "--output_dir", str(out), *extra]


def eval_losses(run: Path) -> list[float]:
    """``eval_loss`` of each evaluation in the run's metrics (the first: before training)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    losses, seen = [], set()
    for r in rows:  # one per step: an evaluation at the last step is not repeated after it
        if "eval_loss" in r and r.get("step") not in seen:
            seen.add(r.get("step"))
            losses.append(r["eval_loss"])
    return losses


def run_variants(names: list[str], model: Path, data: Path, workdir: Path, timeout: float
                 ) -> dict[str, dict[str, Any]]:
    """Start every variant at once, wait until each ends or the deadline passes; one row each."""
    records = len(json.loads(data.read_text(encoding="utf-8")))
    epoch_steps = steps_per_epoch(records)
    procs, cmds, t0 = {}, {}, time.time()
    for name in names:
        out = workdir / name
        out.mkdir(parents=True, exist_ok=True)
        cmds[name] = command(model, data, out / "run", VARIANTS[name][0], epoch_steps)
        env = checkout_env({**os.environ, "CHATFT_DATA_CACHE": str(workdir / f"data-cache-{name}")})
        with (out / "log.txt").open("w") as log:
            procs[name] = subprocess.Popen(cmds[name], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the variant's whole tree, nothing else
            rc = proc.wait()
        losses = eval_losses(workdir / name / "run")
        rows[name] = {"command": shlex.join(cmds[name]), "returncode": rc, "timed_out": timed_out,
                      "wall_s": round(time.time() - t0, 1), "steps_per_epoch": epoch_steps,
                      "eval_loss_before": losses[0] if losses else None,
                      "eval_loss_per_epoch": [round(x, 4) for x in losses[1:]]}
        if rc != 0:
            rows[name]["log_tail"] = (workdir / name / "log.txt").read_text(errors="replace")[-3000:]
    return rows


def compare(rows: dict[str, dict[str, Any]]) -> None:
    """Each variant's per-epoch difference from its reference variant (in place); without an
    ``adamw_torch`` row, from its losses measured before (:data:`REFERENCE`)."""
    for name, row in rows.items():
        ref = VARIANTS.get(name, ([], None))[1]
        losses = rows.get(ref, {}).get("eval_loss_per_epoch")
        if ref == "adamw_torch" and not losses:
            ref, losses = "adamw_torch (measured before)", REFERENCE["eval_loss_per_epoch"]
        if ref and losses:
            diff = [round(a - b, 4) for a, b in zip(row["eval_loss_per_epoch"], losses)]
            row.update({"reference": ref, "diff_per_epoch": diff,
                        "within_tolerance": len(diff) == 3 and all(abs(d) <= TOLERANCE for d in diff)})
