"""Ranking quality on a tiny synthetic world, end to end: the bundle the service loads
puts an exact title first at every personalization level, its model beats popularity,
and its training rows mean what its serving candidates mean (no train/serve skew)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.bundle import load_bundle
from app.context import Personalization
from app.feature_tables import FeatureTables
from app.features import COL, DENSE_FEATURES
from app.ranking import Ranker, RankQuery
from model_export.dataset import FeaturisedRows
from model_export.pipeline import PipelineConfig, Prepared, prepare, training_rows
from model_export.skew import SKEW_BOUND, serving_rows, skew_report, skewed
from model_export.synthetic import WorldConfig, generate_world

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


def test_the_model_beats_popularity_on_every_task(tiny_bundle: Path) -> None:
    metrics = json.loads((tiny_bundle / "manifest.json").read_text())["offline_metrics"]
    for task, popular in metrics["popularity"].items():
        model = metrics["unified (full)"][task]
        assert model["ndcg@10"] >= popular["ndcg@10"], task
    mean = {s: np.mean([m["ndcg@10"] for m in metrics[s].values()]) for s in metrics}
    assert mean["unified (full)"] > 1.5 * mean["popularity"]


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


def test_no_model_input_is_skewed_between_training_and_serving(small_world: Prepared) -> None:
    report = skew_report(training_rows(small_world), serving_rows(small_world))
    over = {f: (round(r["smd"], 3), r["task"]) for f, r in report.items() if r["smd"] > SKEW_BOUND}
    assert not over


def test_a_raw_count_would_be_reported_as_skewed(small_world: Prepared) -> None:
    """The check can fail: the raw co-engagement count (what the model was fed before
    shares), read from history tables for training rows and from serving tables for
    serving rows, is flagged."""
    train, serve = training_rows(small_world), serving_rows(small_world)

    def with_raw_count(rows: FeaturisedRows, tables: FeatureTables) -> FeaturisedRows:
        dense = rows.inputs["dense"].copy()
        source = rows.inputs["ctx_source"]
        raw = np.zeros(len(dense), dtype=np.float32)
        for s in np.unique(source[source < len(small_world.catalogue)]).tolist():
            mine = source == s
            targets, counts = tables.co_engaged(s)
            hit = np.isin(rows.inputs["target"][mine], targets)
            lookup = dict(zip(targets.tolist(), counts.tolist(), strict=True))
            raw[np.flatnonzero(mine)[hit]] = [lookup[t] for t in rows.inputs["target"][mine][hit]]
        dense[:, COL["co_engagement_share"]] = np.log1p(raw)
        return FeaturisedRows(rows.inputs | {"dense": dense}, rows.label, rows.impression,
                              rows.task)  # fmt: skip

    report = skew_report(
        with_raw_count(train, small_world.history_tables),
        with_raw_count(serve, small_world.serving_tables),
    )
    assert "co_engagement_share" in skewed(report)
