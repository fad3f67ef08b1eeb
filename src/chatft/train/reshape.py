"""Resuming a checkpoint on another layout: another number of processes (or ZeRO stage 1 <-> 2).

**The trajectory.** The data order and the step count depend on the global batch
(``per_device x accumulation x processes``, see :mod:`chatft.train.batching`), not on how it
is split. A checkpoint written by N processes therefore continues the same trajectory on M
processes if the global batch stays the same: when only the process count changed,
:func:`plan_resume` keeps it by choosing the per-device batch and accumulation (the largest
per-device batch up to the configured one that divides the work), and says so; any other
change of the global batch is refused, naming the numbers to use.

**The optimizer state.** ZeRO partitions the optimizer state (stage 1-2) and the parameters
(stage 3) over the processes that wrote the checkpoint, and DeepSpeed loads such shards only
on the same number of processes. DeepSpeed's own answer is its *universal checkpoint*:
``deepspeed.checkpoint.ds_to_universal`` rewrites the shards as one file per parameter (fp32
weights, Adam moments), which any number of processes loads with
``"checkpoint": {"load_universal": true}``. :func:`ensure_universal` runs that conversion once
per checkpoint, into ``step-N/universal`` next to the shards (``chatft universal CHECKPOINT``
does it ahead of time, e.g. on a machine with more memory).

The plain engine's state (one process, no ZeRO) and DeepSpeed's are different formats; a
checkpoint resumes on the engine family that wrote it, and the error says how to proceed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatft import checkpoint as ckpt
from chatft.config import TrainArgs
from chatft.errors import ChatftError, ConfigError

#: Folder of DeepSpeed's universal checkpoint inside a chatft checkpoint.
UNIVERSAL = "universal"
#: Folder of DeepSpeed's own shards inside a chatft checkpoint (the tag the engine saves).
SHARDS = "engine"
_DONE = "COMPLETE"


@dataclass(frozen=True)
class SavedLayout:
    """How the run that wrote a checkpoint was laid out."""

    engine: str  # "torch" (plain) or "deepspeed"
    world_size: int
    zero_stage: int  # 0 for the plain engine
    per_device: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.world_size


def saved_layout(folder: str | Path) -> SavedLayout:
    """Read the layout from a checkpoint: DeepSpeed's file names say the stage and the number
    of processes (one ``zero_pp_rank_R`` optimizer shard per process), the saved config the
    batch."""
    folder = Path(folder)
    state = ckpt.read_state(folder)
    train = state["config"]["train"]
    launch = state["config"]["launch"]
    per_device, accumulation = (int(train["per_device_train_batch_size"]),
                                int(train["gradient_accumulation_steps"]))
    if state.get("engine") != "deepspeed":
        return SavedLayout("torch", 1, 0, per_device, accumulation)
    shards = folder / SHARDS
    optim = list(shards.glob("zero_pp_rank_*_optim_states.pt"))
    if (shards / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        stage = 3
    elif optim:
        stage = int(state["config"]["deepspeed"].get("zero_stage") or 0) or 2  # 1 and 2 alike
    else:
        stage = 0
    world = len(optim) or int(launch.get("nproc", 1)) * int(launch.get("num_nodes", 1))
    return SavedLayout("deepspeed", world, stage, per_device, accumulation)


def keep_global_batch(global_batch: int, per_device: int, world: int) -> tuple[int, int]:
    """``(per_device', accumulation')`` with ``per_device' x accumulation' x world ==
    global_batch``: the largest per-device batch up to ``per_device`` that divides each
    process's share.

    >>> keep_global_batch(8, 4, 1), keep_global_batch(8, 4, 4), keep_global_batch(12, 4, 2)
    ((4, 2), (2, 1), (3, 2))
    """
    if global_batch % world:
        raise ConfigError(f"a global batch of {global_batch} samples cannot be split evenly over "
                          f"{world} processes; resume on a number of processes that divides it")
    share = global_batch // world
    for pd in range(min(per_device, share), 0, -1):
        if share % pd == 0:
            return pd, share // pd
    raise AssertionError("unreachable: 1 divides every share")


@dataclass
class ResumePlan:
    universal: bool  # load DeepSpeed's universal checkpoint (converted by ensure_universal)
    notes: list[str] = field(default_factory=list)  # what changed, for the user


def plan_resume(folder: str | Path, train: TrainArgs, uses_deepspeed: bool, zero_stage: int,
                world: int) -> ResumePlan:
    """How this run (``world`` processes, ``zero_stage``) resumes the checkpoint ``folder``;
    adjusts ``train``'s per-device batch and accumulation to keep the global batch when only
    the process count changed. Raises ConfigError for what cannot change."""
    folder = Path(folder)
    saved = saved_layout(folder)
    engine = "deepspeed" if uses_deepspeed else "torch"
    if saved.engine != engine:
        raise ConfigError(_engine_change(folder, saved, engine))
    notes: list[str] = []
    pd, acc = train.per_device_train_batch_size, train.gradient_accumulation_steps
    if pd * acc * world != saved.global_batch:
        if (pd, acc) == (saved.per_device, saved.accumulation) and world != saved.world_size:
            pd2, acc2 = keep_global_batch(saved.global_batch, pd, world)
            train.per_device_train_batch_size, train.gradient_accumulation_steps = pd2, acc2
            notes.append(f"keeping the checkpoint's global batch of {saved.global_batch} samples "
                         f"on {world} process(es) instead of {saved.world_size}: "
                         f"per_device_train_batch_size {pd} -> {pd2}, "
                         f"gradient_accumulation_steps {acc} -> {acc2}")
        elif train.resume_force:
            # The user changed the batch itself and accepted it: the data order and the step
            # count follow the new global batch. Without --resume_force the resume's settings
            # check refuses, naming this difference with every other one.
            notes.append(f"{folder} was trained with a global batch of {saved.global_batch} "
                         f"samples ({saved.per_device} per device x {saved.accumulation} "
                         f"accumulation x {saved.world_size} processes); this run's is "
                         f"{pd * acc * world} ({pd} x {acc} x {world}) (--resume_force)")
    universal = False
    if engine == "deepspeed" and (saved.zero_stage == 0) != (zero_stage == 0):
        raise ConfigError(
            f"{folder} was written by DeepSpeed {'without ZeRO' if saved.zero_stage == 0 else f'ZeRO-{saved.zero_stage}'}"
            f" and this run uses {'no ZeRO' if zero_stage == 0 else f'ZeRO-{zero_stage}'}: DeepSpeed "
            "converts between ZeRO stages 1-3 (universal checkpoint) but not to or from stage 0. "
            f"Resume with --zero_stage {saved.zero_stage}")
    if engine == "deepspeed" and (saved.zero_stage == 3) != (zero_stage == 3):
        # DeepSpeed 0.19.8 loads a universal checkpoint at ZeRO-3 from the model states of
        # zero_pp_rank_0 (written at ZeRO-3 only) and at stages 1-2 from mp_rank_00 (written
        # at stages 0-2 only): the universal form does not cross that line.
        raise ConfigError(
            f"{folder} was written at ZeRO-{saved.zero_stage} and this run uses ZeRO-{zero_stage}: "
            "DeepSpeed resumes a checkpoint on another number of processes but not across "
            f"stages 1-2 <-> 3 (the model states are stored differently). Resume with "
            f"--zero_stage {saved.zero_stage}, or start a new run from its weights: `chatft "
            f"export {folder} -o MODEL`, then `chatft train --model MODEL ...`")
    if engine == "deepspeed" and saved.zero_stage > 0 and saved.world_size != world:
        universal = True
        notes.append(f"{folder} holds ZeRO-{saved.zero_stage} shards of {saved.world_size} "
                     f"process(es); this run has {world} process(es) at ZeRO-{zero_stage}: "
                     f"loading DeepSpeed's universal checkpoint ({folder / UNIVERSAL})")
    return ResumePlan(universal, notes)


def _engine_change(folder: Path, saved: SavedLayout, engine: str) -> str:
    if saved.engine == "torch":
        return (f"{folder} was written by the plain PyTorch engine (one process, no ZeRO); this "
                "run uses DeepSpeed, which cannot read that optimizer state. Resume it with "
                "--nproc 1 and no ZeRO or offload (the plain engine), or start a new run from its "
                f"weights: `chatft export {folder} -o MODEL`, then `chatft train --model MODEL ...` "
                "(the optimizer state starts fresh)")
    return (f"{folder} was written by DeepSpeed (ZeRO-{saved.zero_stage}, {saved.world_size} "
            "process(es)); this run uses the plain PyTorch engine, which cannot read DeepSpeed's "
            "optimizer state. Resume it with --backend deepspeed (any number of processes), or "
            f"start a new run from its weights: `chatft export {folder} -o MODEL`, then "
            "`chatft train --model MODEL ...` (the optimizer state starts fresh)")


def convert_to_universal(folder: str | Path, log=print) -> Path:
    """Write DeepSpeed's universal checkpoint of ``folder`` into ``folder/universal`` (once;
    an existing complete one is kept). Returns its path."""
    folder = Path(folder)
    target = folder / UNIVERSAL
    if (target / _DONE).is_file():
        return target
    if not (folder / SHARDS).is_dir():
        raise ChatftError(f"{folder}: no DeepSpeed shards ({SHARDS}/) to convert")
    # DeepSpeed's converter unpickles the shards freely: refuse any that names a global
    # beyond DeepSpeed's allow-list first (read, never run; chatft.integrity.pickles).
    from chatft.integrity.pickles import DEEPSPEED_GLOBALS, scan

    for shard in sorted((folder / SHARDS).glob("*.pt")):
        scan(shard, DEEPSPEED_GLOBALS)
    tmp = folder / (UNIVERSAL + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, (os.cpu_count() or 2) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(folder / SHARDS), "--output_folder", str(tmp), "--num_extract_workers", workers,
           "--num_merge_workers", "1", "--inject_missing_state"]
    log(f"converting {folder / SHARDS} into DeepSpeed's universal checkpoint {target}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ChatftError(f"{folder}: DeepSpeed's universal checkpoint conversion failed "
                          f"({' '.join(cmd[1:4])}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    (tmp / _DONE).write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    log(f"universal checkpoint written in {time.perf_counter() - t0:.1f} s")
    return target


def ensure_universal(folder: str | Path, rank: int, log=print, poll_s: float = 1.0) -> Path:
    """Process 0 converts (:func:`convert_to_universal`); the others wait for the result in
    the shared folder (the heartbeat stops them if process 0 dies meanwhile)."""
    target = Path(folder) / UNIVERSAL
    if rank == 0:
        return convert_to_universal(folder, log)
    while not (target / _DONE).is_file():
        time.sleep(poll_s)
    return target
