"""Structured JSON logs: one access-log line per HTTP request, and the formatter for all
service logs.

A line carries the request id (``X-Request-ID`` taken from the request when it is sane,
else generated, and always echoed in the response), route template, status, latency,
and what the ranking handler adds: task, personalization, cache outcome, model version
and a keyed hash of the user id. Never the raw user id; the query text only when
``log_queries`` is on (its length otherwise).

``AccessLogMiddleware`` is pure ASGI (no response buffering) and also counts
``unicorn_responses_total{route,status}``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.metrics import ServiceMetrics

ACCESS_LOGGER = "unicorn.access"
REQUEST_ID_HEADER = "x-request-id"
STATE_KEY = "unicorn_access"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

access_logger = logging.getLogger(ACCESS_LOGGER)


@dataclass
class AccessRecord:
    """What one request's log line says; handlers fill in the ranking fields."""

    request_id: str
    method: str
    path: str
    route: str = "unmatched"
    status: int = 0
    latency_ms: float = 0.0
    task: str | None = None
    personalization: str | None = None
    cache: str | None = None
    model_version: str | None = None
    user: str | None = None  # keyed hash, never the raw id
    query_chars: int | None = None
    query: str | None = None  # only with log_queries
    n_candidates: int | None = None
    error: str | None = None

    def as_log(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def hash_user(user_id: str | None, key: bytes) -> str | None:
    """A keyed 64-bit blake2b of the user id: joinable across lines, not reversible by
    enumerating likely ids without the key."""
    if not user_id:
        return None
    return hashlib.blake2b(user_id.encode("utf-8", "replace"), key=key, digest_size=8).hexdigest()


def describe_rank(
    record: AccessRecord,
    task: str,
    personalization: str,
    model_version: str,
    user: str | None,
    query: str | None,
    log_query: bool,
) -> None:
    """The ranking fields of a ``/rank`` line: ``user`` already hashed, the query's length,
    and its text only when ``log_query``."""
    record.task = task
    record.personalization = personalization
    record.model_version = model_version
    record.user = user
    if query is not None:
        record.query_chars = len(query)
        if log_query:
            record.query = query


def access_record(scope: Scope) -> AccessRecord | None:
    """The record of the request in ``scope`` (``None`` outside the middleware)."""
    state = scope.get("state")
    record = state.get(STATE_KEY) if isinstance(state, dict) else None
    return record if isinstance(record, AccessRecord) else None


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """Request id in and out, one JSON access-log line, response counter by route/status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = AccessRecord(_request_id(scope), scope["method"], scope["path"])
        scope.setdefault("state", {})[STATE_KEY] = record
        header = (b"x-request-id", record.request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            record.latency_ms = round((time.perf_counter() - started) * 1000.0, 3)
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None and record.path in self.known_paths:
                path = record.path
            record.route = path or "unmatched"
            self.metrics.responses.labels(record.route, str(record.status)).inc()
            access_logger.info("access", extra={"access": record.as_log()})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update(access)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str | int) -> None:
    """JSON lines on stderr for the service and uvicorn loggers (called by ``serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
