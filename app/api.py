"""HTTP routes, one router per concern, assembled in ``api_router``; dependencies as
``Annotated`` aliases; every error mapped to ``{"error": {code, message, field}}`` by the
handlers in ``install_error_handlers``.

Routes: ``POST /rank``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``POST /admin/reload``, ``GET /catalogue/sample``. OpenAPI at ``/docs``.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.access_log import access_record
from app.errors import (
    Forbidden,
    ModelUnavailable,
    NotFound,
    Overloaded,
    Unauthorized,
    UnicornError,
)
from app.schemas import (
    SAMPLE_MAX,
    CatalogueSample,
    ErrorResponse,
    Health,
    RankRequest,
    RankResponse,
    Ready,
    ReloadRequest,
    ReloadResponse,
    error_body,
)
from app.service import RankingService

logger = logging.getLogger("unicorn.api")

JSON = "application/json"
RETRY_AFTER_SECONDS = "1"


class JsonResponse(JSONResponse):
    """JSON rendered by orjson; numpy values are refused, never silently converted.

    A ``JSONResponse`` subclass so that FastAPI documents a route's 200 body by its
    ``responses`` model; a plain ``Response`` subclass is documented as ``{"type":
    "string"}`` next to the model's ``$ref``, a schema no JSON object satisfies."""

    media_type = JSON

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


async def get_service(request: Request) -> RankingService:
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, RankingService):
        raise ModelUnavailable("the service is starting: no model is loaded yet")
    return service


ServiceDep = Annotated[RankingService, Depends(get_service)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


# --- ranking ------------------------------------------------------------------------------
ranking_router = APIRouter(tags=["ranking"])


@ranking_router.post(
    "/rank",
    response_class=JsonResponse,
    responses={200: {"model": RankResponse}, **_errors(400, 404, 413, 422, 503)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": RankRequest.model_json_schema()}},
        }
    },
)
async def rank(request: Request, service: ServiceDep) -> JsonResponse:
    """Rank entities for one unified context (search, prequery, more_like_this, entity)."""
    started = time.perf_counter()
    req = service.parse(await request.body())
    return JsonResponse(await service.rank(req, access_record(request.scope), started))


# --- health -------------------------------------------------------------------------------
health_router = APIRouter(tags=["health"])


@health_router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@health_router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}})
async def readyz(request: Request) -> JsonResponse:
    """Readiness: 200 with the model version and cache state once a model serves, else 503."""
    service = getattr(request.app.state, "service", None)
    if isinstance(service, RankingService):
        ready = await service.readiness()
    else:
        ready = Ready(status="not_ready", model_version=None, cache="off", cache_backend="off")
    status = 200 if ready.status == "ready" else 503
    return JsonResponse(ready.model_dump(), status_code=status)


# --- metrics ------------------------------------------------------------------------------
metrics_router = APIRouter(tags=["metrics"])


@metrics_router.get("/metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus exposition of the service metrics (all workers when multiprocess)."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


# --- admin --------------------------------------------------------------------------------
admin_router = APIRouter(prefix="/admin", tags=["admin"])


async def require_admin(request: Request, service: ServiceDep) -> None:
    """Bearer-token check; the admin routes do not exist when no token is configured."""
    token = service.settings.admin_token
    if token is None:
        raise NotFound("admin endpoints are disabled (UNICORN_ADMIN_TOKEN is not set)")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("Authorization header must be 'Bearer <token>'", field="authorization")
    if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("the admin token is not valid", field="authorization")


AdminDep = Annotated[None, Depends(require_admin)]


@admin_router.post(
    "/reload", response_model=ReloadResponse, responses=_errors(400, 401, 403, 404, 409, 422)
)
async def reload(
    _admin: AdminDep,
    service: ServiceDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    """Load, verify and warm a bundle, then swap it in; a refused bundle (409) leaves the
    running model serving."""
    path = Path(body.bundle) if body is not None and body.bundle else None
    return await service.reload(path)


# --- catalogue ----------------------------------------------------------------------------
catalogue_router = APIRouter(prefix="/catalogue", tags=["catalogue"])


@catalogue_router.get("/sample", response_model=CatalogueSample, responses=_errors(422))
async def catalogue_sample(
    service: ServiceDep,
    n: Annotated[int, Query(ge=1, le=SAMPLE_MAX, description="Items per list.")] = 100,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1, description="Draw seed.")] = 0,
) -> CatalogueSample:
    """Queries, video ids and page entity ids drawn from the served bundle (load tests)."""
    return service.sample(n, seed)


ROUTERS = (ranking_router, health_router, metrics_router, admin_router, catalogue_router)
api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)
# Route templates, for metric labels of responses that never reached routing (e.g. 413).
ROUTE_PATHS = frozenset(getattr(r, "path", "") for router in ROUTERS for r in router.routes)


# --- errors -------------------------------------------------------------------------------
def _field(loc: tuple[Any, ...], located: bool) -> str | None:
    """``("candidates", 3)`` -> ``candidates[3]``. FastAPI's errors are ``located``: their
    first part says where (``body``, ``query``...) and is dropped."""
    parts = list(loc[1:] if located else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def _validation_response(errors: list[Any], located: bool) -> JsonResponse:
    messages, first_field = [], None
    for err in errors[:3]:
        field = _field(tuple(err.get("loc", ())), located) or "body"
        first_field = first_field or field
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(msg if msg.startswith(f"{field} ") else f"{field}: {msg}")
    if len(errors) > 3:
        messages.append(f"and {len(errors) - 3} more")
    return JsonResponse(
        error_body("invalid_request", "; ".join(messages), first_field), status_code=422
    )


def install_error_handlers(app: FastAPI) -> None:
    """One mapping from every error to the JSON error shape; never a bare 500 page."""

    @app.exception_handler(UnicornError)
    async def _unicorn_error(_request: Request, exc: UnicornError) -> JsonResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if isinstance(exc, Overloaded) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return JsonResponse(
            error_body(exc.code, exc.message, exc.field),
            status_code=exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> JsonResponse:
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return JsonResponse(
                error_body("malformed_request", "request body must be valid JSON", "body"),
                status_code=400,
            )
        return _validation_response(errors, located=True)

    @app.exception_handler(ValidationError)
    async def _validation(_request: Request, exc: ValidationError) -> JsonResponse:
        return _validation_response(list(exc.errors(include_url=False)), located=False)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JsonResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JsonResponse(
            error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> JsonResponse:
        record = access_record(request.scope)
        request_id = record.request_id if record else "-"
        logger.error("unhandled error (request %s)", request_id, exc_info=exc)
        return JsonResponse(
            error_body("internal_error", f"internal error (request id {request_id})"),
            status_code=500,
            headers={"X-Request-ID": request_id},
        )
