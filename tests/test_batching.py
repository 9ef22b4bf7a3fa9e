"""Micro-batching: concatenation matches per-request scoring on the real model; the
batcher groups concurrent calls, honours the row cap and the deadline, and hands every
caller its own slice or the exception."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.core.bundle import Bundle, load_bundle
from app.core.context import Personalization
from app.core.errors import BundleError
from app.core.ranking import Ranker, RankQuery
from app.serving.batching import BatchClosed, MicroBatcher, concatenate_requests, rows_of
from app.serving.model_holder import check_batched_scoring

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ranker(tiny_bundle: Path) -> Ranker:
    return Ranker(load_bundle(tiny_bundle))


def _inputs(ranker: Ranker) -> list[dict[str, np.ndarray]]:
    bundle: Bundle = ranker.bundle
    video = str(bundle.catalogue.entity_id[np.flatnonzero(bundle.catalogue.rankable)[5]])
    user = str(bundle.tables.user_ids[np.flatnonzero(bundle.tables.user_cluster > 0)[0]])
    queries = [
        RankQuery(task="search", query="the", personalization=Personalization.NONE),
        RankQuery(task="prequery", user_id=user, personalization=Personalization.FULL),
        RankQuery(task="more_like_this", source_entity_id=video, user_id=user),
    ]
    return [ranker.prepare(q).inputs for q in queries]


def _fake_inputs(rows: int, value: float) -> dict[str, np.ndarray]:
    return {
        "ctx_cat": np.zeros((1, 4), np.int64),
        "ctx_source": np.zeros(1, np.int64),
        "ctx_tokens": np.zeros((1, 8), np.int64),
        "user_vec": np.zeros((1, 2), np.float32),
        "target": np.full(rows, value, np.int64),
        "item_vec": np.zeros((rows, 2), np.float32),
        "dense": np.full((rows, 3), value, np.float32),
    }


def test_concatenated_requests_score_like_separate_requests(ranker: Ranker) -> None:
    requests = _inputs(ranker)
    separate = [ranker.bundle.scorer.score(r) for r in requests]
    batched = concatenate_requests(requests)
    assert batched["ctx_cat"].shape[0] == sum(len(s) for s in separate)
    scores = ranker.bundle.scorer.score(batched)
    np.testing.assert_allclose(scores, np.concatenate(separate), atol=1e-6)


def test_rows_of_checks_the_layout() -> None:
    assert rows_of(_fake_inputs(3, 1.0)) == 3
    bad = _fake_inputs(3, 1.0)
    bad["ctx_cat"] = np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match=r"ctx_cat must have 1 context row per request"):
        rows_of(bad)
    bad = _fake_inputs(3, 1.0)
    bad["dense"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="dense has 2 rows, target has 3"):
        rows_of(bad)


def _echo(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["dense"][:, 0].copy()


async def test_concurrent_calls_share_one_run_and_get_their_own_slice() -> None:
    runs: list[int] = []
    batcher = MicroBatcher(
        _echo, window_s=0.05, max_rows=100, on_batch=lambda n, _s: runs.append(n)
    )
    results = await asyncio.gather(*[batcher.score(_fake_inputs(n, float(n))) for n in (1, 2, 3)])
    await batcher.close()
    assert runs == [6]
    for n, scores in zip((1, 2, 3), results, strict=True):
        np.testing.assert_array_equal(scores, np.full(n, float(n)))


async def test_batches_never_exceed_max_rows() -> None:
    runs: list[int] = []
    batcher = MicroBatcher(_echo, window_s=0.05, max_rows=5, on_batch=lambda n, _s: runs.append(n))
    results = await asyncio.gather(*[batcher.score(_fake_inputs(2, float(i))) for i in range(5)])
    await batcher.close()
    assert max(runs) <= 5 and sum(runs) == 10 and len(runs) == 3
    assert [float(r[0]) for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="a request of 6 rows exceeds max_batch_size 5"):
        await MicroBatcher(_echo, window_s=0.01, max_rows=5).score(_fake_inputs(6, 0.0))


async def test_a_lone_request_waits_at_most_the_window() -> None:
    batcher = MicroBatcher(_echo, window_s=0.02, max_rows=100)
    started = time.perf_counter()
    await batcher.score(_fake_inputs(1, 0.0))
    elapsed = time.perf_counter() - started
    await batcher.close()
    assert 0.015 <= elapsed < 0.2


async def test_every_caller_gets_the_exception_of_a_failed_run() -> None:
    def broken(_inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise RuntimeError("onnxruntime exploded")

    batcher = MicroBatcher(broken, window_s=0.02, max_rows=100)
    results = await asyncio.gather(
        *[batcher.score(_fake_inputs(2, 0.0)) for _ in range(3)], return_exceptions=True
    )
    await batcher.close()
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


async def test_a_wrong_sized_result_is_an_error_not_a_wrong_slice() -> None:
    batcher = MicroBatcher(lambda i: np.zeros(1, np.float32), window_s=0.02, max_rows=100)
    results = await asyncio.gather(
        batcher.score(_fake_inputs(2, 0.0)), batcher.score(_fake_inputs(3, 0.0)),
        return_exceptions=True,
    )  # fmt: skip
    await batcher.close()
    assert all(isinstance(r, RuntimeError) and "shape (1,)" in str(r) for r in results)


async def test_close_finishes_queued_work_then_refuses() -> None:
    seen_threads: set[str] = set()

    def score(inputs: dict[str, np.ndarray]) -> np.ndarray:
        seen_threads.add(threading.current_thread().name)
        return _echo(inputs)

    batcher = MicroBatcher(score, window_s=0.05, max_rows=100)
    pending = asyncio.ensure_future(batcher.score(_fake_inputs(2, 7.0)))
    await asyncio.sleep(0)
    await batcher.close()
    np.testing.assert_array_equal(await pending, [7.0, 7.0])
    assert threading.main_thread().name not in seen_threads  # inference ran off the loop
    with pytest.raises(BatchClosed):
        await batcher.score(_fake_inputs(1, 0.0))


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="window_s must be > 0"):
        MicroBatcher(_echo, window_s=0, max_rows=1)
    with pytest.raises(ValueError, match="max_rows must be >= 1, got 0"):
        MicroBatcher(_echo, window_s=0.1, max_rows=0)


def test_a_model_that_batches_differently_is_refused_for_micro_batching(ranker: Ranker) -> None:
    check_batched_scoring(ranker)  # the real model: batched == separate
    real_score = ranker.bundle.scorer.score

    def broadcast_only(inputs: dict[str, np.ndarray]) -> np.ndarray:
        scores = real_score(inputs)
        return scores + 0.1 if inputs["ctx_cat"].shape[0] > 1 else scores

    ranker.bundle.scorer.score = broadcast_only  # type: ignore[method-assign]
    try:
        with pytest.raises(BundleError, match="scores micro-batched requests differently"):
            check_batched_scoring(ranker)
    finally:
        ranker.bundle.scorer.score = real_score  # type: ignore[method-assign]
