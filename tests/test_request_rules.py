"""HTTP rules a hostile or careless client meets (issue: hardening): the media type, a
field given twice, HEAD wherever GET exists; and the metric series an SRE's alerts need
from the first scrape (every status at zero, process gauges; that the objective is read on
the right side of its bucket bound is in test_metrics.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.serving.config import Settings
from app.serving.metrics import STATUSES

pytestmark = pytest.mark.anyio

RANK = {"task": "prequery", "k": 3}


@pytest.fixture(scope="module")
async def client(
    fast_bundle: Path, running_app: Callable[[Settings], Any]
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(Settings(bundle=fast_bundle, admin_token=None)) as (_app, client):
        yield client


def _samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_body_of_another_media_type_is_refused_with_415(
    client: httpx.AsyncClient, content_type: str
) -> None:
    r = await client.post(
        "/rank", content=b'{"task": "prequery"}', headers={"content-type": content_type}
    )
    assert r.status_code == 415
    error = r.json()["error"]
    assert error["field"] == "content-type" and content_type.split(";")[0] in error["message"]


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "application/vnd.api+json"],
)
async def test_json_and_an_absent_media_type_are_read_as_json(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = await client.post("/rank", content=b'{"task": "prequery", "k": 2}', headers=headers)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 2


async def test_a_field_given_twice_is_refused_naming_it(client: httpx.AsyncClient) -> None:
    body = b'{"task": "prequery", "k": 5, "k": 50}'
    r = await client.post("/rank", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "code": "malformed_request",
        "message": "k is given more than once",
        "field": "k",
    }


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/catalogue/sample?n=2"])
async def test_head_answers_wherever_get_does(client: httpx.AsyncClient, path: str) -> None:
    get, head = await client.get(path), await client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


async def test_rank_is_post_only_and_says_so(client: httpx.AsyncClient) -> None:
    r = await client.head("/rank")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"


async def test_every_status_series_exists_at_zero_before_its_first_response(
    client: httpx.AsyncClient,
) -> None:
    """A 503 burst must show in increase(): its series exists before the burst."""
    text = (await client.get("/metrics")).text
    responses = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in _samples(text, "unicorn_responses_total")
    }
    for route in ("/rank", "/healthz", "/metrics", "unmatched"):
        for status in STATUSES:
            assert (route, str(status)) in responses
    assert responses[("/rank", "503")] == 0
    latency = {
        tuple(sorted(s.labels.items()))
        for s in _samples(text, "unicorn_rank_latency_seconds_count")
    }
    assert len(latency) == 4 * 3 * 3  # task x personalization x cache outcome


async def test_process_gauges_report_this_process(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text

    def value(name: str) -> float:
        (sample,) = _samples(text, name)
        return float(sample.value)

    rss = value("unicorn_process_resident_memory_bytes")
    assert 10 * 2**20 < rss < 64 * 2**30  # a Python process with numpy loaded, in bytes
    assert value("unicorn_process_open_fds") >= 3
    assert value("unicorn_process_max_fds") >= value("unicorn_process_open_fds")
    assert value("unicorn_process_cpu_seconds") > 0
