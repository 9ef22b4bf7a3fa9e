"""Shadow scoring (app/serving/shadow.py) on a real server with a real shadow process:
agreement metrics that tell an identical model from a disagreeing one, and a shadow that
is frozen, killed, failing or refused never changes or holds an answer."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, LiveServer, copy_bundle, model_version

from app.serving.config import Settings
from app.serving.shadow import spearman
from loadtest.processes import wait_until

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

        wait_until(done, 30)
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


def _shadow_of(server: LiveServer) -> Any:
    shadow = server.app.state.served.shadow
    assert shadow is not None
    wait_until(lambda: shadow.model_version is not None, 30)
    return shadow


def test_a_stopped_shadow_holds_no_answer_and_drops_what_its_queue_cannot_take(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    read_metric: Callable[..., float],
) -> None:
    """The shadow process frozen (SIGSTOP: a shadow that takes forever): 20 answers, all
    as without a shadow; 2 samples wait in the queue, 18 are dropped; once it runs again
    (SIGCONT) it scores the 2."""
    expected = _answers(start_server(settings_for(cache_enabled=False)), REQUESTS * 5)
    server = start_server(_shadow_settings(settings_for, same_scores, shadow_queue_capacity=2))
    shadow = _shadow_of(server)
    os.kill(shadow.process.pid, signal.SIGSTOP)
    try:
        assert _answers(server, REQUESTS * 5) == expected
        text = _metrics(server)
        assert read_metric(text, SHADOW_REQUESTS, outcome="dropped") == 18
        assert read_metric(text, SHADOW_REQUESTS, outcome="scored") == 0
    finally:
        os.kill(shadow.process.pid, signal.SIGCONT)

    def two_scored() -> bool:
        return read_metric(_metrics(server), SHADOW_REQUESTS, outcome="scored") == 2

    wait_until(two_scored, 30)


def test_a_shadow_process_that_dies_turns_shadow_scoring_off_and_answers_are_unchanged(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    same_scores: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = _answers(start_server(settings_for(cache_enabled=False)), REQUESTS * 2)
    server = start_server(_shadow_settings(settings_for, same_scores))
    shadow = _shadow_of(server)
    os.kill(shadow.process.pid, signal.SIGKILL)
    wait_until(lambda: not shadow.up, 30)
    assert _answers(server, REQUESTS * 2) == expected
    with server.client() as client:
        assert "shadow" not in client.get("/readyz").json()["variants"]
        reload = client.post(
            "/admin/reload", json={"variant": "shadow"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )  # fmt: skip
        assert reload.status_code == 409 and "not running" in reload.json()["error"]["message"]
    assert any("shadow process exited" in r.getMessage() for r in caplog.records)


def test_a_sample_the_shadow_fails_on_is_counted_and_logged_once(
    fast_bundle: Path, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The shadow process's loop, run here: a sample its ranker raises on is answered
    ``failed``, the next one is scored; the worker counts 8 failures and logs one line."""
    import multiprocessing

    from app.core.context import Personalization
    from app.core.ranking import RankQuery
    from app.serving.metrics import ServiceMetrics
    from app.serving.shadow import Shadow, ShadowSample, serve_samples

    jobs, to_shadow = multiprocessing.Pipe(duplex=False)
    from_shadow, results = multiprocessing.Pipe(duplex=False)
    for sample in (
        ShadowSample(RankQuery(task="search", query=""), "default", ("v1", "v2")),  # no query
        ShadowSample(RankQuery(task="prequery", personalization=Personalization.NONE),
                     "default", ("v1", "v2", "v3")),
        None,
    ):  # fmt: skip
        to_shadow.send(sample)
    serve_samples(str(fast_bundle), {}, jobs, results, nice=0)
    answers = []
    while from_shadow.poll():
        answers.append(from_shadow.recv())
    assert [a[0] for a in answers] == ["ready", "failed", "scored"], answers
    assert "query" in answers[1][2]

    metrics = ServiceMetrics()
    shadow = Shadow(settings_for(shadow_bundle=fast_bundle), metrics)
    for _ in range(8):
        shadow._handle(answers[1])
    get = metrics.registry.get_sample_value
    assert get("unicorn_shadow_requests_total", {"variant": "default", "outcome": "failed"}) == 8
    logged = [r for r in caplog.records if "shadow scoring failed" in r.getMessage()]
    assert len(logged) == 1


def test_a_refused_shadow_bundle_leaves_the_service_serving_without_a_shadow(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    tampered_bundle: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(_shadow_settings(settings_for, tampered_bundle))
    shadow = server.app.state.served.shadow
    wait_until(lambda: shadow.started.is_set(), 30)
    assert not shadow.up and shadow.model_version is None
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
    _shadow_of(server)
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
    same_scores: Path, settings_for: Callable[..., Settings]
) -> None:
    """``offer`` with a seeded draw: about the ratio is sent, nothing when none is
    asked, an empty answer is never sampled, and no more than the capacity is held."""
    import random
    from types import SimpleNamespace

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

    def queued(ratio: float, answer: RankOutcome, capacity: int = 10_000) -> int:
        settings = settings_for(
            shadow_bundle=same_scores, shadow_sample_ratio=ratio, shadow_queue_capacity=capacity
        )
        shadow = Shadow(settings, ServiceMetrics(), random.Random(7).random)
        shadow.up = True
        sent: list[Any] = []
        shadow.jobs = SimpleNamespace(send=sent.append)  # type: ignore[assignment]  # no process
        for _ in range(2000):
            shadow.offer(RankQuery(task="prequery"), answer)
        assert shadow.sent == len(sent)
        return len(sent)

    assert 150 < queued(0.1, outcome) < 250
    assert queued(0.0, outcome) == 0
    assert queued(1.0, outcome) == 2000
    empty = RankOutcome([], ctx, "default", "m", Personalization.NONE, "miss", [], 0)
    assert queued(1.0, empty) == 0
    assert queued(1.0, outcome, capacity=5) == 5  # nothing answered: 5 held, 1995 dropped


def test_each_worker_has_a_shadow_that_dies_with_it(fast_bundle: Path, tmp_path: Path) -> None:
    """``unicorn serve`` with 2 workers: a shadow process under each, scoring for both
    (the metrics add up the workers); a worker killed with SIGKILL takes its shadow with
    it, the supervisor's new worker starts its own, and stopping leaves none."""
    import httpx
    import psutil

    from loadtest.processes import ServiceProcess, metric

    settings = {"bundle": fast_bundle, "workers": 2, "shadow_bundle": fast_bundle,
                "shadow_sample_ratio": 1.0, "cache_enabled": False}  # fmt: skip
    server = ServiceProcess(settings, log_path=tmp_path / "server.log").start()
    first: set[int] = set()
    later: set[int] = set()

    def shadows() -> list[psutil.Process]:
        return [
            c for w in server.worker_processes() for c in w.children()
            if any("spawn_main" in a for a in c.cmdline()) and c.nice() == 19
        ]  # fmt: skip

    try:
        wait_until(lambda: len(shadows()) == 2, 60)
        first = {p.pid for p in shadows()}

        def scored() -> float:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for body in REQUESTS:
                    assert client.post("/rank", json=body).status_code == 200
            text = server.metrics()
            return metric(text, SHADOW_REQUESTS, variant="default", outcome="scored")

        wait_until(lambda: scored() >= 8, 60, poll_s=0.2)
        victim = server.worker_processes()[0]
        (its_shadow,) = [c for c in victim.children() if c.pid in first]
        victim.kill()
        wait_until(lambda: _gone(its_shadow.pid), 30)
        wait_until(lambda: len(shadows()) == 2 and {p.pid for p in shadows()} != first, 120)
        later = {p.pid for p in shadows()}
    finally:
        server.stop()
    wait_until(lambda: all(_gone(pid) for pid in first | later), 30)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_clean_shutdown_writes_only_json_lines(fast_bundle: Path, tmp_path: Path) -> None:
    """``unicorn serve`` with a shadow, stopped: the shadow's queues are released, so
    multiprocessing's resource tracker prints no "leaked semaphore" warning (a non-JSON
    line in the log) and every line of the log is JSON."""
    import httpx

    from loadtest.processes import ServiceProcess

    settings = {"bundle": fast_bundle, "shadow_bundle": fast_bundle, "shadow_sample_ratio": 1.0}
    log = tmp_path / "server.log"
    server = ServiceProcess(settings, log_path=log).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.post("/rank", json=REQUESTS[0]).status_code == 200
    finally:
        server.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and "leaked" not in log.read_text()
    for line in lines:
        json.loads(line)
