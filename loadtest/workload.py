"""Request bodies for the benchmark, drawn from the served bundle (never hard-coded).

One list of ``/rank`` bodies per task, deterministic from a seed:

- search: typed prefixes the bundle's search log holds (``FeatureTables.query_keys``:
  every keystroke of every logged query), so each body is a real instant-search call;
- prequery: a member and a country;
- more_like_this: a rankable video as the source;
- entity: a non-video page entity (genre, collection, person) with linked videos.

Members are drawn from the bundle's user table (so the cluster cache key varies as in
production), countries from the catalogue. The in-process benchmark turns the same
bodies into ``RankQuery`` objects, so both measure the same requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.bundle import Bundle
from app.core.context import Personalization
from app.core.ranking import RankQuery

TASKS: tuple[str, ...] = ("search", "prequery", "more_like_this", "entity")
DEFAULT_K = 20


def _draw(rng: np.random.Generator, values: np.ndarray, n: int) -> list[str]:
    if len(values) == 0:
        raise ValueError("cannot draw request values from an empty bundle table")
    return [str(v) for v in values[rng.integers(0, len(values), size=n)].tolist()]


def request_bodies(bundle: Bundle, task: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` ``/rank`` bodies for ``task`` drawn from ``bundle``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    catalogue, tables = bundle.catalogue, bundle.features.tables
    users = _draw(rng, tables.user_ids, n)
    # A catalogue without availability by country (MovieLens) serves every country alike.
    countries = _draw(rng, np.array(catalogue.country_names or ("",)), n)
    bodies: list[dict[str, Any]] = [
        {"task": task, "user_id": u, "k": DEFAULT_K, "personalization": "cluster"}
        | ({"country": c} if c else {})
        for u, c in zip(users, countries, strict=True)
    ]
    if task == "search":
        # Prefixes of 2+ characters: a one-letter prefix is a keystroke too, but its result
        # set is dominated by top-up; the mix below still holds plenty of short prefixes.
        queries = tables.query_keys[np.strings.str_len(tables.query_keys) >= 2]
        for body, q in zip(bodies, _draw(rng, queries, n), strict=True):
            body["query"] = q
    elif task == "more_like_this":
        videos = catalogue.entity_id[catalogue.rankable]
        for body, v in zip(bodies, _draw(rng, videos, n), strict=True):
            body["source_entity_id"] = v
    elif task == "entity":
        has_links = np.diff(catalogue.link_indptr) > 0
        pages = catalogue.entity_id[~catalogue.rankable & has_links]
        for body, e in zip(bodies, _draw(rng, pages, n), strict=True):
            body["source_entity_id"] = e
    return bodies


def rank_query(body: dict[str, Any]) -> RankQuery:
    """The ``RankQuery`` the service builds from ``body`` (no HTTP)."""
    candidates = body.get("candidates")
    return RankQuery(
        task=body["task"],
        user_id=body.get("user_id"),
        query=body.get("query"),
        country=body.get("country"),
        source_entity_id=body.get("source_entity_id"),
        candidates=None if candidates is None else tuple(candidates),
        k=int(body.get("k", DEFAULT_K)),
        personalization=Personalization(body.get("personalization", "cluster")),
    )
