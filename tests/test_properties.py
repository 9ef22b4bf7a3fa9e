"""Properties of the shared context and feature code over arbitrary input (hypothesis):
whatever a client sends, imputation either succeeds or raises the two errors the service
maps to 4xx, and features are always finite and shaped as the model expects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import hand_world
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.context import (
    MAX_QUERY_CHARS,
    NULL_SOURCE,
    TASKS,
    UNKNOWN_COUNTRY,
    UNKNOWN_USER,
    Context,
    Personalization,
    Task,
    impute_context,
    normalise_query,
)
from app.core.features import DENSE_FEATURES, INPUT_NAMES, MAX_QUERY_TOKENS, FeatureBuilder
from app.core.retrieval import CandidateRetriever

SETTINGS = settings(max_examples=150, deadline=None)
COL = {name: i for i, name in enumerate(DENSE_FEATURES)}
BINARY = ("query_imputed", "name_prefix", "name_exact", "last_token_prefix", "linked_to_source")
SHARES = ("token_overlap", "trigram_containment", "co_engagement_share", "query_target_ctr")

# Text that exercises normalisation: any unicode, plus the characters that change most.
TRICKY = "aZ _-.'ßﬁＡéé\u0301İΣς\u00a0\u3000\t\n🚀東"
texts = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=TRICKY, max_size=300),
    st.text(alphabet="ab _", min_size=150, max_size=600),  # around the length cap
)
maybe_texts = st.one_of(st.none(), texts)
ENTITY_IDS = [e[0] for e in hand_world.ENTITIES]


@cache
def builder() -> FeatureBuilder:
    return hand_world.builder()


@cache
def retriever() -> CandidateRetriever:
    return CandidateRetriever(builder())


def source_name(entity_id: str) -> str | None:
    catalogue = builder().catalogue
    i = catalogue.index.get(entity_id)
    return None if i is None else str(catalogue.display_name[i])


# ---------------------------------------------------------------------- normalise_query


@SETTINGS
@given(maybe_texts)
def test_normalise_query_is_idempotent_and_tidy(text: str | None) -> None:
    out = normalise_query(text)
    assert normalise_query(out) == out
    assert len(out) <= MAX_QUERY_CHARS
    assert out == out.strip()
    assert "  " not in out
    assert re.fullmatch(r"[\w ]*", out) and "_" not in out  # word characters and spaces
    assert out.split(" ") == out.split() or out == ""


@SETTINGS
@given(texts)
def test_normalise_query_ignores_surrounding_space(text: str) -> None:
    assert normalise_query(f"  {text}\t") == normalise_query(text)


# Case folding holds for text with base characters; a combining mark with no base (such as
# U+0345) before another mark is the one known exception, and no query starts that way.
@SETTINGS
@given(st.text(alphabet=TRICKY + "ABCXYZ\u0300\u0308\u0327ÅØÆŒΆΪ", max_size=100))
def test_normalise_query_ignores_case(text: str) -> None:
    assert normalise_query(text.casefold()) == normalise_query(text)
    assert normalise_query(text.upper()) == normalise_query(text.lower())


# ----------------------------------------------------------------------- impute_context


@SETTINGS
@given(
    task=st.one_of(st.sampled_from(TASKS), st.text(max_size=20)),
    user=maybe_texts,
    query=maybe_texts,
    country=maybe_texts,
    source=st.one_of(st.none(), st.sampled_from(ENTITY_IDS), st.text(max_size=20)),
)
def test_impute_context_succeeds_or_raises_a_client_error(
    task: str, user: str | None, query: str | None, country: str | None, source: str | None
) -> None:
    try:
        ctx = impute_context(task, user, query, country, source, source_name)
    except (ValueError, LookupError):
        return
    assert isinstance(ctx, Context)
    assert ctx.user_id and ctx.country and ctx.source_entity_id
    assert ctx.user_id == UNKNOWN_USER or ctx.user_id == ctx.user_id.strip()
    assert ctx.country == UNKNOWN_COUNTRY or ctx.country == ctx.country.upper()
    assert normalise_query(ctx.query) == ctx.query
    if ctx.task is Task.SEARCH:
        assert ctx.query and ctx.source_entity_id == NULL_SOURCE and not ctx.query_imputed
    elif ctx.task is Task.PREQUERY:
        assert ctx.query == "" and ctx.source_entity_id == NULL_SOURCE
    else:
        assert ctx.source_entity_id in ENTITY_IDS
        if ctx.query_imputed:
            assert ctx.query == normalise_query(source_name(ctx.source_entity_id))


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Request:
    task: str
    user: str | None
    query: str | None
    country: str | None
    source: str | None
    level: Personalization

    def context(self) -> Context | None:
        try:
            return impute_context(
                self.task, self.user, self.query, self.country, self.source, source_name
            )
        except (ValueError, LookupError):
            return None


requests = st.builds(
    Request,
    task=st.sampled_from(TASKS),
    user=st.one_of(st.none(), st.sampled_from(["dark_fan", "bright_fan", "searcher"]), texts),
    query=maybe_texts,
    country=st.one_of(st.none(), st.sampled_from(["US", "gb", "DE", "XX"]), texts),
    source=st.one_of(st.none(), st.sampled_from(ENTITY_IDS)),
    level=st.sampled_from(list(Personalization)),
)
N_ENTITIES = len(hand_world.ENTITIES)


@SETTINGS
@given(r=requests, cand=st.lists(st.integers(0, N_ENTITIES - 1), max_size=30))
def test_features_are_finite_and_shaped_for_any_request(r: Request, cand: list[int]) -> None:
    ctx = r.context()
    if ctx is None:
        return
    b = builder()
    level = r.level
    cf = b.context(ctx, level)
    inputs = b.candidates(cf, np.array(cand, dtype=np.int64))
    n = len(cand)
    assert tuple(inputs) == INPUT_NAMES
    assert inputs["ctx_cat"].shape == (1, 4) and inputs["ctx_tokens"].shape == (1, MAX_QUERY_TOKENS)
    assert inputs["target"].tolist() == cand
    assert inputs["dense"].shape == (n, len(DENSE_FEATURES))
    assert inputs["item_vec"].shape == (n, b.tables.vec_dim)
    for name, arr in inputs.items():
        assert np.all(np.isfinite(arr)), name
    dense = inputs["dense"]
    for f in BINARY:
        assert set(np.unique(dense[:, COL[f]]).tolist()) <= {0.0, 1.0}, f
    for f in SHARES:
        column = dense[:, COL[f]]
        assert np.all((column >= 0) & (column <= 1 + 1e-6)), f
    assert np.all(dense[:, COL["bm25"]] >= 0)
    # duplicated candidates get identical rows
    for first, again in ((i, j) for i in range(n) for j in range(i) if cand[i] == cand[j]):
        assert np.array_equal(dense[first], dense[again])
    if level is not Personalization.FULL:
        assert not inputs["user_vec"].any() and not dense[:, COL["user_item_dot"]].any()


@SETTINGS
@given(r=requests, limit=st.integers(1, 15))
def test_retrieval_returns_allowed_unique_candidates_for_any_request(
    r: Request, limit: int
) -> None:
    ctx = r.context()
    if ctx is None:
        return
    cf = builder().context(ctx, r.level)
    got = retriever().retrieve(cf, limit)
    allowed = retriever().allowed[cf.country_row].copy()
    if cf.source_index >= 0:
        allowed[cf.source_index] = False
    assert len(got) == len(set(got.tolist())) == min(limit, int(allowed.sum()))
    assert np.all(allowed[got])
