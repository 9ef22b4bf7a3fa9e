"""Candidate retrieval (app.core.retrieval) on the hand-built world of ``hand_world``, and
against a dense oracle (the whole catalogue scored) on a real bundle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import hand_world
import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import TASKS, Personalization, Task, impute_context
from app.core.features import COL, ContextFeatures, FeatureBuilder
from app.core.retrieval import CandidateRetriever
from app.core.text_index import TextIndex


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
    # "crzz" shares one trigram ("$cr") with "crown quest" and is 2 edits from any "crow..":
    # below the trigram threshold and over the typo budget, so the slate is the
    # popularity top-up, in which the game has no special place
    got = retrieve(retriever, "search", "crzz", country="US", limit=3)
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


# ------------------------------------------------------------- search like a search box

FILMS: tuple[tuple[str, str], ...] = (
    ("m_toy", "Toy Story"),
    ("m_toy2", "Toy Story 2"),
    ("m_god", "The Godfather"),
    ("m_god2", "The Godfather: Part II"),
    ("m_tokyo", "Tokyo Godfathers"),
    ("m_amelie", "Amélie (Le fabuleux destin d'Amélie Poulain)"),
    ("m_wars", "Star Wars"),
    ("m_stand", "Stand by Me"),
    ("m_heat", "Heat"),
    ("m_inter", "Interstellar"),
    ("m_the", "The Thing"),
)
# "Heat" is the most popular title and "Tokyo Godfathers" next: popularity alone would
# put them first, so a match must be what brings a title before them.
FILM_PLAYS: tuple[hand_world.Row, ...] = tuple(
    (100 + i, "prequery", f"fan{i}", "", "US", "", target, 1)
    for i, target in enumerate(["m_heat"] * 6 + ["m_tokyo"] * 4 + ["m_god", "m_toy"])
)


@pytest.fixture(scope="module")
def films() -> CandidateRetriever:
    n = len(FILMS)
    cat = Catalogue.from_columns(
        {
            "entity_id": np.array([e for e, _ in FILMS]),
            "entity_type": np.array(["video"] * n),
            "display_name": np.array([name for _, name in FILMS]),
            "year": np.zeros(n, dtype=np.int32),
            "genres": np.array([""] * n),
            "countries": np.array([""] * n),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )
    tables = hand_world.tables(cat, hand_world.make_log(FILM_PLAYS))
    return CandidateRetriever(FeatureBuilder(cat, tables, TextIndex.build(cat)))


def matched(retriever: CandidateRetriever, query: str) -> list[str]:
    """The search candidates that match ``query`` (first-stage score > 0), best first:
    the slate before its popularity top-up."""
    ctx = impute_context("search", "u", query, "US", None, lambda _: None)
    cf = retriever.features.context(ctx, Personalization.NONE)
    ids, score = retriever._search(cf)
    hits = ids[np.lexsort((ids, -score))]
    return retriever.catalogue.entity_id[hits].tolist()


@pytest.mark.parametrize(
    "query",
    [
        "godfahter",  # transposition
        "godfaher",  # missing letter
        "godfatther",  # doubled letter
        "godfah",  # a typo in a prefix being typed
        "GODFATHER",
    ],
)
def test_search_finds_the_godfather_through_a_typo(films: CandidateRetriever, query: str) -> None:
    got = matched(films, query)
    # every "godfather" title matches, and only those (Heat is the most popular title)
    assert set(got) == {"m_god", "m_god2", "m_tokyo"}
    assert retrieve(films, "search", query, limit=3, level=Personalization.NONE)[:3] == got


def test_the_typo_in_the_second_word_of_a_name_is_found(films: CandidateRetriever) -> None:
    # "godfather" is the second word of "the godfather": word anchors and the typo
    # budget find it, where the whole-name trigrams ("$the godfather$") did not
    got = matched(films, "the godfahter")
    assert set(got[:2]) == {"m_god", "m_god2"}  # "the" and "godfahter" both match
    # then "the" alone (an exact token), then "godfahter" alone (a typo: weighs less)
    assert got[2:] == ["m_the", "m_tokyo"]


def test_a_later_word_is_matched_as_the_start_of_the_query(films: CandidateRetriever) -> None:
    assert set(matched(films, "story")) == {"m_toy", "m_toy2"}
    assert set(matched(films, "stor")) >= {"m_toy", "m_toy2"}
    assert matched(films, "wars")[0] == "m_wars"
    assert matched(films, "wras")[0] == "m_wars"  # transposition


@pytest.mark.parametrize("query", ["Amélie", "amelie", "AMELIE", "ame\u0301lie", "amelei"])
def test_accents_do_not_matter(films: CandidateRetriever, query: str) -> None:
    assert matched(films, query) == ["m_amelie"]


def test_a_short_token_is_not_matched_with_a_typo(films: CandidateRetriever) -> None:
    # "hte" is one transposition from "the", but 3 letters get no typo budget (and share
    # no word-anchored trigram with it): nothing matches, the slate is the top-up
    assert matched(films, "hte") == []
    assert matched(films, "the")[:3] != []
    got = retrieve(films, "search", "hte", limit=3, level=Personalization.NONE)
    assert got == retrieve(films, "prequery", limit=3, level=Personalization.NONE)


def test_an_exact_token_outranks_a_typo_of_it(films: CandidateRetriever) -> None:
    ctx = impute_context("search", "u", "the godfahter", "US", None, lambda _: None)
    cf = films.features.context(ctx, Personalization.NONE)
    score = _search_score(films, cf)
    idx = films.catalogue.index
    text = films.text
    containment = np.isin(text.name_trigrams[idx["m_god"]], cf.trigrams).sum() / len(cf.trigrams)
    pop = films.features.pop_log[idx["m_god"]] / films.features.pop_log.max()
    # "the" exactly (1), "godfahter" within the budget (0.7), trigrams, popularity
    assert containment >= 0.5
    assert score[idx["m_god"]] == pytest.approx(1 + 0.7 + containment + 0.1 * pop)
    exact = films.features.context(
        impute_context("search", "u", "the godfather", "US", None, lambda _: None),
        Personalization.NONE,
    )
    assert _search_score(films, exact)[idx["m_god"]] > score[idx["m_god"]]


def _search_score(retriever: CandidateRetriever, cf: ContextFeatures) -> np.ndarray:
    """The first-stage search score of every entity (0: not matched)."""
    ids, score = retriever._search(cf)
    dense = np.zeros(retriever.n)
    dense[ids] = score
    return dense


# ---------------------------------------------------------- search text features


def text_features(
    retriever: CandidateRetriever, query: str, *entity_ids: str, task: str = "search"
) -> dict[str, dict[str, float]]:
    catalogue = retriever.catalogue

    def name(entity_id: str) -> str | None:
        i = catalogue.index.get(entity_id)
        return None if i is None else str(catalogue.display_name[i])

    source = "m_heat" if task != "search" else None
    ctx = impute_context(task, "u", query, "US", source, name)
    cf = retriever.features.context(ctx, Personalization.NONE)
    cand = np.array([catalogue.index[e] for e in entity_ids], dtype=np.int64)
    dense = retriever.features.candidates(cf, cand)["dense"]
    cols = (
        "name_prefix", "name_exact", "word_prefix", "token_overlap", "fuzzy_overlap",
        "last_token_prefix", "bm25", "trigram_containment",
    )  # fmt: skip
    return {e: {c: float(dense[i, COL[c]]) for c in cols} for i, e in enumerate(entity_ids)}


def test_word_prefix_is_the_query_starting_at_any_word(films: CandidateRetriever) -> None:
    d = text_features(films, "godfather", "m_god", "m_god2", "m_tokyo", "m_heat")
    assert d["m_god"]["word_prefix"] == 1 and d["m_god"]["name_prefix"] == 0
    assert d["m_god2"]["word_prefix"] == 1 and d["m_tokyo"]["word_prefix"] == 1
    assert d["m_heat"]["word_prefix"] == 0
    d = text_features(films, "story 2", "m_toy", "m_toy2")
    assert d["m_toy2"]["word_prefix"] == 1 and d["m_toy"]["word_prefix"] == 0
    # a whole-name prefix is a word prefix; the middle of a word is not
    d = text_features(films, "toy st", "m_toy")
    assert d["m_toy"]["word_prefix"] == d["m_toy"]["name_prefix"] == 1
    assert text_features(films, "ory", "m_toy")["m_toy"]["word_prefix"] == 0


def test_fuzzy_overlap_counts_tokens_found_exactly_or_within_the_budget(
    films: CandidateRetriever,
) -> None:
    d = text_features(films, "the godfahter", "m_god", "m_tokyo", "m_the", "m_heat")
    assert d["m_god"]["token_overlap"] == 0.5 and d["m_god"]["fuzzy_overlap"] == 1
    assert d["m_tokyo"]["token_overlap"] == 0 and d["m_tokyo"]["fuzzy_overlap"] == 0.5
    assert d["m_the"]["token_overlap"] == d["m_the"]["fuzzy_overlap"] == 0.5
    assert d["m_heat"]["fuzzy_overlap"] == 0
    # bm25 stays on exact matches: the typo adds nothing to the score of "the"
    exact = text_features(films, "the", "m_god")["m_god"]
    assert d["m_god"]["bm25"] == pytest.approx(exact["bm25"]) and exact["bm25"] > 0
    # the last token as a prefix, with a typo
    typed = text_features(films, "godfah", "m_god")["m_god"]
    assert typed["fuzzy_overlap"] == 1 and typed["token_overlap"] == 0
    assert typed["last_token_prefix"] == 0
    # "hte": too short for a typo
    assert text_features(films, "hte", "m_the")["m_the"]["fuzzy_overlap"] == 0


def test_page_queries_are_not_typo_matched(films: CandidateRetriever) -> None:
    # a page's query is its source's own name, never a typo: fuzzy overlap is exact overlap
    page = text_features(films, "godfahter", "m_god", task="more_like_this")["m_god"]
    assert page["fuzzy_overlap"] == page["token_overlap"] == 0
    search = text_features(films, "godfahter", "m_god")["m_god"]
    assert search["fuzzy_overlap"] == 1  # the same text typed in the search box


def test_text_features_do_not_depend_on_the_other_candidates(films: CandidateRetriever) -> None:
    alone = text_features(films, "the godfahter", "m_god")["m_god"]
    together = text_features(films, "the godfahter", "m_heat", "m_god", "m_tokyo")["m_god"]
    assert alone == together


def test_trigram_containment_is_word_anchored(films: CandidateRetriever) -> None:
    d = text_features(films, "godfahter", "m_god", "m_heat")
    assert d["m_god"]["trigram_containment"] >= 0.5  # "$go" of the second word counts
    assert d["m_heat"]["trigram_containment"] == 0


# ----------------------------------------------- the sparse first stage vs a dense oracle
def _dense_reference(r: CandidateRetriever, cf: ContextFeatures, limit: int) -> np.ndarray:
    """The first stage scored over the whole catalogue (what ``CandidateRetriever`` did
    before it read only what a request touches): the oracle its answers must equal."""
    from app.core.retrieval import CLUSTER_WEIGHT, FUZZY_WEIGHT, SEARCH_POP_WEIGHT, USER_WEIGHT
    from app.core.text_index import TRIGRAM_MATCH

    f, n = r.features, r.n
    score = np.zeros(n)
    task = cf.context.task
    if task is Task.SEARCH:
        token_hits, fuzzy_hits = np.zeros(n), np.zeros(n)
        for i, tok in enumerate(cf.tokens):
            exact = np.zeros(n, dtype=bool)
            exact[r.text.postings(tok, prefix=cf.is_prefix[i])] = True
            near = np.zeros(n, dtype=bool)
            near[cf.fuzzy_postings[i]] = True
            token_hits += exact
            fuzzy_hits += near & ~exact
        c = cf.trigram_containment
        trigram = np.where(c >= TRIGRAM_MATCH, c, 0.0)
        relevant = (token_hits > 0) | (fuzzy_hits > 0) | (trigram > 0)
        pop = SEARCH_POP_WEIGHT * f.pop_log / max(float(f.pop_log.max()), 1.0)
        score = np.where(relevant, token_hits + FUZZY_WEIGHT * fuzzy_hits + trigram + pop, 0.0)
    elif task is Task.MORE_LIKE_THIS:
        targets, counts = r.tables.co_engaged(cf.source_index)
        score[targets] = 2.0 + np.log1p(counts)
        sims = r.item_unit @ r.item_unit[cf.source_index]
        sims[cf.source_index] = -np.inf
        near = np.argsort(-sims, kind="stable")[: r.neighbours.shape[1]]
        score[near] = np.maximum(score[near], 1.0 + np.clip(sims[near], 0.0, 1.0))
    elif task is Task.ENTITY:
        targets, counts = r.tables.co_engaged(cf.source_index)
        score[targets] = 1.0 + np.log1p(counts)
        linked = r.catalogue.linked(cf.source_index)
        score[linked] += 2.0 + f.pop_log[linked] / 100.0
    else:
        score = 1.0 + f.country_pop_log[cf.country_row].astype(np.float64)
        if cf.cluster > 0:
            score = score + CLUSTER_WEIGHT * f.cluster_pop_log[cf.cluster]
        if cf.user_vec.any():
            score = score + USER_WEIGHT * np.clip(r.tables.item_vec @ cf.user_vec[0], 0.0, None)
    allowed = r.allowed[cf.country_row].copy()
    if cf.source_index >= 0:
        allowed[cf.source_index] = False
    score = np.where(allowed, score, -np.inf)
    hits = np.flatnonzero(score > 0)
    hits = hits[np.lexsort((hits, -score[hits]))][:limit]
    if len(hits) < limit:
        pop = np.where(allowed, f.country_pop_log[cf.country_row].astype(np.float64), -np.inf)
        pop[hits] = -np.inf
        rest = np.flatnonzero(np.isfinite(pop))
        rest = rest[np.lexsort((rest, -pop[rest]))][: limit - len(hits)]
        hits = np.concatenate([hits, rest])
    return hits.astype(np.int64)


def _contexts(bundle_dir: Any, seed: int) -> Iterator[tuple[CandidateRetriever, Any]]:
    """(retriever, ContextFeatures) for every task over a real bundle's catalogue: titles
    typed whole, as prefixes and with a typo; sources; members at every level."""
    from app.core.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    r, cat = bundle.retriever, bundle.catalogue
    rng = np.random.default_rng(seed)
    names = [str(cat.display_name[i]).lower() for i in rng.choice(len(cat), 12, replace=False)]
    queries = [q for name in names for q in (name, name[: max(1, len(name) // 2)], name[1:])]
    queries += ["s", "th", "zzzz qqq"]
    sources = [str(cat.entity_id[i]) for i in rng.choice(len(cat), 12, replace=False)]
    users = [str(u) for u in rng.choice(bundle.tables.user_ids, 6, replace=False)] + ["nobody"]
    countries = [*cat.country_names[:3], None, "ZZ"]

    def name_of(entity_id: str) -> str | None:
        i = cat.index.get(entity_id)
        return None if i is None else str(cat.display_name[i])

    for task in TASKS:
        for i in range(24):
            q = queries[i % len(queries)] if task == "search" else None
            src = sources[i % len(sources)] if task in ("more_like_this", "entity") else None
            ctx = impute_context(task, users[i % len(users)], q, countries[i % 5], src, name_of)
            yield r, r.features.context(ctx, list(Personalization)[i % 3])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_first_stage_equals_scoring_the_whole_catalogue(fast_bundle: Any, seed: int) -> None:
    """For every task, country, member and level, and limits from 1 to past the catalogue,
    the candidates are exactly the dense oracle's, in its order."""
    for r, cf in _contexts(fast_bundle, seed):
        for limit in (1, 7, 60, 300, r.n + 5):
            got, want = r.retrieve(cf, limit), _dense_reference(r, cf, limit)
            assert got.tolist() == want.tolist(), (cf.context, limit)


def test_prequery_past_its_stored_list_is_exact_or_scores_the_catalogue(
    fast_bundle: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With lists far shorter than the catalogue, a member's vector that could lift an
    entity from beyond the list makes the catalogue be scored: the answer is still the
    oracle's, whether the list sufficed or not (both happen here)."""
    import app.core.retrieval as retrieval

    monkeypatch.setattr(retrieval, "PREQUERY_LIST", 40)
    sufficed = []

    for r, cf in _contexts(fast_bundle, 2):
        if cf.context.task is not Task.PREQUERY:
            continue
        fresh = CandidateRetriever(r.features)  # lists of 40 entities
        for limit in (1, 10, 40, 41, 200):
            got = fresh.retrieve(cf, limit)
            assert got.tolist() == _dense_reference(fresh, cf, limit).tolist(), (cf, limit)
            ids, _ = fresh._prequery(cf, limit)
            sufficed.append(len(ids) < fresh.n)
    assert any(sufficed) and not all(sufficed), sufficed
