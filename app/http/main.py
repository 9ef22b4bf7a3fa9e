"""The FastAPI application: ``create_app(settings)`` builds it, its lifespan loads the model
and opens the cache, and closes both. Nothing heavy happens at import time.

Run it with ``unicorn serve`` (see ``app.http.server``), or any ASGI server:
``uvicorn --factory app.http.main:create_app`` (settings from ``UNICORN_*`` variables).

The lifespan builds the serving parts (``app.http.deps.Served``): the model holder
(``app.serving.model_holder``) and the ranking pipeline with its cache
(``app.serving.pipeline``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from app.core.errors import BundleError
from app.http.access_log import AccessLogMiddleware
from app.http.body_limit import BodySizeLimitMiddleware
from app.http.deps import Served
from app.http.error_handlers import install_error_handlers
from app.http.protocol import AdmissionDoor, DoorMiddleware
from app.http.routes import ROUTE_PATHS, api_router
from app.serving.config import Settings
from app.serving.metrics import ServiceMetrics
from app.serving.model_holder import Variants, freeze_heap
from app.serving.pipeline import RankingPipeline, open_cache
from app.serving.shadow import Shadow

logger = logging.getLogger("unicorn.main")

API_VERSION = "1"
PROCESS_SAMPLE_SECONDS = 5.0


class StartupError(RuntimeError):
    """The service cannot start (the configured bundle is refused)."""


async def _warm_routes(app: FastAPI) -> None:
    """Route an unknown path through the router once (no middleware: no metrics, no log
    line), so FastAPI builds its lazily compiled routes now rather than on the first
    client request (tens of milliseconds)."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/__warm-up__", "raw_path": b"/__warm-up__",
        "root_path": "", "query_string": b"", "headers": [], "state": {},
        "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 0),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Any) -> None:
        return None

    try:
        await app.router(scope, receive, send)
    except Exception as exc:  # a warm-up must never stop the service from starting
        logger.debug("route warm-up failed: %s", exc)


async def _sample_process(metrics: ServiceMetrics) -> None:
    """Each worker refreshes its process gauges (RSS, CPU, descriptors) every few seconds,
    so a scrape answered by one worker still shows the others."""
    while True:
        await asyncio.sleep(PROCESS_SAMPLE_SECONDS)
        metrics.sample_process()


async def _close(served: Served) -> None:
    served.stopping = True  # /readyz answers 503 from here on
    if served.shadow is not None:
        await served.shadow.close()
    await served.models.close()
    await served.pipeline.close()
    if served.feedback is not None:
        await served.feedback.close()  # what is queued is written
    if served.tracing is not None:
        await asyncio.to_thread(served.tracing.close)  # the spans queued are exported
    ServiceMetrics.mark_process_dead(os.getpid())


DOCS_ASSETS = "/docs/assets"  # Swagger UI's JS, CSS and icon, for /docs


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ranking app for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    metrics.init_routes(ROUTE_PATHS)
    metrics.init_variants(
        tuple(v.name for v in settings.variant_specs), shadow=settings.shadow_bundle is not None
    )
    door = AdmissionDoor(metrics)  # the connection layer's early 503s (app.http.protocol)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models = Variants(settings, metrics)
        pipeline = RankingPipeline(settings, metrics, models, open_cache(settings, metrics))
        served = Served(settings, metrics, models, pipeline)
        door.admission = pipeline.admission
        try:
            await models.start()
        except BundleError as exc:
            await _close(served)
            logger.critical("cannot start: bundle %s is refused: %s", settings.bundle, exc.message)
            raise StartupError(
                f"cannot start: bundle {settings.bundle} is refused: {exc.message}"
            ) from None
        logger.info("cache: %s", settings.cache_backend)
        if settings.shadow_bundle is not None:  # its own process; loads while we serve
            served.shadow = models.shadow = Shadow(settings, metrics)
            served.shadow.start()
        app.state.served = served
        if served.feedback is not None:
            served.feedback.start()
        await _warm_routes(app)
        freeze_heap()
        sampler = asyncio.get_running_loop().create_task(_sample_process(metrics))
        try:
            yield
        finally:
            gc.unfreeze()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            door.admission = None
            door.log_summary()  # the refusals of a window cut short
            await _close(served)

    # FastAPIOffline: a FastAPI whose /docs loads Swagger UI from the package, not a CDN
    app = FastAPIOffline(
        title="UniCoRn ranking service",
        version=API_VERSION,
        summary="One deep model ranks search and recommendations (Netflix UniCoRn, RecSys 2024).",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url=DOCS_ASSETS,
    )
    app.state.settings = settings
    app.state.served = None  # set by the lifespan once the model is loaded
    app.include_router(api_router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.gzip_min_bytes:  # inside CORS and the access log: they see the final answer
        app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_min_bytes, compresslevel=6)
    if settings.cors_origin_list:  # a preflight is answered here, before any route
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["content-type", "authorization", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics, known_paths=ROUTE_PATHS)
    app.add_middleware(DoorMiddleware, door=door)
    return app
