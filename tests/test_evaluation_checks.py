"""The evaluation's metrics, behavioural checks and the LambdaMART anchor, with hand-built
scorers (no torch training): NDCG, recall and MRR on known lists, typo generation, the
relevance guard, the prefix and typo checks, the taste check's choice of members, the
title/tag split of search queries, LambdaMART on hand-made rows, and the report renderer
(model_export.evaluate / lambdamart / report)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import hand_world
import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import Personalization, impute_context
from app.core.features import COL, DENSE_FEATURES, FeatureBuilder
from app.core.retrieval import CandidateRetriever
from app.core.text_index import TextIndex
from model_export import evaluate
from model_export.dataset import FeaturisedRows
from model_export.engagement_log import EngagementLog
from model_export.evaluate import System
from model_export.table_builder import build_feature_tables

# ---------------------------------------------------------------------- ranking metrics


def test_ranking_metrics_on_a_known_list() -> None:
    ndcg, recall, mrr = evaluate.ranking_metrics(np.array([5, 3, 9]), np.array([3]))
    assert ndcg == pytest.approx(1 / np.log2(3))
    assert (recall, mrr) == (1.0, 0.5)
    ndcg, recall, mrr = evaluate.ranking_metrics(np.array([1, 2]), np.array([1, 2]))
    assert (ndcg, recall, mrr) == (1.0, 1.0, 1.0)
    assert evaluate.ranking_metrics(np.array([4, 5]), np.array([9])) == (0.0, 0.0, 0.0)
    # a positive past the cut-off counts for MRR only
    ranked = np.arange(20)
    ndcg, recall, mrr = evaluate.ranking_metrics(ranked, np.array([15]), k=10)
    assert (ndcg, recall) == (0.0, 0.0) and mrr == pytest.approx(1 / 16)


def test_ranking_metrics_need_a_positive() -> None:
    with pytest.raises(ValueError, match=r"^positives must not be empty$"):
        evaluate.ranking_metrics(np.array([1]), np.array([], dtype=np.int64))


# ------------------------------------------------------------------------------ typos


def _strip(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def test_each_typo_kind_makes_its_kind_of_error() -> None:
    rng = np.random.default_rng(0)
    word = "stranger"
    for _ in range(20):
        swapped = evaluate.typo_word(word, "transposition", rng)
        assert swapped is not None and len(swapped) == len(word) and swapped != word
        diff = [i for i, (a, b) in enumerate(zip(word, swapped, strict=True)) if a != b]
        assert len(diff) == 2 and diff[1] == diff[0] + 1
        assert swapped[diff[0]] == word[diff[1]] and swapped[diff[1]] == word[diff[0]]

        missing = evaluate.typo_word(word, "missing_letter", rng)
        assert missing is not None and len(missing) == len(word) - 1
        assert any(word[:i] + word[i + 1 :] == missing for i in range(len(word)))

        doubled = evaluate.typo_word(word, "doubled_letter", rng)
        assert doubled is not None and len(doubled) == len(word) + 1
        assert any(
            doubled[:i] + doubled[i + 1 :] == word and doubled[i] == doubled[i + 1]
            for i in range(len(word))
        )

        accent = evaluate.typo_word(word, "accent", rng)
        assert accent is not None and accent != word and len(accent) == len(word)
        assert _strip(accent) == word  # an accent added on one letter
    # an accented word loses its accent
    assert evaluate.typo_word("amélie", "accent", rng) == "amelie"


def test_typos_are_seeded_and_touch_one_long_word() -> None:
    name = "the dark water"
    for kind in evaluate.TYPO_KINDS:
        a = [evaluate.typo_title(name, kind, np.random.default_rng(s)) for s in range(10)]
        b = [evaluate.typo_title(name, kind, np.random.default_rng(s)) for s in range(10)]
        assert a == b  # same seed, same typo
        assert len(set(a)) > 1  # different seeds reach different words / positions
        for typo in a:
            assert typo is not None
            words = typo.split(" ")
            assert words[0] == "the"  # 3 letters: never touched
            changed = [w for w, o in zip(words, name.split(" "), strict=True) if w != o]
            assert len(changed) == 1


def test_typo_title_without_a_long_enough_word_is_none() -> None:
    rng = np.random.default_rng(0)
    assert evaluate.typo_title("up 2", "missing_letter", rng) is None
    assert evaluate.typo_title("1984", "doubled_letter", rng) is None  # digits are not letters
    assert evaluate.typo_title("rhythm", "accent", rng) is None  # nothing to accent
    with pytest.raises(ValueError, match=r"^typo kind must be one of .*, got 'swap'$"):
        evaluate.typo_word("word", "swap", rng)


# --------------------------------------------------------------- guard, typo, prefix


@pytest.fixture(scope="module")
def world() -> tuple[EngagementLog, FeatureBuilder, CandidateRetriever]:
    builder = hand_world.builder()
    return hand_world.make_log(hand_world.ROWS), builder, CandidateRetriever(builder)


def _exact_name(inputs: dict[str, np.ndarray]) -> np.ndarray:
    dense = inputs["dense"]
    return dense[:, COL["name_exact"]] + 1e-3 * dense[:, COL["global_pop_log"]]


def _random(inputs: dict[str, np.ndarray]) -> np.ndarray:
    # a fixed pseudo-random score per entity: the same for every request
    return np.asarray((inputs["target"] * 7919 + 13) % 101, dtype=np.float64)


def test_relevance_guard_is_one_for_an_exact_name_ranker_and_less_for_random(
    world: tuple[EngagementLog, FeatureBuilder, CandidateRetriever],
) -> None:
    log, builder, retriever = world
    systems = [System(f"exact ({lvl.value})", lvl, _exact_name) for lvl in Personalization]
    systems.append(System("random", Personalization.FULL, _random))
    guards = evaluate.relevance_guards(log, builder, retriever, systems, 40, 300, seed=3)
    assert guards["exact (none)"]["pairs"] == guards["random"]["pairs"] >= 30
    for lvl in Personalization:
        assert guards[f"exact ({lvl.value})"]["top1_share"] == 1.0
    assert guards["random"]["top1_share"] < 0.6
    # the one-scorer form, at a level
    one = evaluate.relevance_guard(
        log, builder, retriever, _exact_name, 40, 300, seed=3, level=Personalization.NONE
    )
    assert one == guards["exact (none)"]


def test_popular_titles_have_a_unique_name_and_come_most_popular_first(
    world: tuple[EngagementLog, FeatureBuilder, CandidateRetriever],
) -> None:
    _, builder, _ = world
    titles = evaluate.popular_titles(builder, 10)
    ids = builder.catalogue.entity_id[titles].tolist()
    assert ids[:2] == ["v_dark", "v_stranger"]  # 4 and 3 positives
    pos = builder.tables.entity_pos[titles]
    assert np.all(np.diff(pos) <= 0) and np.all(pos > 0)
    assert "v_star" not in ids and "g_drama" not in ids  # never engaged / not rankable
    assert len(evaluate.popular_titles(builder, 2)) == 2


def test_typo_and_prefix_checks_report_every_kind_and_length(
    world: tuple[EngagementLog, FeatureBuilder, CandidateRetriever],
) -> None:
    log, builder, retriever = world
    prefix_ranker = evaluate.column_scorer("name_prefix", "global_pop_log")
    systems = [
        System("exact", Personalization.FULL, _exact_name),
        System("prefix", Personalization.NONE, prefix_ranker),
    ]
    typos = evaluate.typo_check(log, builder, retriever, systems, 300, seed=1, n_titles=10)
    assert typos["titles"] == len(evaluate.popular_titles(builder, 10))
    assert set(typos["systems"]) == {"exact", "prefix"}
    for per_kind in typos["systems"].values():
        assert set(per_kind) == {*evaluate.TYPO_KINDS, "overall"}
        assert per_kind["overall"]["n"] == typos["queries"]
        assert sum(per_kind[k]["n"] for k in evaluate.TYPO_KINDS) == typos["queries"]
        for stats in per_kind.values():
            assert 0.0 <= stats["top1"] <= stats["top3"] <= stats["retrieved"] <= 1.0
    for kind, examples in typos["examples"].items():
        assert examples and all(typo != name for name, typo in examples), kind

    prefixes = evaluate.prefix_check(log, builder, retriever, systems, 300, seed=1, n_titles=10)
    for per_len in prefixes["systems"].values():
        assert set(per_len) == {"3", "4", "5"}
        for stats in per_len.values():
            assert stats["n"] > 0
            # this world has fewer rankable titles than 10: every retrieved one is in the top 10
            assert stats["top3"] <= stats["top10"] == stats["retrieved"] == 1.0


# ----------------------------------------------------------------------- taste check

GENRE_OF = {f"h{i}": "horror" for i in range(6)} | {f"c{i}": "comedy" for i in range(6)}
GENRE_OF |= {f"d{i}": "drama|comedy" if i % 2 else "drama" for i in range(4)}


def _taste_catalogue() -> Catalogue:
    ids = list(GENRE_OF)
    return Catalogue.from_columns(
        {
            "entity_id": np.array(ids),
            "entity_type": np.array(["video"] * len(ids)),
            "display_name": np.array([f"title {e}" for e in ids]),
            "year": np.zeros(len(ids), dtype=np.int32),
            "genres": np.array([GENRE_OF[e] for e in ids]),
            "countries": np.array([""] * len(ids)),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )


def _positives(user: str, targets: list[str], t0: int = 0) -> list[hand_world.Row]:
    return [(t0 + i, "prequery", user, "", "US", "", t, 1) for i, t in enumerate(targets)]


def _taste_logs() -> tuple[EngagementLog, EngagementLog]:
    horror = [f"h{i % 6}" for i in range(10)]
    train = (
        _positives("horror_fan", horror)  # 10 horror positives: a clear favourite
        + _positives("mixed", ["c0", "c1", "c2", "c3", "c4", "d0", "d1", "d2", "d3", "d0"])
        + _positives("few", horror[:4])  # too few positives
        + _positives("gone", horror + horror[:2])  # not in the test log
        + _positives("crowd", [f"c{i % 6}" for i in range(40)] + [f"d{i % 4}" for i in range(20)])
    )
    test = [
        (1000, "prequery", user, "", "GB", "", "c0", 1)
        for user in ("horror_fan", "mixed", "few", "crowd")
    ]
    return hand_world.make_log(train), hand_world.make_log(test)


def test_taste_members_are_the_ones_with_a_clear_favourite_genre() -> None:
    cat = _taste_catalogue()
    train, test = _taste_logs()
    members = evaluate.taste_members(train, test, cat)
    assert [m.user_id for m in members] == ["horror_fan"]
    (fan,) = members
    assert fan.genre == "horror" and fan.share == 1.0 and fan.positives == 10
    assert fan.base_share == pytest.approx(26 / 96)  # horror positives / all positives
    assert fan.country == "GB"  # from the test log
    # "crowd" has a favourite (comedy, 0.83 of 60) but it is what everybody plays
    loose = evaluate.taste_members(train, test, cat, min_lift=1.2)
    assert "crowd" in [m.user_id for m in loose]


def test_taste_check_measures_the_favourite_genre_in_the_slate() -> None:
    cat = _taste_catalogue()
    train, test = _taste_logs()
    vectors = np.zeros((len(cat), 2), dtype=np.float32)
    vectors[:, 0] = 1.0
    tables = build_feature_tables(train, cat, vectors, np.eye(2, dtype=np.float32))
    builder = FeatureBuilder(cat, tables, TextIndex.build(cat))
    retriever = CandidateRetriever(builder)
    is_horror = np.char.find(cat.genres, "horror") >= 0

    def horror_first(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return is_horror[inputs["target"]].astype(np.float64)

    def horror_last(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return -horror_first(inputs)

    systems = [
        System("first", Personalization.FULL, horror_first),
        System("last", Personalization.NONE, horror_last),
    ]
    out = evaluate.taste_check(train, test, builder, retriever, systems, 300, seed=0, k=5)
    assert out["qualifying"] == out["members"] == 1
    assert out["genres"] == {"horror": 1}
    assert out["systems"]["first"] == {"genre_share@5": 1.0, "n": 1.0}
    assert out["systems"]["last"]["genre_share@5"] == 0.0


# ------------------------------------------------------------------ title / tag split


def test_prefix_edit_distance_is_osa_to_the_closest_prefix() -> None:
    assert evaluate.prefix_edit_distance("stra", "stranger things") == 0
    assert evaluate.prefix_edit_distance("srta", "stranger") == 1  # one transposition
    assert evaluate.prefix_edit_distance("stx", "stranger") == 1
    assert evaluate.prefix_edit_distance("", "abc") == 0
    assert evaluate.prefix_edit_distance("abc", "") == 3


def test_title_queries_are_name_prefixes_at_word_boundaries_within_a_typo_budget() -> None:
    names = ["stranger things", "the crown"]
    assert evaluate.is_title_query("stra", names)
    assert evaluate.is_title_query("thin", names)  # from the second word
    assert evaluate.is_title_query("crow", names)
    assert evaluate.is_title_query("stranger things", names)
    assert evaluate.is_title_query("strnager", names)  # 8 chars: up to 2 edits
    assert evaluate.is_title_query("crwn", names)  # 4 chars: 1 edit
    assert not evaluate.is_title_query("ranger", names)  # not at a word boundary
    assert not evaluate.is_title_query("xy", names)  # short: exact prefixes only
    assert not evaluate.is_title_query("str", ["the crown"])
    assert not evaluate.is_title_query("dark comedy", names)
    assert not evaluate.is_title_query("", names)


def test_search_results_split_into_title_and_tag_queries(
    world: tuple[EngagementLog, FeatureBuilder, CandidateRetriever],
) -> None:
    _, builder, retriever = world
    cat = builder.catalogue

    def imp(query: str, target: str) -> evaluate.TestImpression:
        ctx = impute_context("search", "searcher", query, "US", None, cat.name_of)
        return evaluate.TestImpression(ctx, np.array([cat.index[target]]))

    imps = {
        "search": [imp("stra", "v_stranger"), imp("winona", "v_stranger"), imp("dark", "v_dark")],
        "prequery": [],
    }
    assert evaluate.title_query_mask(imps["search"], builder.text.names).tolist() == [
        True,
        False,
        True,
    ]
    systems = [System("exact", Personalization.FULL, _exact_name)]
    plain = evaluate.evaluate_systems(systems, imps, builder, retriever, 50)
    assert set(plain["exact"]) == {"search", "prequery"}
    split = evaluate.evaluate_systems(systems, imps, builder, retriever, 50, split_search=True)
    assert split["exact"]["search"] == plain["exact"]["search"]
    assert split["exact"]["search_title"]["n"] == 2 and split["exact"]["search_tag"]["n"] == 1


# ------------------------------------------------------------------------- LambdaMART


def _synthetic_rows(n_groups: int, seed: int, size: int = 10) -> FeaturisedRows:
    """Rows where the positive of each impression is the one with the highest
    ``bm25`` (plus noise); every other column is noise."""
    rng = np.random.default_rng(seed)
    n = n_groups * size
    dense = rng.normal(size=(n, len(DENSE_FEATURES))).astype(np.float32)
    signal = dense[:, COL["bm25"]] + 0.5 * rng.normal(size=n)
    label = np.zeros(n, dtype=np.float32)
    best = signal.reshape(n_groups, size).argmax(axis=1) + np.arange(n_groups) * size
    label[best] = 1.0
    ctx_cat = np.zeros((n, 4), dtype=np.int64)
    ctx_cat[:, 0] = np.repeat(rng.integers(0, 4, n_groups), size)
    ctx_cat[:, 3] = np.repeat(rng.integers(0, 3, n_groups), size)
    impression = np.repeat(np.arange(n_groups), size)
    task = np.array(["search"] * n)
    return FeaturisedRows({"dense": dense, "ctx_cat": ctx_cat}, label, impression, task)


def _mrr(rows: FeaturisedRows, scores: np.ndarray) -> float:
    out = []
    for g in np.unique(rows.impression):
        at = rows.impression == g
        order = np.argsort(-scores[at], kind="stable")
        out.append(1.0 / (np.flatnonzero(rows.label[at][order])[0] + 1))
    return float(np.mean(out))


def test_lambdamart_learns_the_signal_column_and_is_deterministic() -> None:
    pytest.importorskip("lightgbm")
    from model_export.lambdamart import LambdaMARTConfig, train_lambdamart

    train = _synthetic_rows(300, seed=0)
    # shuffled: training sorts the rows into contiguous impressions itself
    train = train.select(np.random.default_rng(1).permutation(len(train)))
    test = _synthetic_rows(100, seed=2)
    config = LambdaMARTConfig(n_estimators=40, min_child_samples=10, seed=3)
    model = train_lambdamart(train, config)
    scores = model.score(test.inputs)
    random = np.random.default_rng(4).normal(size=len(test))
    assert _mrr(test, scores) > _mrr(test, random) + 0.3
    assert next(iter(model.stats["top_features_by_gain"])) == "bm25"
    again = train_lambdamart(train, config)
    np.testing.assert_array_equal(again.score(test.inputs), scores)
    # serving-shaped inputs: one context row for N candidates
    one = {"dense": test.inputs["dense"][:10], "ctx_cat": test.inputs["ctx_cat"][:1]}
    np.testing.assert_allclose(model.score(one), scores[:10])
    systems = model.systems((Personalization.NONE, Personalization.FULL))
    assert [(s.name, s.level) for s in systems] == [
        ("lambdamart (none)", Personalization.NONE),
        ("lambdamart (full)", Personalization.FULL),
    ]


def test_lambdamart_drops_impressions_without_a_positive() -> None:
    pytest.importorskip("lightgbm")
    from model_export.lambdamart import LambdaMARTConfig, train_lambdamart

    rows = _synthetic_rows(60, seed=5)
    rows.label[rows.impression < 20] = 0.0
    model = train_lambdamart(rows, LambdaMARTConfig(n_estimators=5, min_child_samples=5))
    assert model.stats["impressions"] == 40 and model.stats["rows"] == 400
    assert model.stats["impressions_dropped_without_positive"] == 20
    rows.label[:] = 0.0
    with pytest.raises(ValueError, match=r"^no impression has a positive: nothing to rank$"):
        train_lambdamart(rows, LambdaMARTConfig(n_estimators=5))
    with pytest.raises(ValueError, match=r"^learning_rate must be > 0, got 0.0$"):
        LambdaMARTConfig(learning_rate=0.0)


# --------------------------------------------------------------------------- report


def test_report_renders_every_section_and_keeps_the_findings(
    world: tuple[EngagementLog, FeatureBuilder, CandidateRetriever], tmp_path: Path
) -> None:
    from model_export import report

    log, builder, retriever = world
    shared = [System("bm25", Personalization.FULL, evaluate.column_scorer("bm25"), ("search",))]
    seeded = [
        report._tagged(System(f"unified ({lvl.value})", lvl, _exact_name), seed)
        for seed in (7, 8)
        for lvl in Personalization
    ]
    systems = seeded + shared
    cat = builder.catalogue
    ctx = impute_context("search", "searcher", "stra", "US", None, cat.name_of)
    imps = {"search": [evaluate.TestImpression(ctx, np.array([cat.index["v_stranger"]]))]}
    results = evaluate.evaluate_systems(systems, imps, builder, retriever, 50, split_search=True)
    guards = evaluate.relevance_guards(log, builder, retriever, systems, 10, 50, 1)
    typos = evaluate.typo_check(log, builder, retriever, systems, 50, 1, 5)
    prefixes = evaluate.prefix_check(log, builder, retriever, systems, 50, 1, 5)
    per_seed: list[dict[str, Any]] = [
        {
            "seed": seed,
            "results": report._for_seed(results, seed),
            "relevance_guard": report._for_seed(guards, seed),
            "typo_check": report._for_seed(typos["systems"], seed),
            "prefix_check": report._for_seed(prefixes["systems"], seed),
            "taste_check": {},
            "train": {"train_seconds": 1.0, "rows": 10, "parameters": 5},
            "per_task_train_seconds": {"search": 0.5},
        }
        for seed in (7, 8)
    ]
    assert set(per_seed[0]["results"]) == {
        "unified (none)",
        "unified (cluster)",
        "unified (full)",
        "bm25",
    }
    doc = {
        "source": "synthetic",
        "command": "unicorn evaluate --source synthetic",
        "seconds": 1.0,
        "data": {},
        "test_impressions": {"search": 1},
        "checks": {
            "relevance_guard": {"pairs": 10.0},
            "typo": {k: v for k, v in typos.items() if k != "systems"},
            "prefix": {k: v for k, v in prefixes.items() if k != "systems"},
            "taste": {"thresholds": {"k": 20}, "mean_train_share": None},
        },
        "per_seed": per_seed,
    }
    (tmp_path / "evaluation_synthetic.json").write_text(json.dumps(report._json_safe(doc)))
    (tmp_path / "EVALUATION.md").write_text("x\n<!-- findings -->\nkept\n<!-- /findings -->\n")
    report.render_markdown(tmp_path)
    text = (tmp_path / "EVALUATION.md").read_text()
    assert "<!-- findings -->\nkept\n<!-- /findings -->" in text
    for title in ("Goals", "Relevance guard", "Typo check", "Prefix check", "Taste check"):
        assert f". {title}" in text, title
    assert "| search_title | 1 | " in text and "| search_tag |" not in text  # no tag query
    assert "| unified (cluster) | 1.000 ± 0.000 |" in text  # the guard at every level
    assert report._json_safe({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}
