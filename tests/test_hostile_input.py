"""Limits an operator sets are the limits enforced (query length, candidate count, body
size), with the configured number in the message; and hostile JSON that random bytes do
not find (deep nesting, lone surrogates, huge numbers, NaN, a byte-order mark, duplicate
keys) gets a 4xx in the error shape, never a 500. ``test_api.py`` checks the default
limits field by field; ``test_api_robustness.py`` fuzzes random bodies on a live server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.serving.config import Settings

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
async def tight(
    fast_bundle: Path, running_app: Callable[[Settings], Any]
) -> AsyncIterator[httpx.AsyncClient]:
    """A service with small limits of its own."""
    settings = Settings(
        bundle=fast_bundle, max_query_chars=10, max_candidates=3, max_body_bytes=2048
    )
    async with running_app(settings) as (_, client):
        yield client


async def _error(client: httpx.AsyncClient, body: bytes, status: int) -> dict[str, Any]:
    response = await client.post("/rank", content=body, headers=JSON)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "field"} and error["message"]
    return dict(error)


async def test_configured_limits_are_enforced_with_the_configured_numbers(
    tight: httpx.AsyncClient,
) -> None:
    at_limit = b'{"task": "search", "query": "abcdefghij", "candidates": ["a", "b", "c"]}'
    assert (await tight.post("/rank", content=at_limit, headers=JSON)).status_code == 200
    query = await _error(tight, b'{"task": "search", "query": "abcdefghijk"}', 422)
    assert query["field"] == "query"
    assert query["message"] == "query must be at most 10 characters, got 11"
    many = await _error(tight, b'{"task": "prequery", "candidates": ["a", "b", "c", "d"]}', 422)
    assert many["field"] == "candidates" and "at most 3 ids" in many["message"]
    big = await _error(tight, b'{"task": "prequery", "user_id": "' + b"u" * 2100 + b'"}', 413)
    assert big["field"] == "body" and "at most 2048 bytes" in big["message"]


HOSTILE: list[tuple[str, bytes, set[int], str]] = [
    # (id, body, allowed statuses, text in the message)
    ("deeply nested array", b"[" * 1000 + b"]" * 1000, {400}, "recursion limit"),
    (
        "deeply nested in a field",
        b'{"task": "prequery", "candidates": ' + b"[" * 900 + b"]" * 900 + b"}",
        {400},
        "recursion limit",
    ),
    ("lone surrogate in user_id", b'{"task": "prequery", "user_id": "\\ud800"}', {400}, "JSON"),
    (
        "lone surrogate in a candidate",
        b'{"task": "prequery", "candidates": ["\\udfff"]}',
        {400},
        "JSON",
    ),
    ("NaN for k", b'{"task": "prequery", "k": NaN}', {400, 422}, "k"),
    ("huge number for k", b'{"task": "prequery", "k": 1e400}', {422}, "k"),
    ("huge integer for k", b'{"task": "prequery", "k": ' + b"9" * 400 + b"}", {400, 422}, "k"),
    ("byte-order mark", b'\xef\xbb\xbf{"task": "prequery"}', {400}, "JSON"),
    ("null body", b"null", {422}, "object"),
    ("string body", b'"prequery"', {422}, "object"),
    (
        "nested object in an unknown field",
        b'{"task": "prequery", "x": ' + b'{"a": ' * 50 + b"1" + b"}" * 50 + b"}",
        {422},
        "Extra inputs",
    ),
    ("not UTF-8", b'{"task": "search", "query": "\xff\xfe"}', {400}, "JSON"),
    ("duplicate key", b'{"task": "search", "task": "prequery"}', {400}, "more than once"),
]


@pytest.mark.parametrize(
    ("body", "statuses", "text"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
async def test_hostile_json_gets_a_4xx_with_a_message(
    tight: httpx.AsyncClient, body: bytes, statuses: set[int], text: str
) -> None:
    response = await tight.post("/rank", content=body, headers=JSON)
    assert response.status_code in statuses, response.text
    assert text in response.json()["error"]["message"], response.text


async def test_odd_but_valid_strings_are_served(tight: httpx.AsyncClient) -> None:
    """Valid JSON that a hand-written parser might trip on: served, never a 5xx."""
    for body in (
        b'{"task": "search", "query": "a\\u0000b"}',
        b'{"task": "prequery", "user_id": "\\ud83d\\ude80", "country": "\\u00df"}',
        b'{"task": "search", "query": "\\u202e\\u0301x"}',
    ):
        response = await tight.post("/rank", content=body, headers=JSON)
        assert response.status_code == 200, (body, response.text)
