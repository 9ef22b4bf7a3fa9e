"""The deterministic synthetic world (model_export.synthetic).

All tests share one small world (a few hundred users and titles, well under a second to
generate); the determinism and scaling tests build a few more of the same size.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import TASKS, impute_context, normalise_query, tokenize
from model_export.engagement_log import EngagementLog
from model_export.synthetic import (
    KEYSTROKE_GAP_S,
    SyntheticWorld,
    WorldConfig,
    build_world,
    engagement_probability,
    generate_world,
    search_relevance,
)

SMALL = WorldConfig(
    seed=11,
    n_users=400,
    n_videos=400,
    n_games=30,
    n_collections=10,
    n_people=20,
    search_sessions=300,
    prequery_sessions=400,
    more_like_this_sessions=300,
    entity_sessions=300,
)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return build_world(SMALL)


def _entity_index(catalogue: Catalogue, ids: np.ndarray) -> np.ndarray:
    return np.array([catalogue.index[e] for e in ids.tolist()], dtype=np.int64)


def _search_sessions(log: EngagementLog) -> list[np.ndarray]:
    """Impression ids of each logged-in search session, in keystroke order. A session is a
    run of one user's search impressions at most ``KEYSTROKE_GAP_S[1]`` seconds apart."""
    s = log.select((log.task == "search") & (log.user_id != ""))
    imp, first = np.unique(s.impression_id, return_index=True)
    user, when = s.user_id[first], s.timestamp[first]
    order = np.lexsort((imp, when, user))
    imp, user, when = imp[order], user[order], when[order]
    new = np.r_[True, (user[1:] != user[:-1]) | (when[1:] - when[:-1] > KEYSTROKE_GAP_S[1])]
    return np.split(imp, np.flatnonzero(new)[1:])


def _first_row_of(log: EngagementLog) -> dict[int, int]:
    imp, first = np.unique(log.impression_id, return_index=True)
    return dict(zip(imp.tolist(), first.tolist(), strict=True))


# ----------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_arrays(world: SyntheticWorld) -> None:
    again = build_world(SMALL)
    for name, column in world.log.columns().items():
        assert np.array_equal(column, getattr(again.log, name)), name
    for name, column in world.catalogue.columns().items():
        assert np.array_equal(column, again.catalogue.columns()[name]), name
    assert np.array_equal(world.user_taste, again.user_taste)
    assert np.array_equal(world.entity_latent, again.entity_latent)


def test_different_seeds_give_different_worlds(world: SyntheticWorld) -> None:
    catalogue, log = generate_world(replace(SMALL, seed=12))
    assert not np.array_equal(catalogue.display_name, world.catalogue.display_name)
    n = min(len(log), len(world.log))
    assert not np.array_equal(log.target_entity_id[:n], world.log.target_entity_id[:n])


def test_generate_world_returns_the_built_tables(world: SyntheticWorld) -> None:
    catalogue, log = generate_world(SMALL)
    assert np.array_equal(catalogue.entity_id, world.catalogue.entity_id)
    assert np.array_equal(log.query, world.log.query)


# ---------------------------------------------------------------------------- schema


def test_every_task_is_present(world: SyntheticWorld) -> None:
    rows = world.log.rows_per_task()
    assert set(rows) == set(TASKS)
    assert all(n > 0 for n in rows.values()), rows


def test_log_schema_and_impression_structure(world: SyntheticWorld) -> None:
    log = world.log
    assert log.impression_id.dtype == np.int64 and log.timestamp.dtype == np.int64
    assert log.label.dtype == np.int8
    assert set(np.unique(log.label).tolist()) == {0, 1}
    for name in ("task", "user_id", "query", "country", "source_entity_id", "target_entity_id"):
        assert getattr(log, name).dtype.kind == "U", name
    # impression ids are 0..n-1 in time order; the rows of one impression share the context
    imp, inverse = np.unique(log.impression_id, return_inverse=True)
    assert np.array_equal(imp, np.arange(len(imp)))
    assert np.all(np.diff(log.impression_id) >= 0)
    first = np.unique(log.impression_id, return_index=True)[1]
    assert np.all(np.diff(log.timestamp[first]) >= 0)
    for name in ("timestamp", "task", "user_id", "query", "country", "source_entity_id"):
        column = getattr(log, name)
        assert np.array_equal(column, column[first][inverse]), name
    pairs = np.unique(np.char.add(log.impression_id.astype(str), log.target_entity_id))
    assert len(pairs) == len(log), "a target appears twice in one impression"
    per_impression = np.bincount(inverse)
    assert per_impression.max() <= SMALL.impressions_per_request
    start = SMALL.start_timestamp
    assert start <= log.timestamp.min() and log.timestamp.max() < start + 91 * 86_400


def test_context_is_raw_per_task(world: SyntheticWorld) -> None:
    log, catalogue = world.log, world.catalogue
    by_task = {task: log.select(log.task == task) for task in TASKS}
    search = by_task["search"]
    assert np.all(search.source_entity_id == "")
    assert all(normalise_query(q) for q in np.unique(search.query).tolist())
    # raw, not normalised: typed prefixes that end in a space are kept as typed
    assert np.any(np.char.endswith(search.query, " "))
    pre = by_task["prequery"]
    assert np.all(pre.query == "") and np.all(pre.source_entity_id == "")
    for task, kinds in (
        ("more_like_this", {"video"}),
        ("entity", {"genre", "collection", "person"}),
    ):
        rows = by_task[task]
        assert np.all(rows.query == ""), f"{task} query must stay raw (empty), not imputed"
        source_types = catalogue.entity_type[_entity_index(catalogue, rows.source_entity_id)]
        assert set(np.unique(source_types).tolist()) == kinds, task
    # every row imputes with the service's own code
    first = np.unique(log.impression_id, return_index=True)[1]
    names = dict(zip(catalogue.entity_id.tolist(), catalogue.display_name.tolist(), strict=True))
    for i in first[:: max(1, len(first) // 500)].tolist():
        ctx = impute_context(
            str(log.task[i]),
            str(log.user_id[i]),
            str(log.query[i]),
            str(log.country[i]),
            str(log.source_entity_id[i]),
            names.get,
        )
        assert ctx.query or ctx.task.value == "prequery"


def test_missing_users_and_countries_are_empty_strings(world: SyntheticWorld) -> None:
    log = world.log
    first = np.unique(log.impression_id, return_index=True)[1]
    users, countries = log.user_id[first], log.country[first]
    assert all(u == "" or re.fullmatch(r"u\d+", u) for u in np.unique(users).tolist())
    assert 0.01 < np.mean(users == "") < 0.06  # ~3% logged out
    assert 0.005 < np.mean(countries == "") < 0.045  # ~2% unknown country
    assert set(np.unique(countries).tolist()) == {"", *SMALL.countries}


def test_ids_exist_and_targets_are_available_in_the_row_country(world: SyntheticWorld) -> None:
    log, catalogue = world.log, world.catalogue
    known = set(catalogue.entity_id.tolist())
    assert set(np.unique(log.target_entity_id).tolist()) <= known
    assert set(np.unique(log.source_entity_id).tolist()) <= known | {""}
    target = _entity_index(catalogue, log.target_entity_id)
    assert np.all(catalogue.rankable[target])
    for country in SMALL.countries:
        rows = log.country == country
        assert np.all(catalogue.available_in(country)[target[rows]]), country


def test_catalogue_names_links_and_countries(world: SyntheticWorld) -> None:
    c = world.catalogue
    rankable = c.display_name[c.rankable].tolist()
    assert len(set(rankable)) == len(rankable), "rankable names are unique"
    normalised = {normalise_query(n) for n in rankable}
    # "Star" next to "Star River": some title is the first words of another one
    assert any(
        " ".join(tokenize(n)[:k]) in normalised
        for n in normalised
        for k in range(1, len(tokenize(n)))
    )
    assert re.fullmatch(r"v\d+", str(c.entity_id[0])) and c.entity_type[0] == "video"
    for kind, pattern in (
        ("game", r"g\d+"),
        ("genre", r"genre:[a-z_]+"),
        ("collection", r"col:\d+"),
        ("person", r"person:\d+"),
    ):
        ids = c.entity_id[c.entity_type == kind].tolist()
        assert ids and all(re.fullmatch(pattern, i) for i in ids), kind
    # links go from non-video pages to videos; collections hold 5-30, people 3-15
    src = _entity_index(c, c.link_source)
    dst = _entity_index(c, c.link_target)
    assert np.all(c.entity_type[dst] == "video") and np.all(~c.rankable[src])
    for kind, low, high in (("collection", 5, 30), ("person", 3, 15)):
        sizes = np.bincount(src, minlength=len(c))[c.entity_type == kind]
        assert low <= sizes.min() and sizes.max() <= high, kind
    # genre links match the genres column
    genre_of_video = {
        (f"genre:{g}", str(v))
        for v, gs in zip(c.entity_id.tolist(), c.genres.tolist(), strict=True)
        if c.index[v] < SMALL.n_videos
        for g in gs.split("|")
    }
    genre_links = {
        (str(s), str(t))
        for s, t in zip(c.link_source, c.link_target, strict=True)
        if str(s).startswith("genre:")
    }
    assert genre_links == genre_of_video
    videos = c.entity_type == "video"
    exclusive = np.mean(c.available[:, videos].sum(axis=0) == 1)
    assert 0.1 < exclusive < 0.35
    assert np.all(c.countries[~videos] == "")
    assert c.country_names == tuple(sorted(SMALL.countries))


# ---------------------------------------------------------------------------- search


def test_search_sessions_are_successive_keystrokes(world: SyntheticWorld) -> None:
    log = world.log
    first = _first_row_of(log)
    sessions = _search_sessions(log)
    assert len(sessions) > 0.8 * SMALL.search_sessions
    assert np.mean([len(s) > 3 for s in sessions]) > 0.4
    for session in sessions:
        rows = [first[i] for i in session.tolist()]
        queries = log.query[rows].tolist()
        assert all(len(q) <= 2 for q in queries[:1]), queries
        for before, after in itertools.pairwise(queries):
            assert after[:-1] == before, queries
        gaps = np.diff(log.timestamp[rows])
        assert np.all((gaps >= KEYSTROKE_GAP_S[0]) & (gaps <= KEYSTROKE_GAP_S[1]))


def test_search_play_is_attributed_to_every_keystroke_that_showed_it(
    world: SyntheticWorld,
) -> None:
    log = world.log
    played_sessions = 0
    for session in _search_sessions(log):
        rows = np.isin(log.impression_id, session)
        played = np.unique(log.target_entity_id[rows & (log.label == 1)])
        assert len(played) <= 1, "one play per search session"
        if len(played) == 1:
            played_sessions += 1
            shown = rows & (log.target_entity_id == played[0])
            assert np.all(log.label[shown] == 1)
            final = rows & (log.impression_id == session[-1])
            assert np.any(final & shown), "the play happens on the final keystroke"
    assert played_sessions > 0.5 * SMALL.search_sessions


def test_row_order_within_an_impression_does_not_leak_the_label(world: SyntheticWorld) -> None:
    # slots are built in priority order (the intended search title first); the log must not
    # keep that order, or an evaluation that breaks ties by row order would be fooled
    log = world.log
    first_row = np.zeros(len(log), dtype=bool)
    first_row[np.unique(log.impression_id, return_index=True)[1]] = True
    for task in TASKS:
        positives = (log.task == task) & (log.label == 1)
        assert first_row[positives].mean() < 0.3, task


def test_exact_title_query_ends_on_that_title(world: SyntheticWorld) -> None:
    log, catalogue = world.log, world.catalogue
    names = dict(zip(catalogue.entity_id.tolist(), catalogue.display_name.tolist(), strict=True))
    cases = hits = 0
    for session in _search_sessions(log):
        final = log.impression_id == session[-1]
        query = normalise_query(str(log.query[final][0]))
        for target, label in zip(log.target_entity_id[final], log.label[final], strict=True):
            if normalise_query(names[str(target)]) == query:
                cases, hits = cases + 1, hits + int(label)
    assert cases >= 10
    assert hits / cases >= 0.85


def test_typo_rate_controls_queries_that_match_no_title() -> None:
    def off_title_share(typo_rate: float) -> float:
        catalogue, log = generate_world(replace(SMALL, typo_rate=typo_rate, seed=3))
        names = [normalise_query(n) for n in catalogue.display_name[catalogue.rankable].tolist()]
        starts = np.sort(
            [" ".join(tokenize(n)[k:]) for n in names for k in range(len(tokenize(n)))]
        )
        queries = np.array([normalise_query(q) for q in log.query[log.task == "search"].tolist()])
        # q is a prefix of some name suffix iff it prefixes the next suffix in sorted order
        after = starts[np.minimum(np.searchsorted(starts, queries), len(starts) - 1)]
        return float(np.mean(~np.strings.startswith(after, queries)))

    assert off_title_share(0.0) == 0.0
    assert off_title_share(0.5) > 0.05


# ------------------------------------------------------------------------ engagement


def test_positive_rates_are_plausible(world: SyntheticWorld) -> None:
    log = world.log
    for task in TASKS:
        rate = float(log.label[log.task == task].mean())
        assert 0.02 <= rate <= 0.5, (task, rate)


def test_personal_taste_raises_engagement_in_every_task(world: SyntheticWorld) -> None:
    log = world.log
    taste = world.oracle_taste(log)
    users = np.strings.slice(log.user_id[log.user_id != ""], 1, None).astype(np.int64)
    targets = _entity_index(world.catalogue, log.target_entity_id[log.user_id != ""])
    centroid = world.cluster_centroid[world.user_cluster[users]]
    cluster_taste = np.full(len(log), np.nan)
    cluster_taste[log.user_id != ""] = np.einsum("nd,nd->n", centroid, world.entity_latent[targets])
    for task in TASKS:
        for score in (taste, cluster_taste):
            rows = (log.task == task) & ~np.isnan(score)
            low, high = np.quantile(score[rows], [1 / 3, 2 / 3])
            near = log.label[rows & (score > high)].mean()
            far = log.label[rows & (score < low)].mean()
            assert near > 2 * far and near - far > 0.05, (task, near, far)


def test_more_like_this_sources_are_mostly_the_users_earlier_plays(
    world: SyntheticWorld,
) -> None:
    log = world.log
    played: dict[str, list[tuple[int, str]]] = {}
    positive = (log.label == 1) & (log.task != "more_like_this") & (log.user_id != "")
    for u, t, e in zip(
        log.user_id[positive], log.timestamp[positive], log.target_entity_id[positive], strict=True
    ):
        played.setdefault(str(u), []).append((int(t), str(e)))
    mlt = log.select((log.task == "more_like_this") & (log.user_id != ""))
    first = np.unique(mlt.impression_id, return_index=True)[1]
    from_history = [
        any(
            t < int(mlt.timestamp[i]) and e == mlt.source_entity_id[i]
            for t, e in played.get(str(mlt.user_id[i]), [])
        )
        for i in first.tolist()
    ]
    assert 0.4 < np.mean(from_history) <= 0.8 + 0.05


def test_search_relevance_orders_exact_prefix_later_word_and_token_matches() -> None:
    name = "the star river"
    tokens = np.array([["the", "star", "river", "", "", "", ""]] * 6)
    queries = np.array(["the star river", "the st", "star ri", "river", "xyz riv", "moon"])
    rel = search_relevance(queries, np.array([name] * 6), tokens)
    exact, prefix, later, later_word, token, none = rel.tolist()
    assert exact == 1.0
    assert prefix == pytest.approx(0.6 + 0.3 * 6 / 14)
    assert later == pytest.approx(0.5 + 0.3 * 7 / 14)
    assert later_word == pytest.approx(0.5 + 0.3 * 5 / 14)
    assert (token, none) == (0.3, 0.0)


def test_engagement_probability_prefers_relevance_in_search() -> None:
    # an exact title for a member who dislikes it (taste -1, unpopular) still beats an
    # unrelated title they love (taste +1, very popular): taste cannot override relevance
    exact = engagement_probability("search", np.array([1.0]), np.array([-1.0]), np.array([-2.0]))
    unrelated = engagement_probability("search", np.array([0.0]), np.array([1.0]), np.array([2.0]))
    assert exact[0] > unrelated[0] + 0.15
    # ... while for one relevance level, taste moves the probability a lot
    liked, disliked = engagement_probability(
        "prequery", np.zeros(2), np.array([0.6, -0.2]), np.zeros(2)
    )
    assert liked > 5 * disliked
    with pytest.raises(ValueError, match=r"task must be one of .* got 'browse'"):
        engagement_probability("browse", np.zeros(1), np.zeros(1), np.zeros(1))


# ----------------------------------------------------------------------- scale knobs


def test_sessions_do_not_grow_with_users() -> None:
    few = build_world(replace(SMALL, n_users=50))
    many = build_world(replace(SMALL, n_users=5000))
    for w in (few, many):
        n_impressions = {
            task: len(np.unique(w.log.impression_id[w.log.task == task])) for task in TASKS
        }
        assert n_impressions["prequery"] == SMALL.prequery_sessions
        assert n_impressions["entity"] == SMALL.entity_sessions
        assert n_impressions["more_like_this"] <= SMALL.more_like_this_sessions
    assert len(np.unique(many.log.user_id)) > len(np.unique(few.log.user_id))


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": -1}, r"seed must be >= 0, got -1"),
        ({"n_users": 0}, r"n_users must be >= 1, got 0"),
        ({"n_videos": 0}, r"n_videos must be >= 1, got 0"),
        ({"n_games": -3}, r"n_games must be >= 0, got -3"),
        ({"n_genres": 31}, r"n_genres must be in \[1, 30\], got 31"),
        ({"n_countries": 0}, r"n_countries must be in \[1, 30\], got 0"),
        ({"taste_dim": 1}, r"taste_dim must be >= 2, got 1"),
        ({"search_sessions": -1}, r"search_sessions must be >= 0, got -1"),
        ({"impressions_per_request": 3}, r"impressions_per_request must be in \[4, 200\]"),
        ({"span_days": 0}, r"span_days must be in \[1, 36500\], got 0"),
        ({"n_users": 2.5}, r"n_users must be an integer, got 2.5"),
        ({"n_clusters": True}, r"n_clusters must be an integer, got True"),
        ({"typo_rate": 1.5}, r"typo_rate must be in \[0, 1\), got 1.5"),
        ({"logged_out_rate": -0.1}, r"logged_out_rate must be in \[0, 1\), got -0.1"),
        ({"unknown_country_rate": "x"}, r"unknown_country_rate must be a number, got 'x'"),
    ],
)
def test_config_validation_names_the_field_and_rule(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WorldConfig(**change)  # type: ignore[arg-type]


def test_the_config_sizes_are_the_catalogues(world: SyntheticWorld) -> None:
    c = world.catalogue
    assert len(c) == SMALL.n_entities and int(c.rankable.sum()) == SMALL.n_rankable
    assert Counter(c.entity_type.tolist()) == {
        "video": SMALL.n_videos, "game": SMALL.n_games, "genre": SMALL.n_genres,
        "collection": SMALL.n_collections, "person": SMALL.n_people,
    }  # fmt: skip
