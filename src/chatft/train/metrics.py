"""Seeing progress: one-line messages, a progress bar, ``metrics.jsonl``, optional TensorBoard,
a loss-curve PNG.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged step
(``{"step", "loss", "lr", "grad_norm", "tokens_per_s", ...}``) and per evaluation
(``{"step", "epoch", "eval_loss"}``); on resume, lines past the resumed step are dropped first so the
file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def say(msg: str, rank: int = 0) -> None:
    """``chatft: msg`` on stderr, from process 0 only (every process may call it)."""
    if rank == 0:
        print(f"chatft: {msg}", file=sys.stderr, flush=True)


class MetricsLog:
    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool, show_progress: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if show_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key,
                                       value, record["step"])
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                     f"{record['tokens_per_s']:,.0f} tok/s", refresh=False)
        if self.bar is not None and "eval_loss" in record:
            epoch = f" (epoch {record['epoch']:g})" if "epoch" in record else ""
            self.bar.write(f"step {record['step']}{epoch}: held-out loss {record['eval_loss']:.4f}",
                           file=sys.stderr)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(records: list[dict[str, Any]], out: str | Path,
                    marked_step: int | None = None) -> Path:
    """Train loss per step and held-out loss per evaluation, as a PNG; the evaluation at
    ``marked_step`` (the exported weights) is circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", linewidth=1.5)
        mark = [(s, v) for s, v in held if s == marked_step][-1:]
        if mark:
            ax.plot(*zip(*mark), "o", markersize=12, markerfacecolor="none", color="red",
                    label=f"exported (step {marked_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean NLL per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
