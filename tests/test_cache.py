"""The result cache: the key covers everything that changes a result and nothing can
collide; LRU + TTL; the breaker (never fail, count, bypass, recover); Redis for real."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Any

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


# --- never fail, breaker, recovery ------------------------------------------------------------
class FlakyCache(ClusterCache):
    backend = "flaky"

    def __init__(self, clock: FakeClock, metrics: ServiceMetrics) -> None:
        super().__init__(ttl_seconds=60, retry_seconds=5, metrics=metrics, clock=clock)
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


@pytest.mark.integration
async def test_redis_stores_values_with_a_ttl(redis_server: Any) -> None:
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, ttl_seconds=30)
    try:
        assert (await cache.get("unicorn:rank:x")).outcome == "miss"
        assert await cache.set("unicorn:rank:x", b'[{"a":1}]') is True
        assert (await cache.get("unicorn:rank:x")).value == b'[{"a":1}]'
        ttl_ms = int(redis_server.command("PTTL", "unicorn:rank:x")[1:])
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


@pytest.mark.integration
async def test_stalled_redis_costs_the_timeout_once_then_nothing(
    redis_server: Any,
    caplog: pytest.LogCaptureFixture,
    finish_without_waiting: Callable[[Coroutine[Any, Any, Any]], Any],
) -> None:
    """A paused Redis never answers: the first read is cut by the cache timeout (a
    ``TimeoutError``, not a hang), then the open breaker answers without waiting at all."""
    metrics = ServiceMetrics()
    cache = _redis_cache(redis_server.url, metrics, timeout_seconds=0.05, retry_seconds=60)
    try:
        await cache.set("k", b"v")  # the pool now holds a live connection
        redis_server.pause()
        assert (await cache.get("k")).outcome == "bypass"
        assert "cache redis get failed (TimeoutError" in caplog.text
        assert cache.degraded
        assert finish_without_waiting(cache.get("k")).outcome == "bypass"
        assert finish_without_waiting(cache.set("k", b"w")) is False
        assert _sample(metrics, "unicorn_cache_errors_total", backend="redis", operation="get") == 1
    finally:
        redis_server.resume()
        await cache.close()
