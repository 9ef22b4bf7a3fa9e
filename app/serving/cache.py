"""The result cache of ``POST /rank``: in-process LRU+TTL by default, Redis when shared.

Only ``none`` and ``cluster`` results are cached: they depend on the request's context
and the user's CLUSTER, never on the user, so every member of a cluster may share them.
``full`` results are per user and bypass the cache (``cache_key`` still keys them by the
user id, so even a future caller that stored them could not serve one user's list to
another).

A failing cache never fails a request: ``ClusterCache.get``/``set`` catch every error and
count it in ``unicorn_cache_errors_total`` (that request is scored instead). After
``cache_failure_threshold`` failures in a row a circuit breaker opens (requests bypass the
cache for ``cache_retry_seconds``, ``unicorn_cache_degraded`` = 1) and then lets ONE request
probe the backend again; a success closes the breaker, so the service recovers by itself.

A Redis call's deadline (``cache_timeout_ms``) runs on the event loop, which is sometimes
late (inline scoring, a busy core). ``loop_fair_timeout`` keeps that lateness from being
charged to Redis: a deadline is counted in steps that each start when the loop is back,
so time the loop was stuck does not count (up to ``MAX_WAIT_FACTOR`` deadlines in all), and
a reply the late loop finds together with the expired deadline is still used.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import orjson

from app.core.context import Personalization
from app.serving.metrics import ServiceMetrics

logger = logging.getLogger("unicorn.cache")

KEY_PREFIX = "unicorn:rank:"
OPERATIONS: tuple[str, ...] = ("get", "set", "ping", "decode")
KEY_SCHEMA = 2  # bump when the key layout changes, so old entries are never misread
CacheOutcome = Literal["hit", "miss", "bypass"]
Clock = Callable[[], float]
T = TypeVar("T")
DEADLINE_STEPS = 4  # loop_fair_timeout counts a deadline in this many steps
MAX_WAIT_FACTOR = 20  # and waits at most this many deadlines, however late the loop


@dataclass(frozen=True, slots=True)
class CacheKeyParts:
    """Everything that changes a ranking result.

    ``query`` is the normalised (or imputed) query and ``country`` the imputed country,
    so requests that impute to the same context share an entry. ``candidates`` is the
    request's id list (``None`` when the service retrieves; then ``retrieval_limit``
    matters). ``user_id`` must be set for ``full`` and only for ``full``.
    """

    variant: str
    model_version: str
    task: str
    query: str
    country: str
    user_cluster: int
    source_entity_id: str
    candidates: tuple[str, ...] | None
    retrieval_limit: int
    k: int
    personalization: Personalization
    user_id: str | None = None


def cache_key(parts: CacheKeyParts) -> str:
    """A collision-free key: the parts serialised as one JSON array (no separator can be
    forged inside a string), hashed with blake2b-160.

    Candidate order does not change a ranking (ties break by entity, scores are per row)
    and duplicates are dropped before scoring, so the candidate SET is keyed.
    """
    level = Personalization(parts.personalization)
    if level is Personalization.FULL and not parts.user_id:
        raise ValueError("user_id is required in the cache key of a full-personalization result")
    if level is not Personalization.FULL and parts.user_id is not None:
        raise ValueError(
            f"user_id must be None for personalization {level.value}: those results are "
            f"shared by every user of a cluster"
        )
    if parts.candidates is None:
        candidates: object = ["retrieved", parts.retrieval_limit]
    else:
        candidates = ["given", sorted(set(parts.candidates))]
    payload = orjson.dumps(
        [
            KEY_SCHEMA,
            parts.variant,
            parts.model_version,
            parts.task,
            parts.query,
            parts.country,
            parts.user_cluster,
            parts.source_entity_id,
            candidates,
            parts.k,
            level.value,
            parts.user_id,
        ]
    )
    return KEY_PREFIX + hashlib.blake2b(payload, digest_size=20).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheRead:
    outcome: CacheOutcome
    value: bytes | None = None


MISS = CacheRead("miss")
BYPASS = CacheRead("bypass")


class CircuitBreaker:
    """Closed (use the backend) -> open after ``failure_threshold`` failures in a row (skip
    it for ``retry_seconds``) -> one probe allowed -> closed on success, open again at once
    on failure. Any success resets the count, so one slow call among good ones (a network
    blip, a reply that lost the race with its deadline) costs its own request only."""

    def __init__(
        self, retry_seconds: float, clock: Clock = time.monotonic, *, failure_threshold: int = 1
    ) -> None:
        if retry_seconds <= 0:
            raise ValueError(f"retry_seconds must be > 0, got {retry_seconds}")
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.retry_seconds = retry_seconds
        self.failure_threshold = failure_threshold
        self.clock = clock
        self._open_until: float | None = None
        self._probing = False
        self._failures = 0  # in a row, since the last success

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """May this call use the backend? While open, only one probe after the pause."""
        if self._open_until is None:
            return True
        if self._probing or self.clock() < self._open_until:
            return False
        self._probing = True
        return True

    def record_success(self) -> bool:
        """Close; True when this closed an open breaker (the backend recovered)."""
        recovered = self._open_until is not None
        self._open_until, self._probing, self._failures = None, False, 0
        return recovered

    def record_failure(self) -> bool:
        """Count a failure; (re)open for ``retry_seconds`` at the ``failure_threshold``-th in
        a row, or at once while open (a failed probe). True when this opened a closed one."""
        self._failures += 1
        closed = self._open_until is None
        if closed and self._failures < self.failure_threshold:
            return False
        self._open_until, self._probing = self.clock() + self.retry_seconds, False
        return closed


class ClusterCache(ABC):
    """A bytes -> bytes store with a TTL, wrapped in the never-fail + breaker policy.

    Subclasses implement the raw ``_get``/``_set``/``_ping``; they may raise anything.
    """

    backend: ClassVar[str]

    def __init__(
        self,
        ttl_seconds: float,
        retry_seconds: float,
        metrics: ServiceMetrics | None = None,
        clock: Clock = time.monotonic,
        failure_threshold: int = 1,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        self.ttl_seconds = ttl_seconds
        self.metrics = metrics
        self.breaker = CircuitBreaker(retry_seconds, clock, failure_threshold=failure_threshold)
        if metrics is not None:  # zero series, so rate() and alerts see them from the start
            for operation in OPERATIONS:
                metrics.cache_errors.labels(self.backend, operation)
            metrics.cache_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self.breaker.is_open

    async def get(self, key: str) -> CacheRead:
        """``hit`` with the value, ``miss``, or ``bypass`` when the cache is unusable."""
        if not self.breaker.allow():
            return BYPASS
        try:
            value = await self._get(key)
        except Exception as exc:  # any failure of the cache means "score instead"
            self._failed("get", exc)
            return BYPASS
        self._succeeded()
        return MISS if value is None else CacheRead("hit", value)

    async def set(self, key: str, value: bytes) -> bool:
        """Store ``value``; False (never an exception) when the cache is unusable."""
        if not self.breaker.allow():
            return False
        try:
            await self._set(key, value)
        except Exception as exc:
            self._failed("set", exc)
            return False
        self._succeeded()
        return True

    async def check(self) -> bool:
        """Readiness probe: True when the backend answers (a probe counts like a request)."""
        if not self.breaker.allow():
            return False
        try:
            await self._ping()
        except Exception as exc:
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    def record_error(self, operation: str, exc: BaseException) -> None:
        """A failure seen by the caller (e.g. an undecodable value): count it and open."""
        self._failed(operation, exc)

    def _failed(self, operation: str, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.cache_errors.labels(self.backend, operation).inc()
        if self.breaker.record_failure():
            logger.warning(
                "cache %s %s failed (%s: %s), %d in a row; bypassing it for %.1fs",
                self.backend,
                operation,
                type(exc).__name__,
                exc,
                self.breaker.failure_threshold,
                self.breaker.retry_seconds,
            )
            if self.metrics is not None:
                self.metrics.cache_degraded.set(1)
        else:
            logger.debug("cache %s %s failed (%s: %s)", self.backend, operation,
                         type(exc).__name__, exc)  # fmt: skip

    def _succeeded(self) -> None:
        if self.breaker.record_success():
            logger.warning("cache %s recovered", self.backend)
            if self.metrics is not None:
                self.metrics.cache_degraded.set(0)

    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _set(self, key: str, value: bytes) -> None: ...

    @abstractmethod
    async def _ping(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


class InProcessCache(ClusterCache):
    """LRU bounded by ``max_entries``, each entry expiring ``ttl_seconds`` after its write.

    A lock (held for a dict operation only) makes it safe from threads as well as tasks.
    """

    backend = "memory"

    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        retry_seconds: float = 1.0,
        metrics: ServiceMetrics | None = None,
        clock: Clock = time.monotonic,
        failure_threshold: int = 1,
    ) -> None:
        super().__init__(ttl_seconds, retry_seconds, metrics, clock, failure_threshold)
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    async def _get(self, key: str) -> bytes | None:
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry[1]

    async def _set(self, key: str, value: bytes) -> None:
        expires = self.clock() + self.ttl_seconds
        with self._lock:
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    async def _ping(self) -> None:
        return None

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()


class _SteppedDeadline:
    """The timer of one ``loop_fair_timeout`` call: ``DEADLINE_STEPS`` steps, each timed
    from when the loop ran the previous one, then ``scope`` is cut after that pass.

    A plain object, not a closure: the closure that scheduled itself named itself, a
    reference cycle (function -> its own cell) that outlived every call and held its timer,
    its timeout scope and, through the scope, the request's task: about 14 objects per
    Redis call that only the cyclic garbage collector could free. They pushed a serving
    process into full collections (~60 ms of CPU over a loaded bundle's ~90k objects),
    the long tail of Redis cache hits, even at concurrency 1. ``cancel`` drops every
    reference this object holds, so a finished call is freed by reference counting
    (``tests/test_cache_tail.py``; ``loadtest/redis_tail.py --probe`` shows it in a server).
    """

    __slots__ = ("_last", "_loop", "_scope", "_step", "_steps_left", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout,
                 seconds: float) -> None:  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._scope: asyncio.Timeout | None = scope
        self._step = seconds / DEADLINE_STEPS
        began = loop.time()
        self._last = began + MAX_WAIT_FACTOR * seconds
        self._steps_left = DEADLINE_STEPS
        self._timer: asyncio.Handle | None = loop.call_at(began + self._step, self._stepped)

    def _stepped(self) -> None:
        loop, scope = self._loop, self._scope
        if loop is None or scope is None:  # cancelled meanwhile
            return
        self._steps_left -= 1
        now = loop.time()
        if self._steps_left > 0 and now < self._last:  # the next step starts now, however late
            self._timer = loop.call_at(min(now + self._step, self._last), self._stepped)
        else:  # cut, after this pass (the scope cancels the call on the next one)
            self._timer = loop.call_soon(scope.reschedule, now)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop = self._scope = None


async def loop_fair_timeout(seconds: float, call: Awaitable[T]) -> T:
    """``await call``, cut with ``TimeoutError`` after ``seconds`` like ``asyncio.timeout``,
    except that time the event loop was stuck elsewhere does not count against it.

    The deadline is a timer on the loop. When the loop comes back late (it scored inline,
    or lost its core), it finds a reply that arrived in time and the expired deadline in
    the same pass; ``asyncio.timeout`` then cancels the call and the reply is lost, as if
    Redis had been slow. Here:

    - **the deadline is counted in ``DEADLINE_STEPS`` steps**, each timed from when the
      loop got back to the previous one, so a stretch in which the loop was stuck, and
      ran the step's timer late, is not counted; a call of several round trips (a
      reconnect, then the command) still gets loop time to finish. However late the
      loop, a call waits at most ``MAX_WAIT_FACTOR x seconds``;
    - **the cut waits for the end of the pass** in which the last step's timer runs: it
      is queued behind the wakeups that the pass's I/O callbacks (which asyncio, and
      uvloop, run before due timers) have queued, so a call whose reply was read finishes.

    A cut call had no reply when the loop read its socket at the deadline, and a stalled
    Redis still cuts every call: after ``seconds`` (plus up to a millisecond a step, the
    selector's resolution) on a loop that keeps up, later by the time the loop was stuck.
    A call answered within the first step (every hit from a healthy Redis) costs one
    timer, as with ``asyncio.timeout``, and leaves no reference cycle behind
    (``_SteppedDeadline``).
    """
    async with asyncio.timeout(None) as scope:
        deadline = _SteppedDeadline(asyncio.get_running_loop(), scope, seconds)
        try:
            return await call
        finally:
            deadline.cancel()


class RedisCache(ClusterCache):
    """Redis (``redis.asyncio`` + hiredis) shared by every replica; values expire by TTL.

    Every call (a reconnect included) runs under ``loop_fair_timeout(timeout_seconds)``: a
    stalled Redis costs a request at most ``timeout_seconds`` once (up to
    ``MAX_WAIT_FACTOR`` times that when the loop itself was that late), and nothing while
    the breaker is open. redis-py's own socket and pool timeouts are off: they are plain
    loop timers that a late loop trips (and its write timeout runs each send in a task of
    its own, a loop pass later); its connect timeout stays, beyond the longest wait, only
    to bound closing a connection to a stalled Redis. redis-py retries a command ONCE, at
    once, on a connection error only (never on a timeout): after Redis restarts, every
    pooled connection is dead, and without that retry each one would fail a request and
    re-open the breaker for another ``retry_seconds`` (measured under load: recovery took
    two breaker periods instead of one).
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        timeout_seconds: float,
        retry_seconds: float,
        max_connections: int = 64,
        metrics: ServiceMetrics | None = None,
        clock: Clock = time.monotonic,
        failure_threshold: int = 1,
    ) -> None:
        super().__init__(ttl_seconds, retry_seconds, metrics, clock, failure_threshold)
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self._ttl_ms = max(int(ttl_seconds * 1000), 1)
        # A stale pooled connection fails at once (reset / EOF): reconnect and retry once.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,  # waiting for a free pooled connection: the call's deadline
            socket_timeout=None,  # reads and writes: the call's deadline
            socket_connect_timeout=MAX_WAIT_FACTOR * timeout_seconds + 1.0,  # see above
            retry=retry,
            health_check_interval=0,
        )
        self.client = aioredis.Redis(connection_pool=pool, retry=retry)

    async def _get(self, key: str) -> bytes | None:
        value = await loop_fair_timeout(self.timeout_seconds, self.client.get(key))
        if value is None:
            return None
        return value if isinstance(value, bytes) else str(value).encode()

    async def _set(self, key: str, value: bytes) -> None:
        await loop_fair_timeout(self.timeout_seconds, self.client.set(key, value, px=self._ttl_ms))

    async def _ping(self) -> None:
        await loop_fair_timeout(self.timeout_seconds, self.client.ping())

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # closing a dead connection must not fail shutdown
            logger.debug("closing redis failed: %s", exc)
