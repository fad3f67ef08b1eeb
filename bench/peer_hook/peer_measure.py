"""Measurement inside a peer tool's training process (LLaMA-Factory, ms-swift).

Both tools train with Hugging Face ``Trainer``. ``sitecustomize.py`` beside this file runs at
interpreter start (this folder is on ``PYTHONPATH`` for peer runs only) and calls
:func:`install`, which waits for ``transformers.trainer`` to be imported and then wraps
``Trainer.__init__`` to add the recorder callback: every ``Trainer`` the tool builds gets it,
whatever the tool's own callback list. Nothing else of the tool is changed.

Per optimizer step the recorder writes (``PEER_MEASURE_OUT``, a JSON file rewritten after each
step, so a crash keeps the steps done):

* wall time between consecutive step ends (the first from ``on_train_begin``), with the CUDA
  queue drained before each reading;
* tokens the model was fed, counted from the inputs of every ``training_step`` (collated,
  before the tool's loss code runs) the same way for every tool: ``nonpad`` = tokens of
  ``input_ids`` that are not the pad id (packed rows and padded batches alike), ``all`` =
  every position, ``trained`` = labels that are not -100;
* the length and trained labels of every sample in the step: a packed row's segments start
  where ``position_ids`` is 0 (padding left out); without position ids, one sample per row;
* ``torch.cuda.max_memory_allocated/reserved``;
* the tool's own token count, Hugging Face Trainer's ``num_input_tokens_seen`` (the recorder
  turns on its ``non_padding`` mode);
* every ``on_log`` record (losses, the tool's own eval loss, learning rate).

``PEER_MEASURE_STOP_AFTER=K`` ends the process right after step K's record is written
(``os._exit(0)``): the tools save the whole model when training ends, ~15 GB for a 7B model,
which a speed row must not wait for. Only torch, transformers and the standard library are
imported here: a peer's process has its own packages.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

IGNORE_INDEX = -100
_TARGET = "transformers.trainer"


def segment_starts_from_mask(mask):
    """Where samples start in packed rows that carry their boundaries in the attention mask
    instead of position ids, as position-id-like ``[B, T]`` (0 at a start, 1 elsewhere).
    ``mask``: ``[B, 1, T, T]`` block-diagonal causal (LLaMA-Factory's neat packing: float, 0
    where attended, the dtype's minimum where not; or bool) or ``[B, T]`` segment ids
    (1, 1, 2, 2, ..., 0 on padding). Token i starts a sample when it may not attend to i-1.

    >>> import torch
    >>> m = torch.tensor([[1, 1, 2, 2, 2, 0]])
    >>> segment_starts_from_mask(m).tolist()
    [[0, 1, 0, 1, 1, 0]]
    """
    import torch

    if mask.dim() == 4:
        diag = torch.diagonal(mask[:, 0], offset=-1, dim1=-2, dim2=-1)  # [B, T-1]: (i, i-1)
        sees_prev = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
        if diag.dtype != torch.bool and not diag.is_floating_point():
            sees_prev = diag != 0
    else:
        sees_prev = (mask[:, 1:] == mask[:, :-1]) & (mask[:, 1:] != 0)  # [B, T-1]
    first = torch.zeros_like(sees_prev[:, :1], dtype=torch.long)
    return torch.cat([first, sees_prev.long()], dim=1)


def segments(input_ids, position_ids, pad_id: int, labels=None) -> list[tuple[int, int]]:
    """``(length, trained labels)`` of each sample in one batch. ``input_ids``: ``[B, T]``;
    ``position_ids``, ``labels``: ``[B, T]`` or None. Padding (``pad_id``) is dropped first; in
    what remains a sample starts wherever the position id is 0 (packed rows; see
    :func:`segment_starts_from_mask` for rows whose mask marks the boundaries), or each row is
    one sample (no position ids). Trained labels are those that are not -100 (0 without labels).

    >>> import torch
    >>> ids, pos = torch.tensor([[5, 6, 7, 8, 9, 0]]), torch.tensor([[0, 1, 0, 1, 2, 0]])
    >>> segments(ids, pos, 0, torch.tensor([[-100, 6, -100, 8, 9, -100]]))
    [(2, 1), (3, 2)]
    >>> segments(torch.tensor([[5, 6, 0], [7, 0, 0]]), None, 0)
    [(2, 0), (1, 0)]
    """
    import torch

    keep = input_ids != pad_id  # [B, T]
    if position_ids is not None and position_ids.shape != input_ids.shape:
        position_ids = None
    if labels is not None and labels.shape != input_ids.shape:
        labels = None
    out: list[tuple[int, int]] = []
    for r in range(input_ids.shape[0]):
        row_keep = keep[r]
        n = int(row_keep.sum())
        if n == 0:
            continue
        trained = (labels[r][row_keep] != IGNORE_INDEX) if labels is not None else None  # [n]
        if position_ids is None:
            starts = [0]
        else:
            pos = position_ids[r][row_keep]  # [n] positions of the real tokens
            starts = torch.nonzero(pos == 0).flatten().tolist()
            if not starts or starts[0] != 0:
                starts = [0] + starts  # a row that continues a sample from the previous row
        bounds = starts + [n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            out.append((b - a, int(trained[a:b].sum()) if trained is not None else 0))
    return out


class _Counter:
    """What the Trainer fed the model since the last optimizer step (read from the inputs of
    each ``training_step``, before the tool's loss code can pop the labels)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.pending: list[tuple] = []  # (input_ids, position_ids, labels, mask) per micro-batch

    def record(self, inputs) -> None:
        input_ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if input_ids is None:
            return
        pos, labels = inputs.get("position_ids"), inputs.get("labels")
        mask = inputs.get("attention_mask")
        # Detached references only; read after the step's synchronize (no extra sync here).
        self.pending.append((input_ids.detach(), None if pos is None else pos.detach(),
                             None if labels is None else labels.detach(),
                             None if mask is None else mask.detach()))

    def drain(self) -> dict:
        nonpad = total = trained = 0
        samples: list[tuple[int, int]] = []
        for ids, pos, labels, mask in self.pending:
            ids2 = ids.reshape(-1, ids.shape[-1])  # [B, T]
            if mask is not None and (mask.dim() == 4 or (mask.dim() == 2 and int(mask.max()) > 1)):
                # Packed rows whose mask holds the boundaries (position ids may run on across them).
                pos = segment_starts_from_mask(mask)
            pos2 = pos if pos is not None and pos.dim() == 2 else None
            nonpad += int((ids2 != self.pad_id).sum())
            total += ids2.numel()
            if labels is not None:
                trained += int((labels != IGNORE_INDEX).sum())
            samples += segments(ids2, pos2, self.pad_id, labels)
        self.pending.clear()
        return {"nonpad": nonpad, "all": total, "trained": trained,
                "lengths": [n for n, _ in samples], "trained_per_sample": [t for _, t in samples]}


def _write(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def make_recorder_class():
    """The ``TrainerCallback`` subclass (built after transformers is imported)."""
    import torch
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.out = os.environ.get("PEER_MEASURE_OUT")
            self.stop_after = int(os.environ.get("PEER_MEASURE_STOP_AFTER", "0") or 0)
            self.counter = _Counter(int(os.environ.get("PEER_PAD_ID", "-1")))
            self.cuda = torch.cuda.is_available()
            self.rank = int(os.environ.get("RANK", "0"))
            self.record: dict = {"pid": os.getpid(), "rank": self.rank, "steps": [], "logs": [],
                                 "process_start_unix": _process_start_unix()}
            self.last = 0.0

        def _sync(self) -> None:
            if self.cuda:
                torch.cuda.synchronize()

        def _save(self) -> None:
            if self.out and self.rank == 0:
                _write(self.out, self.record)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # The tool's own token count, in the mode that leaves padding out.
            args.include_num_input_tokens_seen = "non_padding"
            r = self.record
            r.update({"train_begin_unix": time.time(), "max_steps": state.max_steps,
                      "num_train_epochs": args.num_train_epochs,
                      "per_device_train_batch_size": args.per_device_train_batch_size,
                      "gradient_accumulation_steps": args.gradient_accumulation_steps,
                      # A tool may switch recomputation on in the model, not the arguments.
                      "gradient_checkpointing": bool(args.gradient_checkpointing) or bool(
                          getattr(model, "is_gradient_checkpointing", False)),
                      "bf16": bool(args.bf16), "deepspeed": bool(args.deepspeed),
                      "attn_implementation": getattr(getattr(model, "config", None),
                                                     "_attn_implementation", None),
                      "model_dtype": str(next(model.parameters()).dtype) if model is not None
                      else None,
                      "model_class": type(model).__name__ if model is not None else None,
                      "world_size": args.world_size})
            self._save()
            self._sync()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            now = time.perf_counter()
            step = {"step": state.global_step, "time_s": now - self.last, "end_unix": time.time(),
                    "num_input_tokens_seen": state.num_input_tokens_seen,
                    **self.counter.drain()}
            if self.cuda:
                step["max_memory_allocated"] = torch.cuda.max_memory_allocated()
                step["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            self.record["steps"].append(step)
            self._save()
            if self.stop_after and state.global_step >= self.stop_after:
                self.record["stopped_after"] = state.global_step
                self._save()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)  # skip the tool's end-of-training model save (see module doc)
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.record["logs"].append({"step": state.global_step, "unix": time.time(),
                                            **{k: v for k, v in logs.items()
                                               if isinstance(v, (int, float, str))}})
                self._save()

        def on_train_end(self, args, state, control, **kwargs):
            self.record["train_end_unix"] = time.time()
            self._save()

    return Recorder


def _process_start_unix() -> float | None:
    """When this process started (Linux: ``/proc/self/stat`` field 22, in clock ticks since
    boot), so time to first step includes interpreter start and imports."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _patch_trainer_module(module) -> None:
    """Wrap ``Trainer.__init__`` so that every Trainer (and subclass) gets one recorder.
    (Not through ``DEFAULT_CALLBACKS``: ms-swift replaces that list with its own.)"""
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or getattr(trainer_cls.__init__, "_peer_measure", False):
        return
    recorder = make_recorder_class()
    original = trainer_cls.__init__

    # functools.wraps keeps the signature visible (ms-swift inspects Trainer.__init__'s
    # parameters to choose between `processing_class` and `tokenizer`).
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if any(isinstance(cb, recorder) for cb in self.callback_handler.callbacks):
            return  # a subclass's __init__ ran this already
        rec = recorder()
        self.add_callback(rec)
        step = self.training_step  # the tool's own (bound; subclasses' overrides included)

        def training_step(model, inputs, *a, **k):
            rec.counter.record(inputs)
            return step(model, inputs, *a, **k)

        self.training_step = training_step

    __init__._peer_measure = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.trainer`` with the normal finders and patches it once loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _patch_trainer_module(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch ``transformers.trainer`` when it is imported (only where ``PEER_MEASURE_OUT`` is
    set: the tools' helper processes, such as a launcher, get nothing)."""
    if not os.environ.get("PEER_MEASURE_OUT"):
        return
    if _TARGET in sys.modules:
        _patch_trainer_module(sys.modules[_TARGET])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
