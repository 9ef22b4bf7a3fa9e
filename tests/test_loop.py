"""``make loop`` (loadtest/loop.py): the simulated members are the synthetic world's, their
sessions and engagement decisions are seeded and reproducible, the decisions follow the
true probabilities with the examination decay, and the figures (DCG / NDCG, coverage,
Gini, top-1% share) are right on small hand-made inputs. The end-to-end smoke runs a few
sessions of every task against a real server with events on and joins its files back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from handmade_bundle import WORLD

from app.core.catalogue import Catalogue
from app.core.context import TASKS, normalise_query
from loadtest import loop
from loadtest.loop import (
    Figures,
    GroundTruth,
    K,
    LogStats,
    SeedRun,
    Sessions,
    coverage,
    dcg,
    draw_sessions,
    engaged,
    examination,
    expected_engagements,
    exposure,
    gini,
    ndcg,
    probabilities,
    top_share,
)
from model_export import synthetic as sw


@pytest.fixture(scope="module")
def truth() -> GroundTruth:
    return GroundTruth.of(WORLD)


def _sessions_equal(a: Sessions, b: Sessions) -> bool:
    names = ("user", "country", "query", "source", "target", "alternative", "draws")
    return a.task == b.task and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in names)


# --- the world's truth ---------------------------------------------------------------------


def test_the_truth_is_the_worlds_hidden_state(truth: GroundTruth) -> None:
    world = sw.build_world(WORLD)
    assert np.array_equal(truth.ent.latent, world.entity_latent)
    assert np.array_equal(truth.users.taste, world.user_taste)
    assert np.array_equal(truth.popularity, world.entity_log_popularity[: WORLD.n_rankable])
    truth.check_catalogue(world.catalogue)  # the same catalogue: no error
    other = sw.generate_world(sw.WorldConfig(**{**WORLD.__dict__, "n_videos": 150}))[0]
    with pytest.raises(SystemExit, match="not the synthetic world"):
        truth.check_catalogue(other)
    ids = world.catalogue.entity_id
    assert truth.index_of([str(ids[3]), "nope", str(ids[0])]).tolist() == [3, -1, 0]


# --- sessions ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_sessions_are_reproducible_per_seed(truth: GroundTruth, task: str) -> None:
    a, b = draw_sessions(truth, task, 60, seed=3), draw_sessions(truth, task, 60, seed=3)
    assert _sessions_equal(a, b)
    assert a.bodies(truth) == b.bodies(truth)
    assert not _sessions_equal(a, draw_sessions(truth, task, 60, seed=4))
    # a task's stream is its own: drawing another task first changes nothing
    draw_sessions(truth, TASKS[(TASKS.index(task) + 1) % len(TASKS)], 30, seed=3)
    assert _sessions_equal(a, draw_sessions(truth, task, 60, seed=3))


def test_sessions_are_what_the_worlds_members_do(truth: GroundTruth) -> None:
    ent, r = truth.ent, truth.n_rankable
    search = draw_sessions(truth, "search", 300, seed=1)
    # the query is typed for the wanted title: (a typo aside) it matches its name
    rel = sw.search_relevance(
        np.array([normalise_query(q) for q in search.query.tolist()]),
        ent.name_norm[search.target],
        ent.tokens[search.target],
    )
    assert (rel > 0).mean() > 0.9 and (search.target < r).all()
    assert ent.available[search.country, search.target].all()
    has_alt = search.alternative >= 0
    assert has_alt.any() and not (search.alternative[has_alt] == search.target[has_alt]).any()
    mlt = draw_sessions(truth, "more_like_this", 200, seed=1)
    assert ((mlt.source >= 0) & (mlt.source < WORLD.n_videos)).all()  # a video to start from
    page = draw_sessions(truth, "entity", 200, seed=1)
    assert (page.source >= r).all() and (np.diff(ent.link_indptr)[page.source] > 0).all()
    body = page.bodies(truth, k=7, personalization="cluster")[0]
    assert body["task"] == "entity" and body["k"] == 7 and body["personalization"] == "cluster"
    assert body["user_id"] == f"u{page.user[0]}" and body["country"] in WORLD.countries
    assert body["source_entity_id"] == str(truth.ids[page.source[0]]) and "query" not in body
    pre = draw_sessions(truth, "prequery", 50, seed=1).bodies(truth)[0]
    assert set(pre) == {"task", "user_id", "country", "k", "personalization"}


def test_the_tasks_interleave_in_a_seeded_order(truth: GroundTruth) -> None:
    sessions = {t: draw_sessions(truth, t, 40, seed=1) for t in TASKS}
    plan = loop.schedule(sessions, seed=1)
    assert sorted(plan) == sorted((t, i) for t, s in sessions.items() for i in range(len(s)))
    assert plan == loop.schedule(sessions, seed=1) != loop.schedule(sessions, seed=2)
    first_tasks = {t for t, _ in plan[: len(plan) // 4]}
    assert first_tasks == set(TASKS)  # not one task after another


# --- the member model ----------------------------------------------------------------------


def test_probabilities_are_the_worlds_engagement_model(truth: GroundTruth) -> None:
    ent, users, r = truth.ent, truth.users, truth.n_rankable
    s = draw_sessions(truth, "prequery", 5, seed=2)
    items = np.tile(np.arange(6), (len(s), 1))
    items[:, -1] = -1  # an empty slot
    p = probabilities(truth, s, items)
    u, c = s.user[0], s.country[0]
    for j in range(5):
        taste = float(users.taste[u] @ ent.latent[j])
        expected = sw.engagement_probability(
            "prequery", np.zeros(1), np.array([taste]), np.array([truth.sim.pop_z[c, j]])
        )[0]
        assert p[0, j] == pytest.approx(expected if ent.available[c, j] else 0.0, rel=1e-5)
    assert (p[:, -1] == 0).all()
    # an item the member's country does not carry is never engaged
    missing = np.flatnonzero(~ent.available[s.country[0], :r])
    if len(missing):
        assert probabilities(truth, s.take(slice(0, 1)), missing[None, :1])[0, 0] == 0.0
    # a page's own source is not engaged; the rest follow relevance = cosine
    mlt = draw_sessions(truth, "more_like_this", 4, seed=2)
    assert (probabilities(truth, mlt, mlt.source[:, None]) == 0).all()
    # search: the wanted title has the world's play probability, the preferred
    # alternative ALT_CLICK_RATE, every other title 0
    search = draw_sessions(truth, "search", 80, seed=2)
    p_all = loop.all_probabilities(truth, search)
    nonzero = (p_all > 0).sum(axis=1)
    assert (nonzero <= 1 + (search.alternative >= 0)).all()
    rows = np.arange(len(search))
    has_alt = search.alternative >= 0
    assert np.allclose(p_all[rows[has_alt], search.alternative[has_alt]], sw.ALT_CLICK_RATE)
    i = int(np.flatnonzero(p_all[rows, search.target] > 0)[0])
    t = search.target[i]
    q = np.array([normalise_query(str(search.query[i]))])
    expected = sw.engagement_probability(
        "search",
        sw.search_relevance(q, ent.name_norm[[t]], ent.tokens[[t]]),
        np.array([float(users.taste[search.user[i]] @ ent.latent[t])]),
        np.array([truth.sim.pop_z[search.country[i], t]]),
    )[0]
    assert p_all[i, t] == pytest.approx(expected, rel=1e-5)


def test_engagement_decisions_follow_examination_times_probability() -> None:
    n, k = 40_000, 4
    p = np.tile(np.array([0.9, 0.5, 0.5, 0.0]), (n, 1))
    draws = np.random.default_rng(5).random((n, K))
    hits = engaged(p, draws)
    expected = examination(k) * p[0]
    assert examination(3).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5])
    for pos in range(k):
        sd = math.sqrt(max(expected[pos] * (1 - expected[pos]), 1e-12) / n)
        assert abs(hits[:, pos].mean() - expected[pos]) <= 4 * sd + 1e-12
    assert not hits[:, 3].any()  # p = 0: never
    assert np.array_equal(hits, engaged(p, draws.copy()))  # the same draws, the same acts


def test_the_same_answers_give_the_same_engagements(truth: GroundTruth) -> None:
    shown = np.tile(np.arange(K), (50, 1))
    a, b = (draw_sessions(truth, "prequery", 50, seed=9) for _ in range(2))
    hits_a = engaged(probabilities(truth, a, shown), a.draws)
    assert np.array_equal(hits_a, engaged(probabilities(truth, b, shown), b.draws))
    other = draw_sessions(truth, "prequery", 50, seed=10)
    assert not np.array_equal(hits_a, engaged(probabilities(truth, other, shown), other.draws))


# --- the figures ---------------------------------------------------------------------------


def test_dcg_ndcg_and_expected_engagements_by_hand() -> None:
    shown = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    best = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    by_hand = 0.5 + 1.0 / math.log2(4)
    assert dcg(shown)[0] == pytest.approx(by_hand)
    assert expected_engagements(shown).tolist() == pytest.approx(dcg(shown).tolist())
    ideal = 1.0 + 0.5 / math.log2(3)
    scores = ndcg(shown, best)
    assert scores[0] == pytest.approx(by_hand / ideal)
    assert scores[1] == pytest.approx(1.0)  # the best order
    assert math.isnan(scores[2])  # nothing engageable: left out of the mean
    assert dcg(np.ones((1, 20)), k=10)[0] == pytest.approx(examination(10).sum())


def test_coverage_gini_and_top_share_by_hand() -> None:
    shown = np.array([[0, 1, -1], [0, 2, -1]])
    assert exposure(shown, 4).tolist() == [2, 1, 1, 0]
    assert coverage(shown, 4) == pytest.approx(0.75)
    # sorted exposure 0, 1, 1, 2: 2 * (0 + 2 + 3 + 8) / (4 * 4) - 5 / 4
    assert gini(exposure(shown, 4)) == pytest.approx(0.375)
    assert gini(np.array([3, 3, 3])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 5])) == pytest.approx(0.75)  # (n - 1) / n
    assert gini(np.zeros(3)) == 0.0
    popularity = np.array([5.0, 1.0, 0.0, 3.0])
    assert top_share(shown, popularity, fraction=0.25) == pytest.approx(0.5)  # item 0: 2 of 4
    assert top_share(shown, popularity, fraction=0.5) == pytest.approx(0.5)  # items 0 and 3
    assert top_share(np.full((2, 3), -1), popularity) == 0.0


def _figures(engagements: float, ndcg_: float) -> Figures:
    return Figures(10, engagements, ndcg_, 0.2, 0.5, 0.1, 0)


def test_the_report_block_is_written_and_replaced(tmp_path: Path) -> None:
    def run(seed: int, delta: float) -> SeedRun:
        per_bundle = {
            name: {t: _figures(1.0 + d, 0.5 + d) for t in (*TASKS, "all")}
            for name, d in (("original", 0.0), ("cold", delta), ("warm", -delta / 2))
        }
        log = LogStats(seed, {t: 10 for t in TASKS}, {t: 3 for t in TASKS}, 12, 0, 9, 1, 1)
        join = {"impressions_used": 40, "engagements_used": 12, "positives_by_position": [1, 2]}
        facts = {"seconds": 30.0, "version": "events-s7-abc", "train_rows": 1234, "users": 9}
        return SeedRun(seed, log, join, per_bundle, {arm: facts for arm in loop.ARMS})

    runs = [run(1, -0.1), run(2, -0.2)]
    settings = {
        "minutes": 1.0, "world_seed": 7, "members": 4000, "rankable": 2100,
        "bundle": "bundles/demo", "original_version": "synthetic-s7-x", "log_sessions": 10,
        "eval_sessions": 10, "personalization": "full",
    }  # fmt: skip
    body = loop.render(runs, settings, "make loop")
    assert "| join: impressions_used | 40 | 40 |" in body
    cold, warm = body.index("**cold** against"), body.index("**warm** against")
    assert "- search: expected engagements worse (-15.0%), NDCG@10 worse" in body[cold:warm]
    assert "- search: expected engagements better (+7.5%), NDCG@10 better" in body[warm:]
    assert "| 0.350 ± 0.071 |" in body  # cold NDCG over the two seeds (0.4, 0.3)
    assert "| cold: training rows | 1234 | 1234 |" in body
    doc = tmp_path / "EVALUATION.md"
    doc.write_text("# Offline evaluation\n\nhand-written\n")
    for text in ("first", "second"):
        loop.ensure_section(doc)
        loop.write_block(doc, loop.BLOCK, text)
    out = doc.read_text()
    assert out.count(loop.SECTION) == 1 and "second" in out and "first" not in out
    assert out.startswith("# Offline evaluation\n\nhand-written\n")


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_few_sessions_against_a_real_server(fast_bundle: Path, tmp_path: Path) -> None:
    """Serve the fast bundle with events on, run 6 sessions of every task, post the
    engagements, stop it; the files join back with every engagement used; then the
    evaluation serves the bundle to fresh sessions and scores its answers."""
    truth = GroundTruth.of(WORLD)
    truth.check_catalogue(Catalogue.load(fast_bundle / "catalogue.npz"))
    events_dir, stats = loop.log_phase(truth, fast_bundle, tmp_path, seed=1, n_sessions=6)
    assert sum(stats.requests.values()) == 24 and stats.impression_files >= 1
    assert stats.accepted == sum(stats.engagements.values()) and stats.duplicates == 0
    join = loop.join_report(events_dir, fast_bundle)
    assert join["impressions_used"] == 24 and join["impressions_hashed_user"] == 0
    assert join["engagements_used"] == stats.accepted
    assert join["engagements_orphan"] == join["engagements_unshown"] == 0
    fresh = {t: draw_sessions(truth, t, 4, seed=101) for t in TASKS}
    result = loop.eval_phase(truth, {"original": fast_bundle}, fresh, tmp_path)["original"]
    for task in TASKS:
        figures = result[task]
        assert figures.sessions == 4 and 0 <= figures.engagements <= examination(K).sum()
        assert math.isnan(figures.ndcg) or 0.0 <= figures.ndcg <= 1.0 + 1e-9
    assert 0 < result["all"].coverage <= 1 and result["all"].sessions == 16
