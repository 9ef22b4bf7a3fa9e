"""Temporal splits of the engagement log, both per user.

- ``temporal_split``: per user, the last ``test_fraction`` of their impressions (by time)
  are the test set.
- ``history_split``: per user again, the first ``history_fraction`` of each user's
  training impressions are their *history* (feature tables, pre-trained vectors and
  clusters are fitted on it) and the rest their *fit* rows (what the ranker learns from).

Both cut per user because members engage in bursts: one global time cut left most
MovieLens members with no history at all before their fit rows (3% of fit impressions had
a user vector), so the model never saw at training time the personal inputs it is served
with. Per user, every fit row of a member with history sees that member's earlier
engagements, as a test (serving) request sees all of its member's training rows.

No label leaks: a fit row is never in the history window, so no count, vector or cluster
a fit row is featurised with contains its own label (tests/test_leakage.py). Logged-out
rows split at the time quantile of the logged-out rows.
"""

from __future__ import annotations

import numpy as np

from model_export.engagement_log import EngagementLog


def _impressions(log: EngagementLog) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique impressions with their (first) timestamp and user, and each row's impression."""
    imp_ids, first, inverse = np.unique(log.impression_id, return_index=True, return_inverse=True)
    return imp_ids, log.timestamp[first], log.user_id[first], inverse


def _per_user_tail(log: EngagementLog, fraction: float, name: str) -> np.ndarray:
    """Row mask: each user's last ``fraction`` of impressions by time (logged-out rows:
    those after the logged-out time quantile). Whole impressions stay together."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {fraction}")
    imp_ids, ts, users, inverse = _impressions(log)
    tail = np.zeros(len(imp_ids), dtype=bool)
    order = np.lexsort((imp_ids, ts, users))  # by user, then time
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    rank_in_user = np.arange(len(order)) - np.repeat(starts, counts)
    n_tail = np.floor(counts * fraction).astype(np.int64)
    tail[order] = rank_in_user >= np.repeat(counts - n_tail, counts)
    anonymous = users == ""
    if anonymous.any():
        cut = np.quantile(ts[anonymous], 1.0 - fraction)
        tail[anonymous] = ts[anonymous] > cut
    return tail[inverse]


def temporal_split(log: EngagementLog, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks (train, test)."""
    test = _per_user_tail(log, test_fraction, "test_fraction")
    return ~test, test


def history_split(
    train: EngagementLog, history_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean row masks (history, fit) over the training split, cut per user by time."""
    if not 0.0 < history_fraction < 1.0:
        raise ValueError(f"history_fraction must be in (0, 1), got {history_fraction}")
    fit = _per_user_tail(train, 1.0 - history_fraction, "history_fraction")
    return ~fit, fit
