"""Candidate retrieval (app.retrieval) on the hand-built world of ``hand_world``."""

from __future__ import annotations

from dataclasses import replace

import hand_world
import numpy as np
import pytest

from app.context import Personalization, impute_context
from app.engagement_log import TASKS
from app.features import FeatureBuilder
from app.retrieval import CandidateRetriever


@pytest.fixture(scope="module")
def builder() -> FeatureBuilder:
    return hand_world.builder()


@pytest.fixture(scope="module")
def retriever(builder: FeatureBuilder) -> CandidateRetriever:
    return CandidateRetriever(builder)


def retrieve(
    retriever: CandidateRetriever,
    task: str,
    query: str | None = None,
    source: str | None = None,
    country: str | None = "US",
    user: str | None = "someone",
    level: Personalization = Personalization.CLUSTER,
    limit: int = 50,
) -> list[str]:
    catalogue = retriever.catalogue

    def name(entity_id: str) -> str | None:
        i = catalogue.index.get(entity_id)
        return None if i is None else str(catalogue.display_name[i])

    ctx = impute_context(task, user, query, country, source, name)
    cand = retriever.retrieve(retriever.features.context(ctx, level), limit)
    assert cand.dtype == np.int64
    return catalogue.entity_id[cand].tolist()


# ------------------------------------------------------------------------------ search


@pytest.mark.parametrize(
    ("query", "country", "expected"),
    [
        ("Stranger Things", "US", "v_stranger"),
        ("the crown", "GB", "v_crown"),
        ("Midnight Gospel", "DE", "v_gospel"),
        ("dark water", "US", "v_dark"),
    ],
)
def test_search_finds_a_title_for_its_full_name(
    retriever: CandidateRetriever, query: str, country: str, expected: str
) -> None:
    assert retrieve(retriever, "search", query, country=country)[0] == expected


@pytest.mark.parametrize(
    ("query", "country", "expected"),
    [("midn", "DE", "v_gospel"), ("stranger t", "US", "v_stranger"), ("gos", "DE", "v_gospel")],
)
def test_search_finds_a_title_for_a_distinctive_prefix(
    retriever: CandidateRetriever, query: str, country: str, expected: str
) -> None:
    assert retrieve(retriever, "search", query, country=country)[0] == expected


def test_search_prefix_brings_every_completion_before_the_top_up(
    retriever: CandidateRetriever,
) -> None:
    got = retrieve(retriever, "search", "stra", country="US")
    assert set(got[:2]) == {"v_stranger", "v_strange"}


def test_search_tolerates_a_one_character_typo(retriever: CandidateRetriever) -> None:
    # no name token starts with "midnigt": only the trigram path can find it
    assert len(retriever.text.postings("midnigt", prefix=True)) == 0
    assert retrieve(retriever, "search", "midnigt", country="DE", limit=1) == ["v_gospel"]


def test_weak_trigram_overlap_alone_is_not_a_match(retriever: CandidateRetriever) -> None:
    # "crwn" shares one trigram ("$cr") with "crown quest": below the fuzzy threshold, so
    # the slate is the popularity top-up, in which the game has no special place
    got = retrieve(retriever, "search", "crwn", country="US", limit=3)
    popular = retrieve(retriever, "prequery", country="US", level=Personalization.NONE, limit=3)
    assert got == popular


def test_search_results_with_a_match_come_before_the_top_up(
    retriever: CandidateRetriever,
) -> None:
    got = retrieve(retriever, "search", "dark", country="US", limit=5)
    assert got[0] == "v_dark"
    assert len(got) == 5 and len(set(got)) == 5


# ------------------------------------------------------------------------ availability


@pytest.mark.parametrize("country", ["US", "GB", "DE", None, "XX"])
@pytest.mark.parametrize("task", TASKS)
def test_results_respect_country_availability_and_skip_the_source(
    retriever: CandidateRetriever, task: str, country: str | None
) -> None:
    catalogue = retriever.catalogue
    source = {"more_like_this": "v_crown", "entity": "g_drama"}.get(task)
    query = "star" if task == "search" else None
    got = retrieve(retriever, task, query, source=source, country=country, limit=50)
    allowed = catalogue.available_in((country or "").upper())
    expected = set(catalogue.entity_id[allowed].tolist()) - {source}
    # the top-up fills the slate with everything that may be shown, and nothing else
    assert set(got) == expected
    assert len(got) == len(set(got))


def test_a_title_not_available_in_a_country_is_never_retrieved_there(
    retriever: CandidateRetriever,
) -> None:
    # "Star" is a GB title: its exact name finds it in GB, never in the US
    assert retrieve(retriever, "search", "star", country="GB")[0] in {"v_star", "v_starriv"}
    assert "v_star" in retrieve(retriever, "search", "star", country="GB", limit=2)
    assert "v_star" not in retrieve(retriever, "search", "star", country="US")
    assert "v_gospel" not in retrieve(retriever, "search", "midnight gospel", country="US")


def test_more_like_this_never_returns_the_source(retriever: CandidateRetriever) -> None:
    for source in ("v_stranger", "v_dark", "g_crownq"):
        assert source not in retrieve(retriever, "more_like_this", source=source, country=None)


# --------------------------------------------------------------- recommendations tasks


def test_more_like_this_returns_co_engaged_targets_first(retriever: CandidateRetriever) -> None:
    # from Stranger Things: Dark Water co-engaged 3 times, Strange Days once
    got = retrieve(retriever, "more_like_this", source="v_stranger", country="US")
    assert got[:2] == ["v_dark", "v_strange"]


def test_more_like_this_falls_back_to_item_vector_neighbours(
    retriever: CandidateRetriever,
) -> None:
    # Midnight Gospel has no co-engagement; its neighbours in item space are the dark titles
    got = retrieve(retriever, "more_like_this", source="v_gospel", country="US", limit=3)
    assert set(got) == {"v_stranger", "v_strange", "v_dark"}


def test_entity_returns_its_linked_videos(retriever: CandidateRetriever) -> None:
    assert set(retrieve(retriever, "entity", source="g_drama", limit=2)) == {"v_crown", "v_dark"}
    assert set(retrieve(retriever, "entity", source="p_winona", limit=2)) == {
        "v_stranger",
        "v_strange",
    }
    space = retrieve(retriever, "entity", source="c_space", country="GB", limit=2)
    assert set(space) == {"v_starriv", "v_star"}


# Prequery: every played title has the same US popularity, so only the personal terms
# (whatever their weights) can tell the two users' slates apart.
FLAT_POPULARITY: tuple[hand_world.Row, ...] = (
    (100, "prequery", "dark_fan", "", "US", "", "v_stranger", 1),
    (110, "prequery", "dark_fan", "", "US", "", "v_strange", 1),
    (100, "prequery", "bright_fan", "", "US", "", "v_starriv", 1),
    (110, "prequery", "bright_fan", "", "US", "", "v_crown", 1),
)


@pytest.fixture(scope="module")
def flat_retriever() -> CandidateRetriever:
    return CandidateRetriever(hand_world.builder(FLAT_POPULARITY))


def test_prequery_is_personalised_by_cluster(flat_retriever: CandidateRetriever) -> None:
    dark = retrieve(flat_retriever, "prequery", user="dark_fan", limit=2)
    bright = retrieve(flat_retriever, "prequery", user="bright_fan", limit=2)
    assert set(dark) == {"v_stranger", "v_strange"}
    assert set(bright) == {"v_starriv", "v_crown"}
    # without personalization both get the same country-popular slate
    none = Personalization.NONE
    assert retrieve(flat_retriever, "prequery", user="dark_fan", level=none) == retrieve(
        flat_retriever, "prequery", user="bright_fan", level=none
    )


def test_prequery_full_uses_the_users_vector(flat_retriever: CandidateRetriever) -> None:
    # Dark Water and Crown Quest were never played: only the user vector orders them.
    def order(user: str, level: Personalization) -> list[str]:
        got = retrieve(flat_retriever, "prequery", user=user, level=level)
        return [e for e in got if e in ("v_dark", "g_crownq")]

    assert order("dark_fan", Personalization.FULL) == ["v_dark", "g_crownq"]
    assert order("bright_fan", Personalization.FULL) == ["g_crownq", "v_dark"]
    cluster = Personalization.CLUSTER
    assert order("dark_fan", cluster) == order("bright_fan", cluster)


# -------------------------------------------------------------------------------- limit


@pytest.mark.parametrize("limit", [1, 2, 3, 5])
@pytest.mark.parametrize("task", TASKS)
def test_limit_is_respected(retriever: CandidateRetriever, task: str, limit: int) -> None:
    source = {"more_like_this": "v_dark", "entity": "c_space"}.get(task)
    query = "st" if task == "search" else None
    got = retrieve(retriever, task, query, source=source, country="US", limit=limit)
    assert len(got) == limit and len(set(got)) == limit
    longer = retrieve(retriever, task, query, source=source, country="US", limit=limit + 1)
    assert longer[:limit] == got


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_is_refused(retriever: CandidateRetriever, limit: int) -> None:
    with pytest.raises(ValueError, match=rf"^limit must be >= 1, got {limit}$"):
        retrieve(retriever, "prequery", limit=limit)


def test_tables_for_another_catalogue_are_refused(builder: FeatureBuilder) -> None:
    tables = replace(builder.tables, country_pos=builder.tables.country_pos[:2])
    other = FeatureBuilder(builder.catalogue, tables, builder.text)
    with pytest.raises(
        ValueError, match=r"^feature tables have 2 country rows, the catalogue needs 4$"
    ):
        CandidateRetriever(other)
