"""Which samples go into which micro-batch, and how a micro-batch becomes tensors.

Everything here is a pure function of (sample lengths, seed, epoch, sizes), so every process
computes the same plan without talking to the others, and a resumed run replays exactly the
order an uninterrupted run would have used.

**Steps.** Each epoch shuffles the samples with ``seed`` and ``epoch``; consecutive groups of
``global_batch = per_device_train_batch_size x gradient_accumulation_steps x world_size``
samples form one optimizer step (the last group of an epoch may be smaller; no sample is
dropped).

**Micro-batches.** A step's samples are dealt into ``world_size x m`` bins, longest first
into the bin with the fewest tokens, so processes finish their micro-batches at about the
same time. Process ``r`` takes bins ``r*m .. r*m + m - 1``. ``m`` is the configured
accumulation, raised if a token cap per micro-batch demands more bins; it is the same on
every process, as collective operations require.

**Packing.** A packed micro-batch is one row: its samples concatenated, positions restarting
at 0 for each sample. Attention is confined to each sample, i.e. the mask is block-diagonal
and causal within each block. For samples of lengths 3 and 2 (rows = queries, columns =
keys)::

        a0 a1 a2 b0 b1
    a0 [ 1  .  .  .  . ]
    a1 [ 1  1  .  .  . ]
    a2 [ 1  1  1  .  . ]
    b0 [ .  .  .  1  . ]
    b1 [ .  .  .  1  1 ]

The attention kernels derive this mask from ``position_ids`` (a new block starts wherever the
position does not increase by one), so no ``T x T`` mask is ever built by chatft. Targets are
shifted per sample (:mod:`chatft.data.labels`), so no sample predicts its neighbour's tokens.
Without packing, a micro-batch is padded to its longest sample and carries an attention mask.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from chatft.data.labels import IGNORE_INDEX, shifted_targets

#: On CUDA, packed rows are padded to a multiple of this many tokens: fewer distinct shapes for
#: the GPU kernels (and for the memory planner, which sizes micro-batches the same way).
CUDA_TOKEN_MULTIPLE = 64


def epoch_order(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch (a permutation of ``range(n_samples)``)."""
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


def steps_per_epoch(n_samples: int, global_batch: int) -> int:
    return math.ceil(n_samples / global_batch)


def step_samples(n_samples: int, global_batch: int, seed: int, epoch: int, step_in_epoch: int) -> np.ndarray:
    """Indices of the samples of one optimizer step."""
    order = epoch_order(n_samples, seed, epoch)
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]


def deal_into_bins(samples: np.ndarray, lengths: np.ndarray, n_bins: int) -> list[list[int]]:
    """Longest-first greedy balancing of ``samples`` (indices) into ``n_bins`` by tokens.

    Ties go to the lowest bin index, and samples of equal length keep their order, so the
    result is deterministic. Bins may be empty when there are fewer samples than bins.

    >>> deal_into_bins(np.array([0, 1, 2, 3]), np.array([5, 1, 3, 3]), 2)
    [[0, 1], [2, 3]]
    """
    listed = samples.tolist()
    # Stable sort by length, longest first: equal lengths keep their order in `samples`.
    order = [listed[j] for j in sorted(range(len(listed)), key=lambda j: -int(lengths[listed[j]]))]
    heap = [(0, b) for b in range(n_bins)]  # (tokens so far, bin index)
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in order:
        tokens, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (tokens + int(lengths[i]), b))
    return bins


def micro_batches_per_rank(step_tokens: int, world_size: int, accumulation: int,
                           micro_batch_tokens: int) -> int:
    """Micro-batches each process runs in one step: the configured accumulation, or more
    when ``micro_batch_tokens`` (0 = no cap) would otherwise be exceeded on average."""
    if not micro_batch_tokens:
        return accumulation
    return max(accumulation, math.ceil(step_tokens / (world_size * micro_batch_tokens)))


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as seen by one process."""

    micro_batches: list[list[int]]  # this process's bins, each a list of sample indices
    trained_tokens: int  # targets in the whole step, over all processes (loss denominator)
    tokens: int  # tokens in the whole step, over all processes


def plan_micro_batches(samples: np.ndarray, lengths: np.ndarray, trained: np.ndarray, *,
                       world_size: int, rank: int, accumulation: int,
                       micro_batch_tokens: int = 0) -> StepPlan:
    """The micro-batches process ``rank`` runs for one step over ``samples``."""
    step_tokens = int(lengths[samples].sum())
    m = micro_batches_per_rank(step_tokens, world_size, accumulation, micro_batch_tokens)
    bins = deal_into_bins(samples, lengths, world_size * m)
    return StepPlan(bins[rank * m:(rank + 1) * m], int(trained[samples].sum()), step_tokens)


def plan_step(lengths: np.ndarray, trained: np.ndarray, *, global_batch: int, seed: int,
              epoch: int, step_in_epoch: int, world_size: int, rank: int, accumulation: int,
              micro_batch_tokens: int = 0) -> StepPlan:
    """The micro-batches process ``rank`` runs for one training step (see module docstring)."""
    samples = step_samples(len(lengths), global_batch, seed, epoch, step_in_epoch)
    return plan_micro_batches(samples, lengths, trained, world_size=world_size, rank=rank,
                              accumulation=accumulation, micro_batch_tokens=micro_batch_tokens)


def eval_plans(lengths: np.ndarray, trained: np.ndarray, *, global_batch: int, world_size: int,
               rank: int, accumulation: int, micro_batch_tokens: int = 0) -> list[StepPlan]:
    """Held-out data in file order, cut into steps like training (no shuffling)."""
    order = np.arange(len(lengths))
    return [plan_micro_batches(order[i:i + global_batch], lengths, trained, world_size=world_size,
                               rank=rank, accumulation=accumulation,
                               micro_batch_tokens=micro_batch_tokens)
            for i in range(0, len(order), global_batch)]


@dataclass
class Batch:
    """Model inputs of one micro-batch. Shapes: packed ``[1, T]``; padded ``[B, L]``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # already shifted; IGNORE_INDEX where no loss
    attention_mask: torch.Tensor | None  # None when packed (positions define the blocks)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets),
                     move(self.attention_mask))


def pack(samples: list[tuple[np.ndarray, np.ndarray]], pad_to_multiple_of: int = 1,
         pad_id: int = 0) -> Batch:
    """Concatenate ``(input_ids, loss_mask)`` samples into one padding-free row ``[1, T]``.

    With ``pad_to_multiple_of > 1`` the row is extended by a filler segment (its own
    positions, no targets) so kernels see fewer distinct shapes; the filler attends only to
    itself and is never learned.
    """
    ids = [s[0] for s in samples]
    tgts = [shifted_targets(s[0], s[1]) for s in samples]
    pos = [np.arange(len(s[0])) for s in samples]
    total = sum(len(i) for i in ids)
    fill = (-total) % pad_to_multiple_of if total else pad_to_multiple_of
    if fill:
        ids.append(np.full(fill, pad_id))
        tgts.append(np.full(fill, IGNORE_INDEX))
        pos.append(np.arange(fill))
    return Batch(torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
                 torch.from_numpy(np.concatenate(pos).astype(np.int64))[None],
                 torch.from_numpy(np.concatenate(tgts).astype(np.int64))[None], None)


def pad(samples: list[tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> Batch:
    """Right-pad samples to the longest: ``[B, L]`` with an attention mask."""
    if not samples:
        return pack([], pad_to_multiple_of=1)
    width = max(len(s[0]) for s in samples)
    ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    tgts = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    for r, (x, m) in enumerate(samples):
        ids[r, :len(x)] = x
        tgts[r, :len(x)] = shifted_targets(x, m)
        mask[r, :len(x)] = 1
    pos = np.broadcast_to(np.arange(width), ids.shape).copy()
    return Batch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(tgts),
                 torch.from_numpy(mask))
