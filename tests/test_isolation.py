"""Isolation and security: metrics labels stay bounded enums whatever the traffic (no
user id, query, path or id as a label); logs carry neither the user id nor the query
text unless ``log_queries`` is on; the admin token never reaches a log line, a metric or
a response, and is compared in constant time; cache keys of different contexts never
collide (property-based). ``test_api.py`` has the single-request versions of the first
two; ``test_service_integration.py`` the two users on a shared Redis."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import app.http.routes as app_api
from app.core.context import Personalization, Task
from app.serving.cache import OPERATIONS, CacheKeyParts, cache_key
from app.serving.config import Settings
from app.serving.metrics import CACHE_OUTCOMES, EVENT_OUTCOMES, STAGES

pytestmark = pytest.mark.anyio

TOKEN = "isolation-admin-token-0123456789"
SECRET_USER = "member-7f3a91c2"
SECRET_QUERY = "kiwi zebra quartz"
SECRETS = (SECRET_USER, SECRET_QUERY, "kiwi", "zebra", "quartz", "7f3a91c2")


async def _distinctive_traffic(
    client: httpx.AsyncClient, video: str, odd_path: bool = True
) -> None:
    """Requests full of values no metric label (or log line) may carry. ``odd_path``: a
    URL that embeds them (an access line names the path it was asked for, as is)."""
    bodies: list[dict[str, Any]] = [
        {"task": "search", "query": SECRET_QUERY, "user_id": SECRET_USER, "country": "ZZ"},
        {
            "task": "search",
            "query": SECRET_QUERY,
            "user_id": SECRET_USER,
            "personalization": "full",
        },
        {"task": "prequery", "user_id": SECRET_USER, "candidates": [video, "cand-kiwi-1"]},
        {"task": "more_like_this", "source_entity_id": "src-zebra-404", "user_id": SECRET_USER},
        {"task": "search", "query": "q" * 500, "user_id": SECRET_USER},
        {"task": "quartz-task", "user_id": SECRET_USER},
    ]
    for body in bodies + bodies[:1]:
        await client.post("/rank", json=body, headers={"X-Request-ID": "req-kiwi-zebra"})
    if odd_path:
        await client.get(f"/users/{SECRET_USER}/{SECRET_QUERY}")
    await client.post("/admin/reload", headers={"Authorization": "Bearer kiwi-zebra-quartz-1234"})
    await client.get("/catalogue/sample", params={"n": 3, "seed": 7, "kiwi": "zebra"})


async def test_metric_label_values_stay_bounded_enums_whatever_the_traffic(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with running_app(settings_for(admin_token=TOKEN)) as (app, client):
        service = app.state.served.models.choose(None)
        video = str(service.bundle.catalogue.entity_id[0])
        await _distinctive_traffic(client, video)
        text = (await client.get("/metrics")).text
        routes = {getattr(r, "path", "") for r in app.routes} | app_api.ROUTE_PATHS
        routes |= {"unmatched"}
        version = service.model_version
    for secret in SECRETS:
        assert secret not in text
    allowed: dict[str, set[str]] = {
        "task": {t.value for t in Task},
        "personalization": {p.value for p in Personalization},
        "cache": set(CACHE_OUTCOMES),
        "outcome": set(CACHE_OUTCOMES) | set(EVENT_OUTCOMES),
        "kind": {"impression", "engagement"},
        "stage": set(STAGES),
        "route": routes,
        "backend": {"memory", "redis"},
        "operation": set(OPERATIONS),
        "result": {"ok", "refused"},
        "model_version": {version},
        "variant": {"default"},
    }
    seen = 0
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("unicorn_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                if label == "status":
                    assert value.isdigit() and len(value) == 3, (sample.name, value)
                else:
                    assert value in allowed[label], (sample.name, label, value)
                seen += 1
    assert seen > 50  # the traffic above did produce labelled series


@pytest.mark.parametrize("log_queries", [False, True])
async def test_logs_carry_no_user_id_and_no_query_text_unless_log_queries_is_on(
    settings_for: Callable[..., Settings],
    running_app: Callable[[Settings], Any],
    caplog: pytest.LogCaptureFixture,
    log_queries: bool,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    settings = settings_for(log_queries=log_queries, log_level="DEBUG", admin_token=TOKEN)
    async with running_app(settings) as (app, client):
        video = str(app.state.served.models.choose(None).bundle.catalogue.entity_id[0])
        await _distinctive_traffic(client, video, odd_path=False)
    lines = [
        json.dumps({**r.__dict__, "message": r.getMessage()}, default=str) for r in caplog.records
    ]
    text = "\n".join(lines)
    assert SECRET_USER not in text and "7f3a91c2" not in text  # never, not even hashed input
    access = [getattr(r, "access", {}) for r in caplog.records if getattr(r, "access", None)]
    ranked = [a for a in access if a.get("route") == "/rank" and a.get("status") == 200]
    assert ranked and all(a.get("user") for a in ranked)  # a keyed hash stands in for it
    if log_queries:
        assert any(a.get("query") == SECRET_QUERY for a in ranked)
    else:
        assert SECRET_QUERY not in text and "quartz" not in text
        assert all("query" not in a for a in access)
        assert {a.get("query_chars") for a in ranked} >= {len(SECRET_QUERY)}


@pytest.mark.integration
def test_the_admin_token_never_reaches_logs_metrics_or_responses(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Successful, refused and unauthorised reloads on a live server, all loggers at
    DEBUG (uvicorn's included): neither the token nor a presented wrong one is written."""
    caplog.set_level(logging.DEBUG)
    server = start_server(settings_for(admin_token=TOKEN, log_level="DEBUG"))
    wrong = "wrong-token-kiwi-0123456789"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bodies: list[str] = []
    with server.client() as client:
        calls = [
            client.post("/admin/reload", headers=auth),
            client.post("/admin/reload", json={"bundle": str(tmp_path / "none")}, headers=auth),
            client.post("/admin/reload", headers={"Authorization": f"Bearer {wrong}"}),
            client.post("/admin/reload", headers={"Authorization": TOKEN}),
            client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}x"}),
            client.get("/metrics"),
        ]
        assert [r.status_code for r in calls] == [200, 409, 403, 401, 403, 200]
        bodies += [r.text + json.dumps(dict(r.headers)) for r in calls]
    logged = "\n".join(json.dumps(r.__dict__, default=str) + r.getMessage() for r in caplog.records)
    assert "model reloaded" in logged and "refused" in logged  # the reloads were logged
    for secret in (TOKEN, wrong):
        assert secret not in logged
        assert all(secret not in body for body in bodies)


async def test_admin_tokens_are_compared_in_constant_time(
    settings_for: Callable[..., Settings],
    running_app: Callable[[Settings], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every presented token goes through ``hmac.compare_digest``, whatever its length or
    prefix: no early-exit ``==`` that leaks, by timing, how much of a guess is right."""
    calls: list[tuple[bytes, bytes]] = []
    real = app_api.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_api.hmac, "compare_digest", spy)
    async with running_app(settings_for(admin_token=TOKEN)) as (_, client):
        guesses = ["x", TOKEN[:-1], TOKEN + "0", "y" * len(TOKEN)]
        for guess in guesses:
            response = await client.post(
                "/admin/reload", headers={"Authorization": f"Bearer {guess}"}
            )
            assert response.status_code == 403
    assert calls == [(g.encode(), TOKEN.encode()) for g in guesses]


# --- cache keys -------------------------------------------------------------------------------
# Small alphabets full of separators and quotes, so different parts often concatenate to
# the same text: only a structured key keeps them apart.
TRICKY = st.text(alphabet='ab|:,"\\ \x00\u00e9', max_size=4)


@st.composite
def key_parts(draw: st.DrawFn) -> CacheKeyParts:
    level = draw(st.sampled_from(list(Personalization)))
    return CacheKeyParts(
        variant=draw(TRICKY),
        model_version=draw(TRICKY),
        task=draw(st.sampled_from([t.value for t in Task])),
        query=draw(TRICKY),
        country=draw(TRICKY),
        user_cluster=draw(st.integers(0, 12)),
        source_entity_id=draw(TRICKY),
        candidates=draw(st.one_of(st.none(), st.lists(TRICKY, max_size=3).map(tuple))),
        retrieval_limit=draw(st.sampled_from([100, 300])),
        k=draw(st.integers(1, 12)),
        personalization=level,
        user_id=draw(TRICKY.filter(bool)) if level is Personalization.FULL else None,
    )


def _meaning(parts: CacheKeyParts) -> tuple[Any, ...]:
    """What a key must distinguish: the candidate SET, the retrieval limit only when the
    service retrieves; everything else as is."""
    fields = dataclasses.asdict(parts)
    fields["candidates"] = (
        ("retrieved", parts.retrieval_limit)
        if parts.candidates is None
        else ("given", frozenset(parts.candidates))
    )
    del fields["retrieval_limit"]
    return tuple(sorted(fields.items(), key=lambda kv: kv[0]))


@settings(max_examples=400, deadline=None)
@given(a=key_parts(), b=key_parts())
def test_cache_keys_are_equal_exactly_when_the_contexts_are(
    a: CacheKeyParts, b: CacheKeyParts
) -> None:
    assert (cache_key(a) == cache_key(b)) == (_meaning(a) == _meaning(b))


@settings(max_examples=200, deadline=None)
@given(a=key_parts(), field=st.sampled_from(["task", "country", "personalization", "query"]))
def test_changing_task_country_level_or_query_always_changes_the_key(
    a: CacheKeyParts, field: str
) -> None:
    other_level = (
        Personalization.NONE
        if a.personalization is Personalization.CLUSTER
        else Personalization.CLUSTER
    )
    changes: dict[str, Any] = {
        "task": {"task": "entity" if a.task != "entity" else "search"},
        "country": {"country": a.country + "|"},
        "personalization": {"personalization": other_level, "user_id": None},
        "query": {"query": a.query + " "},
    }
    assert cache_key(dataclasses.replace(a, **changes[field])) != cache_key(a)


def test_onnxruntime_writes_nothing_under_the_home_or_cache_dirs(
    fast_bundle: Path, tmp_path: Path
) -> None:
    """Loading and scoring a bundle in a fresh process leaves $HOME and $XDG_CACHE_HOME
    empty: onnxruntime's telemetry (a device id and a database under
    ~/.cache/Microsoft/DeveloperTools) is off before it loads."""
    import os
    import subprocess
    import sys

    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(cache))
    script = (
        "import sys; from app.core.bundle import load_bundle; "
        "from app.core.ranking import Ranker, RankQuery; "
        "ranker = Ranker(load_bundle(sys.argv[1])); "
        "print(len(ranker.rank(RankQuery(task='prequery', k=5)).items))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(fast_bundle)], env=env, capture_output=True,
        text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("cache"),
        Path("home"),
    ]
