"""An OPEN-LOOP load of ``/rank`` calls at a fixed rate (asyncio + httpx in a background
thread), and the figures of a time window of its calls. A call's latency runs from its
scheduled send time, so client-side queueing behind a stalled server counts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
import numpy as np
import orjson

Check = Callable[[int, dict[str, Any]], str | None]


@dataclass(frozen=True, slots=True)
class Sample:
    """One ``/rank`` call of a load run."""

    at: float  # scheduled send time, seconds since the run started
    latency: float  # seconds from the scheduled send time to the full response
    status: int  # HTTP status; 0 = transport error (no response)
    problem: str | None  # why the call failed; None = a 200 that passed the check
    model_version: str | None = None
    cache: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def shed(self) -> bool:
        """A 503 from admission control: refused fast, with Retry-After."""
        return self.status == 503 and self.problem == "503 overloaded"


class _Runner:
    """The lifecycle both load runners share: a background thread that sets ``_ready``
    once it can send, records ``samples`` until ``_stop``, timed from ``started``."""

    samples: list[Sample]
    started: float
    timeout_s: float
    _stop: threading.Event
    _ready: threading.Event
    _thread: threading.Thread

    def _ready_s(self) -> float:
        raise NotImplementedError

    def _not_ready(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        """Start sending (after the runner's unrecorded first contact with the server)."""
        self._thread.start()
        if not self._ready.wait(self._ready_s()):
            raise RuntimeError(self._not_ready())
        return self

    def now(self) -> float:
        """Seconds since the run started (the clock of ``Sample.at``)."""
        return time.monotonic() - self.started

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(self.timeout_s + 30)
        return sorted(self.samples, key=lambda s: s.at)

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class LoadRunner(_Runner):
    """POSTs ``bodies`` (round robin) to ``{url}/rank`` at ``rate`` per second, open loop,
    from a background thread until ``stop``. ``check(index, response_json)`` may return a
    reason to count a 200 as failed (e.g. a mixed-version answer)."""

    def __init__(
        self, url: str, bodies: Sequence[dict[str, Any]], rate: float, *, connections: int = 64,
        timeout_s: float = 10.0, check: Check | None = None,
    ) -> None:  # fmt: skip
        if rate <= 0 or not bodies:
            raise ValueError(f"rate must be > 0 and bodies non-empty, got {rate}, {len(bodies)}")
        self.url, self.bodies, self.rate = url.rstrip("/"), [orjson.dumps(b) for b in bodies], rate
        self.connections, self.timeout_s, self.check = connections, timeout_s, check
        self.samples: list[Sample] = []
        self.started = 0.0
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def _ready_s(self) -> float:
        return self.timeout_s + 30

    def _not_ready(self) -> str:
        return f"load: no answer from {self.url}/healthz"

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.connections)
        headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits, headers=headers
        ) as client:
            await client.get("/healthz")  # the first call pays for imports and a connection
            self.started = time.monotonic()
            self._ready.set()
            pending: set[asyncio.Task[None]] = set()
            i = 0
            while not self._stop.is_set():
                due = i / self.rate
                wait = due - self.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(self._one(client, i, due))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, i: int, due: float) -> None:
        index = i % len(self.bodies)
        status, problem, version, cache = 0, None, None, None
        try:
            response = await client.post("/rank", content=self.bodies[index])
            status = response.status_code
            if status == 200:
                data = orjson.loads(response.content)
                version, cache = data.get("model_version"), data.get("cache")
                problem = self.check(index, data) if self.check else None
            elif status == 503 and response.headers.get("retry-after"):
                problem = f"503 {orjson.loads(response.content)['error']['code']}"
            else:
                problem = f"{status} {response.text[:80]}"
        except Exception as exc:  # every failure of a call is a data point, not a crash
            problem = type(exc).__name__
        self.samples.append(Sample(due, self.now() - due, status, problem, version, cache))


@dataclass(frozen=True)
class Window:
    """Figures of the samples sent in one time window."""

    sent: int
    failed: int
    shed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    problems: dict[str, int] = field(default_factory=dict)


def summarise(
    samples: Sequence[Sample],
    start: float = -math.inf,
    end: float = math.inf,
    where: Callable[[Sample], bool] | None = None,
) -> Window:
    """Requests scheduled in ``[start, end)`` (and matching ``where``)."""
    chosen = [s for s in samples if start <= s.at < end and (where is None or where(s))]
    if not chosen:
        return Window(0, 0, 0, math.nan, math.nan, math.nan)
    latencies = np.array([s.latency for s in chosen]) * 1000.0
    return Window(
        sent=len(chosen),
        failed=sum(1 for s in chosen if not s.ok),
        shed=sum(1 for s in chosen if s.shed),
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
        max_ms=float(latencies.max()),
        problems=dict(Counter(s.problem for s in chosen if s.problem is not None)),
    )


class _RawConnection(asyncio.Protocol):
    """One keep-alive connection of ``RawLoadRunner``: one call at a time, the response's
    status, ``Retry-After`` and (for a 503) error code parsed by hand."""

    def __init__(self, runner: RawLoadRunner) -> None:
        self.runner = runner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.call: tuple[int, float] | None = None  # (index, due) of the call in flight
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, index: int, due: float, request: bytes) -> None:
        self.call = (index, due)
        self.runner.send_lag.append(self.runner.now() - due)
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or self.call is None:
            return
        head = bytes(buffer[: end + 2]).lower()  # each header line ends with CRLF
        start = head.find(b"\r\ncontent-length:")
        length = int(head[start + 17 : head.find(b"\r", start + 2)]) if start >= 0 else 0
        if len(buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        _index, due = self.call
        self.call = None
        problem: str | None = None
        if status == 503 and b"\r\nretry-after:" in head:
            try:
                problem = f"503 {orjson.loads(body)['error']['code']}"
            except (ValueError, KeyError, TypeError):
                problem = "503 unparsable body"
        elif status != 200:
            problem = f"{status} {body[:80].decode(errors='replace')}"
        closing = b"\r\nconnection: close" in head
        self.runner.record(Sample(due, self.runner.now() - due, status, problem))
        if closing:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        else:
            self.runner.idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.call is not None:
            _index, due = self.call
            self.call = None
            self.runner.record(Sample(due, self.runner.now() - due, 0, "connection closed"))
        self.runner.lost(self)


class RawLoadRunner(_Runner):
    """Like ``LoadRunner`` (same ``start`` / ``stop`` / ``running`` / ``samples``), for rates
    an httpx client cannot offer (thousands of calls a second from one core): raw
    HTTP/1.1 keep-alive connections on uvloop, opened as needed up to ``connections``;
    a call due while all are busy waits for one, and its latency still runs from its
    scheduled send time (so client-side queueing counts against the server). The
    responses' bodies are not checked (status, ``Retry-After`` and a 503's code are)."""

    def __init__(
        self, url: str, bodies: Sequence[dict[str, Any]], rate: float, *, connections: int = 400,
        timeout_s: float = 10.0,
    ) -> None:  # fmt: skip
        if rate <= 0 or not bodies:
            raise ValueError(f"rate must be > 0 and bodies non-empty, got {rate}, {len(bodies)}")
        host_port = url.split("://", 1)[-1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.requests = [
            b"POST /rank HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (host_port.encode(), len(b), b)
            for b in (orjson.dumps(body) for body in bodies)
        ]
        self.rate, self.connections, self.timeout_s = rate, connections, timeout_s
        self.samples: list[Sample] = []
        self.send_lag: list[float] = []  # seconds from each call's due time to its write
        self.started = 0.0
        self._idle: list[_RawConnection] = []
        self._all: set[_RawConnection] = set()
        self._open = 0
        self._opening = 0
        self._queued: collections.deque[tuple[int, float]] = collections.deque()
        self._stop, self._ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ready_s(self) -> float:
        return 30.0

    def _not_ready(self) -> str:
        return f"load: cannot connect to {self.host}:{self.port}"

    # --- called by the connections ---
    def record(self, sample: Sample) -> None:
        self.samples.append(sample)

    def idle(self, connection: _RawConnection) -> None:
        if self._queued:
            index, due = self._queued.popleft()
            connection.send(index, due, self.requests[index % len(self.requests)])
        else:
            self._idle.append(connection)

    def lost(self, connection: _RawConnection) -> None:
        self._open -= 1
        self._all.discard(connection)
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)

    # --- the loop ---
    def _main(self) -> None:
        try:
            import uvloop

            runner: Callable[[Any], Any] = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a serving dependency
            runner = asyncio.run
        runner(self._run())

    async def _connect(self) -> None:
        self._opening += 1
        try:
            loop = asyncio.get_running_loop()
            _, connection = await loop.create_connection(
                lambda: _RawConnection(self), self.host, self.port
            )
            self._open += 1
            self._all.add(connection)
            self.idle(connection)
        except OSError:
            if self._queued:  # the call that needed it fails
                _index, due = self._queued.popleft()
                self.record(Sample(due, self.now() - due, 0, "connect failed"))
        finally:
            self._opening -= 1

    def _send(self, index: int, due: float) -> None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.send(index, due, self.requests[index % len(self.requests)])
                return
        self._queued.append((index, due))
        if self._open + self._opening < self.connections:
            asyncio.get_running_loop().create_task(self._connect())

    async def _run(self) -> None:
        for _ in range(8):  # a few connections before the clock starts
            await self._connect()
        self._queued.clear()
        self.started = time.monotonic()
        self._ready.set()
        i = 0
        while not self._stop.is_set():
            now = self.now()
            while i / self.rate <= now:
                self._send(i, i / self.rate)
                i += 1
            await asyncio.sleep(max(0.0, i / self.rate - self.now()))
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and len(self.samples) < i:
            await asyncio.sleep(0.01)
        for _index, due in self._queued:
            self.record(Sample(due, self.now() - due, 0, "not sent (no free connection)"))
        self._queued.clear()
        for connection in list(self._all):
            if connection.call is not None:  # unanswered within timeout_s of the end
                _, due = connection.call
                connection.call = None
                self.record(Sample(due, self.now() - due, 0, "timeout"))
            if connection.transport is not None:
                connection.transport.close()
