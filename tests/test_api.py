"""The HTTP API in-process (httpx ASGITransport, lifespan running) on a real bundle (the
session's ``fast_bundle``: a hand-made model, so no training):
every task, every error case (status AND the field named in the message), unknown
candidates, cold start, k bounds, determinism, the response schema, health, docs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import model_version
from pydantic import SecretStr

from app.core.bundle import Bundle
from app.core.context import NULL_SOURCE, UNKNOWN_COUNTRY, UNKNOWN_USER
from app.http.main import StartupError, create_app
from app.http.schemas import RankResponse
from app.serving.config import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def served(
    fast_bundle: Path, running_app: Callable[[Settings], Any]
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    settings = Settings(bundle=fast_bundle, log_user_salt=SecretStr("test-salt"), admin_token=None)
    async with running_app(settings) as pair:
        yield pair


@pytest.fixture
def client(served: tuple[Any, httpx.AsyncClient]) -> httpx.AsyncClient:
    return served[1]


@pytest.fixture
def bundle(served: tuple[Any, httpx.AsyncClient]) -> Bundle:
    return served[0].state.served.models.choose(None).bundle


def _video(bundle: Bundle, i: int = 0) -> str:
    return str(bundle.catalogue.entity_id[np.flatnonzero(bundle.catalogue.rankable)[i]])


def _page(bundle: Bundle) -> str:
    linked = np.diff(bundle.catalogue.link_indptr) > 0
    return str(bundle.catalogue.entity_id[np.flatnonzero(~bundle.catalogue.rankable & linked)[0]])


def _user(bundle: Bundle, cluster: int | None = None) -> str:
    tables = bundle.tables
    rows = np.flatnonzero(
        tables.user_cluster > 0 if cluster is None else tables.user_cluster == cluster
    )
    return str(tables.user_ids[rows[0]])


async def _rank(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- every task ---------------------------------------------------------------------------
async def test_search_ranks_titles_matching_the_query(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    name = str(bundle.catalogue.display_name[np.flatnonzero(bundle.catalogue.rankable)[0]])
    body = await _rank(client, task="search", query=name, k=5, personalization="none")
    RankResponse.model_validate(body)
    assert body["task"] == "search" and body["personalization"] == "none"
    assert 1 <= len(body["items"]) <= 5
    assert body["items"][0]["name"] == name  # the exact title comes first
    assert body["context"]["source_entity_id"] == NULL_SOURCE
    assert body["context"]["user_id"] == UNKNOWN_USER
    assert body["context"]["country"] == UNKNOWN_COUNTRY
    assert body["model_version"] == bundle.model_version


async def test_prequery_has_neither_query_nor_source(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    body = await _rank(client, task="prequery", user_id=_user(bundle), country="us", k=7)
    assert len(body["items"]) == 7
    assert body["context"]["query"] == "" and body["context"]["source_entity_id"] == NULL_SOURCE
    assert body["context"]["country"] == "US"


async def test_more_like_this_imputes_the_query_from_the_source_name(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    source = _video(bundle)
    body = await _rank(client, task="more_like_this", source_entity_id=source, k=10)
    assert body["context"]["query_imputed"] is True
    assert body["context"]["query"] != ""
    assert source not in [item["entity_id"] for item in body["items"]]  # never itself
    assert len(body["items"]) == 10


async def test_entity_page_ranks_videos(client: httpx.AsyncClient, bundle: Bundle) -> None:
    page = _page(bundle)
    body = await _rank(client, task="entity", source_entity_id=page, k=10)
    assert body["context"]["source_entity_id"] == page and body["context"]["query_imputed"]
    assert {item["entity_type"] for item in body["items"]} <= {"video", "game"}
    linked = set(bundle.catalogue.entity_id[bundle.catalogue.linked(bundle.catalogue.index[page])])
    assert linked & {item["entity_id"] for item in body["items"]}  # its member videos rank


async def test_response_schema_and_json_types(client: httpx.AsyncClient, bundle: Bundle) -> None:
    response = await client.post("/rank", json={"task": "prequery", "k": 20})
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    parsed = RankResponse.model_validate(body)
    assert set(body) == {
        "request_id", "items", "task", "variant", "model_version", "personalization", "cache",
        "context",
        "unknown_candidates",
    }  # fmt: skip
    assert body["request_id"] == response.headers["x-request-id"]  # one id, two places
    assert set(body["items"][0]) == {"entity_id", "score", "name", "entity_type"}
    scores = [item.score for item in parsed.items]
    assert scores == sorted(scores, reverse=True)
    assert all(
        isinstance(item["score"], float) and 0.0 <= item["score"] <= 1.0 for item in body["items"]
    )


async def test_results_are_deterministic(
    served: tuple[Any, httpx.AsyncClient], bundle: Bundle
) -> None:
    """Scored twice (cache bypassed by full personalization) -> identical items."""
    client = served[1]
    request = {"task": "more_like_this", "source_entity_id": _video(bundle, 3), "k": 15,
               "personalization": "full", "user_id": _user(bundle)}  # fmt: skip
    first, second = await _rank(client, **request), await _rank(client, **request)
    assert first["cache"] == second["cache"] == "bypass"
    assert first["items"] == second["items"]


async def test_cache_hit_returns_what_the_miss_scored(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    request = {"task": "search", "query": "deterministic hit check", "k": 9, "country": "GB"}
    first, second = await _rank(client, **request), await _rank(client, **request)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["items"] == second["items"]
    assert first["context"] == second["context"]


async def test_cluster_results_are_shared_inside_a_cluster_with_each_users_context(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    tables = bundle.tables
    cluster = int(np.bincount(tables.user_cluster[tables.user_cluster > 0]).argmax())
    users = tables.user_ids[tables.user_cluster == cluster][:2].tolist()
    a = await _rank(client, task="prequery", user_id=users[0], k=6, country="DE")
    b = await _rank(client, task="prequery", user_id=users[1], k=6, country="DE")
    assert (a["cache"], b["cache"]) == ("miss", "hit")
    assert a["items"] == b["items"]
    assert (a["context"]["user_id"], b["context"]["user_id"]) == (users[0], users[1])


async def test_full_personalization_is_never_cached(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    request = {"task": "prequery", "user_id": _user(bundle), "personalization": "full", "k": 5}
    assert [(await _rank(client, **request))["cache"] for _ in range(2)] == ["bypass", "bypass"]


# --- candidates, cold start, k --------------------------------------------------------------
async def test_unknown_candidates_are_dropped_and_listed(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    known = [_video(bundle, 0), _video(bundle, 1), _video(bundle, 2)]
    candidates = [known[0], "no-such-1", known[1], "no-such-2", known[2], known[0]]
    for expected_cache in ("miss", "hit"):
        body = await _rank(client, task="search", query="a", candidates=candidates, k=10)
        assert body["cache"] == expected_cache
        assert sorted(item["entity_id"] for item in body["items"]) == sorted(known)
        assert body["unknown_candidates"] == ["no-such-1", "no-such-2"]


async def test_candidate_order_does_not_change_the_ranking_or_the_key(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    ids = [_video(bundle, i) for i in range(8)]
    a = await _rank(client, task="prequery", candidates=ids, k=8, personalization="none")
    b = await _rank(client, task="prequery", candidates=ids[::-1], k=8, personalization="none")
    assert b["cache"] == "hit" and a["items"] == b["items"]


async def test_only_unknown_candidates_give_an_empty_list(client: httpx.AsyncClient) -> None:
    body = await _rank(client, task="search", query="x", candidates=["nope-a", "nope-b"])
    assert body["items"] == [] and body["unknown_candidates"] == ["nope-a", "nope-b"]


async def test_cold_start_user_is_served_not_refused(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    for level in ("none", "cluster", "full"):
        body = await _rank(client, task="prequery", user_id="never-seen-user-42",
                           personalization=level, k=5)  # fmt: skip
        assert len(body["items"]) == 5 and body["context"]["user_id"] == "never-seen-user-42"
    # Two cold users share cluster 0, so the second is served from the cache.
    a = await _rank(client, task="search", query="cold", user_id="cold-a", k=4)
    b = await _rank(client, task="search", query="cold", user_id="cold-b", k=4)
    assert (a["cache"], b["cache"]) == ("miss", "hit") and a["items"] == b["items"]


@pytest.mark.parametrize("k", [1, 2, 200])
async def test_k_bounds_are_honoured(client: httpx.AsyncClient, bundle: Bundle, k: int) -> None:
    body = await _rank(client, task="prequery", k=k, personalization="none")
    retrievable = int(bundle.catalogue.rankable.sum())
    assert len(body["items"]) == min(k, retrievable, 300)


# --- errors -------------------------------------------------------------------------------
ERROR_CASES: list[tuple[str, Any, int, str, str]] = [
    # (id, body, status, field, text in the message)
    ("unknown task", {"task": "browse"}, 422, "task", "'search'"),
    ("missing task", {"query": "x"}, 422, "task", "required"),
    ("search without query", {"task": "search"}, 422, "query", "required for task search"),
    ("blank query", {"task": "search", "query": " ?! "}, 422, "query", "required"),
    ("mlt without source", {"task": "more_like_this"}, 422, "source_entity_id", "required"),
    ("entity without source", {"task": "entity", "query": "x"}, 422, "source_entity_id",
     "required"),
    ("unknown source", {"task": "more_like_this", "source_entity_id": "v-none"}, 404,
     "source_entity_id", "not in the catalogue"),
    ("k zero", {"task": "prequery", "k": 0}, 422, "k", "greater than or equal to 1"),
    ("k too big", {"task": "prequery", "k": 201}, 422, "k", "less than or equal to 200"),
    ("k as string", {"task": "prequery", "k": "5"}, 422, "k", "integer"),
    ("k as float", {"task": "prequery", "k": 2.5}, 422, "k", "integer"),
    ("bad level", {"task": "prequery", "personalization": "max"}, 422, "personalization",
     "'cluster'"),
    ("query too long", {"task": "search", "query": "q" * 201}, 422, "query",
     "at most 200 characters"),
    ("too many candidates", {"task": "prequery", "candidates": ["v"] * 1001}, 422,
     "candidates", "at most 1000 ids"),
    ("candidate id too long", {"task": "prequery", "candidates": ["v" * 129]}, 422,
     "candidates[0]", "at most 128"),
    ("empty candidate id", {"task": "prequery", "candidates": [""]}, 422, "candidates[0]",
     "at least 1"),
    ("unknown field", {"task": "prequery", "personalisation": "none"}, 422, "personalisation",
     "Extra inputs are not permitted"),
    ("user id not a string", {"task": "prequery", "user_id": 42}, 422, "user_id",
     "valid string"),
    ("country too long", {"task": "prequery", "country": "C" * 17}, 422, "country",
     "at most 16"),
    ("body is a list", [], 422, "body", "object"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "field", "text"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
async def test_bad_input_gets_4xx_naming_the_field(
    client: httpx.AsyncClient, body: Any, status: int, field: str, text: str
) -> None:
    response = await client.post("/rank", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert field.split("[")[0] in error["message"]
    assert text in error["message"]
    assert error["code"] in {"invalid_request", "not_found"}


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"task": "search", "query": "x"'])
async def test_malformed_json_is_400_naming_the_body(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "malformed_request",
        "message": response.json()["error"]["message"],
        "field": "body",
    }
    assert "JSON" in response.json()["error"]["message"]


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    big = json.dumps({"task": "search", "query": "x", "user_id": "u" * (300 * 1024)}).encode()
    response = await client.post("/rank", content=big)
    assert response.status_code == 413
    metrics = (await client.get("/metrics")).text
    assert 'unicorn_responses_total{route="/rank",status="413"}' in metrics
    assert response.json()["error"]["field"] == "body"
    assert "at most 262144 bytes" in response.json()["error"]["message"]


async def test_oversized_chunked_body_is_413(client: httpx.AsyncClient) -> None:
    """No Content-Length: the limit is enforced while the body streams."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"task": "search", "query": "x", "user_id": "'
        for _ in range(40):
            yield b"u" * 8192
        yield b'"}'

    response = await client.post("/rank", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_unknown_route_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await client.get("/rank")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_admin_is_disabled_without_a_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/admin/reload", headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 404
    assert "disabled" in response.json()["error"]["message"]


# --- health, metrics, sample, docs ------------------------------------------------------------
async def test_health_and_readiness(client: httpx.AsyncClient, bundle: Bundle) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": bundle.model_version,
                            "variants": {"default": bundle.model_version},
                            "cache": "ok", "cache_backend": "memory"}  # fmt: skip


async def test_readiness_is_503_before_the_model_is_loaded(fast_bundle: Path) -> None:
    app = create_app(Settings(bundle=fast_bundle))  # lifespan NOT run: no model
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://unicorn") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        rank = await client.post("/rank", json={"task": "prequery"})
        assert rank.status_code == 503 and rank.json()["error"]["code"] == "model_unavailable"


async def test_startup_fails_with_a_clear_message_when_the_bundle_is_bad(
    tmp_path: Path, tampered_bundle: Path
) -> None:
    for path, reason in ((tmp_path / "missing", "does not exist"), (tampered_bundle, "sha256")):
        app = create_app(Settings(bundle=path))
        with pytest.raises(StartupError, match=reason) as info:
            async with app.router.lifespan_context(app):
                pass
        assert str(path) in str(info.value)


async def test_metrics_names_and_no_user_or_query_labels(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    await _rank(client, task="search", query="secret-query-text", user_id="secret-user-9", k=3)
    text = (await client.get("/metrics")).text
    for name in (
        "unicorn_rank_latency_seconds_bucket", "unicorn_stage_latency_seconds_bucket",
        "unicorn_inference_batch_size_bucket", "unicorn_candidates_per_request_bucket",
        "unicorn_cache_requests_total", "unicorn_cache_errors_total", "unicorn_cache_degraded",
        "unicorn_responses_total", "unicorn_in_flight_requests", "unicorn_shed_requests_total",
        "unicorn_model_info", "unicorn_model_reloads_total", "unicorn_scoring_slots",
    ):  # fmt: skip
        assert f"\n{name}" in text, name
    assert "\nunicorn_scoring_slots 4.0" in text  # max_in_flight, no flood
    info = f'unicorn_model_info{{model_version="{bundle.model_version}",variant="default"}} 1.0'
    assert info in text
    assert 'task="search"' in text and 'le="0.00025"' in text
    assert 'unicorn_responses_total{route="/rank",status="200"}' in text
    for stage in ("retrieval", "features", "inference", "cache"):
        assert f'unicorn_stage_latency_seconds_count{{stage="{stage}",variant="default"}}' in text
    assert "secret-user-9" not in text and "secret-query-text" not in text


async def test_access_log_line_hashes_the_user_and_hides_the_query(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="unicorn.access")
    response = await client.post(
        "/rank", json={"task": "search", "query": "private words", "user_id": "member-77"},
        headers={"X-Request-ID": "req-abc.123"},
    )  # fmt: skip
    assert response.headers["x-request-id"] == "req-abc.123"
    (record,) = [r for r in caplog.records if getattr(r, "access", {}).get("route") == "/rank"]
    line = record.access  # type: ignore[attr-defined]
    assert line["request_id"] == "req-abc.123" and line["status"] == 200
    assert line["task"] == "search" and line["cache"] in {"miss", "hit"}
    assert line["query_chars"] == len("private words") and "query" not in line
    assert line["user"] and "member-77" not in json.dumps(line)
    assert "private words" not in json.dumps(line)
    # A request id that is not sane is replaced, never echoed.
    bad = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert (
        bad.headers["x-request-id"] != "bad id\twith spaces"
        and len(bad.headers["x-request-id"]) == 32
    )


async def test_catalogue_sample_draws_from_the_served_bundle(
    client: httpx.AsyncClient, bundle: Bundle
) -> None:
    response = await client.get("/catalogue/sample", params={"n": 5, "seed": 3})
    sample = response.json()
    assert sample["model_version"] == bundle.model_version
    assert 1 <= len(sample["queries"]) <= 5 and len(sample["video_ids"]) == 5
    assert all(bundle.catalogue.rankable[bundle.catalogue.index[v]] for v in sample["video_ids"])
    assert all(
        not bundle.catalogue.rankable[bundle.catalogue.index[e]] for e in sample["entity_ids"]
    )
    assert (await client.get("/catalogue/sample", params={"n": 5, "seed": 3})).json() == sample
    for n in (0, 1001):
        bad = await client.get("/catalogue/sample", params={"n": n})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "n"


async def test_openapi_documents_the_rank_contract(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["k"]["maximum"] == 200 and body["additionalProperties"] is False
    assert "RankResponse" in spec["components"]["schemas"]
    assert "ErrorResponse" in spec["components"]["schemas"]


# --- admission control and micro-batching -----------------------------------------------------
async def test_requests_over_the_slot_limit_are_shed_with_retry_after(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    # The first request holds the only slot through a 600 ms batch window; the second
    # waits 100 ms for it, so it is answered (503) first, while the slot is still held.
    settings = settings_for(max_in_flight=1, queue_timeout_ms=100, batch_window_ms=600,
                            cache_enabled=False)  # fmt: skip
    async with running_app(settings) as (_, client):
        answered: list[int] = []

        async def rank(k: int) -> httpx.Response:
            response = await client.post("/rank", json={"task": "prequery", "k": k})
            answered.append(response.status_code)
            return response

        responses = await asyncio.gather(rank(3), rank(4))
        assert answered == [503, 200]  # shed at the queue timeout, not once the slot was free
        shed = next(r for r in responses if r.status_code == 503)
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert "max_in_flight=1" in shed.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text
        assert "unicorn_shed_requests_total 1.0" in metrics


async def test_requests_queued_on_a_busy_loop_are_shed(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    """Inline scoring blocks the loop; requests queued behind it past the timeout get 503."""
    settings = settings_for(max_in_flight=1, queue_timeout_ms=100, cache_enabled=False)
    async with running_app(settings) as (app, client):
        scorer = app.state.served.models.choose(None).bundle.scorer
        real_score = scorer.score

        def slow_score(inputs: dict[str, np.ndarray]) -> np.ndarray:
            time.sleep(0.25)  # blocks the event loop, like a long inference would
            return real_score(inputs)

        scorer.score = slow_score
        try:
            responses = await asyncio.gather(
                *[client.post("/rank", json={"task": "prequery", "k": 2 + i}) for i in range(4)]
            )
        finally:
            scorer.score = real_score
        statuses = [r.status_code for r in responses]
        assert 200 in statuses and 503 in statuses, statuses


async def test_the_loop_reads_new_requests_between_inline_scorings(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    """A slot is handed on at the next event-loop turn, so queued scorings do not run back
    to back: a health check sent behind four slow /rank calls is answered before the
    last of them, and the /rank calls finish first come, first served."""
    settings = settings_for(max_in_flight=1, queue_timeout_ms=5000, cache_enabled=False)
    async with running_app(settings) as (app, client):
        scorer = app.state.served.models.choose(None).bundle.scorer
        real_score = scorer.score

        def slow_score(inputs: dict[str, np.ndarray]) -> np.ndarray:
            time.sleep(0.1)  # blocks the event loop
            return real_score(inputs)

        finished: list[str] = []

        async def call(name: str, method: str, path: str, **kwargs: Any) -> int:
            response = await client.request(method, path, **kwargs)
            finished.append(name)
            return response.status_code

        scorer.score = slow_score
        try:
            ranks = [
                asyncio.create_task(
                    call(f"rank{i}", "POST", "/rank", json={"task": "prequery", "k": 2 + i})
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.05)  # all four are in: the first is scoring
            health = asyncio.create_task(call("health", "GET", "/healthz"))
            statuses = await asyncio.gather(*ranks, health)
        finally:
            scorer.score = real_score
    assert statuses == [200] * 5
    assert finished.index("health") < finished.index("rank3"), finished
    ranked = [name for name in finished if name.startswith("rank")]
    assert ranked == sorted(ranked), finished


async def test_micro_batched_scores_equal_unbatched_scores(
    settings_for: Callable[..., Settings],
    bundle: Bundle,
    running_app: Callable[[Settings], Any],
    read_metric: Callable[..., float],
) -> None:
    requests = [
        {"task": "search", "query": "the", "k": 10},
        {"task": "prequery", "user_id": _user(bundle), "personalization": "full", "k": 10},
        {"task": "more_like_this", "source_entity_id": _video(bundle, 4), "k": 10},
        {"task": "entity", "source_entity_id": _page(bundle), "k": 10},
    ]
    results = {}
    for window in (0.0, 150.0):
        settings = settings_for(batch_window_ms=window, cache_enabled=False)
        async with running_app(settings) as (_, client):
            responses = await asyncio.gather(*[client.post("/rank", json=r) for r in requests])
            results[window] = [r.json()["items"] for r in responses]
            assert [r.status_code for r in responses] == [200] * 4
            metrics = (await client.get("/metrics")).text
            runs = read_metric(metrics, "unicorn_inference_batch_size_count")
            # unbatched: one onnxruntime run per request; batched: they shared runs
            assert runs == 4 if not window else 1 <= runs < 4, (window, runs)
    for unbatched, batched in zip(results[0.0], results[150.0], strict=True):
        assert [i["entity_id"] for i in unbatched] == [i["entity_id"] for i in batched]
        np.testing.assert_allclose(
            [i["score"] for i in unbatched], [i["score"] for i in batched], atol=1e-6
        )


async def test_a_request_uses_one_model_snapshot_across_a_reload(
    settings_for: Callable[..., Settings],
    second_bundle: Path,
    bundle: Bundle,
    running_app: Callable[[Settings], Any],
) -> None:
    """A request waiting in a batch window when the model is swapped answers with the
    model it started with; the next request gets the new one and misses the cache."""
    settings = settings_for(batch_window_ms=150, admin_token="a" * 16)
    async with running_app(settings) as (app, client):
        served = app.state.served
        request = {"task": "prequery", "k": 3, "personalization": "none"}
        pending = asyncio.ensure_future(client.post("/rank", json=request))
        in_flight = served.metrics.registry.get_sample_value
        async with asyncio.timeout(5):
            while in_flight("unicorn_in_flight_requests") != 1:  # waiting in the batch window
                await asyncio.sleep(0.001)
        await served.models.holder(None).reload(second_bundle)
        before = (await pending).json()
        after = (await client.post("/rank", json=request)).json()
        assert before["model_version"] == bundle.model_version
        assert after["model_version"] == model_version(second_bundle) != bundle.model_version
        assert after["cache"] == "miss"  # a new model version is a new cache key


async def test_the_heap_is_frozen_once_serving_starts_and_after_a_reload(
    settings_for: Callable[..., Settings],
    second_bundle: Path,
    running_app: Callable[[Settings], Any],
) -> None:
    """Serving starts with the objects alive then (the bundle, the app) out of the cyclic
    collector's generations, so a full collection does not walk them; a reload freezes
    the new bundle's objects too; shutdown hands them all back."""
    import gc
    import weakref

    gc.unfreeze()  # whatever an earlier test left
    async with running_app(settings_for()) as (app, _client):
        served = app.state.served
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen
        assert not gc.is_tracked(served.models.choose(None).bundle.catalogue.index) or frozen
        old = weakref.ref(served.models.choose(None).bundle)
        await served.models.holder(None).reload(second_bundle)
        assert old() is None  # the old bundle freed at once, frozen or not
        assert gc.get_freeze_count() > frozen // 2  # the new one's objects frozen too
    assert gc.get_freeze_count() == 0
