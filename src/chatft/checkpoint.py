"""Resumable checkpoints, saved atomically: the folder layout and its bookkeeping.

Training writes them (:func:`chatft.train.loop.save_checkpoint`); ``chatft export`` reads them,
so this module sits below both and knows nothing of engines.

Layout under ``output_dir/checkpoints``::

    step-000040/            a complete checkpoint
        engine/ or engine_state.pt   DeepSpeed's (or the plain engine's) model + optimizer state
        trainer_state.json  step, epoch, data position, config, metrics so far
        model/              model config + tokenizer files + chatft.json (for `chatft export`)
        COMPLETE            written last
    latest                  text file: "step-000040"

A checkpoint is written into ``step-000040.partial`` and renamed only after every process has
finished writing and ``COMPLETE`` exists; then ``latest`` is replaced with ``os.replace``.
A crash at any point leaves ``latest`` naming the previous complete checkpoint; a leftover
``.partial`` folder is deleted by the next save.

Rotation (:func:`to_delete`) is one pure function: the checkpoints, ``save_total_limit`` and a
set of protected ones (the best evaluated checkpoint, which the export may need) in, what to
delete out. Whoever needs a checkpoint kept adds it to the protected set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def partial_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / (step_name(step) + ".partial")


def clean_partials(output_dir: str | Path) -> None:
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def to_delete(checkpoints: list[Path], limit: int, protected: Collection[Path] = ()) -> list[Path]:
    """Which of ``checkpoints`` (oldest first) rotation deletes: the newest one and every
    protected one are kept, then the newest others until ``limit`` are kept in all (so a
    protected checkpoint counts towards the limit, and ``limit`` 1 with an older protected
    best keeps two, as Hugging Face's Trainer does).

    >>> names = [Path(f"step-{i}") for i in (2, 4, 6, 8)]
    >>> [p.name for p in to_delete(names, 2, {Path("step-2")})]
    ['step-4', 'step-6']
    """
    names = [p.name for p in checkpoints]  # by name: "step-000040" whatever the path's spelling
    keep = {p.name for p in protected if p.name in names} | set(names[-1:])
    for name in reversed(names):
        if len(keep) >= limit:
            break
        keep.add(name)
    return [p for p in checkpoints if p.name not in keep]


def finalize(output_dir: str | Path, step: int, trainer_state: dict[str, Any], limit: int,
             protected: Collection[Path] = ()) -> Path:
    """Process 0, after every process wrote its part into the partial folder: write the
    trainer state and marker, rename into place, point ``latest`` at it, rotate old ones
    (never one in ``protected``)."""
    part = partial_path(output_dir, step)
    (part / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, ensure_ascii=False),
                                   encoding="utf-8")
    (part / MARKER).write_text("ok\n")
    final = checkpoints_dir(output_dir) / step_name(step)
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(part, final)
    tmp = checkpoints_dir(output_dir) / "latest.tmp"
    tmp.write_text(step_name(step) + "\n")
    os.replace(tmp, checkpoints_dir(output_dir) / "latest")
    for old in to_delete(complete_checkpoints(output_dir), limit, protected):
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    root = checkpoints_dir(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / MARKER).is_file():
            return cand
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def read_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file() and (Path(folder) / STATE_FILE).is_file()
