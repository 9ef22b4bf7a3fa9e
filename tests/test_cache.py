"""The result cache: the key covers everything that changes a result and nothing can
collide; LRU + TTL; the breaker (never fail, count, bypass, open after failures in a row,
recover); Redis for real, a late event loop never charged to it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import psutil
import pytest

from app.core.context import Personalization
from app.serving.cache import (
    KEY_PREFIX,
    CacheKeyParts,
    CircuitBreaker,
    ClusterCache,
    InProcessCache,
    RedisCache,
    cache_key,
)
from app.serving.metrics import ServiceMetrics

pytestmark = pytest.mark.anyio

BASE = CacheKeyParts(
    variant="default",
    model_version="m1",
    task="search",
    query="star wars",
    country="US",
    user_cluster=3,
    source_entity_id="<null_source>",
    candidates=("v1", "v2"),
    retrieval_limit=300,
    k=20,
    personalization=Personalization.CLUSTER,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the key ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("variant", "challenger"),
        ("model_version", "m2"),
        ("task", "prequery"),
        ("query", "star war"),
        ("country", "GB"),
        ("user_cluster", 4),
        ("source_entity_id", "v9"),
        ("candidates", ("v1", "v3")),
        ("candidates", None),
        ("candidates", ()),
        ("k", 21),
        ("personalization", Personalization.NONE),
    ],
)
def test_changing_any_part_changes_the_key(field: str, value: Any) -> None:
    assert cache_key(dataclasses.replace(BASE, **{field: value})) != cache_key(BASE)


def test_retrieval_limit_matters_only_when_the_service_retrieves() -> None:
    retrieved = dataclasses.replace(BASE, candidates=None)
    assert cache_key(dataclasses.replace(retrieved, retrieval_limit=100)) != cache_key(retrieved)
    assert cache_key(dataclasses.replace(BASE, retrieval_limit=100)) == cache_key(BASE)


def test_key_is_stable_prefixed_and_order_and_duplicate_insensitive() -> None:
    key = cache_key(BASE)
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 40
    assert cache_key(dataclasses.replace(BASE)) == key
    shuffled = dataclasses.replace(BASE, candidates=("v2", "v1", "v2"))
    assert cache_key(shuffled) == key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"task": "search", "query": "a|b"}, {"task": "search|a", "query": "b"}),
        ({"query": "a", "country": "b,c"}, {"query": "a,b", "country": "c"}),
        ({"query": 'x", "y'}, {"query": "x", "country": "y"}),
        ({"source_entity_id": "v1", "query": ""}, {"source_entity_id": "", "query": "v1"}),
        ({"candidates": ("a,b",)}, {"candidates": ("a", "b")}),
        ({"candidates": ("a", "b")}, {"candidates": ("ab",)}),
        ({"model_version": "m1:search"}, {"model_version": "m1", "task": ":search"}),
        ({"user_cluster": 12, "k": 3}, {"user_cluster": 1, "k": 23}),
    ],
)
def test_tricky_strings_never_collide(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert cache_key(dataclasses.replace(BASE, **a)) != cache_key(dataclasses.replace(BASE, **b))


def test_no_collisions_across_tasks_countries_and_levels() -> None:
    keys = {
        cache_key(dataclasses.replace(BASE, task=t, country=c, personalization=p))
        for t in ("search", "prequery", "more_like_this", "entity")
        for c in ("US", "GB", "", "<unknown_country>")
        for p in (Personalization.NONE, Personalization.CLUSTER)
    }
    assert len(keys) == 4 * 4 * 2


def test_full_results_are_keyed_by_user_and_shared_results_never_are() -> None:
    full = dataclasses.replace(BASE, personalization=Personalization.FULL, user_id="alice")
    assert cache_key(full) != cache_key(dataclasses.replace(full, user_id="bob"))
    with pytest.raises(ValueError, match=r"user_id is required .* full-personalization"):
        cache_key(dataclasses.replace(full, user_id=None))
    with pytest.raises(ValueError, match="user_id must be None for personalization cluster"):
        cache_key(dataclasses.replace(BASE, user_id="alice"))


# --- in-process LRU + TTL -------------------------------------------------------------------
async def test_lru_evicts_the_least_recently_used_entry() -> None:
    cache = InProcessCache(max_entries=2, ttl_seconds=60)
    await cache.set("a", b"1")
    await cache.set("b", b"2")
    assert (await cache.get("a")).value == b"1"  # a is now the most recent
    await cache.set("c", b"3")
    assert (await cache.get("b")).outcome == "miss"
    assert (await cache.get("a")).outcome == "hit" and (await cache.get("c")).outcome == "hit"
    assert len(cache) == 2


async def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = InProcessCache(max_entries=10, ttl_seconds=5, clock=clock)
    await cache.set("k", b"v")
    clock.now += 4.9
    assert (await cache.get("k")).outcome == "hit"
    clock.now += 0.2
    assert (await cache.get("k")).outcome == "miss"
    assert len(cache) == 0  # the expired entry was dropped


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        InProcessCache(max_entries=0, ttl_seconds=1)
    with pytest.raises(ValueError, match="ttl_seconds must be > 0, got 0"):
        InProcessCache(max_entries=1, ttl_seconds=0)
    with pytest.raises(ValueError, match="retry_seconds must be > 0, got -1"):
        CircuitBreaker(-1)
    with pytest.raises(ValueError, match="failure_threshold must be >= 1, got 0"):
        CircuitBreaker(1, failure_threshold=0)


# --- never fail, breaker, recovery ------------------------------------------------------------
class FlakyCache(ClusterCache):
    backend = "flaky"

    def __init__(
        self, clock: FakeClock, metrics: ServiceMetrics, failure_threshold: int = 1
    ) -> None:
        super().__init__(ttl_seconds=60, retry_seconds=5, metrics=metrics, clock=clock,
                         failure_threshold=failure_threshold)  # fmt: skip
        self.failing = True
        self.calls = 0
        self.store: dict[str, bytes] = {}

    async def _get(self, key: str) -> bytes | None:
        self.calls += 1
        if self.failing:
            raise ConnectionError("backend down")
        return self.store.get(key)

    async def _set(self, key: str, value: bytes) -> None:
        self.calls += 1
        if self.failing:
            raise TimeoutError("backend stalled")
        self.store[key] = value

    async def _ping(self) -> None:
        if self.failing:
            raise ConnectionError("backend down")

    async def close(self) -> None:
        return None


def _sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_failures_bypass_count_open_the_breaker_and_recover() -> None:
    clock, metrics = FakeClock(), ServiceMetrics()
    cache = FlakyCache(clock, metrics)
    assert (await cache.get("k")).outcome == "bypass"  # the error is swallowed
    assert cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 1
    assert _sample(metrics, "unicorn_cache_errors_total", backend="flaky", operation="get") == 1
    # While open, the backend is not touched at all.
    calls = cache.calls
    assert (await cache.get("k")).outcome == "bypass"
    assert await cache.set("k", b"v") is False
    assert cache.calls == calls
    # After retry_seconds ONE probe goes through; it fails, so the breaker re-opens.
    clock.now += 5.1
    assert (await cache.get("k")).outcome == "bypass" and cache.calls == calls + 1
    assert (await cache.get("k")).outcome == "bypass" and cache.calls == calls + 1
    # The backend comes back: the next probe closes the breaker, the cache works again.
    cache.failing = False
    clock.now += 5.1
    assert (await cache.get("k")).outcome == "miss"
    assert not cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 0
    assert await cache.set("k", b"v") is True
    assert (await cache.get("k")).value == b"v"
    assert _sample(metrics, "unicorn_cache_errors_total", backend="flaky", operation="get") == 2


async def test_set_failure_never_raises_and_is_counted() -> None:
    clock, metrics = FakeClock(), ServiceMetrics()
    cache = FlakyCache(clock, metrics)
    assert await cache.set("k", b"v") is False
    assert _sample(metrics, "unicorn_cache_errors_total", backend="flaky", operation="set") == 1
    assert await cache.check() is False  # readiness sees the open breaker


async def test_failures_below_the_threshold_are_counted_but_keep_the_cache_in_use() -> None:
    clock, metrics = FakeClock(), ServiceMetrics()
    cache = FlakyCache(clock, metrics, failure_threshold=3)
    for _ in range(2):
        assert (await cache.get("k")).outcome == "bypass"  # this request is scored instead
    assert not cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 0
    assert _sample(metrics, "unicorn_cache_errors_total", backend="flaky", operation="get") == 2
    cache.failing = False
    assert (await cache.get("k")).outcome == "miss"  # a success: the count starts again
    cache.failing = True
    assert await cache.set("k", b"v") is False and (await cache.get("k")).outcome == "bypass"
    assert not cache.degraded
    calls = cache.calls
    assert (await cache.get("k")).outcome == "bypass"  # the third in a row opens it
    assert cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 1
    assert (await cache.get("k")).outcome == "bypass" and cache.calls == calls + 1


def test_breaker_opens_after_the_threshold_in_a_row_and_a_failed_probe_reopens_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2.0, clock, failure_threshold=3)
    assert breaker.record_failure() is False and breaker.record_failure() is False
    assert breaker.record_success() is False  # closed all along; the count is reset
    assert breaker.record_failure() is False and breaker.record_failure() is False
    assert not breaker.is_open and breaker.allow()
    assert breaker.record_failure() is True and breaker.is_open and not breaker.allow()
    clock.now += 2.5
    assert breaker.allow() is True  # the probe
    assert breaker.record_failure() is False  # it failed: open again at once, not after 3
    assert breaker.is_open and not breaker.allow()
    clock.now += 2.5
    assert breaker.allow() and breaker.record_success() is True
    assert breaker.record_failure() is False and not breaker.is_open  # closed: 3 again


def test_breaker_allows_a_single_probe_at_a_time() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2.0, clock)
    assert breaker.allow()
    assert breaker.record_failure() is True and breaker.record_failure() is False
    clock.now += 2.5
    assert breaker.allow() is True  # the probe
    assert breaker.allow() is False  # everyone else keeps bypassing meanwhile
    assert breaker.record_success() is True and breaker.allow()


# --- Redis, for real ----------------------------------------------------------------------------
def _redis_cache(url: str, metrics: ServiceMetrics, **kwargs: Any) -> RedisCache:
    options: dict[str, Any] = {"ttl_seconds": 30, "timeout_seconds": 0.05, "retry_seconds": 0.3}
    options.update(kwargs)
    return RedisCache(url, metrics=metrics, **options)


def _errors(metrics: ServiceMetrics, operation: str = "get") -> float:
    return _sample(metrics, "unicorn_cache_errors_total", backend="redis", operation=operation)


@pytest.mark.integration
async def test_redis_stores_values_with_a_ttl(redis_server: Any) -> None:
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, ttl_seconds=30)
    try:
        assert (await cache.get("unicorn:rank:x")).outcome == "miss"
        assert await cache.set("unicorn:rank:x", b'[{"a":1}]') is True
        assert (await cache.get("unicorn:rank:x")).value == b'[{"a":1}]'
        with redis_server.client() as r:
            ttl_ms = r.pttl("unicorn:rank:x")
        assert 25_000 < ttl_ms <= 30_000
    finally:
        await cache.close()


@pytest.mark.integration
async def test_redis_down_degrades_then_recovers_by_itself(redis_server: Any) -> None:
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, retry_seconds=0.3)
    try:
        await cache.set("k", b"v")
        redis_server.kill()
        assert (await cache.get("k")).outcome == "bypass"
        assert cache.degraded
        assert _sample(metrics, "unicorn_cache_errors_total", backend="redis", operation="get") >= 1
        redis_server.start()  # empty: no persistence
        deadline = time.monotonic() + 5
        outcome = "bypass"
        while outcome == "bypass" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            outcome = (await cache.get("k")).outcome
        assert outcome == "miss" and not cache.degraded
        await cache.set("k", b"again")
        assert (await cache.get("k")).value == b"again"
    finally:
        await cache.close()


# A late loop: inline scoring (onnxruntime runs on the loop) or a busy core keeps the loop
# from reading replies that Redis sent in time. Blocking it with time.sleep while calls are
# in flight is exactly that, without timing anything.
TIMEOUT_S = 0.1


def _pause(redis_server: Any) -> None:
    """SIGSTOP, and wait until the process is stopped (it answers nothing from then on)."""
    redis_server.pause()
    process = psutil.Process(redis_server.process.pid)
    for _ in range(100_000):
        if process.status() == psutil.STATUS_STOPPED:
            return
    raise AssertionError("redis-server did not stop on SIGSTOP")


@pytest.mark.integration
@pytest.mark.parametrize(
    "anyio_backend", ["asyncio", pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")]
)
@pytest.mark.parametrize(
    ("pool", "held", "late"),
    [
        pytest.param("warm", 0.0, 3.0, id="warm"),
        pytest.param("warm", 0.8, 1.5, id="warm-reply-near-the-deadline"),
        pytest.param("reconnecting", 0.0, 3.0, id="reconnecting"),
    ],
)
async def test_a_late_loop_never_opens_the_breaker_of_a_healthy_redis(
    redis_server: Any, pool: str, held: float, late: float
) -> None:
    """Round after round, four gets and a set wait for Redis, which holds its replies for
    ``held`` cache timeouts (of a free loop), then sends them all, in time; but the loop is
    blocked for ``late`` cache timeouts, past every deadline. ``reconnecting``: every
    pooled connection was dropped first, so each call is mid-way through reconnecting
    (several round trips). Redis was never late, so every call succeeds: hits, nothing
    counted, and the breaker, which opens at the FIRST failure here, stays closed."""
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, timeout_seconds=TIMEOUT_S,
                         retry_seconds=60, failure_threshold=1)  # fmt: skip
    try:
        assert await cache.set("k", b"v") is True
        await asyncio.gather(*(cache.get("k") for _ in range(5)))  # five pooled connections
        with redis_server.client() as admin:

            def answered() -> int:  # a synchronous call: the loop reads nothing meanwhile
                stats = admin.info("commandstats")
                return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("get", "set"))

            for _ in range(3):
                if pool == "reconnecting":
                    await cache.client.connection_pool.disconnect()
                before = answered()
                _pause(redis_server)
                calls: list[asyncio.Future[Any]] = [
                    *(asyncio.ensure_future(cache.get("k")) for _ in range(4)),
                    asyncio.ensure_future(cache.set("k", b"v")),
                ]
                for _ in range(10):
                    await asyncio.sleep(0)  # every call waits for a reply
                await asyncio.sleep(held * TIMEOUT_S)
                assert not any(call.done() for call in calls)
                redis_server.resume()
                if pool == "warm":  # Redis has sent every reply, in time; none is read yet
                    assert any(answered() == before + 5 for _ in range(100))
                time.sleep(late * TIMEOUT_S)
                results = [await call for call in calls]
                assert [r.outcome for r in results[:4]] == ["hit"] * 4 and results[4] is True
                assert not cache.degraded
        assert _errors(metrics, "get") == 0 and _errors(metrics, "set") == 0
        assert _sample(metrics, "unicorn_cache_degraded") == 0
    finally:
        redis_server.resume()
        await cache.close()


@contextlib.contextmanager
def stalled(redis_server: Any, how: str) -> Iterator[None]:
    """Redis stops answering: paused (SIGSTOP), asleep inside (``DEBUG SLEEP``) or killed."""
    sleeper = None
    if how == "sigstop":
        redis_server.pause()
    elif how == "debug_sleep":
        sleeper = redis_server.debug_sleep(1.5)
        with socket.create_connection(("127.0.0.1", redis_server.port)) as probe:
            probe.settimeout(0.2)
            with contextlib.suppress(TimeoutError):  # until the sleep has begun
                for _ in range(10_000):
                    probe.sendall(b"PING\r\n")
                    assert probe.recv(16) == b"+PONG\r\n"
    else:
        redis_server.kill()
    try:
        yield
    finally:
        redis_server.resume()
        if sleeper is not None:
            sleeper.join(15)
        if how == "killed":
            redis_server.start()  # empty: no persistence


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sigstop", "debug_sleep", "killed"])
async def test_a_stalled_redis_opens_the_breaker_at_the_threshold_then_costs_nothing(
    redis_server: Any,
    how: str,
    caplog: pytest.LogCaptureFixture,
    finish_without_waiting: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    """Each call to a stalled Redis is cut by the cache timeout (a ``TimeoutError``, not a
    hang) or refused, counted and scored instead; the third in a row opens the breaker,
    which then answers without waiting at all; a failed probe re-opens it at once."""
    clock, metrics = FakeClock(), ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, retry_seconds=60, failure_threshold=3,
                         clock=clock)  # fmt: skip
    try:
        await cache.set("k", b"v")  # the pool now holds a live connection
        with stalled(redis_server, how):
            for failures in (1, 2, 3):
                assert not cache.degraded
                assert (await cache.get("k")).outcome == "bypass"
                assert _errors(metrics) == failures
            assert cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 1
            error = "ConnectionError" if how == "killed" else "TimeoutError"
            assert f"cache redis get failed ({error}" in caplog.text
            assert finish_without_waiting(cache.get("k")).outcome == "bypass"
            assert finish_without_waiting(cache.set("k", b"w")) is False
            assert _errors(metrics) == 3 and _errors(metrics, "set") == 0
            clock.now += 61
            assert (await cache.get("k")).outcome == "bypass"  # the probe fails
            assert _errors(metrics) == 4 and cache.degraded
            assert finish_without_waiting(cache.get("k")).outcome == "bypass"
    finally:
        await cache.close()


@pytest.mark.integration
async def test_a_stalled_redis_is_still_cut_on_a_late_loop(redis_server: Any) -> None:
    """The loop's lateness buys a call more time, not an unbounded wait: a call to a
    paused Redis during which the loop was blocked is cut all the same, and counted."""
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, timeout_seconds=TIMEOUT_S,
                         retry_seconds=60, failure_threshold=1)  # fmt: skip
    try:
        await cache.set("k", b"v")
        with stalled(redis_server, "sigstop"), anyio.fail_after(30):  # a hang guard only
            get = asyncio.ensure_future(cache.get("k"))
            await asyncio.sleep(0)
            time.sleep(3 * TIMEOUT_S)
            assert (await get).outcome == "bypass"
        assert _errors(metrics) == 1 and cache.degraded
    finally:
        await cache.close()


@pytest.mark.integration
async def test_the_breaker_closes_by_itself_once_a_stalled_redis_answers_again(
    redis_server: Any,
) -> None:
    clock, metrics = FakeClock(), ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, retry_seconds=5, failure_threshold=3,
                         clock=clock)  # fmt: skip
    try:
        await cache.set("k", b"v")
        with stalled(redis_server, "sigstop"):
            for _ in range(3):
                await cache.get("k")
            assert cache.degraded
        assert (await cache.get("k")).outcome == "bypass"  # still open: no probe yet
        clock.now += 5.1
        assert (await cache.get("k")).outcome == "hit"  # the probe reconnects and succeeds
        assert not cache.degraded and _sample(metrics, "unicorn_cache_degraded") == 0
        assert await cache.set("k", b"again") is True
        assert (await cache.get("k")).value == b"again"
    finally:
        await cache.close()
