"""Checkpoints from the training side: saving one on every process, and choosing the one a run
resumes from.

Saving (:func:`save_checkpoint`) writes nothing whose weights are not finite, checks the disk
space first (the last checkpoint's size, else the engine's estimate), lets every process write
and then hash its share of the files (:mod:`chatft.integrity.manifest`), and has process 0
finalize (:func:`chatft.checkpoint.finalize`: manifest, fsync, rename, rotation). Processes
agree on every outcome through one all-reduce, so a failure on one of them (a full disk) is
reported by all instead of leaving the others waiting.

Resuming (:func:`resume`) checks each candidate against its manifest, newest first
(``--resume auto`` falls back past damaged ones, saying so), refuses a checkpoint trained with
other settings unless ``resume_force``, and loads it without running code from it.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from chatft import __version__
from chatft import checkpoint as ckpt
from chatft.config import SECTIONS, TrainArgs
from chatft.errors import ChatftError, ConfigError
from chatft.integrity import manifest
from chatft.integrity.disk import DiskFullError, disk_full_message, free_bytes, gb, out_of_space
from chatft.integrity.pickles import DamagedCheckpointError
from chatft.train.engine import Engine
from chatft.train.metrics import say


#: Settings a resumed run must share with its checkpoint (``--resume_force`` overrides): they
#: change what the remaining steps learn. The training data's content is compared apart (its
#: tokenized cache key, recorded in the checkpoint), and so is the global batch (processes x
#: per-device batch x accumulation), whose split does not change what is learned.
RESUME_SETTINGS = (
    "model.name_or_path", "model.tokenizer", "model.random_init",
    "data.format", "data.system", "data.train_on", "data.max_length", "data.overlong",
    "data.skip_bad", "data.eval_ratio",
    "train.num_train_epochs", "train.max_steps", "train.learning_rate", "train.weight_decay",
    "train.adam_beta1", "train.adam_beta2", "train.adam_epsilon", "train.max_grad_norm",
    "train.lr_scheduler_type", "train.warmup_ratio", "train.warmup_steps", "train.precision",
    "train.seed", "train.optim", "train.master_weights", "train.optimizer_in_bwd",
)


def _global_batch(values: dict[str, dict[str, Any]]) -> tuple[int, str]:
    t, la = values.get("train", {}), values.get("launch", {})
    parts = (t.get("per_device_train_batch_size", 8), t.get("gradient_accumulation_steps", 1),
             la.get("nproc", 1) * la.get("num_nodes", 1))
    return parts[0] * parts[1] * parts[2], (f"{parts[0]} per device x {parts[1]} accumulated x "
                                            f"{parts[2]} process(es)")


def resume_differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
                       ) -> list[str]:
    """How ``current`` differs from ``saved`` (both :meth:`Config.to_dict`) in the settings a
    resume must keep: one sentence per difference (empty: none)."""
    out = []
    for dotted in RESUME_SETTINGS:
        section, _, name = dotted.partition(".")
        default = vars(SECTIONS[section]())[name]
        before = saved.get(section, {}).get(name, default)
        now = current.get(section, {}).get(name, default)
        if before != now:
            out.append(f"{dotted}: {before!r} in the checkpoint, {now!r} now")
    (gb_before, how_before), (gb_now, how_now) = _global_batch(saved), _global_batch(current)
    if gb_before != gb_now:
        out.append(f"global batch: {gb_before} samples ({how_before}) in the checkpoint, "
                   f"{gb_now} ({how_now}) now")
    return out


def _count(engine: Engine, *flags: bool) -> list[int]:
    """How many processes raised each flag (a collective: every process calls it)."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=engine.device)
    return [int(v) for v in engine.all_reduce_sum(t).tolist()]


def _every_rank(error: ChatftError) -> ChatftError:
    error.every_rank = True
    return error


def _needed_bytes(engine: Engine, out: Path) -> int:
    """The newest checkpoint's size when there is one (exact), else the engine's estimate."""
    estimate = torch.tensor([float(engine.checkpoint_bytes())], dtype=torch.float64,
                            device=engine.device)
    needed = int(engine.all_reduce_sum(estimate).item())
    previous = ckpt.complete_checkpoints(out)
    found = manifest.read_manifest(previous[-1]) if previous else None
    return int(found["total_bytes"]) if found and "total_bytes" in found else needed


def check_space_before_training(engine: Engine, args: TrainArgs, saves: bool) -> None:
    """Refuse to start a run whose first checkpoint cannot fit on the disk (every process
    calls this), and say how large each checkpoint will be. Without it the shortage shows only
    at the first save, after an epoch of work. The size is the full checkpoint's: the engines
    count the optimizer's moments, which do not exist before step 1 (each save checks again,
    against the newest checkpoint's size once there is one)."""
    if not saves:
        return
    out = Path(args.output_dir)
    needed = _needed_bytes(engine, out)
    free = free_bytes(out) if engine.rank == 0 else 0
    if _count(engine, engine.rank == 0 and free < needed)[0]:
        raise _every_rank(DiskFullError(
            disk_full_message("checkpoints", out, needed)
            + "; or train without checkpoints: --save_strategy no"))
    say(f"checkpoints: about {gb(needed)} each, {gb(free)} free in {out}", engine.rank)


def save_checkpoint(engine: Engine, args: TrainArgs, step: int, record: Any,
                    state: dict[str, Any], protected: Collection[Path] = ()) -> Path | None:
    """Save step ``step`` (every process calls this); returns the checkpoint folder, or None
    when the weights are not finite (nothing written). ``record`` is the loop's RunRecord,
    ``state`` what the trainer state adds (the step's loss, epoch, evaluations); rotation
    keeps ``protected`` (the best evaluated checkpoint)."""
    out, rank, world = Path(args.output_dir), engine.rank, engine.world_size
    name = ckpt.step_name(step)
    if _count(engine, not engine.finite_weights())[0]:
        say(f"step {step}: no checkpoint saved: some weights are not finite", rank)
        return None
    needed = _needed_bytes(engine, out)
    if rank == 0:
        ckpt.clean_partials(out)
        ckpt.checkpoints_dir(out).mkdir(parents=True, exist_ok=True)
    short = rank == 0 and free_bytes(ckpt.checkpoints_dir(out)) < needed
    if _count(engine, short)[0]:
        raise _every_rank(DiskFullError(disk_full_message(f"checkpoint {name}",
                                                          ckpt.checkpoints_dir(out), needed)))
    part = ckpt.partial_path(out, step)
    trainer_state = {"step": step, "config": record.config, "engine": engine.kind,
                     "base_model": record.base_model, "data_key": record.data_key,
                     "world_size": world, "chatft_version": __version__, **state}

    def attempt(fn) -> Any:
        """Run ``fn`` here; all processes then agree whether it worked everywhere."""
        error, result = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported below, after every process agreed
            error = e
        failed, full = _count(engine, error is not None, error is not None and out_of_space(error))
        if failed:
            if rank == 0:
                shutil.rmtree(part, ignore_errors=True)  # frees what the failed save took
            if full:
                raise _every_rank(DiskFullError(disk_full_message(
                    f"checkpoint {name}", ckpt.checkpoints_dir(out), needed))) from error
            if error is not None:
                raise error
            raise ChatftError(f"checkpoint {name}: another process failed while saving it "
                              f"(its error is above)")
        return result

    def write() -> None:
        if engine.writes_checkpoint:
            engine.save(part, {"step": step})
        if rank == 0:
            model_dir = part / "model"
            model_dir.mkdir(parents=True, exist_ok=True)
            engine.model.config.save_pretrained(model_dir)
            record.tokenizer.save_pretrained(model_dir)

    started = time.perf_counter()
    attempt(write)
    written = time.perf_counter()
    attempt(lambda: manifest.hash_share(part, rank, world))
    final = attempt(lambda: ckpt.finalize(out, step, trainer_state, args.save_total_limit,
                                          world=world, protected=protected)
                    if rank == 0 else None)
    engine.barrier()
    if rank == 0:
        size = manifest.read_manifest(final)["total_bytes"]
        say(f"saved {final} ({gb(size)}: written in {written - started:.1f} s, checksummed and "
            f"synced to disk in {time.perf_counter() - written:.1f} s)")
    return ckpt.checkpoints_dir(out) / name


def resume(engine: Engine, args: TrainArgs, record: Any) -> tuple[int, Path | None]:
    """``(first step to train, checkpoint resumed from)`` as ``args.resume`` asks; ``(0,
    None)`` for a fresh start. Every process calls this."""
    if not args.resume:
        return 0, None
    out, rank = Path(args.output_dir), engine.rank
    if args.resume == "auto":
        candidates = ckpt.newest_first(out)
        if not candidates:
            say(f"resume auto: no checkpoint in {ckpt.checkpoints_dir(out)}, starting fresh", rank)
            return 0, None
    else:
        candidates = [Path(args.resume)]
        if not ckpt.is_checkpoint(candidates[0]):
            raise _every_rank(ChatftError(
                f"--resume {args.resume}: not a complete chatft checkpoint (no {ckpt.MARKER} or "
                f"{ckpt.STATE_FILE}); give a folder like {ckpt.checkpoints_dir(out)}/step-000040, "
                f"or --resume auto"))
    damaged = []
    for folder in candidates:
        problems = manifest.verify(folder, rank, engine.world_size)
        for p in problems:
            print(f"chatft: {folder} is damaged: {p}", file=sys.stderr, flush=True)
        if _count(engine, bool(problems))[0]:
            damaged.append(folder.name)
            if args.resume != "auto":
                raise _every_rank(DamagedCheckpointError(
                    f"--resume {folder}: the checkpoint is damaged (its files do not match its "
                    f"{manifest.MANIFEST}, see above); resume from another one, or --resume auto"))
            say(f"{folder.name} is damaged (see above): trying the next older checkpoint", rank)
            continue
        if manifest.read_manifest(folder) is None:
            say(f"warning: {folder} has no {manifest.MANIFEST} (written by an older chatft): "
                f"its files cannot be checked", rank)
        _check_settings(folder, engine, record, args.resume_force)
        client = engine.load(folder)
        note = f" (the newest good one; damaged: {', '.join(damaged)})" if damaged else ""
        say(f"resumed from {folder}{note} at step {int(client['step'])}", rank)
        return int(client["step"]), folder
    raise _every_rank(DamagedCheckpointError(
        f"--resume auto: every checkpoint in {ckpt.checkpoints_dir(out)} is damaged "
        f"({', '.join(damaged)}; see above); delete them to start afresh"))


def _check_settings(folder: Path, engine: Engine, record: Any, force: bool) -> None:
    """Refuse a checkpoint of another engine; name every setting that differs and refuse
    unless ``force``."""
    state = ckpt.read_state(folder)
    if state.get("engine", engine.kind) != engine.kind:
        names = {"torch": "the plain PyTorch engine", "deepspeed": "DeepSpeed"}
        raise _every_rank(ConfigError(
            f"--resume {folder}: written by {names.get(state['engine'], state['engine'])}, but "
            f"this run trains with {names.get(engine.kind, engine.kind)}: their checkpoints "
            f"differ. Resume with the engine settings of that run (backend, zero_stage, nproc)"))
    saved = state.get("config", {})
    diffs = resume_differences(saved, record.config)
    if state.get("data_key") and record.data_key and state["data_key"] != record.data_key:
        diffs.insert(0, f"training data: tokenized data {state['data_key']} in the checkpoint, "
                        f"{record.data_key} now (the data file, the tokenizer, its chat template "
                        f"or a data option changed)")
    elif not state.get("data_key"):  # older checkpoints: only the path can be compared
        before, now = saved.get("data", {}).get("path"), record.config.get("data", {}).get("path")
        if before != now:
            diffs.insert(0, f"data.path: {before!r} in the checkpoint, {now!r} now")
    if not diffs:
        return
    listed = "\n  - ".join(diffs)
    if not force:
        raise _every_rank(ConfigError(
            f"--resume {folder}: this run's settings differ from the checkpoint's:\n  - {listed}\n"
            f"Resume anyway with --resume_force, or start afresh in another output_dir"))
    say(f"resuming despite different settings (--resume_force):\n  - {listed}", engine.rank)

