"""The separately pre-trained user-item model behind ``full`` personalization, and the
user clusters behind ``cluster``.

- Item vectors: a matrix-factorisation model trained with BPR on the positives of the
  history window (users x items), PyTorch, CPU.
- Clusters: k-means (numpy, k-means++ seeding) over the users' folded-in vectors
  (``model_export.table_builder.fold_in_users``), so a user's cluster at serving time is computed
  from the same vectors by the same code.
"""

from __future__ import annotations

import numpy as np
import torch

from app.core.catalogue import Catalogue
from app.core.context import UNKNOWN_USER, clean_user_ids
from model_export.engagement_log import EngagementLog
from model_export.table_builder import fold_in_users


def train_item_vectors(
    log: EngagementLog, catalogue: Catalogue, dim: int = 16, epochs: int = 15, seed: int = 7
) -> np.ndarray:
    """(E, dim) item vectors from BPR-MF on the positives of ``log``."""
    if dim < 1 or epochs < 1:
        raise ValueError(f"dim and epochs must be >= 1, got dim={dim}, epochs={epochs}")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    members = clean_user_ids(log.user_id)  # the ids the service looks members up by
    pos = (log.label == 1) & (members != UNKNOWN_USER)
    users, u_idx = np.unique(members[pos], return_inverse=True)
    items = catalogue.lookup(log.target_entity_id[pos])
    n_items = len(catalogue)
    user_emb = torch.nn.Embedding(max(len(users), 1), dim)
    item_emb = torch.nn.Embedding(n_items, dim)
    torch.nn.init.normal_(user_emb.weight, std=0.1, generator=gen)
    torch.nn.init.normal_(item_emb.weight, std=0.1, generator=gen)
    if len(items) == 0:
        return item_emb.weight.detach().numpy().astype(np.float32)
    rankable = np.flatnonzero(catalogue.rankable)
    opt = torch.optim.Adam([*user_emb.parameters(), *item_emb.parameters()], lr=0.02)
    u_all = torch.from_numpy(u_idx.astype(np.int64))
    i_all = torch.from_numpy(items.astype(np.int64))
    batch = 4096
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(items)))
        for start in range(0, len(items), batch):
            sel = perm[start : start + batch]
            u, i = u_all[sel], i_all[sel]
            j = torch.from_numpy(rng.choice(rankable, size=len(sel)).astype(np.int64))
            ue = user_emb(u)
            diff = (ue * item_emb(i)).sum(1) - (ue * item_emb(j)).sum(1)
            reg = 1e-4 * (ue.pow(2).sum() + item_emb(i).pow(2).sum() + item_emb(j).pow(2).sum())
            loss = -torch.nn.functional.logsigmoid(diff).mean() + reg / len(sel)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return item_emb.weight.detach().numpy().astype(np.float32)


def fit_clusters(
    log: EngagementLog,
    catalogue: Catalogue,
    item_vec: np.ndarray,
    k: int = 16,
    iterations: int = 25,
    seed: int = 7,
) -> np.ndarray:
    """(k, d) k-means centroids over the folded-in vectors of the users in ``log``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    members = clean_user_ids(log.user_id)  # the ids the service looks members up by
    pos = (log.label == 1) & (members != UNKNOWN_USER)
    users, u_idx = np.unique(members[pos], return_inverse=True)
    vecs = fold_in_users(u_idx, catalogue.lookup(log.target_entity_id[pos]), len(users), item_vec)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    rng = np.random.default_rng(seed)
    if len(vecs) <= k:
        pad = rng.normal(size=(k - len(vecs), item_vec.shape[1])).astype(np.float32)
        return np.concatenate([vecs, pad]).astype(np.float32)
    centroids = [vecs[rng.integers(len(vecs))]]
    for _ in range(1, k):  # k-means++ seeding
        d2 = np.min(((vecs[:, None, :] - np.array(centroids)[None]) ** 2).sum(-1), axis=1)
        total = float(d2.sum())
        # Fewer distinct users than k: every user already sits on a centroid, draw uniformly.
        centroids.append(vecs[rng.choice(len(vecs), p=d2 / total if total > 0 else None)])
    c = np.array(centroids)
    for _ in range(iterations):
        assign = np.argmax(vecs @ c.T, axis=1)
        for j in range(k):
            members = vecs[assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-9)
    return c.astype(np.float32)
