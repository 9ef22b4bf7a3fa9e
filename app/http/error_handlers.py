"""One mapping from every error to the JSON error shape ``{"error": {code, message,
field}}``; never a bare 500 page. ``install_error_handlers`` registers it on an app.
(What uvicorn refuses before the app runs gets the same shape from
``app.http.protocol``.)"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.core.errors import Overloaded, Unauthorized, UnicornError
from app.http.access_log import CLIENT_GONE, access_record
from app.http.routes import JsonResponse
from app.http.schemas import error_body

logger = logging.getLogger("unicorn.api")

RETRY_AFTER_SECONDS = "1"


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

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(_request: Request, _exc: ClientDisconnect) -> JsonResponse:
        # The client went away while its body was read: its own outcome (499, counted and
        # logged by the access-log middleware), no traceback; a 500 means a server fault.
        # Nobody reads this answer. Handled here rather than by the catch-all below,
        # which starlette's ServerErrorMiddleware would also re-raise to uvicorn.
        return JsonResponse(
            error_body("client_disconnected", "the client closed the connection"),
            status_code=CLIENT_GONE,
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
