"""An OPEN-LOOP load of ``/rank`` calls at a fixed rate (asyncio + httpx in a background
thread), and the figures of a time window of its calls. A call's latency runs from its
scheduled send time, so client-side queueing behind a stalled server counts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class LoadRunner:
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

    def start(self) -> LoadRunner:
        """Start sending (after one unrecorded warm-up call that opens a connection)."""
        self._thread.start()
        if not self._ready.wait(self.timeout_s + 30):
            raise RuntimeError(f"load: no answer from {self.url}/healthz")
        return self

    def now(self) -> float:
        """Seconds since the run started (the clock of ``Sample.at``)."""
        return time.monotonic() - self.started

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(self.timeout_s + 30)
        return sorted(self.samples, key=lambda s: s.at)

    @contextlib.contextmanager
    def running(self) -> Iterator[LoadRunner]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

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
