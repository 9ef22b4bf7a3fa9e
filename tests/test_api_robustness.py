"""Never a 500 for any input: random request bodies against a live server must get 200 or
a 4xx in the error shape (hypothesis generates them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

TASKS = ["search", "prequery", "more_like_this", "entity"]
anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=40), st.lists(st.text(max_size=12), max_size=6),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip
text_or_anything = st.one_of(st.text(max_size=60), anything)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "task": st.one_of(st.sampled_from(TASKS), anything),
        "user_id": text_or_anything,
        "query": st.one_of(st.text(max_size=250), anything),
        "country": text_or_anything,
        "source_entity_id": st.one_of(st.sampled_from(["v1", "v2", "genre:0", "col:1"]),
                                      text_or_anything),
        "candidates": st.one_of(st.lists(st.sampled_from(["v1", "v3", "g1", "x"]), max_size=8),
                                anything),
        "k": st.one_of(st.integers(-5, 260), anything),
        "personalization": st.one_of(st.sampled_from(["none", "cluster", "full"]), anything),
        "unexpected": anything,
    },
)  # fmt: skip


@pytest.fixture
def client(live_server: Any) -> Iterator[httpx.Client]:
    """One client for every example: creating one costs more than a request."""
    with live_server.client() as c:
        yield c


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "field"} and error["message"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(body=bodies)
def test_random_json_bodies_never_get_a_5xx(client: httpx.Client, body: dict[str, Any]) -> None:
    _check(client.post("/rank", content=json.dumps(body)))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(raw=st.binary(max_size=300))
def test_random_bytes_never_get_a_5xx(client: httpx.Client, raw: bytes) -> None:
    _check(client.post("/rank", content=raw))
