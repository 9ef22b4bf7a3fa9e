"""What a browser frontend needs from a real server (docs/API.md, "Browsers"): CORS off by
default and exact when configured (preflights, answers and errors), gzip for large answers
and /metrics only when the client accepts it and above the threshold, /docs without a CDN,
and ``unicorn serve --help`` naming each option's default and variable."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable

import httpx
import pytest
from conftest import LiveServer

from app.http.server import SERVE_OPTIONS
from app.serving.config import Settings
from model_export.cli import build_parser

APP = "https://app.example.com"
PREFLIGHT = {
    "origin": APP,
    "access-control-request-method": "POST",
    "access-control-request-headers": "content-type",
}
SMALL = {"task": "search", "query": "sta", "country": "US", "k": 3}
LARGE = {**SMALL, "k": 10, "explain": True}  # ~20 KB of explanation


def test_cors_is_off_by_default(live_server: LiveServer) -> None:
    with live_server.client() as client:
        preflight = client.options("/rank", headers=PREFLIGHT)
        answer = client.post("/rank", json=SMALL, headers={"origin": APP})
    assert "access-control-allow-origin" not in preflight.headers
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_cors_answers_configured_origins_only(
    start_server: Callable[[Settings], LiveServer], settings_for: Callable[..., Settings]
) -> None:
    server = start_server(settings_for(cors_origins=f"{APP}, https://other.example.com"))
    with server.client() as client:
        ok = client.options("/rank", headers=PREFLIGHT)
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == APP
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert ok.headers["access-control-max-age"] == "600"
        refused = client.options("/rank", headers={**PREFLIGHT, "origin": "https://evil.example"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        answer = client.post("/rank", json=SMALL, headers={"origin": APP})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
        error = client.post("/rank", json={"task": "nope"}, headers={"origin": APP})
        assert error.status_code == 422 and error.headers["access-control-allow-origin"] == APP


@pytest.mark.parametrize("bad", ["app.example.com", "https://app.example.com/", "ftp://x"])
def test_cors_origins_must_be_what_a_browser_sends(
    settings_for: Callable[..., Settings], bad: str
) -> None:
    with pytest.raises(ValueError, match="cors_origins"):
        settings_for(cors_origins=bad)


def raw_post(
    client: httpx.Client, path: str, body: dict[str, object], **headers: str
) -> httpx.Response:
    """The response as sent, undecoded (httpx would gunzip it for us)."""
    with client.stream("POST", path, json=body, headers=headers) as response:
        response.raw = b"".join(response.iter_raw())  # type: ignore[attr-defined]
    return response


def test_large_answers_are_gzipped_when_accepted_small_ones_never(
    start_server: Callable[[Settings], LiveServer], settings_for: Callable[..., Settings]
) -> None:
    server = start_server(settings_for(gzip_min_bytes=4096))
    with server.client() as client:
        large = raw_post(client, "/rank", LARGE, **{"accept-encoding": "gzip"})
        small = raw_post(client, "/rank", SMALL, **{"accept-encoding": "gzip"})
        plain = raw_post(client, "/rank", LARGE, **{"accept-encoding": "identity"})
        metrics = client.get("/metrics", headers={"accept-encoding": "gzip"})
    raw = large.raw  # type: ignore[attr-defined]
    assert large.headers["content-encoding"] == "gzip"
    body = json.loads(gzip.decompress(raw))
    assert len(body["explain"]) == 10 and len(raw) < len(plain.raw) / 3  # type: ignore[attr-defined]
    assert "content-encoding" not in small.headers
    assert "content-encoding" not in plain.headers
    assert json.loads(plain.raw)["items"] == body["items"]  # type: ignore[attr-defined]
    assert metrics.headers["content-encoding"] == "gzip"
    assert "unicorn_responses_total" in metrics.text


def test_answers_are_not_compressed_by_default_but_metrics_are(live_server: LiveServer) -> None:
    with live_server.client() as client:
        large = raw_post(client, "/rank", LARGE, **{"accept-encoding": "gzip"})
        metrics = client.get("/metrics", headers={"accept-encoding": "gzip"})
        plain_metrics = client.get("/metrics", headers={"accept-encoding": "identity"})
    assert large.status_code == 200 and "content-encoding" not in large.headers
    assert metrics.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain_metrics.headers
    assert "unicorn_responses_total" in plain_metrics.text


def test_docs_load_their_assets_from_the_service_not_a_cdn(live_server: LiveServer) -> None:
    with live_server.client() as client:
        page = client.get("/docs")
        assets = [client.get(f"/docs/assets/{name}") for name in ("swagger-ui-bundle.js",
                                                                  "swagger-ui.css")]  # fmt: skip
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text and "http" not in page.text.split("<body>")[1].split("url:")[0]
    assert all(a.status_code == 200 and len(a.content) > 10_000 for a in assets)


def test_serve_help_names_each_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, field, _, _ in SERVE_OPTIONS:
        assert f"UNICORN_{field.upper()}" in text, flag
    assert "(default: 8000; env UNICORN_PORT)" in text
    assert "(default: on; env UNICORN_EXPLAIN)" in text
