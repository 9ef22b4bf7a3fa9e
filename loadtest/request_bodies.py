"""``/rank`` request bodies for the load tools, drawn from the served bundle (never
hard-coded), and the ``RankQuery`` the service builds from one. ``request_bodies`` (the
benchmark): one task at a time; search bodies are typed prefixes from the bundle's search
log, members come from its user table, countries, titles and pages from its catalogue.
``mixed_bodies`` (faults, soak): every task and personalization level mixed, drawn from a
``GET /catalogue/sample`` answer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.bundle import Bundle
from app.core.context import Personalization
from app.core.ranking import RankQuery

TASKS: tuple[str, ...] = ("search", "prequery", "more_like_this", "entity")
DEFAULT_K = 20
TASK_MIX = ("search",) * 10 + ("prequery",) * 4 + ("more_like_this",) * 3 + ("entity",) * 2
LEVEL_MIX = ("cluster",) * 12 + ("none",) * 5 + ("full",) * 3


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
    if task == "search":  # 2+ characters: a one-letter prefix's results are mostly top-up
        field, values = "query", tables.query_keys[np.strings.str_len(tables.query_keys) >= 2]
    elif task == "more_like_this":
        field, values = "source_entity_id", catalogue.entity_id[catalogue.rankable]
    elif task == "entity":
        has_links = np.diff(catalogue.link_indptr) > 0
        field, values = "source_entity_id", catalogue.entity_id[~catalogue.rankable & has_links]
    else:
        return bodies
    for body, value in zip(bodies, _draw(rng, values, n), strict=True):
        body[field] = value
    return bodies


def mixed_bodies(sample: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` ``/rank`` bodies mixing every task and personalization level, drawn from a
    ``GET /catalogue/sample`` answer (typed prefixes, videos, pages, countries) and
    member ids ``u0``..``u1999`` (unknown ones are served as cold start)."""
    rng = np.random.default_rng(seed)

    def pick(values: list[str]) -> str:
        return values[int(rng.integers(len(values)))]

    bodies: list[dict[str, Any]] = []
    for i in range(n):
        task = pick(list(TASK_MIX))
        if task == "entity" and not sample["entity_ids"]:
            task = "more_like_this"
        body: dict[str, Any] = {
            "task": task,
            "user_id": f"u{int(rng.integers(2000))}",
            "country": pick(sample["countries"]),
            "k": DEFAULT_K,
            "personalization": pick(list(LEVEL_MIX)),
        }
        if task == "search":
            body["query"] = pick(sample["queries"])
            if i % 10 == 0:  # a frontend that sends its own candidates
                body["candidates"] = [str(v) for v in rng.choice(sample["video_ids"], 30)]
        elif task == "more_like_this":
            body["source_entity_id"] = pick(sample["video_ids"])
        elif task == "entity":
            body["source_entity_id"] = pick(sample["entity_ids"])
        bodies.append(body)
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
