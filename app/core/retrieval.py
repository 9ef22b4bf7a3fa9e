"""Candidate retrieval: which entities the ranker scores when the request names none.

- search: the name index answers every keystroke: whole query tokens, the last token as a
  prefix, and character trigrams for typos; first-stage score = matched tokens + trigram
  containment + a little popularity.
- more_like_this: co-engaged targets of the source, then nearest neighbours in the
  pre-trained item space.
- entity: the videos linked to the entity (genre members, a person's films...), then
  co-engaged targets.
- prequery: personalised popularity: country popularity, plus the user's cluster
  (``cluster``) and the user's own vector (``full``).

Every task keeps only rankable entities available in the request's country, never the
source itself, and tops up with country-popular entities so the ranker always has a slate.
"""

from __future__ import annotations

import numpy as np

from app.core.context import Task
from app.core.features import ContextFeatures, FeatureBuilder
from app.core.text_index import TRIGRAM_MATCH

NEIGHBOURS_FROM_VECTORS = 100
# Prequery blend, chosen by the positive-retrieved rate on the synthetic test split (the
# figures: docs/MODEL.md, "Personalization"): a heavy personal term pushes out titles
# that are popular for a reason.
CLUSTER_WEIGHT = 0.3
USER_WEIGHT = 0.5


class CandidateRetriever:
    def __init__(self, features: FeatureBuilder) -> None:
        self.features = features
        self.text = features.text
        self.tables = features.tables
        self.catalogue = features.catalogue
        self.item_unit = features.item_unit
        # Country availability per country_pos row; row 0 (unknown country) = everything.
        self.allowed = np.stack(
            [self.catalogue.rankable]
            + [self.catalogue.available_in(c) for c in self.catalogue.country_names]
        )
        if self.allowed.shape[0] != self.tables.country_pos.shape[0]:
            raise ValueError(
                f"feature tables have {self.tables.country_pos.shape[0]} country rows, "
                f"the catalogue needs {self.allowed.shape[0]}"
            )

    def retrieve(self, cf: ContextFeatures, limit: int) -> np.ndarray:
        """Up to ``limit`` candidate entity indices (int64), best first-stage score first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        allowed = self.allowed[cf.country_row].copy()
        if cf.source_index >= 0:
            allowed[cf.source_index] = False
        task = cf.context.task
        if task is Task.SEARCH:
            score = self._search_scores(cf)
        elif task is Task.MORE_LIKE_THIS:
            score = self._similar_scores(cf)
        elif task is Task.ENTITY:
            score = self._entity_scores(cf)
        else:
            score = self._prequery_scores(cf)
        return self._top(score, allowed, limit, cf.country_row)

    def _top(self, score: np.ndarray, allowed: np.ndarray, limit: int, country: int) -> np.ndarray:
        score = np.where(allowed, score, -np.inf)
        hits = np.flatnonzero(score > 0)
        if len(hits) > limit:
            hits = hits[np.argpartition(-score[hits], limit - 1)[:limit]]
        hits = hits[np.argsort(-score[hits], kind="stable")]
        if len(hits) < limit:  # top up with what is popular in the country
            pop = np.where(allowed, self.features.country_pop_log[country] + 1e-3, -np.inf)
            pop[hits] = -np.inf
            n_fill = min(limit - len(hits), int(np.isfinite(pop).sum()))
            if n_fill > 0:
                fill = np.argpartition(-pop, n_fill - 1)[:n_fill]
                fill = fill[np.argsort(-pop[fill], kind="stable")]
                hits = np.concatenate([hits, fill])
        return hits.astype(np.int64)

    def _search_scores(self, cf: ContextFeatures) -> np.ndarray:
        n = self.features.n_entities
        fuzzy_weight = 0.7  # a query token found only within its typo budget
        token_hits = np.zeros(n)  # query tokens found exactly (the last one as a prefix)
        fuzzy_hits = np.zeros(n)  # query tokens found only within their typo budget
        for i, tok in enumerate(cf.tokens):
            exact = np.zeros(n, dtype=bool)
            exact[self.text.postings(tok, prefix=cf.is_prefix[i])] = True
            near = np.zeros(n, dtype=bool)
            near[cf.fuzzy_postings[i]] = True
            token_hits += exact
            fuzzy_hits += near & ~exact
        containment = cf.trigram_containment
        # Typo tolerance beyond the edit budget: a name sharing most of the query's
        # (word-anchored) trigrams counts even when no token matched; weak overlap does not.
        trigram = np.where(containment >= TRIGRAM_MATCH, containment, 0.0)
        relevant = (token_hits > 0) | (fuzzy_hits > 0) | (trigram > 0)
        pop = self.features.pop_log / max(float(self.features.pop_log.max()), 1.0)
        score = token_hits + fuzzy_weight * fuzzy_hits + trigram + 0.1 * pop
        return np.where(relevant, score, 0.0)

    def _similar_scores(self, cf: ContextFeatures) -> np.ndarray:
        n = self.features.n_entities
        score = np.zeros(n)
        targets, counts = self.tables.co_engaged(cf.source_index)
        score[targets] = 2.0 + np.log1p(counts)
        sims = self.item_unit @ self.item_unit[cf.source_index]
        k = min(NEIGHBOURS_FROM_VECTORS, n)
        near = np.argpartition(-sims, k - 1)[:k]
        score[near] = np.maximum(score[near], 1.0 + np.clip(sims[near], 0.0, 1.0))
        return score

    def _entity_scores(self, cf: ContextFeatures) -> np.ndarray:
        score = np.zeros(self.features.n_entities)
        targets, counts = self.tables.co_engaged(cf.source_index)
        score[targets] = 1.0 + np.log1p(counts)
        linked = self.catalogue.linked(cf.source_index)
        score[linked] += 2.0 + self.features.pop_log[linked] / 100.0
        return score

    def _prequery_scores(self, cf: ContextFeatures) -> np.ndarray:
        score = 1.0 + self.features.country_pop_log[cf.country_row].astype(np.float64)
        if cf.cluster > 0:
            score = score + CLUSTER_WEIGHT * self.features.cluster_pop_log[cf.cluster]
        if cf.user_vec.any():
            score = score + USER_WEIGHT * np.clip(self.tables.item_vec @ cf.user_vec[0], 0.0, None)
        return score
