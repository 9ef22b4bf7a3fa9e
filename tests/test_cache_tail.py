"""The long tail of Redis cache hits (issue #13 item 4), guarded without timing anything.

The tail was the cyclic garbage collector: every Redis call left a reference cycle behind
(``loop_fair_timeout``'s self-scheduling closure, holding its timer, its timeout scope and,
through the scope, the request's task), so only the collector freed them, and a serving
process that holds a bundle ran full collections of tens of milliseconds every few
seconds. ``loadtest/redis_tail.py`` measures it; these tests check that a hit leaves
nothing for the collector, and that the other suspects stay away from the request path:
a hit reuses a warm pooled connection (no connection setup), sends no ``PING`` (no
health check) and runs over a socket with ``TCP_NODELAY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from app.serving.cache import RedisCache, loop_fair_timeout
from app.serving.metrics import ServiceMetrics

pytestmark = pytest.mark.anyio

BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


@dataclasses.dataclass
class Collected:
    """The type names of what the cyclic collector had to free while the block ran."""

    objects: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[Collected]:
    """A block with the collector off; on exit, what only it could free (DEBUG_SAVEALL)."""
    found = Collected()
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.objects = sorted(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


async def _in_tasks(n: int, call: Callable[[], Awaitable[Any]]) -> list[weakref.ref[Any]]:
    """``call()`` in ``n`` tasks of their own (as a server runs each request), half one
    after another and half at once; weak references to the finished tasks."""
    tasks: list[asyncio.Task[Any]] = []
    for _ in range(n // 2):
        task = asyncio.ensure_future(call())
        await task
        tasks.append(task)
    concurrent = [asyncio.ensure_future(call()) for _ in range(n - n // 2)]
    await asyncio.gather(*concurrent)
    tasks.extend(concurrent)
    refs = [weakref.ref(t) for t in tasks]
    del tasks, concurrent, task
    for _ in range(3):  # the loop runs the callbacks that the last completions queued
        await asyncio.sleep(0)
    return refs


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_loop_fair_timeout_leaves_nothing_for_the_cyclic_collector() -> None:
    """A call answered in time (the case of every hit) is freed by reference counting
    alone, and so is the task that awaited it."""

    async def answered() -> int:
        return await loop_fair_timeout(5.0, asyncio.sleep(0, 7))

    with cyclic_garbage() as garbage:
        refs = await _in_tasks(40, answered)
        assert [r() for r in refs] == [None] * len(refs)  # freed at once, no collection
    assert garbage.objects == []


# --- Redis, for real ----------------------------------------------------------------------------
def _redis_cache(url: str, **kwargs: Any) -> RedisCache:
    options: dict[str, Any] = {"ttl_seconds": 30, "timeout_seconds": 0.5, "retry_seconds": 0.3}
    return RedisCache(url, metrics=ServiceMetrics(), **(options | kwargs))


@pytest.mark.integration
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_redis_hits_leave_nothing_for_the_cyclic_collector(redis_server: Any) -> None:
    cache = _redis_cache(redis_server.url)
    try:
        assert await cache.set("k", b"[]") is True
        # A warm pool, as in a server that has served a while: opening a connection runs
        # redis-py's handshake, whose refused optional commands leave tracebacks behind.
        await asyncio.gather(*(cache.get("k") for _ in range(30)))
        outcomes: list[str] = []

        async def hit() -> None:
            outcomes.append((await cache.get("k")).outcome)

        with cyclic_garbage() as garbage:
            refs = await _in_tasks(60, hit)
            assert await cache.set("k", b"[]") is True
            assert [r() for r in refs] == [None] * len(refs)
        assert outcomes == ["hit"] * 60
        assert garbage.objects == []
    finally:
        await cache.close()


@pytest.mark.integration
async def test_redis_hits_reuse_warm_nodelay_connections_and_send_no_ping(
    redis_server: Any,
) -> None:
    """Hits after warm-up open no connection, send nothing but GET (no health-check PING)
    and run over sockets with TCP_NODELAY (no Nagle delay behind a delayed ACK)."""
    cache = _redis_cache(redis_server.url)
    try:
        await cache.set("k", b"[]")
        await asyncio.gather(*(cache.get("k") for _ in range(8)))
        with redis_server.client() as admin:
            admin.config_resetstat()
            opened = admin.info("stats")["total_connections_received"]
            for _ in range(5):
                reads = await asyncio.gather(*(cache.get("k") for _ in range(8)))
                assert [r.outcome for r in reads] == ["hit"] * 8
            stats = admin.info("commandstats")
            assert admin.info("stats")["total_connections_received"] == opened
        called = {name.removeprefix("cmdstat_"): s["calls"] for name, s in stats.items()}
        called.pop("config|resetstat", None)
        called.pop("info", None)
        assert called == {"get": 40}
        pool = cache.client.connection_pool
        connections = [*pool._available_connections, *pool._in_use_connections]
        assert 1 <= len(connections) <= 8
        for connection in connections:
            assert connection._writer is not None  # connected
            sock = connection._writer.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await cache.close()
