"""HTTP routes, one router per concern, assembled in ``api_router``; dependencies in
``app.http.deps``; every error mapped to ``{"error": {code, message, field}}`` by
``app.http.error_handlers``.

Routes: ``POST /rank``, ``POST /events``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``, ``POST /admin/reload``, ``GET /catalogue/sample``. OpenAPI at ``/docs``.
"""

from __future__ import annotations

import gzip
import hmac
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from app.core.errors import Forbidden, NotFound, Unauthorized, UnsupportedMediaType
from app.http.access_log import access_record, describe_rank, new_request_id
from app.http.deps import Served, ServedDep, served_or_none
from app.http.protocol import ARRIVAL_KEY
from app.http.sampling import sample_catalogue
from app.http.schemas import (
    SAMPLE_MAX,
    CacheState,
    CatalogueSample,
    ErrorResponse,
    EventsAccepted,
    EventsRequest,
    Health,
    RankRequest,
    RankResponse,
    Ready,
    ReloadRequest,
    ReloadResponse,
    parse_body,
    parse_rank_request,
)
from app.serving.feedback import Engagement, hash_user
from app.serving.pipeline import RankOutcome

JSON = "application/json"


class JsonResponse(JSONResponse):
    """JSON rendered by orjson; numpy values are refused, never silently converted.

    A ``JSONResponse`` subclass so that FastAPI documents a route's 200 body by its
    ``responses`` model; a plain ``Response`` subclass is documented as ``{"type":
    "string"}`` next to the model's ``$ref``, a schema no JSON object satisfies."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


# --- ranking ------------------------------------------------------------------------------
ranking_router = APIRouter(tags=["ranking"])


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI body schema of ``model``, for a route that parses its own body
    (``parse_body``, not FastAPI): pydantic's JSON schema with its ``$defs`` written in
    place of their references, so it refers to no component."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return dict(resolve(schema))


RANK_REQUEST_SCHEMA = body_schema(RankRequest)


def require_json(content_type: str | None) -> None:
    """A body sent as another media type (a form, text/plain) is refused with 415; a
    request that names no media type is read as JSON."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(
            f"content-type must be {JSON}, got {media or 'an empty value'!r}",
            field="content-type",
        )


def rank_body(outcome: RankOutcome, request_id: str) -> bytes:
    """The JSON of a ``/rank`` answer (``RankResponse``), rendered once by orjson."""
    return orjson.dumps(
        {
            "request_id": request_id,
            "items": outcome.items,
            "task": outcome.context.task.value,
            "variant": outcome.variant,
            "model_version": outcome.model_version,
            "personalization": outcome.personalization.value,
            "cache": outcome.cache,
            "context": outcome.context.as_dict(),
            "unknown_candidates": outcome.unknown_candidates,
        }
        | ({} if outcome.explanation is None else {"explain": outcome.explanation})
    )


@ranking_router.post(
    "/rank",
    response_class=JsonResponse,
    responses={200: {"model": RankResponse}, **_errors(400, 404, 413, 415, 422, 503)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": RANK_REQUEST_SCHEMA}},
        }
    },
)
async def rank(request: Request, served: ServedDep) -> JsonResponse:
    """Rank entities for one unified context (search, prequery, more_like_this, entity)."""
    started = time.perf_counter()
    require_json(request.headers.get("content-type"))
    req = parse_rank_request(await request.body(), served.limits)
    parsed = time.perf_counter()
    if req.explain:
        await allow_explain(request, served)
    model = served.models.choose(req.user_id, req.variant)
    record = access_record(request.scope)
    if record is not None:
        describe_rank(
            record,
            req.task.value,
            req.personalization.value,
            model.variant,
            model.model_version,
            hash_user(req.user_id, served.user_key),
            req.query,
            served.settings.log_queries,
        )
    arrived = request.scope.get("state", {}).get(ARRIVAL_KEY)  # when its head was read
    query = req.to_query()
    outcome = await served.pipeline.rank(query, model, started, arrived)
    request_id = new_request_id() if record is None else record.request_id
    if record is not None:
        record.cache = outcome.cache
        record.n_candidates = outcome.n_candidates
    if served.feedback is not None:
        served.feedback.impression(request_id, outcome)
    if served.shadow is not None:
        served.shadow.offer(query, outcome)
    response = JsonResponse(rank_body(outcome, request_id))
    if served.tracing is not None:
        served.tracing.record(
            request.headers, "POST /rank", started, time.perf_counter(),
            [("parse", started, parsed), *outcome.stages],
            {"unicorn.task": outcome.context.task.value, "unicorn.cache": outcome.cache,
             "unicorn.variant": outcome.variant, "unicorn.model_version": outcome.model_version,
             "unicorn.request_id": request_id,
             "unicorn.candidates": outcome.n_candidates or 0},
        )  # fmt: skip
    return response


# --- feedback events ----------------------------------------------------------------------
events_router = APIRouter(tags=["events"])


EVENTS_REQUEST_SCHEMA = body_schema(EventsRequest)


@events_router.post(
    "/events",
    response_model=EventsAccepted,
    responses=_errors(400, 404, 413, 415, 422),
    openapi_extra={
        "requestBody": {"required": True, "content": {JSON: {"schema": EVENTS_REQUEST_SCHEMA}}}
    },
)
async def events(request: Request, served: ServedDep) -> EventsAccepted:
    """Engagements with the items of ``/rank`` answers (play, click, add_to_list...), in
    batches; idempotent on ``event_id``. 404 when no event sink is configured."""
    feedback = served.feedback
    if feedback is None:
        raise NotFound("events are disabled (set UNICORN_EVENTS_DIR or UNICORN_EVENTS_REDIS_URL)")
    require_json(request.headers.get("content-type"))
    req = parse_body(EventsRequest, await request.body())
    accepted, duplicates = feedback.engagements(
        Engagement(e.event_id, e.request_id, e.entity_id, e.type, e.ts) for e in req.events
    )
    return EventsAccepted(accepted=accepted, duplicates=duplicates)


# --- health -------------------------------------------------------------------------------
health_router = APIRouter(tags=["health"])


@health_router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@health_router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(request: Request) -> JsonResponse:
    """Readiness: 200 with the model version and cache state once a model serves and until
    shutdown, else 503. The cache is probed, not assumed."""
    served = served_or_none(request)
    if served is None:
        ready = Ready(status="not_ready", model_version=None, cache="off", cache_backend="off")
    else:
        models = {h.name: h.model for h in served.models}
        model = models[served.models.champion]
        shadow = served.shadow
        shadow_version = shadow.model_version if shadow is not None and shadow.up else None
        probe = await served.pipeline.cache_ok()
        cache: CacheState = "off" if probe is None else ("ok" if probe else "degraded")
        ready = Ready(
            status="ready" if model is not None and not served.stopping else "not_ready",
            model_version=model.model_version if model else None,
            variants={n: m.model_version for n, m in models.items() if m is not None}
            | ({} if shadow_version is None else {"shadow": shadow_version}),
            cache=cache,
            cache_backend=served.settings.cache_backend,
        )
    return JsonResponse(ready.model_dump(), status_code=200 if ready.status == "ready" else 503)


# --- metrics ------------------------------------------------------------------------------
metrics_router = APIRouter(tags=["metrics"])
METRICS_GZIP_LEVEL = 6


@metrics_router.get("/metrics", response_class=Response)
async def metrics(request: Request, served: ServedDep) -> Response:
    """Prometheus exposition of the service metrics (all workers when multiprocess),
    gzipped when the scraper accepts it (Prometheus does: ~18x smaller)."""
    body, content_type = served.metrics.render()
    headers = {"vary": "accept-encoding"}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        body, headers["content-encoding"] = gzip.compress(body, METRICS_GZIP_LEVEL), "gzip"
    return Response(body, media_type=content_type, headers=headers)


# --- admin --------------------------------------------------------------------------------
admin_router = APIRouter(prefix="/admin", tags=["admin"])


async def require_admin(request: Request, served: ServedDep) -> None:
    """Bearer-token check; the admin routes do not exist when no token is configured."""
    token = served.settings.admin_token
    if token is None:
        raise NotFound("admin endpoints are disabled (UNICORN_ADMIN_TOKEN is not set)")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("Authorization header must be 'Bearer <token>'", field="authorization")
    if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("the admin token is not valid", field="authorization")


AdminDep = Annotated[None, Depends(require_admin)]


async def allow_explain(request: Request, served: Served) -> None:
    """``"explain": true`` as the ``explain`` setting allows: on, admin token, or off."""
    mode = served.settings.explain
    if mode == "off":
        raise Forbidden("explain is turned off on this service (UNICORN_EXPLAIN=off)",
                        field="explain")  # fmt: skip
    if mode == "admin":
        await require_admin(request, served)


@admin_router.post(
    "/reload", response_model=ReloadResponse, responses=_errors(400, 401, 403, 404, 409, 422)
)
async def reload(
    _admin: AdminDep,
    served: ServedDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    """Load, verify and warm a bundle, then swap it in; a refused bundle (409) leaves the
    running model serving."""
    path = Path(body.bundle) if body is not None and body.bundle else None
    holder = served.models.holder(body.variant if body is not None else None)
    done = await holder.reload(path)
    return ReloadResponse(
        variant=done.variant,
        model_version=done.model_version,
        previous_model_version=done.previous_model_version,
        bundle=done.bundle,
        seconds=done.seconds,
    )


# --- catalogue ----------------------------------------------------------------------------
catalogue_router = APIRouter(prefix="/catalogue", tags=["catalogue"])


@catalogue_router.get("/sample", response_model=CatalogueSample, responses=_errors(422))
async def catalogue_sample(
    served: ServedDep,
    n: Annotated[int, Query(ge=1, le=SAMPLE_MAX, description="Items per list.")] = 100,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1, description="Draw seed.")] = 0,
) -> CatalogueSample:
    """Queries, video ids and page entity ids drawn from the served bundle (load tests)."""
    return sample_catalogue(served.models.choose(None), n, seed)


ROUTERS = (
    ranking_router, events_router, health_router, metrics_router, admin_router, catalogue_router,
)  # fmt: skip
for _router in ROUTERS:  # HEAD wherever GET exists (probes, caches, curl -I); undocumented
    for _route in list(_router.routes):
        if isinstance(_route, APIRoute) and "GET" in (_route.methods or ()):
            _router.add_api_route(
                _route.path.removeprefix(_router.prefix),
                _route.endpoint,
                methods=["HEAD"],
                response_class=_route.response_class,
                include_in_schema=False,
            )
api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)
# Route templates, for metric labels of responses that never reached routing (e.g. 413).
ROUTE_PATHS = frozenset(getattr(r, "path", "") for router in ROUTERS for r in router.routes)
