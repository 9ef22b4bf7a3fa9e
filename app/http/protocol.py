"""The HTTP connection layer: uvicorn's protocols with the limits a public port needs.

uvicorn (0.54) reads a request head of any size (httptools buffers a 200 MiB header
whole, concatenating it piece by piece: 44 s of CPU and ~400 MiB of RSS, measured), waits
for a head or a body forever, accepts connections until the descriptor limit, and answers
the requests it refuses itself in ``text/plain``. ``ServiceHttpToolsProtocol`` (what
``unicorn serve`` runs) and ``ServiceH11Protocol`` (``run(http="h11")``) add, per
connection:

- a bounded head: the request line and headers together at most ``max_header_bytes``
  (431), the request target at most ``max_url_bytes`` (414), at most ``MAX_HEADER_COUNT``
  header lines (431). httptools bytes are counted in ``data_received`` as they arrive,
  so an endless header is refused after one read past the limit; at most
  ``MAX_PIPELINED`` requests queued on a connection (httptools; h11 reads one at a time);
- read deadlines: the head must arrive within ``header_timeout_s`` (from the connection's
  start for its first request, from the first byte for later ones; an idle keep-alive
  connection is uvicorn's ``timeout_keep_alive``), the body within ``body_timeout_s``
  after the head; a connection past either gets a 408 and is closed (a connection that
  sent nothing at all is closed without an answer);
- a cap of ``max_connections`` open connections per process: one past it is answered
  503 at once, before anything is read, and closed, so descriptors and buffers stay
  bounded whatever clients do (uvicorn's ``limit_concurrency`` counts connections too,
  but only refuses a request once its head has been read, in text/plain, and keeps every
  connection open meanwhile);
- every refusal in the service's JSON error shape (``app.http.schemas.error_body``),
  with ``Connection: close``;
- admission at the door (httptools): each request's head is stamped when it completes
  (``ARRIVAL_KEY`` in the request's scope state; the ``/rank`` route hands it to
  admission, so a request's ``queue_timeout_ms`` runs from there),
  and a ``POST /rank`` that admission would refuse at once is answered 503 +
  ``Retry-After`` by ``AdmissionDoor`` as soon as its body has been read: no ASGI task, no
  routing, no body parse, the connection kept alive. It only does so while nearly every
  ``/rank`` call needs scoring (cache off, or nearly all misses): a cache hit needs no
  slot and must not be refused for want of one.

What is refused before a route runs is counted in ``unicorn_responses_total`` with route
``unmatched`` and has an access-log line (``app.http.access_log.ConnectionRefusals``,
which the access-log middleware shares through the lifespan state). What is refused
while a route runs (a body that times out or breaks the chunked encoding) is recorded
as that request's status by the access-log middleware (``set_connection_outcome``), as
is a client that went away before its answer (499).

Deadlines cost one ``loop.time()`` per phase on the normal path: a connection holds at
most one timer, which fires no later than ``min(header_timeout_s, body_timeout_s)`` after
it was set and re-arms itself only while a read is pending, so no timer is created or
cancelled per request.

The limits are process-wide (``configure``): ``app.http.server`` sets them from the
settings before uvicorn starts, and in each worker process before it serves.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import httptools
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.http.access_log import (
    _request_id,
    access_logger,
    connection_refusals,
    set_connection_outcome,
)
from app.http.schemas import error_body
from app.serving.admission import Admission
from app.serving.config import Settings
from app.serving.metrics import ServiceMetrics

# Header lines per request (Apache's LimitRequestFields); a real client sends 5-30.
MAX_HEADER_COUNT = 100
# Requests queued behind the one being answered on a connection (HTTP/1.1 pipelining;
# browsers do not pipeline). httptools parses a whole read at once: 256 KiB of pipelined
# GETs queued 7,700 requests (2.5 KiB each) per connection, and 20 such connections took
# a process from 117 to 497 MiB. Past it the connection is closed (no answer: it would
# arrive before the answers to the requests queued ahead of it).
MAX_PIPELINED = 32
# Request line and per-header separators a parsed head does not keep (method, version,
# ": ", CRLFs): added to the parsed sizes when a head is measured exactly.
_HEAD_OVERHEAD = 32
_HEADER_OVERHEAD = 4

_IDLE, _HEAD, _BODY = 0, 1, 2
# Request scope state: when the head was complete (perf_counter). Lifespan state: the
# app's AdmissionDoor.
ARRIVAL_KEY = "unicorn_head_complete"
DOOR_KEY = "unicorn_admission_door"
PASSED_KEY = "unicorn_door_passed"  # request scope state: let through by the door
# Door refusals counted before the door decides whether nearly all /rank calls score.
DOOR_SAMPLE = 256
DOOR_SCORING_SHARE = 0.9  # ... the share of /rank calls reaching admission it needs
# The door logs the first refusal of each window in full and the rest of it as one summary
# line at its end: at 10x capacity a line per refusal cost the loop ~12 µs each, 5% of the
# core that the accepted requests need (docs/RELIABILITY.md, "Overload").
DOOR_LOG_WINDOW_S = 1.0
_QUOTED_INPUT = re.compile(r": (?:bytearray\(|b['\"])")


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take; the defaults are the settings' defaults."""

    max_header_bytes: int = 32 * 1024
    max_url_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_url_bytes=settings.max_url_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


def configure(limits: ConnectionLimits) -> None:
    """Set the limits of every connection this process accepts from now on."""
    _ConnectionGuard.limits = limits


def protocol_class(http_impl: str) -> type[asyncio.Protocol]:
    """The guarded protocol for ``http_impl``: ``h11``, else httptools."""
    return ServiceH11Protocol if http_impl == "h11" else ServiceHttpToolsProtocol


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A whole HTTP/1.1 response in the JSON error shape that closes the connection."""
    body = orjson.dumps(error_body(code, message, field))
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status))]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in headers]
    lines.append(
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
    )
    lines.append(body)
    return b"".join(lines)


def _head_too_large(max_head: int) -> tuple[int, str, str, str]:
    """(status, code, message, field) of a head over the limits."""
    message = (
        f"request line and headers must be at most {max_head} bytes and "
        f"{MAX_HEADER_COUNT} header lines"
    )
    return 431, "headers_too_large", message, "headers"


_DOOR_ERROR = (
    "overloaded: refused before its body was parsed (the scoring queue was longer than "
    "queue_timeout_ms)"
)


class AdmissionDoor:
    """Refuses ``POST /rank`` at the connection layer while admission would refuse it at
    once (``Admission.refuses_now``), for the price of a parse of the head: thousands a
    second cost the loop a few percent, where each refusal through the FastAPI stack cost
    ~0.35 ms (at 10x capacity more than the whole loop).

    Only while at least ``DOOR_SCORING_SHARE`` of the ``/rank`` calls let through reach
    admission (measured over each ``DOOR_SAMPLE`` of them): with cache hits among them,
    a refusal at the door could refuse one that needs no slot. Each refusal is counted
    as a 503 of ``/rank`` in ``unicorn_responses_total`` and in
    ``unicorn_shed_requests_total``, and logged (``log``): the first of each
    ``DOOR_LOG_WINDOW_S`` with its own access-log line, the others of the window in one
    summary line at its end (``refused``: how many)."""

    def __init__(self, metrics: ServiceMetrics, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.admission: Admission | None = None  # set by the lifespan
        self._responses = metrics.responses.labels("/rank", "503")
        self._shed = metrics.shed
        self._scoring = False  # nearly every /rank call let through needs scoring
        self._passed = 0
        self._entered_mark = 0
        self.refused = 0
        # Let through, their route not started yet (``DoorMiddleware`` counts them off):
        # the requests read in one turn all reach admission in the next.
        self.in_transit = 0
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._response = b""
        self._window_start = -DOOR_LOG_WINDOW_S  # when the last full refusal line was written
        self._unlogged = 0  # refusals of the window not logged yet
        self._summary: asyncio.TimerHandle | None = None

    def admits(self) -> bool:
        """Whether a ``/rank`` call whose head just completed may go on to its route."""
        admission = self.admission
        if admission is None:
            self.in_transit += 1
            return True
        if self._scoring and admission.refuses_now(self.in_transit):
            self.refused += 1
            self._responses.inc()
            self._shed.inc()
            return False
        self.in_transit += 1
        self._passed += 1
        if self._passed >= DOOR_SAMPLE:
            entered = admission.entered - self._entered_mark
            self._scoring = entered >= DOOR_SCORING_SHARE * self._passed
            self._passed, self._entered_mark = 0, admission.entered
        return True

    def log(self, method: str, path: str, arrived: float, request_id: str) -> None:
        """The refusal's access-log line (the fields the access-log middleware writes), or,
        within ``DOOR_LOG_WINDOW_S`` of the last one, a count towards the window's summary
        line (written ``DOOR_LOG_WINDOW_S`` after that line, by a loop timer)."""
        if not access_logger.isEnabledFor(logging.INFO):
            return
        now = self.clock()
        if now - self._window_start < DOOR_LOG_WINDOW_S:
            self._unlogged += 1
            if self._summary is None:
                delay = self._window_start + DOOR_LOG_WINDOW_S - now
                self._summary = asyncio.get_running_loop().call_later(delay, self.log_summary)
            return
        self.log_summary()  # a window that ended without its timer having run yet
        self._window_start = now
        line = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "route": "/rank",
            "status": 503,
            "latency_ms": round((now - arrived) * 1000.0, 3),
            "error": _DOOR_ERROR,
        }
        access_logger.info("access", extra={"access": line})

    def log_summary(self) -> None:
        """The summary line of the refusals not logged one by one since the last full line."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if not self._unlogged:
            return
        line = {
            "route": "/rank",
            "status": 503,
            "refused": self._unlogged,
            "window_s": DOOR_LOG_WINDOW_S,
            "error": _DOOR_ERROR + f"; {self._unlogged} refusals after the last line logged",
        }
        self._unlogged = 0
        access_logger.info("access", extra={"access": line})

    def response(self, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
        """The whole 503 (the JSON error shape, ``Retry-After: 1``)."""
        if default_headers is not self._headers:  # uvicorn renews them (the date) each second
            admission = self.admission
            timeout_ms = admission.queue_timeout_s * 1000 if admission is not None else 0.0
            slots = admission.min_slots if admission is not None else 0
            message = (
                f"the requests queued ahead would take longer than queue_timeout_ms="
                f"{timeout_ms:g} (max_in_flight={slots}); retry shortly"
            )
            self._response = error_response(
                503, "overloaded", message, None, [*default_headers, (b"retry-after", b"1")]
            ).replace(b"connection: close\r\n", b"")
            self._headers = default_headers
        if keep_alive:
            return self._response
        return self._response.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


class DoorMiddleware:
    """Pure ASGI, outermost: counts a request the door let through off ``in_transit`` as
    it enters the app, and hands the app's ``AdmissionDoor`` to the protocol (through the
    lifespan state)."""

    def __init__(self, app: ASGIApp, door: AdmissionDoor) -> None:
        self.app = app
        self.door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state")
        if scope["type"] == "http" and state is not None:
            if PASSED_KEY in state:  # let through by the door
                self.door.in_transit = max(0, self.door.in_transit - 1)
        elif scope["type"] == "lifespan" and isinstance(state, dict):
            state[DOOR_KEY] = self.door  # uvicorn hands this to each connection
        await self.app(scope, receive, send)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing and refuse the request (``answer``:
    with a response; else the connection is only closed)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None, answer: bool = True
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.answer = answer


class _ConnectionGuard:
    """The limits shared by both protocols (a mixin over uvicorn's; see the module doc).

    A subclass tracks its read phase (``_HEAD`` from the connection's start or a
    message's first byte to its complete head, ``_BODY`` from there to the end of the
    message, ``_IDLE`` otherwise) with ``_arm`` / ``_disarm``, and says which request's
    route is running (``_request_cycle``)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    # uvicorn's attributes this mixin uses (set by its protocols' __init__ and
    # connection_made).
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    server_state: Any
    connections: set[Any]
    app_state: dict[str, Any]
    cycle: Any

    def _init_guard(self) -> None:
        limits = self.limits
        self._max_head = limits.max_header_bytes
        self._max_url = limits.max_url_bytes
        self._header_timeout = limits.header_timeout_s
        self._body_timeout = limits.body_timeout_s
        self._tick = min(limits.header_timeout_s, limits.body_timeout_s)
        self._phase = _IDLE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._received = False  # any byte on this connection yet
        self._refused = False

    # --- connection cap ---------------------------------------------------------------
    def _over_cap(self) -> bool:
        """After uvicorn registered the connection: refuse it when it is one too many."""
        if len(self.connections) <= self.limits.max_connections:
            return False
        cap = self.limits.max_connections
        self._refuse(
            503,
            "overloaded",
            f"too many open connections (at most {cap} per process); retry",
            None,
            extra_headers=((b"retry-after", b"1"),),
            over_cap=True,
        )
        return True

    # --- deadlines ----------------------------------------------------------------------
    def _arm(self, phase: int, timeout: float) -> None:
        self._phase = phase
        now = self.loop.time()
        self._deadline = now + timeout
        if self._timer is None:
            # At most one tick ahead: a deadline armed later is never before this timer.
            self._timer = self.loop.call_at(now + self._tick, self._on_timer)

    def _disarm(self) -> None:
        self._phase = _IDLE

    def _stop_timer(self) -> None:
        self._phase = _IDLE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == _IDLE or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < self._deadline:
            self._timer = self.loop.call_at(min(self._deadline, now + self._tick), self._on_timer)
            return
        head = self._phase == _HEAD
        # Connected and said nothing, or answered already (e.g. refused early) while the
        # body still comes: nothing to answer, the connection just ends.
        nothing_to_answer = (not self._received) if head else (self._request_cycle() is None)
        if nothing_to_answer:
            self._stop_timer()
            self.transport.close()
            return
        part, limit = ("headers", self._header_timeout) if head else ("body", self._body_timeout)
        message = f"request {part} not received within {limit:g} s"
        self._refuse(408, "request_timeout", message, None if head else "body")

    # --- refusals -------------------------------------------------------------------------
    # The two uvicorn protocols below come after this mixin in their bases: super() is theirs.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not self._over_cap():
            self._arm(_HEAD, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()
        super().connection_lost(exc)  # type: ignore[misc]

    def _request_cycle(self) -> Any:
        """The cycle of the request whose route runs and whose body is being read, if
        any (its answer is not complete)."""
        raise NotImplementedError

    def _refuse(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
        over_cap: bool = False,
        answer: bool = True,
    ) -> None:
        """Answer ``status`` in the JSON shape (when nothing else is being answered on
        this connection, and ``answer``), record it, and close the connection."""
        if self._refused:
            return
        self._refused = True
        cycle = self._request_cycle()  # before the phase is reset
        self._stop_timer()
        if cycle is not None:
            # A route is reading this request: the client gets this answer if the
            # route has not started its own, and the access log records it as the
            # request's status.
            set_connection_outcome(cycle.scope, status, message)
            if answer and not cycle.response_started:
                self._write_refusal(status, code, message, field, extra_headers)
        else:
            # As uvicorn does, also when an earlier (pipelined) request is still being
            # answered, unless its answer is half written.
            previous = self.cycle
            if answer and (
                previous is None or previous.response_complete or not previous.response_started
            ):
                self._write_refusal(status, code, message, field, extra_headers)
            refusals = connection_refusals(self.app_state)
            if refusals is not None:
                (refusals.over_cap if over_cap else refusals.refused)(status, message)
        self.transport.close()

    def _write_refusal(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None,
        extra_headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        headers = [*self.server_state.default_headers, *extra_headers]
        self.transport.write(error_response(status, code, message, field, headers))

    def _refuse_malformed(self, detail: str | None) -> None:
        message = f"invalid HTTP request: {detail}" if detail else "invalid HTTP request"
        self._refuse(400, "malformed_request", message, None)

    def _client_gone(self) -> None:
        """``connection_lost`` before uvicorn's: a request whose answer had not started
        ends as 499 (unless it was refused here first)."""
        self._stop_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self._refused:
            set_connection_outcome(cycle.scope, 499, "client closed the connection")


class ServiceHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection limits (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()
        self._counting = True  # bytes are head bytes: before a message's head is complete
        self._head_bytes = 0
        door = self.app_state.get(DOOR_KEY)
        self._door = door if isinstance(door, AdmissionDoor) else None
        self._shedding = False  # the message being read was refused at the door
        self._shed_at = 0.0
        self._shed_keep_alive = True

    def _request_cycle(self) -> Any:
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None and not cycle.response_complete:
            return cycle
        return None

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._received = True
        if self._counting:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._stop_timer()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._refuse(
                    refused.status,
                    refused.code,
                    refused.message,
                    refused.field,
                    answer=refused.answer,
                )
            else:
                callback = isinstance(exc, httptools.HttpParserCallbackError)
                self._refuse_malformed(None if callback else str(exc))
            return
        if (
            self._counting
            and self._head_bytes  # 0 once a whole message was read: nothing to check
            and (
                self._head_bytes > self._max_head
                or (self.headers is not None and len(self.headers) > MAX_HEADER_COUNT)
            )
        ):
            self._refuse(*_head_too_large(self._max_head))

    def send_400_response(self, msg: str) -> None:
        self._refuse_malformed(None)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != _HEAD:  # the first request's deadline runs from the connection
            self._arm(_HEAD, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._max_url:
            raise _Refused(
                414, "url_too_long", f"request target must be at most {self._max_url} bytes", "url"
            )

    def on_headers_complete(self) -> None:
        if len(self.headers) > MAX_HEADER_COUNT or (
            # Bytes counted in this read may include the body: measure the head itself.
            self._head_bytes > self._max_head
            and len(self.url)
            + sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in self.headers)
            + _HEAD_OVERHEAD
            > self._max_head
        ):
            raise _Refused(*_head_too_large(self._max_head))
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _Refused(
                400,
                "malformed_request",
                f"more than {MAX_PIPELINED} pipelined requests",
                None,
                answer=False,
            )
        self._counting = False
        self._head_bytes = 0
        self._arm(_BODY, self._body_timeout)
        state = self.scope["state"]
        door = self._door
        if (
            door is not None
            and (self.url == b"/rank" or self.url.startswith(b"/rank?"))
            and self.parser.get_method() == b"POST"
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
        ):
            if not door.admits():
                # Refused: the body is read and dropped, the 503 written once complete.
                self._shedding = True
                self._shed_at = time.perf_counter()
                self._shed_keep_alive = (
                    self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                )
                return
            state[PASSED_KEY] = True
        state[ARRIVAL_KEY] = time.perf_counter()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._shedding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE  # _disarm, inline: this runs per request
        self._counting = True
        if self._shedding:
            self._shedding = False
            keep_alive = self._shed_keep_alive
            door = self._door
            assert door is not None
            self.transport.write(door.response(self.server_state.default_headers, keep_alive))
            request_id = _request_id({"headers": self.headers})  # the client's when sane
            door.log("POST", self.url.decode("latin-1")[:200], self._shed_at, request_id)
            if keep_alive:
                self.on_response_complete()  # keep-alive timer, reading resumed
            else:
                self.transport.close()
            return
        super().on_message_complete()


class _GuardedH11Connection(h11.Connection):
    """h11's connection, which keeps the error it raised (for the status it hints) and
    bounds the request target and the header count."""

    max_target_bytes = ConnectionLimits.max_url_bytes
    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise
        if type(event) is h11.Request:
            if len(event.target) > self.max_target_bytes:
                self.last_error = h11.RemoteProtocolError(
                    f"request target must be at most {self.max_target_bytes} bytes",
                    error_status_hint=414,
                )
                raise self.last_error
            if len(event.headers) > MAX_HEADER_COUNT:
                self.last_error = h11.RemoteProtocolError("too many headers", 431)
                raise self.last_error
        return event


class ServiceH11Protocol(_ConnectionGuard, H11Protocol):
    """uvicorn's h11 protocol with the connection limits (module doc). h11 bounds the
    head itself (``max_incomplete_event_size`` = ``max_header_bytes``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_guard()
        self._guarded = _GuardedH11Connection(h11.SERVER, self._max_head)
        self._guarded.max_target_bytes = self._max_url
        self.conn = self._guarded

    def _request_cycle(self) -> Any:
        cycle = self.cycle  # h11 reads no further request until this one is answered
        return cycle if cycle is not None and not cycle.response_complete else None

    def data_received(self, data: bytes) -> None:
        self._received = True
        super().data_received(data)
        if self._refused:
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != _BODY:
                self._arm(_BODY, self._body_timeout)
        elif state is h11.IDLE:
            if self._phase != _HEAD:  # part of a head has arrived
                self._arm(_HEAD, self._header_timeout)
        else:
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        error = self._guarded.last_error
        status = error.error_status_hint if error is not None else 400
        if status == 431:
            self._refuse(*_head_too_large(self._max_head))
        elif status == 414:
            self._refuse(414, "url_too_long", str(error), "url")
        else:
            # h11 quotes the offending bytes (``illegal request line: bytearray(b'...')``):
            # answer the rule, not the client's bytes.
            detail = _QUOTED_INPUT.split(str(error), 1)[0][:200] if error is not None else None
            self._refuse_malformed(detail)
