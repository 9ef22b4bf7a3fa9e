"""Micro-batching of model inference across concurrent requests (optional).

A queue plus a deadline (after ray serve's ``batching.py``): the first request of a batch
starts a window of ``window_s`` (``time.monotonic()``); requests arriving within it join
until ``max_rows`` candidate rows are reached; then ONE onnxruntime run scores them all
and each caller gets its own slice of the scores, or the exception of the run.

Each request's inputs hold its context once, shape ``(1, ...)``, which the model
broadcasts over that request's ``N`` candidates (see ``app.core.features``). Requests with
different contexts are concatenated by repeating each request's context rows to its
candidate count, so the batched inputs have one context row per candidate, exactly the
layout the model is trained on.

Off by default (``batch_window_ms = 0``): on CPU one request's few hundred rows already
fill onnxruntime's matrix kernels; it is for accelerators or models with a large per-run
overhead. The measurements (on and off, by window and concurrency) are in
docs/BENCHMARKS.md ("micro-batching" and "Serving options").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from app.core.features import CANDIDATE_INPUTS, CONTEXT_INPUTS, one_row_per_candidate

logger = logging.getLogger("unicorn.batching")

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]


class BatchClosed(RuntimeError):
    """The batcher was closed; the caller should score directly."""


def rows_of(inputs: dict[str, np.ndarray]) -> int:
    """Candidate rows of one request's inputs (its context rows must be 1)."""
    rows = int(inputs["target"].shape[0])
    for name in CONTEXT_INPUTS:
        if inputs[name].shape[0] != 1:
            raise ValueError(
                f"{name} must have 1 context row per request, got shape {inputs[name].shape}"
            )
    for name in CANDIDATE_INPUTS:
        if inputs[name].shape[0] != rows:
            raise ValueError(f"{name} has {inputs[name].shape[0]} rows, target has {rows}")
    return rows


def concatenate_requests(requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One model input dict for several requests: context rows repeated per candidate."""
    if len(requests) == 1:
        return requests[0]
    for r in requests:
        rows_of(r)
    return one_row_per_candidate(requests)


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    arrived: float
    future: asyncio.Future[np.ndarray] = field(repr=False)


class MicroBatcher:
    """Collects concurrent ``score`` calls into batches of at most ``max_rows`` rows.

    Batches run one at a time in ``executor`` (``None`` = the loop's default pool), so
    the event loop keeps accepting requests, which queue for the next batch.
    ``on_batch(rows, seconds)`` is called after every run (metrics).
    """

    def __init__(
        self,
        score: Scorer,
        window_s: float,
        max_rows: int,
        executor: Executor | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0 (0 means: do not batch), got {window_s}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._score = score
        self.window_s = window_s
        self.max_rows = max_rows
        self._executor = executor
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the batching task on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="unicorn-micro-batcher"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    async def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Scores of this request's candidates, shape (N,), computed in a shared batch."""
        if self._closed:
            raise BatchClosed("micro-batcher is closed")
        rows = rows_of(inputs)
        if rows > self.max_rows:
            raise ValueError(f"a request of {rows} rows exceeds max_batch_size {self.max_rows}")
        self.start()
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(inputs, rows, time.monotonic(), future))
        return await future

    async def close(self) -> None:
        """Finish what is queued, then stop; later ``score`` calls raise ``BatchClosed``."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is None:
                break
            batch, rows = [first], first.rows
            deadline = first.arrived + self.window_s
            while rows < self.max_rows:
                try:
                    item = await self._next(deadline - time.monotonic())
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if item is None:
                    stopping = True
                    break
                if rows + item.rows > self.max_rows:
                    self._carry = item  # first of the next batch
                    break
                batch.append(item)
                rows += item.rows
            await self._execute(batch, rows)
        if self._carry is not None:
            await self._execute([self._carry], self._carry.rows)
            self._carry = None

    async def _execute(self, batch: list[_Pending], rows: int) -> None:
        live = [p for p in batch if not p.future.done()]  # callers may have gone away
        if not live:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            inputs = concatenate_requests([p.inputs for p in live])
            scores = await loop.run_in_executor(self._executor, self._score, inputs)
            total = sum(p.rows for p in live)
            if scores.shape != (total,):
                raise RuntimeError(
                    f"model returned scores of shape {scores.shape} for a batch of {total} rows"
                )
        except Exception as exc:
            logger.exception("batched inference of %d requests failed", len(live))
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(total, time.perf_counter() - started)
        offset = 0
        for p in live:
            if not p.future.done():
                p.future.set_result(scores[offset : offset + p.rows])
            offset += p.rows
