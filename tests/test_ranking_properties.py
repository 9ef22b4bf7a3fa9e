"""Properties of the WHOLE ranking path (imputation -> retrieval -> features -> the fast
bundle's ONNX model -> top-k) for any request the API would accept (hypothesis):
either a client error (4xx) or a clean top-k: unique entities, finite scores in [0, 1],
best first, at most ``k``, only known candidates, unknown ones listed, whatever the query
text (any unicode, empty, at the length limit), the ids (duplicates, unknown, empty list)
or the member and country strings. ``test_properties.py`` checks the same for the
context and feature code alone (no model)."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.bundle import load_bundle
from app.core.context import Personalization, Task
from app.core.errors import InvalidRequest, NotFound
from app.core.ranking import Ranker, RankQuery, ranking_key
from app.http.schemas import K_MAX, MAX_COUNTRY_CHARS, MAX_ID_CHARS

SETTINGS = settings(max_examples=80, deadline=None)
TRICKY = "aZ _-.'ßﬁＡéé\u0301İΣς\u00a0\u3000\t\n🚀東\x00\ufeff"
texts = st.one_of(st.text(max_size=200), st.text(alphabet=TRICKY, max_size=200))
# A candidate is an index into the catalogue (a known id, video or page) or any string.
picks = st.lists(
    st.one_of(st.integers(0, 10_000), st.text(min_size=1, max_size=MAX_ID_CHARS)), max_size=40
)


@cache
def _ranker(bundle: str) -> Ranker:
    return Ranker(load_bundle(Path(bundle)), max_retrieved=300)


@SETTINGS
@given(
    task=st.sampled_from([t.value for t in Task]),
    user=st.one_of(st.none(), st.text(max_size=MAX_ID_CHARS)),
    query=st.one_of(st.none(), texts),
    country=st.one_of(
        st.none(), st.sampled_from(["US", "gb", "XX"]), st.text(max_size=MAX_COUNTRY_CHARS)
    ),
    source=st.one_of(st.none(), st.integers(0, 10_000), st.text(max_size=MAX_ID_CHARS)),
    candidates=st.one_of(st.none(), picks),
    k=st.integers(1, K_MAX),
    level=st.sampled_from(list(Personalization)),
)
def test_any_accepted_request_gets_a_client_error_or_a_clean_top_k(
    fast_bundle: Path,
    task: str,
    user: str | None,
    query: str | None,
    country: str | None,
    source: int | str | None,
    candidates: list[int | str] | None,
    k: int,
    level: Personalization,
) -> None:
    ranker = _ranker(str(fast_bundle))
    catalogue = ranker.bundle.catalogue
    ids = [str(e) for e in catalogue.entity_id.tolist()]

    def entity(pick: int | str) -> str:
        return ids[pick % len(ids)] if isinstance(pick, int) else pick

    given_ids = None if candidates is None else tuple(entity(c) for c in candidates)
    q = RankQuery(
        task=task,
        user_id=user,
        query=query,
        country=country,
        source_entity_id=None if source is None else entity(source),
        candidates=given_ids,
        k=k,
        personalization=level,
    )
    try:
        result = ranker.rank(q)
    except (InvalidRequest, NotFound) as exc:  # mapped to 422 / 404, with the field
        assert exc.field and exc.message
        return
    out = [i.entity_id for i in result.items]
    scores = [i.score for i in result.items]
    assert len(out) == len(set(out)) <= k
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    # the order is the ranking key's (score within the search tiers), best first
    prepared = ranker.prepare(q)
    cand = prepared.candidates
    probability = ranker.bundle.scorer.score(prepared.inputs) if len(cand) else np.zeros(0)
    key = ranking_key(prepared.inputs, probability)
    assert out == [ids[c] for c in cand[np.lexsort((cand, -key))][:k].tolist()]
    if task != "search":  # untiered: the order is the score's
        assert scores == sorted(scores, reverse=True)
    assert all(i.name is not None and i.entity_type for i in result.items)
    if given_ids is None:
        assert all(catalogue.rankable[catalogue.index[e]] for e in out)
        assert result.unknown_candidates == []
    else:
        known = {c for c in given_ids if c in catalogue.index}
        assert set(out) <= known and len(out) == min(k, len(known))
        assert result.unknown_candidates == [c for c in given_ids if c not in catalogue.index]
