"""Temporal splits of the engagement log.

- ``temporal_split``: per user, the last ``test_fraction`` of their impressions (by time)
  are the test set; logged-out rows split at the global time quantile. Whole impressions
  stay together.
- ``history_split``: the training split cut at its median time into a *history* window
  (feature tables and pre-trained vectors are fitted on it) and a *fit* window (the rows
  the ranker learns from). Features of a training row are thus computed only from data
  that preceded it, as they are in production, so count features never contain the row's
  own label.
"""

from __future__ import annotations

import numpy as np

from app.engagement_log import EngagementLog


def _impressions(log: EngagementLog) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique impressions with their (first) timestamp and user, and each row's impression."""
    imp_ids, first, inverse = np.unique(log.impression_id, return_index=True, return_inverse=True)
    return imp_ids, log.timestamp[first], log.user_id[first], inverse


def temporal_split(log: EngagementLog, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    imp_ids, ts, users, inverse = _impressions(log)
    is_test = np.zeros(len(imp_ids), dtype=bool)
    order = np.lexsort((imp_ids, ts, users))  # by user, then time
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], len(order)]
    counts = ends - starts
    rank_in_user = np.arange(len(order)) - np.repeat(starts, counts)
    n_test = np.floor(counts * test_fraction).astype(np.int64)
    is_test[order] = rank_in_user >= np.repeat(counts - n_test, counts)
    anonymous = users == ""
    if anonymous.any():
        cut = np.quantile(ts[anonymous], 1.0 - test_fraction)
        is_test[anonymous] = ts[anonymous] > cut
    test_rows = is_test[inverse]
    return ~test_rows, test_rows


def history_split(
    train: EngagementLog, history_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks (history, fit) over the training split, cut by time."""
    if not 0.0 < history_fraction < 1.0:
        raise ValueError(f"history_fraction must be in (0, 1), got {history_fraction}")
    _imp_ids, ts, _, inverse = _impressions(train)
    cut = np.quantile(ts, history_fraction)
    history = (ts <= cut)[inverse]
    return history, ~history
