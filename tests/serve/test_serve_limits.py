"""Ranges of the generation knobs (chatft.serve.limits), shared by the API and chatft chat."""

from __future__ import annotations

import math

import pytest

from chatft.serve import limits


@pytest.mark.parametrize("limit, good, bad", [
    (limits.TEMPERATURE, [0, 0.0, 0.7, 2, 2.0], [-0.1, 2.01, 1e9, math.nan, math.inf, -math.inf,
                                                 True, "1", None]),
    (limits.TOP_P, [1e-9, 0.5, 1], [0, 0.0, -1, 1.0001, math.nan, math.inf]),
    (limits.REPETITION_PENALTY, [0.5, 1, 10], [0, -1, 10.5, math.nan, math.inf]),
    (limits.TOP_K, [-1, 0, 1, 50, 10 ** 30], [-2, 1.0, 2.5, True, math.nan]),
    (limits.SEED, [0, -1, -2 ** 63, 2 ** 64 - 1], [2 ** 64, 2 ** 70, -2 ** 63 - 1, 1.0, False]),
    (limits.MAX_TOKENS, [1, 4096, 10 ** 12], [0, -1, 1.0, math.inf, True]),
    (limits.PENALTY, [-2, 0, 2], [2.5, math.nan]),
])
def test_limits(limit, good, bad):
    for v in good:
        assert limit.problem(v) is None, v
    for v in bad:
        assert limit.problem(v), v


def test_messages_name_the_rule():
    assert limits.TEMPERATURE.problem(math.nan) == "must be a finite number, got nan"
    assert limits.TEMPERATURE.problem(3) == "must be >= 0 and <= 2, got 3"
    assert limits.TOP_P.problem(0) == "must be > 0 and <= 1, got 0"
    assert limits.SEED.problem(2 ** 70) == f"must be between -2**63 and 2**64-1, got {2 ** 70}"
    assert limits.MAX_TOKENS.problem(0) == "must be >= 1, got 0"
    assert limits.TOP_K.problem("5") == "must be an integer, got str"
    assert limits.TOP_K.problem(True) == "must be an integer, got a bool"


def test_every_seed_in_range_seeds_a_torch_generator():
    import torch

    g = torch.Generator()
    for seed in (limits.SEED.lo, limits.SEED.hi):
        g.manual_seed(int(seed))
    with pytest.raises((ValueError, RuntimeError)):
        g.manual_seed(int(limits.SEED.hi) + 1)  # why the bound is where it is
