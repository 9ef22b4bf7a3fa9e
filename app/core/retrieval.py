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

# Prequery blend, chosen by the positive-retrieved rate on the synthetic test split (the
# figures: docs/MODEL.md, "Personalization"): a heavy personal term pushes out titles
# that are popular for a reason.
CLUSTER_WEIGHT = 0.3
USER_WEIGHT = 0.5
FUZZY_WEIGHT = 0.7  # a search token found only within its typo budget
SEARCH_POP_WEIGHT = 0.1  # popularity's share of a search match's first-stage score
# Prequery lists kept per (country, cluster), best first: a longer limit, or a member
# whose vector could lift an entity from beyond the list, is scored over the catalogue.
PREQUERY_LIST = 2048

Scored = tuple[np.ndarray, np.ndarray]  # (entity indices, unique; first-stage scores)


class CandidateRetriever:
    """Each task's first stage reads what its request touches (the query's postings, the
    source's co-engaged targets, linked entities and stored neighbours, a precomputed
    prequery list), not the whole catalogue; the orders that do not depend on the
    request (country popularity, prequery per country and cluster) are sorted once, at
    load. What the catalogue still costs per request: a few memsets and counts of
    ``E`` bytes in search (``_search``)."""

    def __init__(self, features: FeatureBuilder) -> None:
        self.features = features
        self.text = features.text
        self.tables = features.tables
        self.catalogue = features.catalogue
        self.item_unit = features.item_unit
        self.n = features.n_entities
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
        neighbours = self.tables.item_neighbours
        if neighbours.shape[0] != self.n or (self.n > 1 and neighbours.shape[1] == 0):
            raise ValueError(
                f"feature tables have neighbours for {neighbours.shape[0]} entities, the "
                f"catalogue has {self.n}"
            )
        self.neighbours = neighbours.astype(np.int64)
        pop = features.pop_log
        self.search_pop = SEARCH_POP_WEIGHT * pop / max(float(pop.max(initial=0.0)), 1.0)
        # The top-up order: each country's available entities, most popular there first.
        self.pop_order = [
            self._ranked(row, np.asarray(features.country_pop_log[row], np.float64), None)
            for row in range(self.allowed.shape[0])
        ]
        self.prequery_lists = {
            (row, cluster): self._ranked(row, self._prequery_base(row, cluster), PREQUERY_LIST)
            for row in range(self.allowed.shape[0])
            for cluster in range(self.tables.cluster_pos.shape[0])
        }
        norms = np.linalg.norm(self.tables.item_vec.astype(np.float64), axis=1)
        self.max_item_norm = float(norms.max(initial=0.0))

    def _ranked(self, row: int, score: np.ndarray, keep: int | None) -> Scored:
        """The entities allowed in country ``row`` by ``score``, best first (ties: lower
        index first), the first ``keep`` of them (None: all)."""
        ids = np.flatnonzero(self.allowed[row])
        order = np.lexsort((ids, -score[ids]))
        if keep is not None:
            order = order[: keep + 1]  # one more: the best score left out (``_prequery``)
        ids = ids[order]
        return ids, score[ids]

    def retrieve(self, cf: ContextFeatures, limit: int) -> np.ndarray:
        """Up to ``limit`` candidate entity indices (int64), best first-stage score first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        task = cf.context.task
        if task is Task.SEARCH:
            ids, score = self._search(cf)
        elif task is Task.MORE_LIKE_THIS:
            ids, score = self._similar(cf)
        elif task is Task.ENTITY:
            ids, score = self._entity(cf)
        else:
            ids, score = self._prequery(cf, limit)
        return self._top(ids, score, limit, cf)

    def sources(self, cf: ContextFeatures, cand: np.ndarray) -> list[str]:
        """Where each retrieved candidate came from, by the rules of ``retrieve`` (for
        ``"explain": true``): the task's first stage, or ``popular_in_country`` for the
        top-up. search: ``name_token`` (a query token is a name token, the last one as a
        prefix), else ``typo`` (within the typo budget), else ``trigram``;
        more_like_this: ``co_engagement``, else ``similar`` (a stored neighbour); entity:
        ``linked``, else ``co_engagement``; prequery: ``prequery`` (the personalised
        popularity list)."""
        labels = np.full(len(cand), "popular_in_country", dtype=object)
        task = cf.context.task
        if task is Task.SEARCH:
            exact = np.zeros(len(cand), dtype=bool)
            near = np.zeros(len(cand), dtype=bool)
            for mark, post in zip(cf.token_marks, cf.fuzzy_postings, strict=True):
                exact |= mark[cand]
                near |= np.isin(cand, post)
            labels[cf.containment(cand) >= TRIGRAM_MATCH] = "trigram"
            labels[near] = "typo"
            labels[exact] = "name_token"
        elif task is Task.MORE_LIKE_THIS:
            labels[np.isin(cand, self.neighbours[cf.source_index])] = "similar"
            labels[np.isin(cand, self.tables.co_engaged(cf.source_index)[0])] = "co_engagement"
        elif task is Task.ENTITY:
            labels[np.isin(cand, self.tables.co_engaged(cf.source_index)[0])] = "co_engagement"
            labels[np.isin(cand, self.catalogue.linked(cf.source_index))] = "linked"
        else:
            labels[:] = "prequery"
        return [str(x) for x in labels]

    def _top(
        self, ids: np.ndarray, score: np.ndarray, limit: int, cf: ContextFeatures
    ) -> np.ndarray:
        keep = self.allowed[cf.country_row, ids] & (ids != cf.source_index) & (score > 0)
        ids, score = ids[keep], score[keep]
        if len(ids) > limit:  # the best ``limit``, and every tie at the cut
            cut = np.partition(-score, limit - 1)[limit - 1]
            best = -score <= cut
            ids, score = ids[best], score[best]
        hits = ids[np.lexsort((ids, -score))][:limit]  # ties: the lower index first
        if len(hits) < limit:  # top up with what is popular in the country
            order = self.pop_order[cf.country_row][0]
            head = order[: limit + len(hits) + 1]  # enough, whatever it has to skip
            fill = head[~np.isin(head, hits) & (head != cf.source_index)][: limit - len(hits)]
            hits = np.concatenate([hits, fill])
        return hits.astype(np.int64)

    def _search(self, cf: ContextFeatures) -> Scored:
        """Matched query tokens (exactly, the last one as a prefix; or within the typo
        budget at ``FUZZY_WEIGHT``), plus word-anchored trigram containment at or above
        ``TRIGRAM_MATCH``, plus a little popularity; only entities matching one of them."""
        trigram = cf.trigram_matches(TRIGRAM_MATCH)
        seen = np.zeros(self.n, dtype=bool)  # the union of every match
        for mark in cf.token_marks:
            seen |= mark
        for part in (*cf.fuzzy_postings, trigram):
            seen[part] = True
        ids = np.flatnonzero(seen)
        token_hits = np.zeros(len(ids))
        fuzzy_hits = np.zeros(len(ids))
        for exact, near in zip(cf.token_marks, cf.fuzzy_postings, strict=True):
            is_exact = exact[ids]
            is_near = np.zeros(self.n, dtype=bool)
            is_near[near] = True
            token_hits += is_exact
            fuzzy_hits += is_near[ids] & ~is_exact
        tri = cf.containment(ids)
        tri = np.where(tri >= TRIGRAM_MATCH, tri, 0.0)
        return ids, token_hits + FUZZY_WEIGHT * fuzzy_hits + tri + self.search_pop[ids]

    def _similar(self, cf: ContextFeatures) -> Scored:
        """Co-engaged targets of the source (2 + log1p(count)), then its stored nearest
        neighbours in the pre-trained item space (1 + cosine); the better of the two."""
        src = cf.source_index
        targets, counts = self.tables.co_engaged(src)
        near = self.neighbours[src]
        sims = self.item_unit[near] @ self.item_unit[src]
        return _best_of(
            np.concatenate([targets, near]),
            np.concatenate([2.0 + np.log1p(counts), 1.0 + np.clip(sims, 0.0, 1.0)]),
        )

    def _entity(self, cf: ContextFeatures) -> Scored:
        """The entity's linked videos (2 + a little popularity) plus its co-engaged targets
        (1 + log1p(count)), added up."""
        src = cf.source_index
        targets, counts = self.tables.co_engaged(src)
        linked = np.unique(self.catalogue.linked(src))
        ids, inverse = np.unique(np.concatenate([targets, linked]), return_inverse=True)
        weights = np.concatenate(
            [1.0 + np.log1p(counts), 2.0 + self.features.pop_log[linked] / 100.0]
        )
        return ids, np.bincount(inverse, weights=weights, minlength=len(ids))

    def _prequery_base(self, row: int, cluster: int) -> np.ndarray:
        score = 1.0 + self.features.country_pop_log[row].astype(np.float64)
        if cluster > 0:
            score = score + CLUSTER_WEIGHT * self.features.cluster_pop_log[cluster]
        return score

    def _prequery(self, cf: ContextFeatures, limit: int) -> Scored:
        """Personalised popularity: country popularity, plus the cluster's, plus (``full``)
        the member's affinity, read from the (country, cluster) list. The member's term is
        added over the list, which is exact when no entity beyond it could reach the
        ``limit``-th score: such an entity's base is at most the best one left out, its
        term at most ``USER_WEIGHT * |user| * max |item|``. Otherwise, and for a limit
        longer than the list, the catalogue is scored."""
        ids, base = self.prequery_lists[cf.country_row, cf.cluster]
        user = cf.user_vec[0]
        personal = bool(user.any())
        complete = len(ids) <= PREQUERY_LIST  # nothing allowed was left out
        if not complete and limit <= PREQUERY_LIST:
            beyond = float(base[PREQUERY_LIST])
            ids, base = ids[:PREQUERY_LIST], base[:PREQUERY_LIST]
            if not personal:
                return ids[:limit], base[:limit]
            score = base + USER_WEIGHT * np.clip(self.tables.item_vec[ids] @ user, 0.0, None)
            bound = beyond + USER_WEIGHT * float(np.linalg.norm(user)) * self.max_item_norm
            if -np.partition(-score, limit - 1)[limit - 1] > bound:
                return ids, score
        elif complete:
            if not personal:
                return ids, base
            return ids, base + USER_WEIGHT * np.clip(self.tables.item_vec[ids] @ user, 0.0, None)
        score = self._prequery_base(cf.country_row, cf.cluster)
        if personal:
            score = score + USER_WEIGHT * np.clip(self.tables.item_vec @ user, 0.0, None)
        return np.arange(self.n), score


def _best_of(ids: np.ndarray, score: np.ndarray) -> Scored:
    """One entry per entity, with its best score."""
    order = np.lexsort((-score, ids))
    ids, score = ids[order], score[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    return ids[first], score[first]
