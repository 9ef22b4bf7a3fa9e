"""Instant search, one keystroke at a time, through ``POST /rank`` on the real model.

For a title, its distinctive prefix is the shortest prefix of its (normalised) name that
fewer than 10 catalogue titles share. Typing the name character by character, the title
must be in the top 10 once that prefix plus two characters is typed, stay there for every
later keystroke, and be first when the whole name is typed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.bundle import Bundle
from app.serving.config import Settings

pytestmark = pytest.mark.anyio

SLACK = 2  # characters typed after the distinctive prefix


def distinctive_prefix_length(name: str, names: np.ndarray) -> int:
    for length in range(1, len(name) + 1):
        if int(np.strings.startswith(names, name[:length]).sum()) < 10:
            return length
    return len(name)


def titles_to_type(bundle: Bundle) -> list[int]:
    """Three titles with unique names: the most engaged, the least engaged, and the one
    that needs the longest prefix to stand out."""
    rankable = np.flatnonzero(bundle.catalogue.rankable)
    names = bundle.text.names[rankable]
    unique = [int(i) for i, n in zip(rankable, names, strict=True) if int((names == n).sum()) == 1]
    pos = bundle.tables.entity_pos
    longest = max(unique, key=lambda i: distinctive_prefix_length(str(bundle.text.names[i]), names))
    return list(
        dict.fromkeys(
            [max(unique, key=lambda i: pos[i]), min(unique, key=lambda i: pos[i]), longest]
        )
    )


async def test_a_title_enters_the_top_10_by_its_distinctive_prefix(
    tiny_bundle: Path, running_app: Callable[[Settings], Any]
) -> None:
    settings = Settings(bundle=tiny_bundle, cache_enabled=False)
    async with running_app(settings) as (app, client):
        bundle: Bundle = app.state.served.models.choose(None).bundle
        rankable_names = bundle.text.names[bundle.catalogue.rankable]
        for index in titles_to_type(bundle):
            name = str(bundle.text.names[index])
            target = str(bundle.catalogue.entity_id[index])
            needed = min(distinctive_prefix_length(name, rankable_names) + SLACK, len(name))
            ranks: list[int | None] = []
            for typed in range(1, len(name) + 1):
                response = await client.post(
                    "/rank", json={"task": "search", "query": name[:typed], "k": 10}
                )
                assert response.status_code == 200, response.text
                ids = [item["entity_id"] for item in response.json()["items"]]
                ranks.append(ids.index(target) if target in ids else None)
            assert all(r is not None for r in ranks[needed - 1 :]), (name, needed, ranks)
            assert ranks[-1] == 0, (name, ranks)
