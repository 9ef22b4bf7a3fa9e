"""Shadow scoring (app/serving/shadow.py) on a real server: agreement metrics that tell an
identical model from a disagreeing one, and a shadow that is blocked, failing or refused
never changes or holds an answer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, LiveServer, copy_bundle, model_version

from app.serving import shadow as shadow_module
from app.serving.config import Settings
from app.serving.shadow import spearman

SHADOW_REQUESTS = "unicorn_shadow_requests_total"
REQUESTS = [
    {"task": "prequery", "k": 10, "personalization": "none"},
    {"task": "search", "query": "st", "k": 10},
    {"task": "search", "query": "a", "country": "US", "k": 10},
    {"task": "prequery", "user_id": "u3", "k": 10, "personalization": "full"},
]


def test_spearman_reads_the_same_order_as_1_and_the_reverse_as_minus_1() -> None:
    assert spearman([0, 1, 2, 3]) == 1.0
    assert spearman([3, 2, 1, 0]) == -1.0
    assert spearman([1, 0, 2, 3]) == pytest.approx(0.8)


@pytest.fixture(scope="module")
def same_scores(tmp_path_factory: pytest.TempPathFactory, fast_bundle: Path) -> Path:
    """Another model version that scores exactly as the fast bundle."""
    return copy_bundle(fast_bundle, tmp_path_factory.mktemp("shadow") / "same", retrained=True)


@pytest.fixture(scope="module")
def reversed_scores(tmp_path_factory: pytest.TempPathFactory, fast_bundle: Path) -> Path:
    """The fast bundle with its dense weights negated: it ranks mostly the other way."""
    import onnx
    from onnx import numpy_helper

    from app.core.bundle import MANIFEST, MODEL_FILE, write_manifest

    target = copy_bundle(fast_bundle, tmp_path_factory.mktemp("shadow") / "reversed")
    model = onnx.load(target / MODEL_FILE)
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == "w":
            negated = numpy_helper.from_array(-numpy_helper.to_array(tensor), "w")
            model.graph.initializer[i].CopyFrom(negated)
    onnx.save(model, target / MODEL_FILE)
    write_manifest(target, json.loads((target / MANIFEST).read_text()))
    return target


def _wait_for(predicate: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Poll until ``predicate`` holds (the shadow works in the background); a deadline
    only turns a hang into a failure, nothing is timed."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _metrics(server: LiveServer) -> str:
    with server.client() as client:
        return client.get("/metrics").text


def _answers(server: LiveServer, requests: list[dict[str, Any]]) -> list[list[Any]]:
    with server.client() as client:
        out = []
        for body in requests:
            response = client.post("/rank", json=body)
            assert response.status_code == 200, response.text
            out.append([(i["entity_id"], i["score"]) for i in response.json()["items"]])
        return out


def _shadow_settings(settings_for: Callable[..., Settings], bundle: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "shadow_bundle": bundle, "shadow_sample_ratio": 1.0, "cache_enabled": False,
        "admin_token": ADMIN_TOKEN,
    }  # fmt: skip
    return settings_for(**(values | kw))


def _agreement(text: str, read: Callable[..., float], name: str) -> tuple[float, float]:
    """(mean, count) of a shadow agreement histogram of the default variant."""
    total = read(text, f"{name}_sum", variant="default")
    count = read(text, f"{name}_count", variant="default")
    return (total / count if count else float("nan")), count


def test_agreement_tells_an_identical_shadow_from_a_disagreeing_one(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    reversed_scores: Path,
    read_metric: Callable[..., float],
) -> None:
    plain = start_server(settings_for(cache_enabled=False))
    expected = _answers(plain, REQUESTS)
    means = {}
    for name, bundle in (("same", same_scores), ("reversed", reversed_scores)):
        server = start_server(_shadow_settings(settings_for, bundle))
        assert _answers(server, REQUESTS) == expected  # the shadow never answers

        def done(server: LiveServer = server) -> bool:
            text = _metrics(server)
            return read_metric(text, SHADOW_REQUESTS, variant="default", outcome="scored") >= 4

        _wait_for(done, f"{name}: 4 samples scored")
        text = _metrics(server)
        overlap = _agreement(text, read_metric, "unicorn_shadow_top10_overlap")
        correlation = _agreement(text, read_metric, "unicorn_shadow_rank_correlation")
        assert overlap[1] == correlation[1] == 4
        means[name] = (overlap[0], correlation[0])
        version = model_version(bundle)
        assert read_metric(text, "unicorn_model_info", variant="shadow", model_version=version) == 1
        with server.client() as client:
            assert client.get("/readyz").json()["variants"]["shadow"] == version
    assert means["same"] == (1.0, 1.0)
    assert means["reversed"][0] < 0.9 and means["reversed"][1] < 0.0, means


@pytest.fixture
def blocked_shadow(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The shadow's scoring waits on an event: a shadow that takes forever."""
    release = threading.Event()
    real = shadow_module.agreement

    def slow(holder: Any, sample: Any) -> Any:
        release.wait(60)
        return real(holder, sample)

    monkeypatch.setattr(shadow_module, "agreement", slow)
    yield release
    release.set()


def test_a_shadow_that_never_finishes_holds_no_answer_and_drops_what_it_cannot_take(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    blocked_shadow: threading.Event,
    read_metric: Callable[..., float],
) -> None:
    expected = _answers(start_server(settings_for(cache_enabled=False)), REQUESTS * 5)
    server = start_server(_shadow_settings(settings_for, same_scores, shadow_queue_capacity=2))
    # 20 answers while the shadow holds its first sample: 1 taken, 2 queued, 17 dropped
    assert _answers(server, REQUESTS * 5) == expected
    text = _metrics(server)
    assert read_metric(text, "unicorn_shadow_requests_total", outcome="dropped") == 17
    assert read_metric(text, "unicorn_shadow_requests_total", outcome="scored") == 0
    blocked_shadow.set()

    def three_scored() -> bool:
        return read_metric(_metrics(server), "unicorn_shadow_requests_total", outcome="scored") == 3

    _wait_for(three_scored, "the held and queued samples scored")


def test_a_failing_shadow_is_counted_and_logged_once_and_answers_are_unchanged(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    read_metric: Callable[..., float],
) -> None:
    def broken(holder: Any, sample: Any) -> Any:
        raise RuntimeError("shadow model exploded")

    expected = _answers(start_server(settings_for(cache_enabled=False)), REQUESTS * 2)
    monkeypatch.setattr(shadow_module, "agreement", broken)
    server = start_server(_shadow_settings(settings_for, same_scores))
    assert _answers(server, REQUESTS * 2) == expected

    def failed_all() -> bool:
        return read_metric(_metrics(server), "unicorn_shadow_requests_total", outcome="failed") == 8

    _wait_for(failed_all, "8 failures counted")
    logged = [r for r in caplog.records if "shadow scoring failed" in r.getMessage()]
    assert len(logged) == 1 and "exploded" in logged[0].getMessage()


def test_a_refused_shadow_bundle_leaves_the_service_serving_without_a_shadow(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    tampered_bundle: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(_shadow_settings(settings_for, tampered_bundle))
    assert server.app.state.served.shadow is None
    assert _answers(server, REQUESTS)
    with server.client() as client:
        assert "shadow" not in client.get("/readyz").json()["variants"]
    assert any("shadow bundle refused" in r.getMessage() for r in caplog.records)


def test_the_shadow_reloads_on_its_own(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    reversed_scores: Path,
    fast_bundle: Path,
) -> None:
    server = start_server(_shadow_settings(settings_for, same_scores))
    with server.client() as client:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        body = {"variant": "shadow", "bundle": str(reversed_scores)}
        done = client.post("/admin/reload", json=body, headers=auth).json()
        assert done["variant"] == "shadow"
        assert done["model_version"] == model_version(reversed_scores)
        assert client.get("/readyz").json()["variants"] == {
            "default": model_version(fast_bundle), "shadow": model_version(reversed_scores),
        }  # fmt: skip


def test_sampling_takes_the_configured_share(
    same_scores: Path, fast_bundle: Path, settings_for: Callable[..., Settings]
) -> None:
    """``offer`` with a seeded draw: about the ratio is queued, nothing when none is
    asked, and an empty answer is never sampled."""
    import asyncio
    import random

    from app.core.context import Context, Personalization, Task
    from app.core.ranking import RankQuery
    from app.serving.metrics import ServiceMetrics
    from app.serving.pipeline import RankOutcome
    from app.serving.shadow import Shadow

    ctx = Context(Task.PREQUERY, "", "", "", "", False)
    outcome = RankOutcome(
        [{"entity_id": "v1", "score": 0.5}], ctx, "default", "m", Personalization.NONE, "miss",
        [], 1,
    )  # fmt: skip

    async def queued(ratio: float, answer: RankOutcome) -> int:
        shadow = Shadow(None, ServiceMetrics(), ratio, 10_000, random.Random(7).random)  # type: ignore[arg-type]
        for _ in range(2000):
            shadow.offer(RankQuery(task="prequery"), answer)
        return shadow.queue.qsize()

    assert 150 < asyncio.run(queued(0.1, outcome)) < 250
    assert asyncio.run(queued(0.0, outcome)) == 0
    assert asyncio.run(queued(1.0, outcome)) == 2000
    empty = RankOutcome([], ctx, "default", "m", Personalization.NONE, "miss", [], 0)
    assert asyncio.run(queued(1.0, empty)) == 0
