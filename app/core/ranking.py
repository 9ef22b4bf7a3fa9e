"""The in-process ranking path: impute -> retrieve -> features -> score -> top-k.

``Ranker.rank`` is what ``POST /rank`` runs on a cache miss and what the offline
evaluation runs, so the offline figures describe the code that serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core.bundle import Bundle
from app.core.context import Context, Personalization, Task, impute_context
from app.core.errors import InvalidRequest, NotFound
from app.core.explain import Occlusion
from app.core.features import CAT_COL, COL, TASK_IDS, ContextFeatures
from app.core.text_index import TRIGRAM_MATCH

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


def ranking_key(inputs: dict[str, np.ndarray], scores: np.ndarray) -> np.ndarray:
    """What candidates are ordered by: the model's probability within tiers, which is
    how a search box behaves (docs/MODEL.md, "Search-box order"):

    3. the exact title: the whole normalised name is the query;
    2. names holding every query token (exactly, the last typed token as a prefix, or
       within the typo budget): a misspelt whole title lands here;
    1. names that match the query: some query token, or most of its trigrams;
    0. the rest: retrieval's popular top-ups.

    Only search is tiered. The model alone ranks most exact titles first, but not a
    title that is also the start of a more popular one ("the dark knight" / "the dark
    knight rises"), and at ``none`` it lets the most popular title of all above a
    misspelt match ("godfahter" -> Pulp Fiction first): tag searches, whose titles share
    no word with what was typed, teach it that popularity can beat text. The response's
    ``score`` stays the probability."""
    dense = inputs["dense"]
    if not np.any(inputs["ctx_cat"][:, CAT_COL["task"]] == TASK_IDS[Task.SEARCH]):
        return np.asarray(scores, dtype=np.float64)
    match = (dense[:, COL["fuzzy_overlap"]] > 0) | (
        dense[:, COL["trigram_containment"]] >= TRIGRAM_MATCH
    )
    whole = dense[:, COL["fuzzy_overlap"]] >= 1.0  # every query token found (so a match)
    tier = dense[:, COL["name_exact"]] + match + whole
    return np.asarray(scores, dtype=np.float64) + 2.0 * tier


@dataclass(frozen=True)
class RankQuery:
    """A validated request, before imputation."""

    task: str
    user_id: str | None = None
    query: str | None = None
    country: str | None = None
    source_entity_id: str | None = None
    candidates: tuple[str, ...] | None = None
    k: int = 20
    personalization: Personalization = Personalization.CLUSTER
    explain: bool = False  # per item: inputs, attribution, retrieval source (app.core.explain)


@dataclass(frozen=True)
class RankedItem:
    entity_id: str
    score: float
    name: str
    entity_type: str


@dataclass
class RankResult:
    items: list[RankedItem]
    context: Context
    personalization: Personalization
    model_version: str
    user_cluster: int
    unknown_candidates: list[str]
    n_candidates: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    explanation: list[dict[str, Any]] | None = None  # per item, when the query asked


@dataclass
class PreparedRequest:
    """A request after imputation, retrieval and features: ready to score."""

    query: RankQuery
    context_features: ContextFeatures
    candidates: np.ndarray
    inputs: dict[str, np.ndarray]
    unknown_candidates: list[str]
    timings: dict[str, float]


class Ranker:
    def __init__(self, bundle: Bundle, max_retrieved: int = 300) -> None:
        if max_retrieved < 1:
            raise ValueError(f"max_retrieved must be >= 1, got {max_retrieved}")
        self.bundle = bundle
        self.max_retrieved = max_retrieved
        self._occlusion: Occlusion | None = None

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    def context(self, q: RankQuery) -> Context:
        """Impute the request's context; map rule violations to 4xx domain errors."""
        try:
            return impute_context(
                q.task,
                q.user_id,
                q.query,
                q.country,
                q.source_entity_id,
                self.bundle.catalogue.name_of,
            )
        except LookupError as exc:
            raise NotFound(str(exc), field="source_entity_id") from exc
        except ValueError as exc:
            message = str(exc)
            field_name = message.split(" ", 1)[0]
            raise InvalidRequest(message, field=field_name) from exc

    def user_cluster(self, ctx: Context, level: Personalization) -> int:
        """The cluster the features give this context at ``level`` (a cache key part),
        without computing the features."""
        return self.bundle.features.user_cluster(ctx.user_id, level)

    def prepare(self, q: RankQuery, ctx: Context | None = None) -> PreparedRequest:
        t0 = time.perf_counter()
        ctx = ctx or self.context(q)
        cf = self.bundle.features.context(ctx, q.personalization)
        unknown: list[str] = []
        if q.candidates is not None:
            cand, unknown = self.bundle.catalogue.indices_of(list(q.candidates))
        else:
            cand = self.bundle.retriever.retrieve(cf, limit=self.max_retrieved)
        t1 = time.perf_counter()
        inputs = self.bundle.features.candidates(cf, cand)
        t2 = time.perf_counter()
        return PreparedRequest(
            q, cf, cand, inputs, unknown, {"retrieval": t1 - t0, "features": t2 - t1}
        )

    def finish(self, prepared: PreparedRequest, scores: np.ndarray) -> RankResult:
        q, cand = prepared.query, prepared.candidates
        k = min(q.k, len(cand))
        key = ranking_key(prepared.inputs, scores)
        top = np.arange(len(cand))
        if k < len(cand):
            # Everything scoring at least the k-th score, ties at the cut included, so that
            # ties are broken by entity index below, not by the candidates' input order.
            kth = np.partition(-key, k - 1)[k - 1]
            top = np.flatnonzero(-key <= kth)
        top = top[np.lexsort((cand[top], -key[top]))][:k]
        catalogue, chosen = self.bundle.catalogue, cand[top]
        # One gather and one ``tolist`` per column, not a numpy scalar per item and field.
        items = [
            RankedItem(entity_id=e, score=p, name=n, entity_type=t)
            for e, p, n, t in zip(
                catalogue.entity_id[chosen].tolist(),
                scores[top].astype(np.float64).tolist(),
                catalogue.display_name[chosen].tolist(),
                catalogue.entity_type[chosen].tolist(),
                strict=True,
            )
        ]
        ctx = prepared.context_features.context
        return RankResult(
            items=items,
            context=ctx,
            personalization=q.personalization,
            model_version=self.model_version,
            user_cluster=prepared.context_features.cluster,
            unknown_candidates=prepared.unknown_candidates,
            n_candidates=len(cand),
            timings=prepared.timings,
            explanation=self.explain(prepared, top, scores, key) if q.explain else None,
        )

    def explain(
        self, prepared: PreparedRequest, rows: np.ndarray, scores: np.ndarray, key: np.ndarray
    ) -> list[dict[str, Any]]:
        """The explanation of the answer's items (``rows`` of the candidates, in order),
        with one more batched model call for the occluded rows (``app.core.explain``).
        ``tier``: the search-box tier that orders search answers before the score
        (``ranking_key``); 0 for the other tasks."""
        if self._occlusion is None:
            norm = self.bundle.manifest.get("normalisation") or {}
            self._occlusion = Occlusion(norm.get("mean"), norm.get("std"))
        occ, cand = self._occlusion, prepared.candidates
        if not len(rows):
            return []
        occluded = self.bundle.scorer.score(occ.feeds(prepared.inputs, rows))
        if prepared.query.candidates is not None:
            sources = ["given"] * len(rows)
        else:
            sources = self.bundle.retriever.sources(prepared.context_features, cand[rows])
        out = occ.explain(prepared.inputs, rows, scores[rows], occluded, sources)
        tiers = np.rint((key[rows] - scores[rows].astype(np.float64)) / 2.0).astype(int)
        for item, tier in zip(out, tiers.tolist(), strict=True):
            item["tier"] = tier
        return out

    def rank(self, q: RankQuery, scorer: Scorer | None = None) -> RankResult:
        """The whole path in the calling thread (``scorer`` defaults to the bundle's)."""
        prepared = self.prepare(q)
        t0 = time.perf_counter()
        if len(prepared.candidates):
            scores = (scorer or self.bundle.scorer.score)(prepared.inputs)
        else:
            scores = np.zeros(0, dtype=np.float32)
        prepared.timings["inference"] = time.perf_counter() - t0
        return self.finish(prepared, scores)
