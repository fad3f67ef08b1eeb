"""Labels: the one place where the mask becomes next-token targets."""

from __future__ import annotations

import numpy as np

from chatft.data.labels import IGNORE_INDEX, shifted_targets, trained_count


def test_shifted_targets_pair_each_position_with_the_next_token():
    ids = np.array([10, 11, 12, 13, 14, 15])
    mask = np.array([0, 0, 1, 1, 0, 1], bool)
    # position t predicts ids[t+1]; it is a target iff mask[t+1]; the last position has none
    assert shifted_targets(ids, mask).tolist() == [-100, 12, 13, -100, 15, -100]
    assert trained_count(mask) == 3


def test_first_token_is_never_a_target():
    ids = np.array([1, 2, 3])
    mask = np.ones(3, bool)
    assert shifted_targets(ids, mask).tolist() == [2, 3, IGNORE_INDEX]
    assert trained_count(mask) == 2  # three masked tokens, two targets
    assert trained_count(np.array([1, 0, 0], bool)) == 0


def test_targets_dtype_and_single_token_sample():
    out = shifted_targets(np.array([7], np.int32), np.array([True]))
    assert out.dtype == np.int64 and out.tolist() == [IGNORE_INDEX]
