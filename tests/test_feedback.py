"""The feedback loop through the service: every /rank answer logged as an impression with
its request id, POST /events validated like /rank and idempotent on event_id, the files a
real server writes joined back into training rows, and a sink outage that never fails
/rank. In-process (httpx, lifespan running) except the end-to-end test, which runs
``python -m app.http.server`` and stops it with SIGTERM."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.serving.config import Settings
from app.serving.events import complete_files

pytestmark = pytest.mark.anyio


def _engagement(request_id: str, entity_id: str, event_id: str = "e1", **extra: Any) -> Any:
    return {"event_id": event_id, "request_id": request_id, "entity_id": entity_id,
            "type": "play", **extra}  # fmt: skip


async def _metric(client: httpx.AsyncClient, kind: str, outcome: str) -> float:
    from loadtest.processes import metric

    text = (await client.get("/metrics")).text
    return metric(text, "unicorn_events_total", kind=kind, outcome=outcome)


async def test_events_are_off_without_a_sink(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    async with running_app(settings_for()) as (_app, client):
        rank = await client.post("/rank", json={"task": "prequery", "k": 3})
        assert rank.status_code == 200 and rank.json()["request_id"]
        response = await client.post("/events", json={"events": [_engagement("r", "v1")]})
        assert response.status_code == 404
        assert "UNICORN_EVENTS_DIR" in response.json()["error"]["message"]


async def test_each_answer_is_an_impression_and_engagements_are_idempotent(
    settings_for: Callable[..., Settings],
    running_app: Callable[[Settings], Any],
    tmp_path: Path,
) -> None:
    """A miss and a hit are each logged with the answer's request id, context, items and
    scores in order; an engagement repeated by event id is answered as a duplicate and
    written once; on shutdown the queue is flushed into complete Parquet files."""
    import pyarrow.parquet as pq

    settings = settings_for(events_dir=tmp_path / "events")
    request = {"task": "search", "query": "the", "user_id": "u1", "country": "US", "k": 4}
    async with running_app(settings) as (_app, client):
        miss = (await client.post("/rank", json=request)).json()
        hit = (await client.post("/rank", json=request)).json()
        assert (miss["cache"], hit["cache"]) == ("miss", "hit")
        assert miss["request_id"] != hit["request_id"]
        shown = miss["items"][1]["entity_id"]
        first = _engagement(miss["request_id"], shown, "e-1", ts=1_796_190_000.5)
        batch = {"events": [first, _engagement(miss["request_id"], shown, "e-2")]}
        assert (await client.post("/events", json=batch)).json() == {
            "accepted": 2,
            "duplicates": 0,
        }
        again = (await client.post("/events", json={"events": [first]})).json()
        assert again == {"accepted": 0, "duplicates": 1}
        assert await _metric(client, "engagement", "duplicate") == 1
        assert await _metric(client, "impression", "queued") == 2
    impressions = [
        row for f in complete_files(tmp_path / "events", "impression")
        for row in pq.read_table(f).to_pylist()
    ]  # fmt: skip
    engagements = [
        row for f in complete_files(tmp_path / "events", "engagement")
        for row in pq.read_table(f).to_pylist()
    ]  # fmt: skip
    by_id = {row["request_id"]: row for row in impressions}
    assert set(by_id) == {miss["request_id"], hit["request_id"]}
    logged = by_id[miss["request_id"]]
    assert logged["entity_ids"] == [i["entity_id"] for i in miss["items"]]
    assert logged["scores"] == pytest.approx([i["score"] for i in miss["items"]])
    assert (logged["task"], logged["query"], logged["cache"]) == ("search", "the", "miss")
    assert logged["user_hashed"] and logged["user"] and logged["user"] != "u1"
    assert by_id[hit["request_id"]]["cache"] == "hit"
    assert sorted(e["event_id"] for e in engagements) == ["e-1", "e-2"]
    assert {e["ts"] for e in engagements if e["event_id"] == "e-1"} == {1_796_190_000.5}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"events": [', 400, "body"),
        (b'{"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "play"}], '
         b'"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "play"}]}',
         400, "events"),
        (b'{"events": []}', 422, "events"),
        (b'{"event": []}', 422, "events"),  # the required field first, then the stranger
        (b'{"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "watch"}]}',
         422, "events[0].type"),
        (b'{"events": [{"event_id": "e e", "request_id": "r", "entity_id": "v", "type": "play"}]}',
         422, "events[0].event_id"),
        (b'{"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "play", '
         b'"ts": NaN}]}', 422, "events[0].ts"),
        (b'{"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "play", '
         b'"ts": 1e300}]}', 422, "events[0].ts"),
        (b'{"events": [{"event_id": "e", "request_id": "r", "entity_id": "v", "type": "play", '
         b'"event_id": "f"}]}', 400, "event_id"),
        (json.dumps({"events": [_engagement("r", "v", f"e{i}") for i in range(1001)]}).encode(),
         422, "events"),
    ],
)  # fmt: skip
async def test_bad_events_get_a_4xx_naming_the_field(
    settings_for: Callable[..., Settings],
    running_app: Callable[[Settings], Any],
    tmp_path: Path,
    body: bytes,
    status: int,
    field: str,
) -> None:
    async with running_app(settings_for(events_dir=tmp_path)) as (_app, client):
        response = await client.post(
            "/events", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert response.json()["error"]["field"] == field, response.text
        plain = await client.post("/events", content=b"{}", headers={"content-type": "text/plain"})
        assert plain.status_code == 415


async def test_a_sink_that_is_down_never_fails_rank(
    settings_for: Callable[..., Settings], running_app: Callable[[Settings], Any]
) -> None:
    """Events to a Redis that is not there: every /rank and /events call is answered, and
    the events are counted as dropped once the queue tried to write them."""
    from loadtest.processes import free_port

    settings = settings_for(events_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_app(settings) as (app, client):
        for _ in range(5):
            response = await client.post("/rank", json={"task": "prequery", "k": 3})
            assert response.status_code == 200
        rid = response.json()["request_id"]
        answered = await client.post("/events", json={"events": [_engagement(rid, "v1")]})
        assert answered.status_code == 200
        await app.state.served.feedback.queue.close(timeout_s=10)  # a write is attempted
        assert await _metric(client, "impression", "dropped") == 5
        assert await _metric(client, "impression", "written") == 0


def test_a_real_servers_events_become_training_rows(fast_bundle: Path, tmp_path: Path) -> None:
    """``python -m app.http.server`` with UNICORN_EVENTS_DIR: rank, engage with the second
    item, SIGTERM; the files it leaves join into the unified engagement log with label 1
    for that item and 0 for the item above it (seen and skipped)."""
    from loadtest.processes import ServiceProcess
    from model_export.event_source import load_events

    events = tmp_path / "events"
    server = ServiceProcess(
        {"bundle": fast_bundle, "events_dir": events, "events_raw_user_ids": 1},
        log_path=tmp_path / "server.log",
    ).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            body = {"task": "prequery", "user_id": "u7", "country": "US", "k": 5}
            answer = client.post("/rank", json=body).json()
            engaged = answer["items"][1]["entity_id"]
            accepted = client.post(
                "/events", json={"events": [_engagement(answer["request_id"], engaged)]}
            )
            assert accepted.json() == {"accepted": 1, "duplicates": 0}
    finally:
        server.stop()
    log, report = load_events(events)
    assert report.impressions_used == 1 and report.engagements_used == 1, report
    shown = [i["entity_id"] for i in answer["items"]]
    rows = dict(zip(log.target_entity_id.tolist(), log.label.tolist(), strict=True))
    assert rows[engaged] == 1 and rows[shown[0]] == 0
    assert set(np.unique(log.user_id).tolist()) == {"u7"}
    assert set(np.unique(log.task).tolist()) == {"prequery"}
