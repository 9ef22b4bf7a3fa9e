"""Builds ``FeatureTables`` from a window of the engagement log (the training split only:
never from the rows being evaluated).

One function, ``build_feature_tables``, makes them for training (from the history window)
and for the bundle the service loads (from the whole training split), so the numbers the
model learned from and the numbers it is served with are computed by the same code.

Per-user signals for ``full`` personalization come from item vectors of a separately
pre-trained user-item model: a user's vector is the shrunk mean of the vectors of the
items they engaged with in the window (a fold-in, so the item basis stays fixed), and the
user's cluster is the nearest of the k-means centroids fitted on those vectors.
"""

from __future__ import annotations

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import UNKNOWN_USER, Task, clean_user_ids, normalise_query
from app.core.feature_tables import ITEM_NEIGHBOURS, FeatureTables, country_rows, unit_rows
from model_export.engagement_log import EngagementLog

USER_SHRINKAGE = 2.0  # pseudo-count pulling users with few engagements towards zero


def fold_in_users(
    user_index: np.ndarray, item_index: np.ndarray, n_users: int, item_vec: np.ndarray
) -> np.ndarray:
    """(n_users, d): shrunk mean of the vectors of each user's positive items."""
    sums = np.zeros((n_users, item_vec.shape[1]), dtype=np.float64)
    np.add.at(sums, user_index, item_vec[item_index])
    counts = np.bincount(user_index, minlength=n_users).astype(np.float64)
    return (sums / (counts[:, None] + USER_SHRINKAGE)).astype(np.float32)


def assign_clusters(user_vec: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """1-based nearest centroid (cosine); 0 for all-zero vectors (no signal)."""
    if len(centroids) == 0 or len(user_vec) == 0:
        return np.zeros(len(user_vec), dtype=np.int64)
    u = user_vec / np.maximum(np.linalg.norm(user_vec, axis=1, keepdims=True), 1e-9)
    c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
    nearest = np.argmax(u @ c.T, axis=1) + 1
    return np.where(np.abs(user_vec).sum(axis=1) > 0, nearest, 0).astype(np.int64)


def nearest_items(item_vec: np.ndarray, k: int = ITEM_NEIGHBOURS) -> np.ndarray:
    """(E, min(k, E - 1)) int32: each row's nearest other rows by cosine, nearest first
    (equal cosines: the lower index first). torch's top-k over blocks of rows: ~100 MB of
    similarities at a time, about 90 s at 100k entities on 2 cores."""
    import torch

    unit = torch.from_numpy(unit_rows(item_vec))
    n = len(unit)
    k = min(k, n - 1)
    out = np.zeros((n, max(k, 0)), dtype=np.int32)
    if k <= 0:
        return out
    block = max(1, (1 << 24) // n)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        sims = unit[lo:hi] @ unit.T
        sims[torch.arange(hi - lo), torch.arange(lo, hi)] = -torch.inf  # never itself
        top = torch.topk(sims, k, dim=1)
        vals, idx = top.values.numpy(), top.indices.numpy()
        order = np.lexsort((idx, -vals), axis=1)
        out[lo:hi] = np.take_along_axis(idx, order, axis=1)
    return out


def build_feature_tables(
    log: EngagementLog,
    catalogue: Catalogue,
    item_vec: np.ndarray,
    centroids: np.ndarray,
    item_neighbours: np.ndarray | None = None,
) -> FeatureTables:
    """Aggregate ``log`` (one window of the training split) into ``FeatureTables``.
    ``item_neighbours``: ``nearest_items(item_vec)`` when already computed (it depends on
    the item vectors only, not on the window)."""
    n_entities = len(catalogue)
    if item_vec.shape[0] != n_entities:
        raise ValueError(f"item_vec has {item_vec.shape[0]} rows, catalogue has {n_entities}")
    if item_neighbours is None:
        item_neighbours = nearest_items(item_vec)
    target = catalogue.lookup(log.target_entity_id)
    if np.any(target < 0):
        bad = log.target_entity_id[target < 0][:3].tolist()
        raise ValueError(f"engagement log names targets missing from the catalogue: {bad}")
    label = log.label.astype(bool)
    entity_pos = np.bincount(target[label], minlength=n_entities).astype(np.float32)
    entity_imp = np.bincount(target, minlength=n_entities).astype(np.float32)
    n_c = len(catalogue.country_names) + 1
    crow = country_rows(catalogue, log.country)
    country_pos = np.zeros((n_c, n_entities), dtype=np.float32)
    np.add.at(country_pos, (crow[label], target[label]), 1.0)

    # Users: fold-in vectors over positives, then clusters. Ids are keyed by the
    # context's own rule (clean_user_id), or the service would never find a user's row.
    users = clean_user_ids(log.user_id)
    has_user = users != UNKNOWN_USER
    user_ids, user_inv = np.unique(users[has_user], return_inverse=True)
    # as wide as the longest id, not as UNKNOWN_USER: the cleaned column holds it
    user_ids = user_ids.astype(f"U{np.strings.str_len(user_ids).max(initial=1)}")
    pos_rows = label[has_user]
    user_vec = fold_in_users(
        user_inv[pos_rows], target[has_user][pos_rows], len(user_ids), item_vec
    )
    user_cluster = assign_clusters(user_vec, centroids)
    user_genre_pos = np.zeros((len(user_ids), catalogue.genre_matrix.shape[1]), dtype=np.float32)
    user_pos_targets = target[has_user][pos_rows]
    np.add.at(user_genre_pos, user_inv[pos_rows], catalogue.genre_matrix[user_pos_targets])
    cluster_pos = np.zeros((len(centroids) + 1, n_entities), dtype=np.float32)
    np.add.at(cluster_pos, (user_cluster[user_inv[pos_rows]], target[has_user][pos_rows]), 1.0)

    # Search queries: every typed prefix, normalised exactly as at serving time.
    is_search = log.task == Task.SEARCH
    queries = np.array([normalise_query(q) for q in log.query[is_search].tolist()], dtype=str)
    q_keys, q_inv = np.unique(queries, return_inverse=True)
    pair = q_inv.astype(np.int64) * n_entities + target[is_search]
    pairs, pair_inv = np.unique(pair, return_inverse=True)
    q_imp = np.bincount(pair_inv).astype(np.float32)
    q_pos = np.bincount(pair_inv, weights=label[is_search]).astype(np.float32)
    q_rows = pairs // n_entities
    query_indptr = np.concatenate([[0], np.cumsum(np.bincount(q_rows, minlength=len(q_keys)))])

    # Co-engagement: positives on a page of entity s for target t.
    paged = np.isin(log.task, (Task.MORE_LIKE_THIS, Task.ENTITY)) & label
    source = catalogue.lookup(log.source_entity_id[paged])
    ok = source >= 0
    co_pair = source[ok] * n_entities + target[paged][ok]
    co_pairs, co_cnt = np.unique(co_pair, return_counts=True)
    co_src = co_pairs // n_entities
    co_indptr = np.concatenate([[0], np.cumsum(np.bincount(co_src, minlength=n_entities))])

    return FeatureTables(
        entity_pos=entity_pos,
        entity_imp=entity_imp,
        country_pos=country_pos,
        cluster_pos=cluster_pos,
        query_keys=q_keys,
        query_indptr=query_indptr.astype(np.int64),
        query_targets=(pairs % n_entities).astype(np.int64),
        query_pos=q_pos,
        query_imp=q_imp,
        co_indptr=co_indptr.astype(np.int64),
        co_targets=(co_pairs % n_entities).astype(np.int64),
        co_count=co_cnt.astype(np.float32),
        user_ids=user_ids.astype(str),
        user_cluster=user_cluster,
        user_vec=user_vec,
        user_genre_pos=user_genre_pos,
        item_vec=item_vec.astype(np.float32),
        item_neighbours=item_neighbours.astype(np.int32),
        centroids=centroids.astype(np.float32),
        prior_ctr=np.array(float(label.mean()) if len(label) else 0.0, dtype=np.float32),
    )
