"""Ranking quality on small synthetic worlds, end to end: the bundle the service loads
puts an exact title first at every personalization level, a model trained on a small
world beats popularity on every task, and training rows mean what serving candidates
mean (no train/serve skew)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.bundle import load_bundle
from app.core.context import Personalization
from app.core.features import COL, DENSE_FEATURES
from app.core.ranking import Ranker, RankQuery
from model_export import evaluate
from model_export.bundle_builder import baseline_systems, model_systems
from model_export.dataset import FeaturisedRows
from model_export.skew import SKEW_BOUND, serving_rows, skew_report, skewed
from model_export.synthetic import WorldConfig, generate_world
from model_export.train import TrainConfig
from model_export.training_pipeline import (
    PipelineConfig,
    Prepared,
    prepare,
    train_unicorn,
    training_rows,
)

pytestmark = pytest.mark.slow


def _unique_popular_titles(ranker: Ranker, n: int) -> list[int]:
    bundle = ranker.bundle
    names = bundle.text.names
    uniq, counts = np.unique(names, return_counts=True)
    ok = np.isin(names, uniq[counts == 1]) & bundle.catalogue.rankable & (names != "")
    order = np.argsort(-bundle.tables.entity_pos, kind="stable")
    return [int(e) for e in order if ok[e]][:n]


@pytest.mark.parametrize("level", list(Personalization))
def test_an_exact_title_ranks_first_for_every_member(tiny_bundle: Path, level: str) -> None:
    ranker = Ranker(load_bundle(tiny_bundle))
    users = [*ranker.bundle.tables.user_ids[:5].tolist(), None]
    titles = _unique_popular_titles(ranker, 15)
    assert len(titles) == 15
    misses = []
    for t in titles:
        name = str(ranker.bundle.catalogue.display_name[t])
        for user in users:
            q = RankQuery("search", user_id=user, query=name, k=3,
                          personalization=Personalization(level))  # fmt: skip
            top = ranker.rank(q).items[0].entity_id
            if top != ranker.bundle.catalogue.entity_id[t]:
                misses.append((name, user, top))
    assert not misses


def test_the_bundle_reports_its_train_serve_skew(tiny_bundle: Path) -> None:
    skew = json.loads((tiny_bundle / "manifest.json").read_text())["train_serve_skew"]
    assert skew["bound"] == SKEW_BOUND
    assert set(skew["features"]) == set(DENSE_FEATURES)


@pytest.fixture(scope="module")
def small_world() -> Prepared:
    """A world large enough that a mean over its test impressions is not noise (the tiny
    bundle's few dozen test impressions per task move a mean by a third of a std)."""
    world = WorldConfig(seed=11, n_users=1500, n_videos=600, search_sessions=1200,
                        prequery_sessions=3000, more_like_this_sessions=2500,
                        entity_sessions=2000)  # fmt: skip
    catalogue, log = generate_world(world)
    return prepare(catalogue, log, PipelineConfig(seed=11, n_clusters=6, vec_dim=8, mf_epochs=3))


def test_the_model_beats_popularity_on_every_task(small_world: Prepared) -> None:
    rows = training_rows(small_world)
    model, _ = train_unicorn(small_world, rows, TrainConfig(progress=False))
    builder, retriever = small_world.builder(serving=True), small_world.retriever()
    imps = evaluate.test_impressions(small_world.test, builder, 150, seed=11)
    popularity = [s for s in baseline_systems() if s.name == "popularity"]
    results = evaluate.evaluate_systems(
        model_systems(model) + popularity, imps, builder, retriever, 300
    )
    for task, popular in results["popularity"].items():
        assert results["unified (full)"][task]["ndcg@10"] > popular["ndcg@10"], task


def test_no_model_input_is_skewed_between_training_and_serving(small_world: Prepared) -> None:
    report = skew_report(training_rows(small_world), serving_rows(small_world))
    over = {f: (round(r["smd"], 3), r["task"]) for f, r in report.items() if r["smd"] > SKEW_BOUND}
    assert not over


def test_a_shifted_input_is_reported_as_skewed(small_world: Prepared) -> None:
    """The check can fail: the same serving rows with one input moved by half of its
    spread within a task are flagged; moved by a tenth they are not."""
    train, serve = training_rows(small_world), serving_rows(small_world)
    col = COL["global_pop_log"]
    search = serve.task == "search"
    spread = float(train.inputs["dense"][train.task == "search", col].std())

    def moved(by: float) -> FeaturisedRows:
        dense = serve.inputs["dense"].copy()
        dense[search, col] += by * spread
        return FeaturisedRows(serve.inputs | {"dense": dense}, serve.label, serve.impression,
                              serve.task)  # fmt: skip

    assert "global_pop_log" not in skewed(skew_report(train, moved(0.1)))
    report = skew_report(train, moved(0.5))
    assert skewed(report) == ["global_pop_log"] and report["global_pop_log"]["task"] == "search"
