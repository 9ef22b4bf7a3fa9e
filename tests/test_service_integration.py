"""The service with real parts: uvicorn servers (threads and processes) and a real
redis-server that the tests kill, restart and pause. Marked ``integration``; the tests
that start server processes are also ``slow``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.serving.config import Settings

pytestmark = pytest.mark.integration

ADMIN = "integration-admin-token-42"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
REQUEST = {"task": "search", "query": "the", "k": 5, "country": "US"}


def _version(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["model_version"])


def _rank(client: httpx.Client, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = client.post("/rank", json=body or REQUEST)
    assert response.status_code == 200, response.text
    return response.json()


# --- Redis shared by replicas ---------------------------------------------------------------
def test_second_identical_request_hits_across_two_instances(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    redis_server: Any,
) -> None:
    a = start_server(settings_for(redis_url=redis_server.url))
    b = start_server(settings_for(redis_url=redis_server.url))
    with a.client() as ca, b.client() as cb:
        first, second = _rank(ca), _rank(cb)
        assert (first["cache"], second["cache"]) == ("miss", "hit")
        assert first["items"] == second["items"]
        assert cb.get("/readyz").json()["cache"] == "ok"
    assert redis_server.dbsize() == 1


def test_full_results_are_never_shared_between_users(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    redis_server: Any,
) -> None:
    server = start_server(settings_for(redis_url=redis_server.url))
    with server.client() as client:
        body = {"task": "prequery", "personalization": "full", "k": 10}
        alice = _rank(client, {**body, "user_id": "alice"})
        bob = _rank(client, {**body, "user_id": "bob"})
        again = _rank(client, {**body, "user_id": "alice"})
    assert [r["cache"] for r in (alice, bob, again)] == ["bypass", "bypass", "bypass"]
    assert (alice["context"]["user_id"], bob["context"]["user_id"]) == ("alice", "bob")
    assert redis_server.dbsize() == 0  # nothing per-user was written to the shared cache


def test_redis_killed_then_restarted_degrades_and_recovers(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    redis_server: Any,
    read_metric: Callable[..., float],
) -> None:
    settings = settings_for(redis_url=redis_server.url, cache_retry_seconds=0.3)
    server = start_server(settings)
    with server.client() as client:
        # Redis answers before the kill (a first call on a busy box may time out once:
        # then the breaker waits cache_retry_seconds and probes again).
        deadline = time.monotonic() + 5
        while _rank(client)["cache"] not in ("miss", "hit") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _rank(client)["cache"] == "hit"
        redis_server.kill()
        outcomes = [_rank(client)["cache"] for _ in range(3)]  # every request still succeeds
        assert outcomes == ["bypass"] * 3
        errors = read_metric(client.get("/metrics").text, "unicorn_cache_errors_total",
                             backend="redis")  # fmt: skip
        assert errors >= 1
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["cache"] == "degraded"
        assert read_metric(client.get("/metrics").text, "unicorn_cache_degraded") == 1

        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 5
        seen: list[str] = []
        while time.monotonic() < deadline and seen[-2:] != ["miss", "hit"]:
            time.sleep(0.1)
            seen.append(_rank(client)["cache"])
        assert seen[-2:] == ["miss", "hit"], seen  # recovered without a restart
        assert client.get("/readyz").json()["cache"] == "ok"
        assert read_metric(client.get("/metrics").text, "unicorn_cache_degraded") == 0


def test_paused_redis_is_bypassed_not_waited_for(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    redis_server: Any,
    read_metric: Callable[..., float],
) -> None:
    """Redis accepts the connection but never answers: every request is still scored and
    answered (bypass) well inside the client's 10 s timeout, which it would not be if
    the service waited for Redis; ``test_cache.py`` shows the cut is the cache timeout."""
    settings = settings_for(redis_url=redis_server.url, cache_timeout_ms=50,
                            cache_retry_seconds=0.5)  # fmt: skip
    server = start_server(settings)
    with server.client() as client:
        _rank(client)  # warm: a pooled connection exists
        redis_server.pause()
        try:
            outcomes = [_rank(client, {**REQUEST, "query": "paused redis"})["cache"]
                        for _ in range(3)]  # fmt: skip
            metrics = client.get("/metrics").text
        finally:
            redis_server.resume()
    assert outcomes == ["bypass"] * 3
    assert read_metric(metrics, "unicorn_cache_errors_total", backend="redis", operation="get") >= 1
    assert read_metric(metrics, "unicorn_cache_degraded") == 1


# --- reload ---------------------------------------------------------------------------------
def test_reload_to_a_new_bundle_changes_the_model_version(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    fast_bundle: Path,
    second_bundle: Path,
    read_metric: Callable[..., float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(settings_for(admin_token=ADMIN))
    old, new = _version(fast_bundle), _version(second_bundle)
    with server.client() as client:
        assert _rank(client)["model_version"] == old
        response = client.post("/admin/reload", json={"bundle": str(second_bundle)}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == new
        assert response.json()["previous_model_version"] == old
        body = _rank(client)
        assert body["model_version"] == new and body["cache"] == "miss"
        text = client.get("/metrics").text
        assert read_metric(text, "unicorn_model_info", model_version=new) == 1
        assert read_metric(text, "unicorn_model_info", model_version=old) == 0
        assert read_metric(text, "unicorn_model_reloads_total", result="ok") == 1
        # A bodiless reload goes back to the configured bundle.
        assert client.post("/admin/reload", headers=AUTH).json()["model_version"] == old
    assert ADMIN not in caplog.text  # the token is never logged


def test_a_tampered_bundle_is_refused_and_the_old_model_keeps_serving(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    fast_bundle: Path,
    tampered_bundle: Path,
    read_metric: Callable[..., float],
) -> None:
    server = start_server(settings_for(admin_token=ADMIN))
    with server.client() as client:
        response = client.post("/admin/reload", json={"bundle": str(tampered_bundle)}, headers=AUTH)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "bundle_refused" and error["field"] == "bundle"
        assert "model.onnx" in error["message"] and "sha256" in error["message"]
        assert _rank(client)["model_version"] == _version(fast_bundle)
        assert client.get("/readyz").json()["model_version"] == _version(fast_bundle)
        text = client.get("/metrics").text
        assert read_metric(text, "unicorn_model_reloads_total", result="refused") == 1
        inside = tampered_bundle.parent / "no-such-bundle"
        missing = client.post("/admin/reload", json={"bundle": str(inside)}, headers=AUTH)
        assert missing.status_code == 409 and "does not exist" in missing.json()["error"]["message"]
        # Outside the reload root nothing is read: no answer tells what exists there.
        for elsewhere in ("/no/such/bundle", "/etc", "/proc/self", f"{inside}/../../../../etc"):
            outside = client.post("/admin/reload", json={"bundle": elsewhere}, headers=AUTH)
            assert outside.status_code == 403, elsewhere
            assert outside.json()["error"]["field"] == "bundle"
            assert "reload root" in outside.json()["error"]["message"]
            assert elsewhere not in outside.json()["error"]["message"]
        text = client.get("/metrics").text
        assert read_metric(text, "unicorn_model_reloads_total", result="refused") == 2


def test_admin_needs_the_right_bearer_token_and_is_off_without_one(
    start_server: Callable[[Settings], Any], settings_for: Callable[..., Settings]
) -> None:
    guarded = start_server(settings_for(admin_token=ADMIN))
    with guarded.client() as client:
        missing = client.post("/admin/reload")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["field"] == "authorization"
        basic = client.post("/admin/reload", headers={"Authorization": f"Basic {ADMIN}"})
        assert basic.status_code == 401
        wrong = client.post("/admin/reload", headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    disabled = start_server(settings_for(admin_token=None))
    with disabled.client() as client:
        assert client.post("/admin/reload", headers=AUTH).status_code == 404


# --- processes: serve, SIGHUP, workers, startup failure ------------------------------------------
def _start_process(
    args: list[str], port: int, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNICORN_")}
    env["UNICORN_LOG_LEVEL"] = "WARNING"
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "app.http.server", "--port", str(port), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_healthy(process: subprocess.Popen[str], url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited: {process.stdout.read() if process.stdout else ''}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.mark.slow
def test_sighup_reloads_the_configured_bundle_path(
    fast_bundle: Path, second_bundle: Path, tmp_path: Path, free_port_factory: Callable[[], int]
) -> None:
    current = tmp_path / "current"
    current.symlink_to(fast_bundle)
    port = free_port_factory()
    process = _start_process(["--bundle", str(current)], port)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url)
        assert httpx.get(f"{url}/readyz").json()["model_version"] == _version(fast_bundle)
        current.unlink()
        current.symlink_to(second_bundle)  # a deploy swaps the bundle, then signals
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        version = ""
        while time.monotonic() < deadline and version != _version(second_bundle):
            time.sleep(0.1)
            version = httpx.get(f"{url}/readyz").json()["model_version"]
        assert version == _version(second_bundle)
    finally:
        _stop(process)


@pytest.mark.slow
def test_serve_exits_with_a_clear_message_when_the_bundle_is_refused(
    tampered_bundle: Path, free_port_factory: Callable[[], int]
) -> None:
    process = _start_process(["--bundle", str(tampered_bundle)], free_port_factory())
    output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "cannot start" in output and "sha256 does not match" in output


@pytest.mark.slow
def test_several_workers_share_one_metrics_view(
    fast_bundle: Path,
    free_port_factory: Callable[[], int],
    read_metric: Callable[..., float],
    tmp_path: Path,
) -> None:
    port = free_port_factory()
    metrics_dir = tmp_path / "metrics"
    (metrics_dir).mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale values of a previous run")
    args = ["--bundle", str(fast_bundle), "--workers", "2"]
    process = _start_process(args, port, {"UNICORN_METRICS_DIR": str(metrics_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, timeout=90)
        # New connections are spread over the workers by the kernel.
        for i in range(8):
            response = httpx.post(f"{url}/rank", json={"task": "prequery", "k": 1 + i})
            assert response.status_code == 200
        text = httpx.get(f"{url}/metrics").text
        assert read_metric(text, "unicorn_responses_total", route="/rank", status="200") == 8
        # Both workers write their own files there; the stale file was removed at start.
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2
        assert not (metrics_dir / "counter_1.db").exists()
    finally:
        _stop(process)
