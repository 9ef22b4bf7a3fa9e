"""Shadow scoring: a candidate bundle ranks a sample of live requests off the request path,
and its agreement with the variant that answered is exported to Prometheus.

``UNICORN_SHADOW_BUNDLE`` names the bundle (loaded, verified and warmed like a variant, by
the ``shadow`` holder of ``app.serving.model_holder.Variants``). After a ``/rank`` answer
is built, ``offer`` samples it (``UNICORN_SHADOW_SAMPLE_RATIO``) into a bounded queue and
returns at once: when the queue is full (``UNICORN_SHADOW_QUEUE_CAPACITY``) the sample is
dropped and counted, never waited for. One task takes the samples in turn and ranks each
in a worker thread, so a slow or failing shadow never holds an answer; what it does share
is the worker's CPU (and, for its Python feature code, the interpreter lock), which is why
it samples: docs/BENCHMARKS.md measures the cost.

Per sample, the shadow ranks the same request twice:

* on its own retrieval, for the **top-10 overlap**: the share of the served top 10 (or of
  the whole answer when shorter) that the shadow's top 10 also holds;
* on the served items as the candidates, for the **rank correlation**: Spearman's rho of
  the served order and the shadow's order of the same items (those its catalogue knows;
  fewer than two: not recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from app.core.ranking import RankQuery
from app.serving.metrics import ServiceMetrics
from app.serving.model_holder import ModelHolder
from app.serving.pipeline import RankOutcome

logger = logging.getLogger("unicorn.shadow")

TOP = 10
LOG_EVERY = 1000  # a failing shadow logs its 1st, 1001st... failure, not each one


@dataclass(frozen=True)
class ShadowSample:
    """One answered request, as the shadow re-ranks it."""

    query: RankQuery
    variant: str
    served: tuple[str, ...]  # the answer's entity ids, in order


@dataclass(frozen=True)
class Agreement:
    overlap: float
    correlation: float | None  # None: fewer than two served items known to the shadow


def spearman(served_positions: list[int]) -> float:
    """Spearman's rho of the order 0..n-1 and ``served_positions`` (a permutation of
    0..n-1: where the shadow put the i-th served item)."""
    n = len(served_positions)
    d2 = sum((i - p) ** 2 for i, p in enumerate(served_positions))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def agreement(holder: ModelHolder, sample: ShadowSample) -> Agreement:
    """The shadow's two rankings of ``sample`` (blocking: runs in a worker thread)."""
    ranker = holder.current().ranker
    served = sample.served
    own = ranker.rank(replace(sample.query, k=len(served)))
    top = min(TOP, len(served))
    shadow_top = {item.entity_id for item in own.items[:top]}
    overlap = len(shadow_top.intersection(served[:top])) / top
    again = ranker.rank(replace(sample.query, candidates=served, k=len(served)))
    position = {item.entity_id: rank for rank, item in enumerate(again.items)}
    known = [position[e] for e in served if e in position]
    return Agreement(overlap, spearman(known) if len(known) >= 2 else None)


class Shadow:
    """The bounded queue of samples and the one task that scores them."""

    def __init__(
        self,
        holder: ModelHolder,
        metrics: ServiceMetrics,
        sample_ratio: float,
        capacity: int,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.sample_ratio = sample_ratio
        self.draw = draw
        self.queue: asyncio.Queue[ShadowSample] = asyncio.Queue(capacity)
        self.failures = 0
        self._task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop scoring; samples still queued are dropped (they are only measurements)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def offer(self, q: RankQuery, outcome: RankOutcome) -> None:
        """Sample an answer for the shadow; never waits (a full queue drops it)."""
        if not outcome.items or (self.sample_ratio < 1.0 and self.draw() >= self.sample_ratio):
            return
        served = tuple(str(item["entity_id"]) for item in outcome.items)
        sample = ShadowSample(replace(q, explain=False), outcome.variant, served)
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            self.metrics.shadow_requests.labels(outcome.variant, "dropped").inc()

    async def drain(self) -> None:
        """Wait until every queued sample is scored (benchmarks: the next measurement must
        not share the CPU with this one's samples)."""
        await self.queue.join()

    async def _run(self) -> None:
        while True:
            sample = await self.queue.get()
            try:
                await self._score(sample)
            finally:
                self.queue.task_done()

    async def _score(self, sample: ShadowSample) -> None:
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(agreement, self.holder, sample)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing shadow is counted, never propagated
            self.metrics.shadow_requests.labels(sample.variant, "failed").inc()
            if self.failures % LOG_EVERY == 0:
                logger.warning(
                    "shadow scoring failed (%d so far): %s: %s",
                    self.failures + 1, type(exc).__name__, exc,
                )  # fmt: skip
            self.failures += 1
            return
        variant = sample.variant
        self.metrics.shadow_latency.labels(variant).observe(time.perf_counter() - started)
        self.metrics.shadow_requests.labels(variant, "scored").inc()
        self.metrics.shadow_overlap.labels(variant).observe(result.overlap)
        if result.correlation is not None:
            self.metrics.shadow_correlation.labels(variant).observe(result.correlation)
