"""Engagement statistics the features and retrieval read: ``FeatureTables``, saved in the
bundle as ``feature_tables.npz``.

They are built from a window of the engagement log by
``model_export.table_builder.build_feature_tables`` (training only); the service loads
them here, and the features read them through ``app.core.features``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import clean_countries
from app.core.table_io import load_table, save_table

ITEM_NEIGHBOURS = 100  # nearest entities kept per entity in the pre-trained item space


@dataclass
class FeatureTables:
    """Counts and vectors keyed by entity index (see ``Catalogue``)."""

    entity_pos: np.ndarray  # (E,) positives per target
    entity_imp: np.ndarray  # (E,) impressions per target
    country_pos: np.ndarray  # (C+1, E) positives per country; row 0 = unknown country
    cluster_pos: np.ndarray  # (K+1, E) positives per user cluster; row 0 = no cluster
    query_keys: np.ndarray  # (Q,) sorted normalised search queries (every prefix typed)
    query_indptr: np.ndarray  # (Q+1,)
    query_targets: np.ndarray  # targets impressed for the query, sorted within a query
    query_pos: np.ndarray
    query_imp: np.ndarray
    co_indptr: np.ndarray  # (E+1,) source entity -> co-engaged targets (CSR)
    co_targets: np.ndarray
    co_count: np.ndarray
    user_ids: np.ndarray  # (U,) sorted
    user_cluster: np.ndarray  # (U,) 1..K, 0 when the user had no positive
    user_vec: np.ndarray  # (U, d) float32
    user_genre_pos: np.ndarray  # (U, G) float32 positives per genre (Catalogue.genre_names)
    item_vec: np.ndarray  # (E, d) float32, from the pre-trained user-item model
    # (E, ITEM_NEIGHBOURS) int32: each entity's nearest other entities by the cosine of
    # ``item_vec`` (``unit_rows``), nearest first; more-like-this retrieval reads them
    item_neighbours: np.ndarray
    centroids: np.ndarray  # (K, d) float32
    prior_ctr: np.ndarray  # () global positive rate, for smoothing

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def vec_dim(self) -> int:
        return int(self.item_vec.shape[1])

    def user_row(self, user_id: str) -> int:
        """Row of ``user_id`` in the user arrays, -1 for an unknown (cold-start) user."""
        return _sorted_row(self.user_ids, user_id)

    def query_row(self, query: str) -> int:
        """Row of a normalised search query in the query arrays, -1 when never typed."""
        return _sorted_row(self.query_keys, query)

    def co_engaged(self, source: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.co_indptr[source], self.co_indptr[source + 1]
        return self.co_targets[lo:hi], self.co_count[lo:hi]

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, path: Path) -> None:
        save_table(path, self.columns())

    @classmethod
    def load(cls, path: Path) -> FeatureTables:
        return cls(**load_table(path, required=tuple(f.name for f in fields(cls))))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32; an all-zero row stays zero): the item space
    whose dot products are the cosines retrieval and the features read."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-9)).astype(np.float32)


def _sorted_row(keys: np.ndarray, key: str) -> int:
    """Position of ``key`` in the sorted ``keys``, -1 when absent."""
    pos = int(np.searchsorted(keys, key))
    return pos if pos < len(keys) and keys[pos] == key else -1


def country_index(catalogue: Catalogue) -> dict[str, int]:
    """Row in ``country_pos`` of each catalogue country code (row 0: unknown country)."""
    return {c: i + 1 for i, c in enumerate(catalogue.country_names)}


def country_rows(catalogue: Catalogue, countries: np.ndarray) -> np.ndarray:
    """Row in ``country_pos`` for each raw or imputed country code: 0 when unknown.
    Codes are cleaned by ``app.core.context.clean_countries``, the rule of the context."""
    index = country_index(catalogue)
    cleaned = clean_countries(countries).tolist()
    return np.array([index.get(c, 0) for c in cleaned], dtype=np.int64)
