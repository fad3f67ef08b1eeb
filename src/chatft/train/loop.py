"""The training loop: one function, the same for one CPU process and many GPUs.

:func:`train` only trains: resume, steps, held-out loss, checkpoints, metrics. It is given a
built engine and tokenized data and returns what it produced, the engine included, and which
step's weights the export should hold (the best evaluated checkpoint, see
:mod:`chatft.train.evaluation`); the job step (:mod:`chatft.job.run`) builds those and exports
and asks afterwards.

Loss normalization. A step's loss is the mean negative log-likelihood per trained token of the
*whole global batch*: every micro-batch contributes ``sum(token losses) / N_step``, where
``N_step`` (targets in the step, over all processes) is known in advance from the plan. The
gradient is thus identical however the step is split into micro-batches, processes or packed
rows, which is what makes (micro-batch 4 x accumulation 1) == (2 x 2) == 2 processes, and
packed == unpacked. DeepSpeed averages gradients over processes, so each process scales its
loss by ``world_size`` to turn that average back into the sum.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from chatft import checkpoint as ckpt
from chatft.config import Schedule, TrainArgs
from chatft.data.labels import trained_count
from chatft.data.prepare import TokenizedDataset
from chatft.errors import ChatftError
from chatft.train.batching import (CUDA_TOKEN_MULTIPLE, Batch, StepPlan, eval_plans, pack, pad,
                                   plan_step)
from chatft.train.checkpointing import check_space_before_training, resume, save_checkpoint
from chatft.train.divergence import BadStepGuard, bad_step_reason
from chatft.train.engine import Engine, Forward
from chatft.train.evaluation import History, due
from chatft.train.metrics import CURVE_FILE, MetricsLog, plot_loss_curve, say
from chatft.train.schedule import lr_at, run_length
from chatft.train.stopping import Stopped, StopSignals


@dataclass
class TrainData:
    """What the loop trains on: tokenized samples and how they become micro-batches."""

    train: TokenizedDataset
    eval: TokenizedDataset | None  # held-out samples (None or empty: no evaluation)
    pad_id: int  # filler token of packed rows and padded batches
    packing: bool  # one padding-free row per micro-batch, else padded to the longest sample


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint stores besides the engine's state, so that ``chatft export`` can
    rebuild the model folder from a checkpoint alone."""

    tokenizer: Any  # saved under model/ with the model's config
    config: dict[str, Any]  # the run's whole configuration (``Config.to_dict()``)
    base_model: str  # what training started from (path or alias)
    data_key: str | None = None  # the tokenized training data's cache key (what a resume compares)


@dataclass
class TrainResult:
    steps: int  # the run's last optimizer step (earlier than planned after an early stop)
    final_loss: float | None  # of the last step trained here (None when resumed at the end)
    eval_loss_before: float | None
    eval_loss_after: float | None  # at the last step
    resumed_from: Path | None  # the checkpoint this run continued from
    engine: Engine  # the trained engine, still holding the last step's weights
    history: History  # every evaluation, the best checkpoint
    export_step: int  # whose weights the export holds: the best checkpoint's or the last step's
    export_reason: str  # why, for the summary line ("step 210 (epoch 1): lowest eval_loss ...")
    export_from: Path | None  # the checkpoint to reload before exporting (None: the engine's)


class Samples:
    """A tokenized dataset with the per-sample arrays the step planner needs."""

    def __init__(self, ds: TokenizedDataset):
        self.ds = ds
        self.lengths = ds.lengths
        self.trained = np.array([trained_count(ds.sample(i)[1]) for i in range(len(ds))])

    def batch(self, indices: list[int], packing: bool, pad_id: int, multiple: int) -> Batch:
        samples = [self.ds.sample(i) for i in indices]
        return pack(samples, multiple, pad_id) if packing else pad(samples, pad_id)


def evaluate(engine: Forward, data: Samples, args: TrainArgs, packing: bool, pad_id: int,
             multiple: int) -> float:
    """Mean NLL per trained token over the held-out set (all processes take part), in
    micro-batches of training's size. ``chatft eval`` calls this too, so its loss is
    training's."""
    plans = eval_plans(data.lengths, data.trained,
                       global_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * engine.world_size,
                       world_size=engine.world_size, rank=engine.rank,
                       accumulation=args.gradient_accumulation_steps,
                       micro_batch_tokens=args.micro_batch_tokens)
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    with engine.eval_mode():
        for plan in plans:
            for mb in plan.micro_batches:
                loss_sum, n = engine.forward(data.batch(mb, packing, pad_id, multiple))
                total += torch.stack([loss_sum.double(), n.double()]).to(total.device)
    engine.all_reduce_sum(total)
    return float(total[0] / total[1])


def token_multiple(device: torch.device) -> int:
    """Packed rows are padded to a multiple of this many tokens (CUDA kernels' alignment)."""
    return CUDA_TOKEN_MULTIPLE if device.type == "cuda" else 1


def held_out_loss(engine: Forward, data: TrainData, args: TrainArgs) -> float:
    """``data.eval``'s loss exactly as :func:`train` measures it (for ``chatft eval``)."""
    assert data.eval is not None
    return evaluate(engine, Samples(data.eval), args, data.packing, data.pad_id,
                    token_multiple(engine.device))


def run_step(engine: Engine, data: Samples, plan: StepPlan, packing: bool, pad_id: int,
             multiple: int) -> torch.Tensor:
    """Forward/backward over this process's micro-batches; returns the local loss sum."""
    local = torch.zeros((), dtype=torch.float32, device=engine.device)
    last = len(plan.micro_batches) - 1
    for k, mb in enumerate(plan.micro_batches):
        loss_sum, _ = engine.forward(data.batch(mb, packing, pad_id, multiple))
        engine.backward(loss_sum * (engine.world_size / plan.trained_tokens), k == last)
        local += loss_sum.detach().float()
    return local


def gpu_memory_peaks(engine: Engine) -> dict[str, list[float]]:
    """Peak GPU memory of every process so far, in GiB and rank order: what torch allocated
    and what its caching allocator reserved. Empty off CUDA. Every process must call it."""
    if engine.device.type != "cuda":
        return {}
    mine = torch.tensor([torch.cuda.max_memory_allocated(engine.device),
                         torch.cuda.max_memory_reserved(engine.device)],
                        dtype=torch.float64, device=engine.device) / 2**30  # [2]
    if engine.world_size > 1:
        every = torch.empty(2 * engine.world_size, dtype=torch.float64, device=engine.device)
        dist.all_gather_into_tensor(every, mine)  # [world * 2], rank-major
        mine = every
    pairs = mine.view(-1, 2).tolist()
    return {"gpu_mem_allocated_gib": [round(a, 3) for a, _ in pairs],
            "gpu_mem_reserved_gib": [round(r, 3) for _, r in pairs]}


def train(engine: Engine, data: TrainData, args: TrainArgs, record: RunRecord) -> TrainResult:
    """Train as ``args`` says: resume, steps, held-out loss, checkpoints, metrics. Every
    process calls this with its engine; none exports (the caller does, from the result)."""
    rank, world, device = engine.rank, engine.world_size, engine.device
    train_data = Samples(data.train)
    eval_data = Samples(data.eval) if data.eval is not None and len(data.eval) else None
    length = run_length(args, len(train_data.lengths), world)
    per_epoch, total_steps = length.steps_per_epoch, length.total_steps
    multiple = token_multiple(device)

    out = Path(args.output_dir)
    schedule = Schedule.of(args, held_out=eval_data is not None)
    start_step, resumed_from = resume(engine, args, record)
    history = History(args.early_stopping_patience, args.early_stopping_threshold)
    if resumed_from is not None:  # the evaluations so far, the best and the patience count
        history = History.from_dict(ckpt.read_state(resumed_from).get("evaluation"),
                                    args.early_stopping_patience, args.early_stopping_threshold)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    check_space_before_training(engine, args, saves=schedule.save != "no")
    say(f"{len(train_data.lengths)} training samples, global batch {length.global_batch}, "
        f"{per_epoch} steps/epoch, {total_steps} steps, {world} process(es) on {device.type}, "
        f"{engine.description}, {engine.precision}", rank)
    metrics = MetricsLog(out, enabled=rank == 0, total_steps=total_steps, start_step=start_step,
                         tensorboard=args.report_to == "tensorboard")

    def held_out_loss() -> float:
        assert eval_data is not None
        return evaluate(engine, eval_data, args, data.packing, data.pad_id, multiple)

    def evaluated(step: int, checkpoint: bool) -> None:
        loss = held_out_loss()
        epoch = round(step / per_epoch, 4)
        history.add(step, epoch, loss, checkpoint)
        metrics.log({"step": step, "epoch": epoch, "eval_loss": loss})

    if eval_data is not None and start_step == 0:
        evaluated(0, checkpoint=False)
    end_step = total_steps
    if history.should_stop:  # resumed from the checkpoint where early stopping stopped
        say(f"early stopping had stopped this run at step {start_step}; nothing to train", rank)
        end_step = start_step
    step_loss = None
    tokens_done = 0
    last_step = start_step
    guard = BadStepGuard(args.max_bad_steps)
    last_good = resumed_from  # the newest checkpoint this run can vouch for
    t0 = time.perf_counter()
    try:
        with StopSignals(rank) as signals:
            for step in range(start_step, end_step):
                torch.manual_seed(args.seed + step)  # resume-proof randomness (dropout, if any)
                epoch, in_epoch = divmod(step, per_epoch)
                plan = plan_step(train_data.lengths, train_data.trained,
                                 global_batch=length.global_batch, seed=args.seed, epoch=epoch,
                                 step_in_epoch=in_epoch, world_size=world, rank=rank,
                                 accumulation=args.gradient_accumulation_steps,
                                 micro_batch_tokens=args.micro_batch_tokens)
                step_start = time.perf_counter()
                lr = lr_at(step, peak=args.learning_rate, total_steps=total_steps,
                           warmup=length.warmup_steps, kind=args.lr_scheduler_type)
                if engine.lr_managed_externally:  # a DeepSpeed JSON scheduler sets the rate
                    lr = engine.current_lr()
                engine.begin_step(lr)  # an optimizer stepping in backward needs the rate before it
                local = run_step(engine, train_data, plan, data.packing, data.pad_id, multiple)
                # One all-reduce before the update: the step's loss (is it finite?) and how many
                # processes were asked to stop (so all of them stop after this same step).
                flag = local.new_tensor(float(signals.requested))
                summed = engine.all_reduce_sum(torch.stack([local, flag]))
                step_loss = float(summed[0]) / plan.trained_tokens
                stop = float(summed[1]) > 0
                grad_norm = engine.step(lr, skip=not math.isfinite(step_loss))
                bad = bad_step_reason(step_loss, grad_norm, engine.precision)
                guard.observe(step + 1, bad)
                elapsed = time.perf_counter() - step_start
                tokens_done += plan.tokens
                done = last_step = step + 1
                if done % args.logging_steps == 0 or done == total_steps or bad:
                    memory = gpu_memory_peaks(engine)  # every process takes part
                    if rank == 0:
                        metrics.log({"step": done, "epoch": round(step / per_epoch + 1 / per_epoch, 4),
                                     "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                     "tokens": plan.tokens, "trained_tokens": plan.trained_tokens,
                                     "step_time_s": elapsed, "tokens_per_s": plan.tokens / elapsed,
                                     "time": time.time(), **memory,
                                     **({"skipped": True, "bad_steps": guard.total} if bad else {})})
                metrics.advance()
                if bad:
                    say(f"step {done}: {bad}: update skipped ({guard.consecutive} in a row; "
                        f"training stops at {args.max_bad_steps})", rank)
                    if guard.exhausted:
                        raise guard.error(done, bad, lr, last_good)
                # Evaluate before saving, so the checkpoint's record includes its own evaluation;
                # the last step always evaluates (held-out data) and saves (a save strategy); a
                # stop request saves the step it stops after and skips its evaluation.
                saving = schedule.save != "no" and not bad and (
                    due(schedule.save, schedule.save_steps, done, per_epoch) or done == total_steps
                    or stop)
                if eval_data is not None and not stop and (
                        due(schedule.eval, schedule.eval_steps, done, per_epoch) or done == total_steps):
                    evaluated(done, checkpoint=saving)
                    if history.should_stop and not saving and schedule.save != "no" and not bad:
                        saving = True  # the run ends here: keep its state
                        history.mark_checkpoint(done)
                if bad and (stop or due(schedule.save, schedule.save_steps, done, per_epoch)):
                    say(f"step {done}: no checkpoint (its update was skipped)", rank)
                if saving:
                    best = history.best if schedule.load_best else None
                    protected = [ckpt.checkpoints_dir(out) / ckpt.step_name(best.step)] if best else []
                    last_good = save_checkpoint(
                        engine, args, done, record,
                        {"loss": step_loss, "epoch": round(done / per_epoch, 4),
                         "evaluation": history.to_dict()}, protected) or last_good
                if stop:
                    raise _stopped(signals, done, total_steps, last_good, schedule.save)
                if history.should_stop:
                    say(f"early stopping at step {done}: {history.bad_evaluations} evaluation(s) "
                        f"in a row without improving eval_loss by more than "
                        f"{args.early_stopping_threshold:g} (early_stopping_patience "
                        f"{args.early_stopping_patience})", rank)
                    break
    finally:
        metrics.close()
    train_time = time.perf_counter() - t0

    export_step, why = history.export_choice(last_step, round(last_step / per_epoch, 4),
                                             schedule.load_best)
    export_from = None
    if export_step != last_step:
        export_from = ckpt.checkpoints_dir(out) / ckpt.step_name(export_step)
        if not ckpt.is_checkpoint(export_from):
            raise ChatftError(f"the best checkpoint {export_from} is missing or incomplete; "
                              f"export it by hand (chatft export) or rerun without "
                              f"--load_best_model_at_end")
    before, after = history.baseline, history.at(last_step)
    if rank == 0:
        say(f"trained {last_step - start_step} steps in {train_time:.1f} s "
            f"({tokens_done / max(train_time, 1e-9):,.0f} tokens/s)"
            + (f"; held-out loss {before.eval_loss:.4f} -> {after.eval_loss:.4f}"
               if before is not None and after is not None and last_step > start_step else ""))
        plot_loss_curve(metrics.records(), out / CURVE_FILE, marked_step=export_step)
    return TrainResult(last_step, step_loss, before.eval_loss if before else None,
                       after.eval_loss if after else None, resumed_from, engine, history,
                       export_step, why, export_from)


def _stopped(signals: StopSignals, done: int, total: int, saved: Path | None,
             save_strategy: str) -> Stopped:
    """The error that ends a run stopped by a signal, saying what was saved."""
    signum = signals.signum or signal.SIGTERM
    name = signal.Signals(signum).name if signals.signum else "a signal to another process"
    if saved is not None and saved.name == ckpt.step_name(done):
        what = (f"saved checkpoint {saved}; continue with the same command and --resume auto")
    elif saved is not None:
        what = f"step {done} was not saved; the newest checkpoint is {saved}"
    else:
        what = (f"no checkpoint was saved (save_strategy {save_strategy})"
                if save_strategy == "no" else "no checkpoint was saved")
    return Stopped(f"stopped by {name} after step {done} of {total}: {what}", signum)
