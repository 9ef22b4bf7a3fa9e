"""Faults under continuous load, with real processes: a real redis-server that is down at
start, killed, restarted and stalled (SIGSTOP, ``DEBUG SLEEP``); model reloads between two
models that score differently; damaged bundles at reload and at start; a killed worker;
load above capacity. Every load is ``loadtest.open_loop.LoadRunner`` (open loop, a fixed
rate of mixed ``/rank`` requests), so "zero failed requests" means every request sent
while the fault was on got a 200 (and, where it says so, the right answer).

Bounds are generous and derived from the settings the test chooses (the machine is a
shared 2-core box); each one is still far below what the fault would cost without the
mechanism under test (a stall lasts seconds, an unbounded queue grows for seconds).
``docs/RELIABILITY.md`` has the longer, documented runs (``python -m loadtest.faults``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.http.protocol import DOOR_LOG_WINDOW_S
from app.serving.config import Settings
from loadtest.faults import (
    damaged_bundles,
    handling_ms,
    logged,
    one_model_check,
    reference_answers,
    shift_model_scores,
)
from loadtest.open_loop import LoadRunner, Sample, summarise
from loadtest.processes import ServiceProcess, metric, wait_until
from loadtest.request_bodies import mixed_bodies

pytestmark = pytest.mark.integration

RATE = 40.0  # requests/s: well below what a test server serves on a busy 2-core box
RETRY_S = 0.3  # cache_retry_seconds of these tests: the breaker probes often
RECOVERY_S = 10.0  # generous: recovery needs one breaker period (RETRY_S) after the fault
ADMIN = "faults-test-admin-token-42"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _version(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["model_version"])


def _bodies(url: str, n: int = 60) -> list[dict[str, Any]]:
    sample = httpx.get(f"{url}/catalogue/sample", params={"n": 40, "seed": 3}).json()
    return mixed_bodies(sample, n, seed=3)


def _cache_state(client: httpx.Client) -> str:
    return str(client.get("/readyz").json()["cache"])


def _burst(url: str, bodies: list[dict[str, Any]], n: int = 8) -> None:
    """``n`` concurrent requests: the server then holds several pooled Redis connections."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            responses = await asyncio.gather(
                *(client.post("/rank", json={**b, "k": 7}) for b in bodies[:n])
            )
        return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * n


def _hit_since(load: LoadRunner, since: float) -> bool:
    return any(s.cache == "hit" and s.at >= since for s in list(load.samples))


def _no_failures(samples: list[Sample]) -> None:
    window = summarise(samples)
    assert window.sent > 0 and window.failed == 0, window.problems


@pytest.fixture
def server_for(
    start_server: Callable[[Settings], Any], settings_for: Callable[..., Settings]
) -> Callable[..., Any]:
    """``server_for(**settings)``: a live uvicorn server (a thread) on the tiny bundle."""
    return lambda **overrides: start_server(settings_for(**overrides))


# --- Redis ----------------------------------------------------------------------------------
def test_redis_down_at_start_serves_every_request_and_recovers_by_itself(
    server_for: Callable[..., Any], redis_server: Any, read_metric: Callable[..., float]
) -> None:
    redis_server.kill()  # nothing listens on its port when the service starts
    server = server_for(redis_url=redis_server.url, cache_retry_seconds=RETRY_S)
    with server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["cache"] == "degraded"
        with LoadRunner(server.url, _bodies(server.url), RATE).running() as load:
            time.sleep(1.0)
            assert _cache_state(client) == "degraded"
            text = client.get("/metrics").text
            restarted = load.now()  # before: every call that ended earlier was scored
            redis_server.start()
            wait_until(lambda: _cache_state(client) == "ok", RECOVERY_S)
            wait_until(lambda: _hit_since(load, restarted), RECOVERY_S)
        samples = load.stop()
        after = client.get("/metrics").text
    assert metric(text, "unicorn_cache_errors_total", backend="redis") >= 1
    assert read_metric(text, "unicorn_cache_degraded") == 1
    assert read_metric(after, "unicorn_cache_degraded") == 0
    _no_failures(samples)
    assert {s.cache for s in samples if s.at + s.latency < restarted} == {"bypass"}


def test_redis_killed_under_load_fails_no_request_and_recovers_in_one_breaker_period(
    server_for: Callable[..., Any], redis_server: Any
) -> None:
    """After Redis comes back, the connections pooled before it died are dead: none of
    them may fail a request (and re-open the breaker for another period)."""
    server = server_for(redis_url=redis_server.url, cache_retry_seconds=RETRY_S)
    bodies = _bodies(server.url)
    _burst(server.url, bodies)  # several pooled connections, all about to go stale
    with server.client() as client, LoadRunner(server.url, bodies, RATE).running() as load:
        time.sleep(0.5)
        redis_server.kill()
        wait_until(lambda: _cache_state(client) == "degraded", RECOVERY_S)
        time.sleep(2 * RETRY_S)  # the breaker probes a dead Redis, and stays open
        redis_server.start()
        restarted = load.now()
        errors_at_restart = metric(client.get("/metrics").text, "unicorn_cache_errors_total")
        wait_until(lambda: _cache_state(client) == "ok", RECOVERY_S)
        wait_until(lambda: _hit_since(load, restarted), RECOVERY_S)
        _burst(server.url, bodies[8:])  # concurrency takes the older pooled connections
        time.sleep(0.3)
        errors_after = metric(client.get("/metrics").text, "unicorn_cache_errors_total")
        assert _cache_state(client) == "ok"
    _no_failures(load.stop())
    assert errors_at_restart >= 1
    assert errors_after == errors_at_restart, "a stale pooled connection failed after recovery"


@pytest.mark.parametrize("stall", ["sigstop", "debug_sleep"])
def test_a_stalled_redis_costs_at_most_the_cache_timeout_under_load(
    server_for: Callable[..., Any],
    redis_server: Any,
    stall: str,
) -> None:
    timeout_s, stall_s = 0.1, 2.5
    server = server_for(
        redis_url=redis_server.url, cache_timeout_ms=timeout_s * 1000, cache_retry_seconds=RETRY_S
    )
    with (
        server.client() as client,
        LoadRunner(server.url, _bodies(server.url), RATE).running() as load,
    ):
        time.sleep(1.0)
        errors_before = metric(client.get("/metrics").text, "unicorn_cache_errors_total")
        stalled = load.now()
        sleeper = None
        if stall == "sigstop":
            redis_server.pause()
        else:
            sleeper = redis_server.debug_sleep(stall_s)  # Redis itself stalls
        try:
            wait_until(lambda: _cache_state(client) == "degraded", stall_s / 2)
            errors_during = metric(client.get("/metrics").text, "unicorn_cache_errors_total")
            time.sleep(max(0.0, stall_s - (load.now() - stalled)))
        finally:
            redis_server.resume()
            if sleeper is not None:
                sleeper.join(stall_s + 10)
        resumed = load.now()
        wait_until(lambda: _cache_state(client) == "ok", RECOVERY_S)
        wait_until(lambda: _hit_since(load, resumed), RECOVERY_S)
    samples = load.stop()
    _no_failures(samples)
    assert errors_during > errors_before  # counted, and /readyz said "degraded"
    before = summarise(samples, 0.2, stalled)
    during = summarise(samples, stalled, resumed)
    # At most ONE cache timeout per request (get, or a set; then the breaker is open),
    # plus scoring as before the stall, plus slack for a noisy box; waiting for the stall
    # itself would take seconds.
    assert during.p99_ms / 1000 <= timeout_s + 2 * before.p99_ms / 1000 + 0.5, (before, during)
    assert during.max_ms / 1000 < stall_s / 2, during


# --- model reload -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with a model that scores every candidate differently."""
    pytest.importorskip("onnx", reason="rewriting a model needs the train extra (onnx)")
    return shift_model_scores(tiny_bundle, tmp_path_factory.mktemp("shifted") / "b")


def test_reloads_under_load_never_fail_a_request_or_mix_model_versions(
    server_for: Callable[..., Any], redis_server: Any, tiny_bundle: Path, shifted_bundle: Path
) -> None:
    """Requests await Redis mid-way (the cache), so a swap can land inside one; every
    answer must still equal, score for score, what the version it names computes."""
    server = server_for(admin_token=ADMIN, redis_url=redis_server.url)
    bodies = _bodies(server.url, n=40)
    versions = {_version(b): b for b in (tiny_bundle, shifted_bundle)}
    references = {v: reference_answers(b, bodies) for v, b in versions.items()}
    assert references[_version(tiny_bundle)][0] != references[_version(shifted_bundle)][0]
    check = one_model_check(references, tolerance=1e-6)
    with (
        server.client() as client,
        LoadRunner(server.url, bodies, RATE, check=check).running() as load,
    ):
        for i in range(6):
            time.sleep(0.3)
            target = shifted_bundle if i % 2 == 0 else tiny_bundle
            response = client.post("/admin/reload", json={"bundle": str(target)}, headers=AUTH)
            assert response.status_code == 200, response.text
        time.sleep(0.3)
    samples = load.stop()
    _no_failures(samples)
    assert {s.model_version for s in samples} == set(versions)


def test_damaged_bundles_are_refused_at_reload_while_the_old_model_serves(
    server_for: Callable[..., Any],
    tiny_bundle: Path,
    tmp_path: Path,
    read_metric: Callable[..., float],
) -> None:
    reasons = {
        "corrupt": "sha256 does not match the manifest",
        "truncated": "onnxruntime cannot load the model",
        "incompatible": "format_version 99 is not supported",
        "bad_manifest": "manifest is not valid JSON",
    }
    server = server_for(admin_token=ADMIN)
    bodies = _bodies(server.url)
    with server.client() as client, LoadRunner(server.url, bodies, RATE).running() as load:
        for kind, path in damaged_bundles(tiny_bundle, tmp_path).items():
            response = client.post("/admin/reload", json={"bundle": str(path)}, headers=AUTH)
            assert response.status_code == 409, (kind, response.text)
            error = response.json()["error"]
            assert error["code"] == "bundle_refused" and reasons[kind] in error["message"], kind
        time.sleep(0.3)
        text = client.get("/metrics").text
    samples = load.stop()
    _no_failures(samples)
    assert {s.model_version for s in samples} == {_version(tiny_bundle)}
    assert read_metric(text, "unicorn_model_reloads_total", result="refused") == len(reasons)


# --- processes ------------------------------------------------------------------------------
def _env(**settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNICORN_")}
    env.update({f"UNICORN_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_exits_non_zero_with_the_reason_on_a_bundle_only_loading_can_refuse(
    tiny_bundle: Path, tmp_path: Path, free_port_factory: Callable[[], int], workers: int
) -> None:
    """A truncated model.onnx whose manifest was re-hashed passes the checksums: the load
    refuses it. With several workers uvicorn's supervisor used to exit 0 on that."""
    truncated = damaged_bundles(tiny_bundle, tmp_path)["truncated"]
    env = _env(bundle=truncated, workers=workers, port=free_port_factory())
    result = subprocess.run(
        [sys.executable, "-m", "app.http.server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot start" in output and str(truncated) in output, output
    assert "onnxruntime cannot load the model" in output, output


def _in_flight_of(metrics_dir: Path, pid: int) -> float:
    """One worker's ``unicorn_in_flight_requests``, read from its own metrics file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    files = [str(p) for p in metrics_dir.glob(f"gauge_livesum_{pid}.db")]
    for family in MultiProcessCollector.merge(files, accumulate=False):
        if family.name == "unicorn_in_flight_requests":
            return sum(s.value for s in family.samples)
    return 0.0


@pytest.fixture
def two_workers(tiny_bundle: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    # A batch window holds each request in the scoring section for a while, so a worker
    # can be killed with requests in flight (its in-flight gauge > 0).
    server = ServiceProcess(
        {"bundle": tiny_bundle, "workers": 2, "batch_window_ms": 150, "log_user_salt": "s"},
        log_path=tmp_path / "server.log",
    )
    try:
        yield server.start()
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_while_the_other_answers_and_metrics_stay_consistent(
    two_workers: ServiceProcess, tiny_bundle: Path
) -> None:
    server = two_workers
    victim = server.worker_pids()[0]
    startups = server.startups()
    with LoadRunner(server.url, _bodies(server.url), RATE).running() as load:
        wait_until(lambda: _in_flight_of(server.metrics_dir, victim) > 0, 30)
        os.kill(victim, signal.SIGKILL)
        killed = load.now()
        wait_until(lambda: server.startups() > startups, 120, poll_s=0.05)
        time.sleep(1.0)
    samples = load.stop()
    # Only requests already on the killed worker may fail: everything sent from just
    # after the kill on is answered (by the survivor, then by both).
    late = summarise(samples, killed + 0.25)
    assert late.sent > 0 and late.failed == 0, late.problems
    failed = summarise(samples).failed
    assert failed <= summarise(samples, killed - 1.0, killed + 0.25).sent
    text = server.metrics()
    received = sum(1 for s in samples if s.status == 200)
    counted = metric(text, "unicorn_responses_total", route="/rank", status="200")
    assert abs(counted - received) <= failed  # the dead worker's counts are kept
    # The dead worker's last in-flight value (> 0) is dropped, not summed forever.
    assert metric(text, "unicorn_in_flight_requests") == 0
    assert metric(text, "unicorn_model_info", model_version=_version(tiny_bundle)) == 1
    assert server.get("/readyz").status_code == 200


def _p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))]


def test_load_above_capacity_is_shed_fast_while_accepted_requests_keep_their_latency(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """Two scoring slots held 20 ms each (a batch window) make a capacity near 100 req/s;
    250 req/s are offered for 2 s, open loop. Without admission control the queue would
    grow by ~150 requests a second (seconds of waiting); with it the excess is refused
    with 503 + Retry-After (at once while the queue ahead is longer than
    ``queue_timeout_ms``, else after waiting that long), and accepted requests take what
    they took below capacity plus at most that wait.

    Checked end to end, at the client (the time a request sat unread counts), and on the
    server's access log (handling time per call, which admission control governs). The
    slack is for the open-loop Python client, which shares the two busy cores.
    """
    queue_s, window_s = 0.03, 0.02
    settings = {
        "bundle": tiny_bundle,
        "cache_enabled": False,
        "max_in_flight": 2,
        "batch_window_ms": window_s * 1000,
        "queue_timeout_ms": queue_s * 1000,
    }
    server = ServiceProcess(settings, log_path=tmp_path / "server.log").start()
    try:
        bodies = _bodies(server.url)
        with LoadRunner(server.url, bodies, 30).running() as base:
            time.sleep(1.5)
        base_samples = base.stop()
        base_ms = handling_ms(server.log())[200]
        with LoadRunner(server.url, bodies, 250, connections=256, timeout_s=60).running() as over:
            time.sleep(2.0)
        samples = over.stop()
        shed_counted = metric(server.metrics(), "unicorn_shed_requests_total")
        # The door's last summary line of refusals follows within DOOR_LOG_WINDOW_S.
        wait_until(lambda: logged(server.log(), 503) >= shed_counted, 5 * DOOR_LOG_WINDOW_S)
        log = server.log()
        handled = handling_ms(log)
    finally:
        server.stop()
    _no_failures(base_samples)
    accepted = [s for s in samples if s.status == 200]
    shed = [s for s in samples if s.shed]
    assert accepted and shed, summarise(samples).problems
    assert len(accepted) + len(shed) == len(samples), summarise(samples).problems
    assert shed_counted == len(shed) == logged(log, 503)
    slack = 0.25  # a noisy shared box
    # End to end, at the client.
    base_p99 = summarise(base_samples, 0.5).p99_ms / 1000
    accepted_p99 = summarise(samples, where=lambda s: s.status == 200).p99_ms / 1000
    shed_p99 = summarise(samples, where=lambda s: s.shed).p99_ms / 1000
    assert accepted_p99 <= base_p99 + queue_s + slack, (base_p99, accepted_p99)
    assert shed_p99 <= queue_s + slack, shed_p99
    # On the server.
    assert _p99(handled[503]) / 1000 <= queue_s + slack, handled[503]
    accepted_ms = handled[200][len(base_ms) :]
    assert _p99(accepted_ms) / 1000 <= queue_s + _p99(base_ms) / 1000 + slack, (
        base_ms,
        accepted_ms,
    )
