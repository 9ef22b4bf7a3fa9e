"""The ranking pipeline behind ``POST /rank``: cache, admission, scoring.

    snapshot (bundle, ranker) -> impute context -> cache key -> cache get
      hit:  cached items + this request's own context        (no scoring, no admission)
      miss/bypass: admission -> retrieve + features -> score -> top-k -> cache set (miss)

The variant and the model version are part of the cache key, so a new model never serves
the old model's entries, nor one variant another's. ``full`` personalization is never
cached (its answers are per member), nor is an explained answer (``explain``: it is
neither read from nor written to the cache).

Inference runs inline on the event loop when micro-batching is off, or through
``app.serving.batching`` when it is on; docs/BENCHMARKS.md measures both. Admission
control (``app.serving.admission``) hands out scoring slots, first come, first served;
a refusal is ``Overloaded`` (503 + ``Retry-After``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from app.core.context import Context, Personalization
from app.core.errors import Overloaded
from app.core.ranking import RankQuery, RankResult
from app.serving.admission import Admission
from app.serving.batching import BatchClosed
from app.serving.cache import (
    BYPASS,
    MISS,
    CacheKeyParts,
    CacheOutcome,
    CacheRead,
    ClusterCache,
    InProcessCache,
    RedisCache,
    cache_key,
)
from app.serving.config import Settings
from app.serving.metrics import ServiceMetrics
from app.serving.model_holder import ServingModel, Variants
from app.serving.tracing import Stage


@dataclass(frozen=True)
class RankOutcome:
    """One answered ranking request; the HTTP layer renders it."""

    items: list[dict[str, Any]]  # entity_id, score, name, entity_type: plain JSON values
    context: Context
    variant: str
    model_version: str
    personalization: Personalization
    cache: CacheOutcome
    unknown_candidates: list[str]
    n_candidates: int | None  # None on a cache hit (nothing was retrieved)
    explanation: list[dict[str, Any]] | None = None  # per item, for ``explain``
    # (stage, start, end) in perf_counter seconds, in order: what tracing turns into spans
    stages: list[Stage] = field(default_factory=list)


def open_cache(settings: Settings, metrics: ServiceMetrics | None) -> ClusterCache | None:
    """The cache the settings ask for: ``None`` (off), in-process, or Redis."""
    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            ttl_seconds=settings.cache_ttl_seconds,
            timeout_seconds=settings.cache_timeout_ms / 1000.0,
            retry_seconds=settings.cache_retry_seconds,
            max_connections=settings.cache_max_connections,
            metrics=metrics,
            failure_threshold=settings.cache_failure_threshold,
        )
    return InProcessCache(
        settings.cache_max_entries,
        settings.cache_ttl_seconds,
        retry_seconds=settings.cache_retry_seconds,
        metrics=metrics,
        failure_threshold=settings.cache_failure_threshold,
    )


class RankingPipeline:
    """Cache, admission and scoring over the holder's current model; one per app."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        models: Variants,
        cache: ClusterCache | None,
    ) -> None:
        self.metrics = metrics
        self.models = models
        self.cache = cache
        self.admission = Admission(
            settings.max_in_flight,
            settings.queue_timeout_ms / 1000.0,
            adaptive=settings.batch_window_ms == 0,  # fair share is for inline scoring
            on_slots=metrics.scoring_slots.set,
        )

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()

    async def cache_ok(self) -> bool | None:
        """The cache's probe: ``None`` when caching is off."""
        return None if self.cache is None else await self.cache.check()

    async def rank(
        self,
        q: RankQuery,
        model: ServingModel | None = None,
        started: float | None = None,
        arrived: float | None = None,
    ) -> RankOutcome:
        """Answer ``q`` on ``model`` (default: the member's variant's current one). ``started``
        (``perf_counter``) is when the request began, so the latency includes the parse;
        ``arrived`` when its head was read, where admission's wait runs from."""
        started = time.perf_counter() if started is None else started
        model = model or self.models.choose(q.user_id)
        variant = model.variant
        ranker = model.ranker
        level = q.personalization
        t_impute = time.perf_counter()
        ctx = ranker.context(q)
        stages = [("impute", t_impute, time.perf_counter())]

        key: str | None = None
        read: CacheRead = BYPASS
        if self.cache is not None and level is not Personalization.FULL and not q.explain:
            key = cache_key(
                CacheKeyParts(
                    variant=variant,
                    model_version=model.model_version,
                    task=ctx.task.value,
                    query=ctx.query,
                    country=ctx.country,
                    user_cluster=ranker.user_cluster(ctx, level),
                    source_entity_id=ctx.source_entity_id,
                    candidates=q.candidates,
                    retrieval_limit=ranker.max_retrieved,
                    k=q.k,
                    personalization=level,
                )
            )
            t0 = time.perf_counter()
            read = await self.cache.get(key)
            t1 = time.perf_counter()
            self.metrics.stage_latency.labels("cache", variant).observe(t1 - t0)
            stages.append(("cache", t0, t1))

        items = self._decode(read.value) if read.outcome == "hit" else None
        if read.outcome == "hit" and items is None:
            read = MISS
        n_candidates: int | None = None
        explanation = None
        if items is None:
            result = await self._score(model, q, ctx, arrived, stages)
            explanation = result.explanation
            items = [
                {
                    "entity_id": i.entity_id,
                    "score": i.score,
                    "name": i.name,
                    "entity_type": i.entity_type,
                }
                for i in result.items
            ]
            unknown = result.unknown_candidates
            n_candidates = result.n_candidates
            if read.outcome == "miss" and key is not None and self.cache is not None:
                t0 = time.perf_counter()
                await self.cache.set(key, orjson.dumps(items))
                t1 = time.perf_counter()
                self.metrics.stage_latency.labels("cache", variant).observe(t1 - t0)
                stages.append(("cache", t0, t1))
        else:
            unknown = (
                model.bundle.catalogue.indices_of(list(q.candidates))[1]
                if q.candidates is not None
                else []
            )
        self.metrics.cache_requests.labels(read.outcome).inc()
        self.metrics.rank_latency.labels(
            ctx.task.value, level.value, read.outcome, variant
        ).observe(time.perf_counter() - started)
        return RankOutcome(
            items, ctx, variant, model.model_version, level, read.outcome, unknown,
            n_candidates, explanation, stages,
        )  # fmt: skip

    def _decode(self, value: bytes | None) -> list[dict[str, Any]] | None:
        """Cached items, or ``None`` (counted as a cache error) when the entry is unusable."""
        try:
            items = orjson.loads(value or b"")
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ValueError(f"cached value is a {type(items).__name__}, not a list of items")
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            if self.cache is not None:
                self.cache.record_error("decode", exc)
            return None
        return items

    async def _score(
        self,
        model: ServingModel,
        q: RankQuery,
        ctx: Context,
        arrived: float | None,
        stages: list[Stage],
    ) -> RankResult:
        t_wait = time.perf_counter()
        try:
            await self.admission.enter(arrived)
        except Overloaded:
            self.metrics.shed.inc()
            raise
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        stages.append(("admission", t_wait, started))
        try:
            prepared = model.ranker.prepare(q, ctx)
            retrieved = started + prepared.timings["retrieval"]
            stages.append(("retrieve", started, retrieved))
            stages.append(("features", retrieved, retrieved + prepared.timings["features"]))
            stage = self.metrics.stage_latency
            variant = model.variant
            stage.labels("retrieval", variant).observe(prepared.timings["retrieval"])
            stage.labels("features", variant).observe(prepared.timings["features"])
            n = len(prepared.candidates)
            self.metrics.candidates_per_request.observe(n)
            t0 = time.perf_counter()
            if n == 0:
                scores = np.zeros(0, dtype=np.float32)
            elif model.batcher is not None and not model.batcher.closed:
                try:
                    scores = await model.batcher.score(prepared.inputs)
                except BatchClosed:  # the model was swapped while this request waited
                    scores = self._score_direct(model, prepared.inputs)
            else:
                scores = self._score_direct(model, prepared.inputs)
            t1 = time.perf_counter()
            prepared.timings["inference"] = t1 - t0
            stage.labels("inference", variant).observe(prepared.timings["inference"])
            stages.append(("score", t0, t1))
            result = model.ranker.finish(prepared, scores)
            stages.append(("top_k", t1, time.perf_counter()))
            return result
        finally:
            self.metrics.in_flight.dec()
            self.admission.leave(time.perf_counter() - started)

    def _score_direct(self, model: ServingModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
        scores = model.bundle.scorer.score(inputs)
        self.metrics.inference_batch_size.observe(len(scores))
        return scores
