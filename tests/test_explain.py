"""``"explain": true`` on /rank (app/core/explain.py): the attributions are what
re-scoring says they are, every dense feature is in one group, the retrieval sources follow
the retriever's rules, and over a real server an explained answer is never cached, never
mixed into cached answers, and allowed only as the ``explain`` setting says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import ADMIN_TOKEN, LiveServer
from handmade_bundle import DENSE_MEAN, dense_weights

from app.core.bundle import Bundle, load_bundle
from app.core.features import COL, DENSE_FEATURES, FEATURE_GROUPS
from app.core.ranking import Ranker, RankQuery
from app.serving.config import Settings


@pytest.fixture(scope="module")
def bundle(fast_bundle: Path) -> Bundle:
    return load_bundle(fast_bundle)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_every_dense_feature_is_in_exactly_one_group() -> None:
    grouped = [name for names in FEATURE_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(DENSE_FEATURES) and len(grouped) == len(set(grouped))


@pytest.mark.parametrize("task", ["search", "prequery", "more_like_this", "entity"])
def test_attribution_is_the_score_minus_the_score_with_the_group_at_its_mean(
    bundle: Bundle, task: str
) -> None:
    # The handmade model is sigmoid(w . dense + rest), so the occluded score of a group is
    # known in closed form: the logit loses w_c * (x_c - mean_c) over the group's columns.
    cat = bundle.catalogue
    source = str(cat.entity_id[0 if task == "more_like_this" else -1])
    q = RankQuery(
        task=task, user_id=None, country="US", k=8, explain=True,
        query=str(cat.display_name[3]) if task == "search" else None,
        source_entity_id=source if task in ("more_like_this", "entity") else None,
    )  # fmt: skip
    ranker = Ranker(bundle, max_retrieved=50)
    prepared = ranker.prepare(q)
    result = ranker.rank(q)
    assert result.explanation is not None and len(result.explanation) == len(result.items)
    w = dense_weights().astype(np.float64)
    ids = list(map(str, cat.entity_id[prepared.candidates]))
    for item, ex in zip(result.items, result.explanation, strict=True):
        x = prepared.inputs["dense"][ids.index(item.entity_id)].astype(np.float64)
        logit = np.log(item.score / (1.0 - item.score))
        assert ex["score"] == pytest.approx(item.score)
        for group, names in FEATURE_GROUPS.items():
            cols = [COL[n] for n in names]
            drop = float(w[cols] @ (x[cols] - DENSE_MEAN[cols]))
            assert ex["attribution"][group] == pytest.approx(
                item.score - sigmoid(logit - drop), abs=2e-5
            ), group
        everything = float(w @ (x - DENSE_MEAN))
        assert ex["all_at_mean"] == pytest.approx(sigmoid(logit - everything), abs=2e-5)
        for name, c in COL.items():
            assert ex["inputs"][name]["value"] == pytest.approx(x[c], abs=1e-5)
            normalised = np.clip((x[c] - DENSE_MEAN[c]) / 2.0, -10, 10)
            assert ex["inputs"][name]["normalised"] == pytest.approx(normalised, abs=1e-4)


def test_explain_changes_nothing_else_in_the_answer(bundle: Bundle) -> None:
    ranker = Ranker(bundle, max_retrieved=50)
    q = RankQuery(task="search", query=str(bundle.catalogue.display_name[7]), k=10)
    plain = ranker.rank(q)
    explained = ranker.rank(RankQuery(**{**q.__dict__, "explain": True}))
    assert plain.explanation is None
    assert explained.items == plain.items


def test_the_exact_title_is_a_name_token_match_in_tier_3(bundle: Bundle) -> None:
    name = str(bundle.catalogue.display_name[11])
    result = Ranker(bundle, max_retrieved=50).rank(
        RankQuery(task="search", query=name, k=5, explain=True)
    )
    assert result.explanation is not None
    first = result.explanation[0]
    assert result.items[0].name == name
    assert first["retrieval"] == "name_token" and first["tier"] == 3
    assert all(e["tier"] <= 3 for e in result.explanation)


def test_sources_follow_the_retrievers_rules(bundle: Bundle) -> None:
    ranker = Ranker(bundle, max_retrieved=300)
    source = int(np.flatnonzero(bundle.catalogue.rankable)[0])
    q = RankQuery(task="more_like_this", source_entity_id=str(bundle.catalogue.entity_id[source]))
    prepared = ranker.prepare(q)
    cf, cand = prepared.context_features, prepared.candidates
    labels = bundle.retriever.sources(cf, cand)
    co = set(bundle.tables.co_engaged(source)[0].tolist())
    near = set(bundle.retriever.neighbours[source].tolist())
    for entity, label in zip(cand.tolist(), labels, strict=True):
        expected = (
            "co_engagement" if entity in co else "similar" if entity in near
            else "popular_in_country"
        )  # fmt: skip
        assert label == expected
    assert "popular_in_country" in labels  # 300 > what the first stage has: a top-up
    given = ranker.rank(
        RankQuery(
            task="prequery",
            candidates=tuple(map(str, bundle.catalogue.entity_id[cand[:5]])),
            explain=True,
        )
    )
    assert given.explanation is not None and len(given.explanation) == 5
    assert {e["retrieval"] for e in given.explanation} == {"given"}


def test_a_bundle_without_training_constants_cannot_explain(bundle: Bundle, tmp_path: Path) -> None:
    ranker = Ranker(bundle)
    ranker.bundle = Bundle(**{**bundle.__dict__, "manifest": {**bundle.manifest}})
    del ranker.bundle.manifest["normalisation"]
    with pytest.raises(ValueError, match="normalisation"):
        ranker.rank(RankQuery(task="prequery", explain=True))


# --- over a real server -------------------------------------------------------------------
BODY = {"task": "search", "query": "sta", "country": "US", "k": 5}


def test_an_explained_answer_is_never_cached_nor_served_from_the_cache(
    live_server: LiveServer,
) -> None:
    with live_server.client() as client:
        first = client.post("/rank", json={**BODY, "explain": True})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["cache"] == "bypass"
        assert [e["score"] for e in body["explain"]] == [i["score"] for i in body["items"]]
        assert set(body["explain"][0]["attribution"]) == set(FEATURE_GROUPS)
        plain = client.post("/rank", json=BODY).json()
        assert plain["cache"] == "miss" and "explain" not in plain  # nothing was written
        again = client.post("/rank", json=BODY).json()
        assert again["cache"] == "hit" and "explain" not in again
        explained = client.post("/rank", json={**BODY, "explain": True}).json()
        assert explained["cache"] == "bypass" and len(explained["explain"]) == 5
        assert explained["items"] == again["items"]


def test_explain_must_be_a_boolean(live_server: LiveServer) -> None:
    with live_server.client() as client:
        got = client.post("/rank", json={**BODY, "explain": "yes"})
    assert got.status_code == 422 and got.json()["error"]["field"] == "explain"


def test_the_explain_setting_can_turn_it_off_or_require_the_admin_token(
    start_server: Callable[[Settings], LiveServer], settings_for: Callable[..., Settings]
) -> None:
    off = start_server(settings_for(explain="off"))
    with off.client() as client:
        refused = client.post("/rank", json={**BODY, "explain": True})
        assert refused.status_code == 403 and refused.json()["error"]["field"] == "explain"
        assert client.post("/rank", json=BODY).status_code == 200
    admin = start_server(settings_for(explain="admin", admin_token=ADMIN_TOKEN))
    with admin.client() as client:
        anonymous = client.post("/rank", json={**BODY, "explain": True})
        assert anonymous.status_code == 401
        wrong = client.post(
            "/rank", json={**BODY, "explain": True}, headers={"authorization": "Bearer nope"}
        )
        assert wrong.status_code == 403
        ok = client.post(
            "/rank", json={**BODY, "explain": True},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )  # fmt: skip
        assert ok.status_code == 200 and len(ok.json()["explain"]) == 5


def test_explain_admin_without_a_token_is_a_settings_error(
    settings_for: Callable[..., Settings],
) -> None:
    with pytest.raises(ValueError, match="explain=admin needs admin_token"):
        settings_for(explain="admin")
