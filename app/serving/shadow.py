"""Shadow scoring: a candidate bundle ranks a sample of live requests in a process of its
own, and its agreement with the variant that answered is exported to Prometheus.

``UNICORN_SHADOW_BUNDLE`` names the bundle. Each serving worker starts one shadow process
(``spawn``, ``nice`` 19: it gets only the CPU the workers leave), which loads, verifies
and warms the bundle as a variant's holder does. After a ``/rank`` answer is built,
``offer`` samples it (``UNICORN_SHADOW_SAMPLE_RATIO``) and sends it down a pipe to that
process, then returns: when ``UNICORN_SHADOW_QUEUE_CAPACITY`` samples are already sent
and not answered, the sample is dropped and counted, never waited for (a few KiB at
most wait in the pipe, so a send never blocks). A slow, failing or dead shadow
therefore never holds or changes an answer, and its Python code never holds the
worker's interpreter lock.

Per sample, the shadow ranks the same request twice:

* on its own retrieval, for the **top-10 overlap**: the share of the served top 10 (or of
  the whole answer when shorter) that the shadow's top 10 also holds;
* on the served items as the candidates, for the **rank correlation**: Spearman's rho of
  the served order and the shadow's order of the same items (those its catalogue knows;
  fewer than two: not recorded).

A thread of the worker reads the process's results into the metrics. The shadow reloads
as the variant ``shadow`` (``POST /admin/reload``, SIGHUP): the process loads the new
bundle between samples and keeps the old one when the new one is refused. A shadow that
is refused at start, or whose process dies, is logged and leaves shadow scoring off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from app.core.errors import BundleError
from app.core.ranking import Ranker, RankQuery
from app.serving.config import Settings
from app.serving.metrics import ServiceMetrics
from app.serving.model_holder import Reloaded, check_reloadable, load_serving_model
from app.serving.pipeline import RankOutcome
from app.serving.variants import SHADOW

logger = logging.getLogger("unicorn.shadow")

TOP = 10
LOG_EVERY = 1000  # a failing shadow logs its 1st, 1001st... failure, not each one
NICE = 19
RELOAD_TIMEOUT_S = 300.0
POLL_S = 0.5  # how often the reader looks whether the process is still alive


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


def agreement(ranker: Ranker, sample: ShadowSample) -> Agreement:
    """The shadow's two rankings of ``sample``."""
    served = sample.served
    own = ranker.rank(replace(sample.query, k=len(served)))
    top = min(TOP, len(served))
    shadow_top = {item.entity_id for item in own.items[:top]}
    overlap = len(shadow_top.intersection(served[:top])) / top
    again = ranker.rank(replace(sample.query, candidates=served, k=len(served)))
    position = {item.entity_id: rank for rank, item in enumerate(again.items)}
    known = [position[e] for e in served if e in position]
    return Agreement(overlap, spearman(known) if len(known) >= 2 else None)


# --- the shadow process -------------------------------------------------------------------
def _load(path: str, options: dict[str, Any]) -> tuple[Ranker, str]:
    _bundle, ranker = load_serving_model(Path(path), Settings(bundle=Path(path), **options))
    return ranker, ranker.model_version


def _exit_with(parent: int) -> None:
    """End this process when its worker is gone: a worker killed with SIGKILL (OOM, a
    supervisor's restart) leaves no shadow behind it holding a bundle in memory."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="unicorn-shadow-parent", daemon=True).start()


def _receive(jobs: Connection) -> Any:
    try:
        return jobs.recv()
    except (EOFError, OSError):  # the worker is gone
        return None


def serve_samples(
    path: str, options: dict[str, Any], jobs: Connection, results: Connection, nice: int = NICE
) -> None:
    """The shadow process: load the bundle, then answer each job received on ``jobs`` on
    ``results`` until ``None`` (or the worker's end of the pipe closes). Jobs: a
    ``ShadowSample`` -> ``("scored", variant, overlap, correlation, seconds)`` or
    ``("failed", variant, error)``; ``("reload", path)`` -> ``("reloaded", version)`` or
    ``("refused", message)``."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    _exit_with(os.getppid())
    try:
        ranker, version = _load(path, options)
    except BundleError as exc:
        results.send(("refused", exc.message))
        return
    results.send(("ready", version))
    while (job := _receive(jobs)) is not None:
        if isinstance(job, tuple):  # ("reload", path)
            try:
                ranker, version = _load(job[1], options)
            except BundleError as exc:
                results.send(("refused", exc.message))
            else:
                results.send(("reloaded", version))
            continue
        started = time.perf_counter()
        try:
            result = agreement(ranker, job)
        except Exception as exc:  # a failing shadow is counted, never propagated
            results.send(("failed", job.variant, f"{type(exc).__name__}: {exc}"))
            continue
        seconds = time.perf_counter() - started
        results.send(("scored", job.variant, result.overlap, result.correlation, seconds))


class Shadow:
    """The worker's side of the shadow process: the sampling, the bounded queue to it, a
    thread reading its results into the metrics, and its reload."""

    name = SHADOW

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        draw: Callable[[], float] = random.random,
        target: Callable[..., None] = serve_samples,
    ) -> None:
        assert settings.shadow_bundle is not None
        self.settings = settings
        self.bundle = settings.shadow_bundle
        self.metrics = metrics
        self.sample_ratio = settings.shadow_sample_ratio
        self.draw = draw
        self.up = False  # scoring: loaded and alive
        self.model_version: str | None = None
        self.failures = 0
        self.capacity = settings.shadow_queue_capacity
        # Samples sent and samples answered, each counted by one thread only (the loop,
        # the reader): the difference is what the process holds.
        self.sent = 0
        self.answered = 0
        context = multiprocessing.get_context("spawn")
        # Pipes, not multiprocessing queues: no feeder thread, and no named semaphores for
        # the resource tracker to report as leaked when a worker exits.
        jobs_out, self.jobs = context.Pipe(duplex=False)
        self.results, results_in = context.Pipe(duplex=False)
        self._child_ends = (jobs_out, results_in)
        options = {
            "ort_intra_op_threads": settings.ort_intra_op_threads,
            "ort_inter_op_threads": settings.ort_inter_op_threads,
            "max_retrieved": settings.max_retrieved,
        }
        self.process = context.Process(
            target=target, args=(str(self.bundle), options, jobs_out, results_in),
            name="unicorn-shadow", daemon=True,
        )  # fmt: skip
        self.started = threading.Event()  # set at the first answer: ready, or refused
        self._reload: concurrent.futures.Future[str] | None = None
        self._reload_lock = asyncio.Lock()
        self._reader = threading.Thread(
            target=self._read, name="unicorn-shadow-reader", daemon=True
        )

    def start(self) -> None:
        """Start the process; it loads the bundle while the worker serves (samples offered
        meanwhile wait in the queue)."""
        self.up = True
        self.process.start()
        for end in self._child_ends:  # the child has its own: a dead child reads as EOF
            end.close()
        self._reader.start()

    async def close(self) -> None:
        self.up = False
        with contextlib.suppress(OSError, ValueError):
            self.jobs.send(None)  # samples still sent are only measurements
        await asyncio.to_thread(self.process.join, 5)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 5)
        await asyncio.to_thread(self._reader.join, 5)
        self.jobs.close()
        self.results.close()

    def offer(self, q: RankQuery, outcome: RankOutcome) -> None:
        """Sample an answer for the shadow; never waits (a full queue drops it)."""
        if not self.up or not outcome.items:
            return
        if self.sample_ratio < 1.0 and self.draw() >= self.sample_ratio:
            return
        if self.sent - self.answered >= self.capacity:
            self.metrics.shadow_requests.labels(outcome.variant, "dropped").inc()
            return
        served = tuple(str(item["entity_id"]) for item in outcome.items)
        sample = ShadowSample(replace(q, explain=False), outcome.variant, served)
        try:
            self.jobs.send(sample)
        except (OSError, ValueError):  # the process is gone; the reader turns the shadow off
            self.metrics.shadow_requests.labels(outcome.variant, "dropped").inc()
            return
        self.sent += 1

    async def reload(self, path: Path | None = None) -> Reloaded:
        """Have the process load ``path`` (default: the configured shadow bundle) after the
        samples queued before it; a refused bundle raises ``BundleError`` and the process
        keeps the bundle it had."""
        target = Path(path) if path is not None else self.bundle
        if path is not None:
            check_reloadable(self.settings, self.bundle, target)
        if not self.up:
            raise BundleError("the shadow is not running (refused at start, or died)", "variant")
        async with self._reload_lock:
            started = time.perf_counter()
            previous = self.model_version or ""
            self._reload = concurrent.futures.Future()
            try:
                self.jobs.send(("reload", str(target)))
            except (OSError, ValueError):
                raise BundleError("the shadow process exited", "variant") from None
            try:
                version = await asyncio.wait_for(
                    asyncio.wrap_future(self._reload), RELOAD_TIMEOUT_S
                )
            except BundleError as exc:
                self.metrics.model_reloads.labels("refused").inc()
                logger.error("shadow: model reload from %s refused: %s", target, exc.message)
                raise
            self.metrics.model_reloads.labels("ok").inc()
            logger.warning("shadow: model reloaded: %s -> %s from %s", previous, version, target)
            return Reloaded(
                variant=SHADOW, model_version=version, previous_model_version=previous,
                bundle=str(target), seconds=round(time.perf_counter() - started, 3),
            )  # fmt: skip

    # --- the reader thread ----------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                if not self.results.poll(POLL_S):
                    if self.process.is_alive():
                        continue
                    self._died()
                    return
                message = self.results.recv()
            except (EOFError, OSError, ValueError):
                self._died()
                return
            self._handle(message)  # a refusal at start ends the process: read as its exit

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind in ("scored", "failed"):
            self.answered += 1
        if kind == "scored":
            _, variant, overlap, correlation, seconds = message
            self.metrics.shadow_latency.labels(variant).observe(seconds)
            self.metrics.shadow_requests.labels(variant, "scored").inc()
            self.metrics.shadow_overlap.labels(variant).observe(overlap)
            if correlation is not None:
                self.metrics.shadow_correlation.labels(variant).observe(correlation)
        elif kind == "failed":
            _, variant, error = message
            self.metrics.shadow_requests.labels(variant, "failed").inc()
            if self.failures % LOG_EVERY == 0:
                logger.warning("shadow scoring failed (%d so far): %s", self.failures + 1, error)
            self.failures += 1
        elif kind in ("ready", "reloaded"):
            previous, self.model_version = self.model_version, message[1]
            self.metrics.set_model(SHADOW, message[1], previous)
            if kind == "ready":
                logger.info("shadow: scoring with model %s from %s", message[1], self.bundle)
                self.started.set()
            elif self._reload is not None:
                self._reload.set_result(message[1])
        elif kind == "refused":
            if not self.started.is_set():
                self.up = False
                logger.error("shadow bundle refused, shadow scoring is off: %s", message[1])
                self.started.set()
            elif self._reload is not None:
                self._reload.set_exception(BundleError(message[1], "bundle"))

    def _died(self) -> None:
        if self.up:
            self.up = False
            logger.error(
                "shadow process exited (code %s): shadow scoring is off", self.process.exitcode
            )
        self.started.set()
        if self._reload is not None and not self._reload.done():
            self._reload.set_exception(BundleError("the shadow process exited", "variant"))
