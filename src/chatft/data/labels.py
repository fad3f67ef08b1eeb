"""Labels are derived here and only here.

A rendered sample has ``input_ids`` ``[x0 .. x(n-1)]`` and ``loss_mask`` ``[m0 .. m(n-1)]``
(``m_i``: token ``x_i`` is learned). Position ``t`` predicts token ``t+1``, so the training
target at position ``t`` is ``x(t+1)`` if ``m(t+1)`` else ``IGNORE_INDEX``; the last
position has no target. Shifting per sample (not per packed row) means a packed row never
asks a sample's last token to predict the next sample's first token.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def shifted_targets(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """``targets[t] = input_ids[t+1] if loss_mask[t+1] else -100``; ``targets[-1] = -100``.

    >>> shifted_targets(np.array([5, 6, 7, 8]), np.array([0, 0, 1, 1], bool)).tolist()
    [-100, 7, 8, -100]
    """
    targets = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = np.where(loss_mask[1:], input_ids[1:], IGNORE_INDEX)
    return targets


def trained_count(loss_mask: np.ndarray) -> int:
    """Number of targets a sample contributes (its first token is never a target)."""
    return int(np.count_nonzero(loss_mask[1:]))
