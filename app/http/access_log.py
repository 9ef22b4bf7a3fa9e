"""Structured JSON logs: one access-log line per HTTP request, and the formatter for all
service logs.

A line carries the request id (``X-Request-ID`` taken from the request when it is sane,
else generated, and always echoed in the response), route template, status, latency,
and what the ranking handler adds: task, personalization, cache outcome, model version
and a keyed hash of the user id. Never the raw user id; the query text only when
``log_queries`` is on (its length otherwise).

``AccessLogMiddleware`` is pure ASGI (no response buffering) and also counts
``unicorn_responses_total{route,status}``. A status is what the client got: when the
connection layer (``app.http.protocol``) answered a request itself while its route ran
(a body that timed out, 408, or broke the chunked encoding, 400) or the client went away
before the answer started, that is the request's status (``set_connection_outcome``; a
client gone is 499, never a 500). What the connection layer refuses before any route runs
(a head too large, a head that timed out, a connection over the cap) is counted and
logged by ``ConnectionRefusals`` with route ``unmatched``; the middleware shares it with
the connection layer through the lifespan state.

``RateLimitFilter`` keeps log lines that clients can cause in bulk (asyncio's accept
errors at the descriptor limit, uvicorn's warnings about requests it refuses) to a few
per interval; ``configure_logging`` installs it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serving.metrics import ServiceMetrics

ACCESS_LOGGER = "unicorn.access"
CONNECTIONS_LOGGER = "unicorn.connections"
REQUEST_ID_HEADER = "x-request-id"
STATE_KEY = "unicorn_access"
# Lifespan state: the app's ``ConnectionRefusals``; request state: the connection layer's
# (status, reason) for the request (``set_connection_outcome``).
REFUSALS_KEY = "unicorn_connection_refusals"
OUTCOME_KEY = "unicorn_connection_outcome"
CLIENT_GONE = 499  # the client closed the connection before its answer started
# Loggers clients can flood, and the beginnings of the messages to rate-limit there
# (None: every message).
FLOODABLE: dict[str, tuple[str, ...] | None] = {
    "asyncio": (
        "socket.accept() out of system resource",  # at the descriptor limit, per accept
        "socket.send() raised exception.",  # writes to connections the client reset
        "Fatal read error on socket transport",
        "Error on transport creation for incoming connection",
    ),
    CONNECTIONS_LOGGER: None,  # connections refused over the cap
    "uvicorn.error": (
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "No supported WebSocket library detected.",
        "Exceeded concurrency limit.",
    ),
}
RATE_LIMIT_INTERVAL_S = 10.0
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

access_logger = logging.getLogger(ACCESS_LOGGER)
connections_logger = logging.getLogger(CONNECTIONS_LOGGER)


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
    variant: str | None = None
    model_version: str | None = None
    user: str | None = None  # keyed hash, never the raw id
    query_chars: int | None = None
    query: str | None = None  # only with log_queries
    n_candidates: int | None = None
    error: str | None = None

    def as_log(self) -> dict[str, Any]:
        # the fields are flat values: ``__dict__``, not ``asdict``'s recursive copy (a
        # third of a line's cost)
        return {k: v for k, v in self.__dict__.items() if v is not None}


def describe_rank(
    record: AccessRecord,
    task: str,
    personalization: str,
    variant: str,
    model_version: str,
    user: str | None,
    query: str | None,
    log_query: bool,
) -> None:
    """The ranking fields of a ``/rank`` line: ``user`` already hashed, the query's length,
    and its text only when ``log_query``."""
    record.task = task
    record.personalization = personalization
    record.variant = variant
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


def new_request_id() -> str:
    """32 random hex digits (what ``uuid4().hex`` gives, without building a UUID)."""
    return os.urandom(16).hex()


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_REQUEST_ID.match(candidate):
                return candidate
            break
    return new_request_id()


def set_connection_outcome(scope: Scope, status: int, reason: str) -> None:
    """The connection layer answered (or lost) the request of ``scope`` itself: record
    ``status`` for it, whatever its route answers (the first outcome set stands)."""
    state = scope.get("state")
    if isinstance(state, dict):
        state.setdefault(OUTCOME_KEY, (status, reason))


class ConnectionRefusals:
    """Counts and logs what the connection layer answers before any route runs: an
    access line per refused request; connections refused over the cap (nothing read,
    thousands a second in a flood) are a rate-limited warning instead."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def refused(self, status: int, reason: str) -> None:
        self.metrics.responses.labels("unmatched", str(status)).inc()
        record = AccessRecord(new_request_id(), "-", "-", status=status, error=reason)
        access_logger.info("access", extra={"access": record.as_log()})

    def over_cap(self, status: int, reason: str) -> None:
        self.metrics.responses.labels("unmatched", str(status)).inc()
        connections_logger.warning("connection refused: %s", reason)


def connection_refusals(lifespan_state: dict[str, Any]) -> ConnectionRefusals | None:
    """The app's ``ConnectionRefusals`` in uvicorn's lifespan state (None before the
    lifespan started, or without one)."""
    refusals = lifespan_state.get(REFUSALS_KEY)
    return refusals if isinstance(refusals, ConnectionRefusals) else None


class AccessLogMiddleware:
    """Request id in and out, one JSON access-log line, response counter by route/status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths
        self.refusals = ConnectionRefusals(metrics)  # every series exists: init_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            state = scope.get("state")
            if scope["type"] == "lifespan" and isinstance(state, dict):
                state[REFUSALS_KEY] = self.refusals  # uvicorn hands this to each connection
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
        except BaseException as exc:
            record.status = record.status or (
                CLIENT_GONE if isinstance(exc, ClientDisconnect) else 500
            )
            raise
        finally:
            outcome = scope["state"].get(OUTCOME_KEY)
            if outcome is not None:  # what the client got (or did not wait for)
                record.status, reason = outcome
                record.error = record.error or reason
            # Every response starts (uvicorn sends a 500 for an app that started none).
            record.status = record.status or 500
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


class RateLimitFilter(logging.Filter):
    """At most one record per message per ``interval_s`` (the messages that begin with
    one of ``prefixes``, or every message when it is None); the next one let through says
    how many were dropped meanwhile. A message is its template's first line (asyncio's
    name the socket on a second line)."""

    def __init__(
        self,
        prefixes: tuple[str, ...] | None = None,
        interval_s: float = RATE_LIMIT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (last emitted, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if self.prefixes is not None and not template.startswith(self.prefixes):
            return True
        key = template.split("\n", 1)[0][:200]
        now = self.clock()
        last, dropped = self._seen.get(key, (-self.interval_s, 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > 1000:  # messages are templates; this only bounds a bug
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            note = f" ({dropped} more like it in the last {now - last:.0f} s were not logged)"
            record.msg = template + note
        return True


def configure_logging(level: str | int) -> None:
    """JSON lines on stderr for the service and uvicorn loggers (called by ``serve``), with
    the lines clients can cause in bulk rate-limited (``RateLimitFilter``)."""
    # A line is written per request: skip what the JSON lines never show (the caller's
    # file and line, thread, process and multiprocessing names), about half the cost of a
    # record (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name, prefixes in FLOODABLE.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(old)
        logger.addFilter(RateLimitFilter(prefixes))
