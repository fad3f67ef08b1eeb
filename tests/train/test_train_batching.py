"""The micro-batch planner and the packed/padded batch layout, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from chatft.data.labels import IGNORE_INDEX
from chatft.train.batching import (deal_into_bins, epoch_order, eval_plans, micro_batches_per_rank,
                                   pack, pad, plan_step, step_samples, steps_per_epoch)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(10, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(10))
    assert (a == epoch_order(10, seed=1, epoch=0)).all()
    assert (a != epoch_order(10, seed=1, epoch=1)).any()
    assert (a != epoch_order(10, seed=2, epoch=0)).any()


def test_steps_cover_every_sample_once_per_epoch_including_the_short_last_step():
    n, gb = 11, 4
    assert steps_per_epoch(n, gb) == 3
    seen = np.concatenate([step_samples(n, gb, 7, 0, s) for s in range(3)])
    assert sorted(seen.tolist()) == list(range(11))
    assert len(step_samples(n, gb, 7, 0, 2)) == 3  # 11 = 4 + 4 + 3: nothing dropped


def test_deal_into_bins_longest_first_into_lightest_bin():
    lengths = np.array([5, 1, 3, 3, 2])
    # longest first: 0 (5) -> bin0 [5, 0]; 2 (3) -> bin1 [5, 3]; 3 (3) -> bin1 [5, 6];
    # 4 (2) -> bin0 [7, 6]; 1 (1) -> bin1 [7, 7]
    bins = deal_into_bins(np.array([0, 1, 2, 3, 4]), lengths, 2)
    assert bins == [[0, 4], [2, 3, 1]]
    assert [int(lengths[b].sum()) for b in bins] == [7, 7]


def test_more_bins_than_samples_leaves_empty_bins():
    assert deal_into_bins(np.array([3]), np.array([1, 1, 1, 9]), 3) == [[3], [], []]


def test_micro_batch_cap_raises_accumulation():
    assert micro_batches_per_rank(1000, world_size=2, accumulation=1, micro_batch_tokens=0) == 1
    # 1000 tokens over 2 ranks with at most 200 per micro-batch: ceil(1000 / 400) = 3
    assert micro_batches_per_rank(1000, world_size=2, accumulation=1, micro_batch_tokens=200) == 3
    assert micro_batches_per_rank(100, world_size=2, accumulation=4, micro_batch_tokens=200) == 4


def test_plan_step_splits_one_step_across_ranks_and_counts_targets_of_the_whole_step():
    lengths = np.array([4, 6, 2, 8, 5, 3, 7, 1])
    trained = np.array([1, 2, 1, 3, 2, 1, 2, 0])
    plans = [plan_step(lengths, trained, global_batch=8, seed=0, epoch=0, step_in_epoch=0,
                       world_size=2, rank=r, accumulation=2) for r in range(2)]
    ids = sorted(i for p in plans for mb in p.micro_batches for i in mb)
    assert ids == list(range(8))
    assert all(len(p.micro_batches) == 2 for p in plans)
    assert all(p.trained_tokens == 12 and p.tokens == 36 for p in plans)
    # 36 tokens in 4 bins, balanced longest-first: every bin holds exactly 9
    assert sorted(int(lengths[mb].sum()) for p in plans for mb in p.micro_batches) == [9, 9, 9, 9]


def test_eval_plans_keep_file_order_and_cover_everything():
    lengths = np.arange(1, 11)
    plans = eval_plans(lengths, np.ones(10, int), global_batch=4, world_size=1, rank=0, accumulation=1)
    assert [sorted(p.micro_batches[0]) for p in plans] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _sample(ids, mask):
    return np.array(ids), np.array(mask, dtype=bool)


def test_pack_concatenates_restarts_positions_and_shifts_targets_per_sample():
    a = _sample([10, 11, 12], [0, 1, 1])
    b = _sample([20, 21], [0, 1])
    batch = pack([a, b])
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # position t predicts token t+1 of the same sample; a sample's last position predicts nothing
    assert batch.targets.tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX]]
    assert batch.attention_mask is None and batch.tokens == 5


def test_pack_pads_to_a_multiple_with_an_untrained_filler_segment():
    batch = pack([_sample([1, 2, 3], [0, 1, 1])], pad_to_multiple_of=4, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0]]  # the filler starts its own block
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, IGNORE_INDEX]]


def test_pad_right_pads_with_mask_and_ignored_targets():
    batch = pad([_sample([1, 2, 3], [0, 1, 1]), _sample([4, 5], [0, 1])], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.tokens == 5


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_is_identical_on_every_rank(world):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 50, 37)
    trained = rng.integers(1, 5, 37)
    plans = [plan_step(lengths, trained, global_batch=12, seed=3, epoch=1, step_in_epoch=2,
                       world_size=world, rank=r, accumulation=2) for r in range(world)]
    flat = [i for p in plans for mb in p.micro_batches for i in mb]
    assert len(flat) == len(set(flat))
    assert len({p.trained_tokens for p in plans}) == 1
