"""The ranking service behind the HTTP API: model snapshot, cache, admission control,
inference (direct or micro-batched), reload, readiness.

``POST /rank`` path (``RankingService.rank``):

    snapshot (bundle, ranker) -> impute context -> cache key -> cache get
      hit:  cached items + this request's own context        (no scoring, no admission)
      miss/bypass: admission -> retrieve + features -> score -> top-k -> cache set (miss)

A request takes ONE ``ServingModel`` snapshot at its start and uses only it, so a reload
(an atomic swap of the snapshot) never yields a mixed-version response; the model
version is part of the cache key, so a new model never serves the old model's entries.

Inference runs inline on the event loop when micro-batching is off. Measured at 500
candidates on the 2-core dev box (synthetic 2,100-entity bundle, medians of 5 alternating
runs): one request at a time, inline p50 2.13 ms vs 2.47 ms through a thread pool (the
hop costs ~0.3 ms). At 8-32 concurrent requests on a quiet machine the hop
(``batch_window_ms=0.01``) let ONE worker use a second core, since onnxruntime releases
the GIL (515-567 vs 345-356 req/s; docs/BENCHMARKS.md); two inline workers did better
still (717 req/s), so cores are used through workers (processes).

Admission control (``app.admission``): scoring slots, first come, first served, each
handed on one event-loop turn after its scoring so that the loop reads new requests
between turns; refusals are 503 + ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from app.access_log import AccessRecord, hash_user
from app.admission import Admission
from app.batching import BatchClosed, MicroBatcher, concatenate_requests
from app.bundle import Bundle, load_bundle
from app.cache import (
    BYPASS,
    MISS,
    CacheKeyParts,
    CacheRead,
    ClusterCache,
    InProcessCache,
    RedisCache,
    cache_key,
)
from app.config import Settings
from app.context import Context, Personalization, Task
from app.errors import BundleError, MalformedRequest, ModelUnavailable, Overloaded
from app.metrics import ServiceMetrics
from app.ranking import Ranker, RankQuery, RankResult
from app.schemas import (
    CacheState,
    CatalogueSample,
    RankLimits,
    RankRequest,
    Ready,
    ReloadResponse,
)
from app.scoring import ScorerOptions

logger = logging.getLogger("unicorn.service")


@dataclass(frozen=True)
class ServingModel:
    """One loaded model and everything bound to it; replaced whole on reload."""

    bundle: Bundle
    ranker: Ranker
    batcher: MicroBatcher | None

    @property
    def model_version(self) -> str:
        return self.bundle.model_version


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
        )
    return InProcessCache(
        settings.cache_max_entries,
        settings.cache_ttl_seconds,
        retry_seconds=settings.cache_retry_seconds,
        metrics=metrics,
    )


def warm_ranker(ranker: Ranker) -> None:
    """Rank one request per task and level through the whole path (raises on failure)."""
    catalogue = ranker.bundle.catalogue
    rankable = np.flatnonzero(catalogue.rankable)
    pages = np.flatnonzero(~catalogue.rankable)
    queries: list[RankQuery] = [
        RankQuery(task=Task.PREQUERY.value, personalization=level) for level in Personalization
    ]
    if len(rankable):
        video = str(catalogue.entity_id[rankable[0]])
        queries.append(RankQuery(task=Task.MORE_LIKE_THIS.value, source_entity_id=video))
        names = ranker.bundle.text.names[rankable]
        named = np.flatnonzero(np.strings.str_len(names) > 0)
        if len(named):
            name = str(names[named[0]])
            queries.append(RankQuery(task=Task.SEARCH.value, query=name[:3]))
            queries.append(
                RankQuery(task=Task.SEARCH.value, query=name, candidates=(video, "<no such id>"))
            )
    if len(pages):
        page = str(catalogue.entity_id[pages[0]])
        queries.append(RankQuery(task=Task.ENTITY.value, source_entity_id=page))
    for q in queries:
        result = ranker.rank(q)
        if not all(np.isfinite(item.score) for item in result.items):
            raise BundleError(f"warm-up {q.task} request scored non-finite values", "bundle")


def check_batched_scoring(ranker: Ranker, tolerance: float = 1e-5) -> None:
    """The model must score requests concatenated by the micro-batcher (one context row
    per candidate) exactly as it scores them one by one; refuse the bundle otherwise."""
    queries = [
        RankQuery(task=Task.PREQUERY.value, personalization=Personalization.NONE),
        RankQuery(task=Task.PREQUERY.value, user_id="<warm-up>", k=5),
    ]
    inputs = [ranker.prepare(q).inputs for q in queries]
    separate = np.concatenate([ranker.bundle.scorer.score(i) for i in inputs])
    batched = ranker.bundle.scorer.score(concatenate_requests(inputs))
    if batched.shape != separate.shape or not np.allclose(batched, separate, atol=tolerance):
        raise BundleError(
            f"{ranker.bundle.path}: model.onnx scores micro-batched requests differently from "
            f"single requests; serve it with batch_window_ms=0",
            field="bundle",
        )


def load_serving_model(path: Path, settings: Settings) -> tuple[Bundle, Ranker]:
    """Verify, load and warm a bundle (blocking: run it in a worker thread)."""
    options = ScorerOptions(
        intra_op_threads=settings.ort_intra_op_threads,
        inter_op_threads=settings.ort_inter_op_threads,
    )
    try:
        bundle = load_bundle(path, options)
        ranker = Ranker(bundle, max_retrieved=settings.max_retrieved)
        warm_ranker(ranker)
        if settings.batch_window_ms > 0:
            check_batched_scoring(ranker)
    except BundleError:
        raise
    except Exception as exc:  # a bundle that breaks the code path is a refused bundle
        raise BundleError(
            f"{path}: bundle failed warm-up ({type(exc).__name__}: {exc})", field="bundle"
        ) from exc
    return bundle, ranker


class RankingService:
    """Holds the serving snapshot, the cache and the metrics; one per app."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        cache: ClusterCache | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = cache
        self.model: ServingModel | None = None
        self.stopping = False
        self.limits = RankLimits(settings.max_query_chars, settings.max_candidates)
        salt = settings.log_user_salt
        self._user_key = salt.get_secret_value().encode() if salt else os.urandom(16)
        self.admission = Admission(
            settings.max_in_flight,
            settings.queue_timeout_ms / 1000.0,
            adaptive=settings.batch_window_ms == 0,  # fair share is for inline scoring
            on_slots=metrics.scoring_slots.set,
        )
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._sighup_installed = False

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured bundle (raises ``BundleError``: the process must not serve)."""
        bundle, ranker = await asyncio.to_thread(
            load_serving_model, self.settings.bundle, self.settings
        )
        self._install(bundle, ranker)
        logger.info(
            "serving model %s from %s (cache: %s)",
            bundle.model_version,
            bundle.path,
            self.settings.cache_backend,
        )
        self._install_sighup()

    async def close(self) -> None:
        self.stopping = True
        self._remove_sighup()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.model is not None and self.model.batcher is not None:
            await self.model.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        ServiceMetrics.mark_process_dead(os.getpid())

    def _install(self, bundle: Bundle, ranker: Ranker) -> ServingModel | None:
        """Atomically swap in a new snapshot; returns the previous one."""
        batcher = None
        if self.settings.batch_window_ms > 0:
            batcher = MicroBatcher(
                bundle.scorer.score,
                window_s=self.settings.batch_window_ms / 1000.0,
                max_rows=self.settings.max_batch_size,
                on_batch=self._observe_batch,
            )
        previous = self.model
        self.model = ServingModel(bundle, ranker, batcher)
        self.metrics.set_model(bundle.model_version, previous.model_version if previous else None)
        return previous

    def _observe_batch(self, rows: int, _seconds: float) -> None:
        self.metrics.inference_batch_size.observe(rows)

    # --- ranking ----------------------------------------------------------------------
    def parse(self, body: bytes) -> RankRequest:
        """Validate a raw ``/rank`` body (pydantic's JSON parser, with the limits)."""
        try:
            return RankRequest.model_validate_json(body, context=self.limits)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            if errors and errors[0]["type"] == "json_invalid":
                detail = errors[0].get("ctx", {}).get("error") or errors[0]["msg"]
                raise MalformedRequest(
                    f"request body must be a JSON object ({detail})", field="body"
                ) from None
            raise

    async def rank(
        self, req: RankRequest, record: AccessRecord | None = None, started: float | None = None
    ) -> bytes:
        """The JSON body of a ``/rank`` response (see the module docstring). ``started``
        (``perf_counter``) is when the handler began, so the latency includes the parse."""
        started = time.perf_counter() if started is None else started
        model = self.model
        if model is None:
            raise ModelUnavailable("no model is loaded yet", field=None)
        ranker = model.ranker
        level = Personalization(req.personalization)
        q = RankQuery(
            task=req.task,
            user_id=req.user_id,
            query=req.query,
            country=req.country,
            source_entity_id=req.source_entity_id,
            candidates=None if req.candidates is None else tuple(req.candidates),
            k=req.k,
            personalization=level,
        )
        if record is not None:
            self._describe(record, req, model)
        ctx = ranker.context(q)
        cluster = ranker.user_cluster(ctx, level)

        key: str | None = None
        read: CacheRead = BYPASS
        if self.cache is not None and level is not Personalization.FULL:
            key = cache_key(
                CacheKeyParts(
                    model_version=model.model_version,
                    task=ctx.task.value,
                    query=ctx.query,
                    country=ctx.country,
                    user_cluster=cluster,
                    source_entity_id=ctx.source_entity_id,
                    candidates=q.candidates,
                    retrieval_limit=ranker.max_retrieved,
                    k=q.k,
                    personalization=level,
                )
            )
            t0 = time.perf_counter()
            read = await self.cache.get(key)
            self.metrics.stage_latency.labels("cache").observe(time.perf_counter() - t0)

        items: list[dict[str, Any]] | None = None
        if read.outcome == "hit":
            items = self._decode(read.value)
            if items is None:
                read = MISS
        if items is None:
            result = await self._score(model, q, ctx)
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
            if record is not None:
                record.n_candidates = result.n_candidates
            if read.outcome == "miss" and key is not None and self.cache is not None:
                t0 = time.perf_counter()
                await self.cache.set(key, orjson.dumps(items))
                self.metrics.stage_latency.labels("cache").observe(time.perf_counter() - t0)
        else:
            unknown = (
                model.bundle.catalogue.indices_of(list(q.candidates))[1]
                if q.candidates is not None
                else []
            )
        body = orjson.dumps(
            {
                "items": items,
                "task": ctx.task.value,
                "model_version": model.model_version,
                "personalization": level.value,
                "cache": read.outcome,
                "context": ctx.as_dict(),
                "unknown_candidates": unknown,
            }
        )
        self.metrics.cache_requests.labels(read.outcome).inc()
        self.metrics.rank_latency.labels(ctx.task.value, level.value, read.outcome).observe(
            time.perf_counter() - started
        )
        if record is not None:
            record.cache = read.outcome
        return body

    def _describe(self, record: AccessRecord, req: RankRequest, model: ServingModel) -> None:
        record.task = req.task
        record.personalization = req.personalization
        record.model_version = model.model_version
        record.user = hash_user(req.user_id, self._user_key)
        if req.query is not None:
            record.query_chars = len(req.query)
            if self.settings.log_queries:
                record.query = req.query

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

    async def _score(self, model: ServingModel, q: RankQuery, ctx: Context) -> RankResult:
        try:
            await self.admission.enter()
        except Overloaded:
            self.metrics.shed.inc()
            raise
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            prepared = model.ranker.prepare(q, ctx)
            stage = self.metrics.stage_latency
            stage.labels("retrieval").observe(prepared.timings["retrieval"])
            stage.labels("features").observe(prepared.timings["features"])
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
            prepared.timings["inference"] = time.perf_counter() - t0
            stage.labels("inference").observe(prepared.timings["inference"])
            return model.ranker.finish(prepared, scores)
        finally:
            self.metrics.in_flight.dec()
            self.admission.leave(time.perf_counter() - started)

    def _score_direct(self, model: ServingModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
        scores = model.bundle.scorer.score(inputs)
        self.metrics.inference_batch_size.observe(len(scores))
        return scores

    # --- reload -----------------------------------------------------------------------
    async def reload(self, path: Path | None = None) -> ReloadResponse:
        """Load, verify and warm a bundle in a worker thread, then swap it in atomically.

        A refused bundle raises ``BundleError`` (409) and the running model keeps serving.
        """
        target = Path(path) if path is not None else self.settings.bundle
        async with self._reload_lock:
            started = time.perf_counter()
            previous = self.model
            try:
                bundle, ranker = await asyncio.to_thread(load_serving_model, target, self.settings)
            except BundleError as exc:
                self.metrics.model_reloads.labels("refused").inc()
                logger.error("model reload from %s refused: %s", target, exc.message)
                raise
            self._install(bundle, ranker)
            self.metrics.model_reloads.labels("ok").inc()
            if previous is not None and previous.batcher is not None:
                await previous.batcher.close()  # requests it holds finish on the old model
            old_version = previous.model_version if previous else ""
            logger.warning(
                "model reloaded: %s -> %s from %s", old_version, bundle.model_version, target
            )
            return ReloadResponse(
                model_version=bundle.model_version,
                previous_model_version=old_version,
                bundle=str(target),
                seconds=round(time.perf_counter() - started, 3),
            )

    def _install_sighup(self) -> None:
        """SIGHUP reloads the configured bundle (single-process serving; with several
        workers uvicorn's supervisor restarts them on SIGHUP, which reloads it too)."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return
        self._sighup_installed = True

    def _remove_sighup(self) -> None:
        if self._sighup_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup_installed = False

    def _on_sighup(self) -> None:
        logger.warning("SIGHUP: reloading %s", self.settings.bundle)
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_quietly(self) -> None:
        # A refused bundle is logged and counted by reload(); the old model keeps serving.
        with contextlib.suppress(BundleError):
            await self.reload(None)

    # --- health and samples -------------------------------------------------------------
    async def readiness(self) -> Ready:
        """Ready once a model serves and until shutdown; the cache is probed, not assumed."""
        model = self.model
        cache_state: CacheState = "off"
        if self.cache is not None:
            cache_state = "ok" if await self.cache.check() else "degraded"
        ready = model is not None and not self.stopping
        return Ready(
            status="ready" if ready else "not_ready",
            model_version=model.model_version if model else None,
            cache=cache_state,
            cache_backend=self.settings.cache_backend,
        )

    def sample(self, n: int, seed: int = 0) -> CatalogueSample:
        """Up to ``n`` queries, videos and page entities from the served bundle."""
        model = self.model
        if model is None:
            raise ModelUnavailable("no model is loaded yet", field=None)
        rng = np.random.default_rng(seed)
        catalogue, tables = model.bundle.catalogue, model.bundle.tables

        def draw(values: np.ndarray) -> list[str]:
            if len(values) == 0:
                return []
            picked = rng.choice(len(values), size=min(n, len(values)), replace=False)
            return [str(v) for v in values[np.sort(picked)].tolist()]

        queries = tables.query_keys if len(tables.query_keys) else model.bundle.text.names
        has_links = np.diff(catalogue.link_indptr) > 0
        return CatalogueSample(
            model_version=model.model_version,
            queries=[q for q in draw(queries) if q],
            video_ids=draw(catalogue.entity_id[catalogue.rankable]),
            entity_ids=draw(catalogue.entity_id[~catalogue.rankable & has_links]),
            countries=list(catalogue.country_names),
        )
