"""Model inputs for one context and N candidates, in one vectorised numpy pass.

``FeatureBuilder.context`` does the per-request work once (tokens, lookups of the user,
country, cluster and query statistics); ``FeatureBuilder.candidates`` then computes every
context x target feature for all N candidates with array operations: no Python loop over
candidates. Training featurises its rows with these same two calls.

Model inputs (names, dtypes and shapes are recorded in the bundle manifest). Context
inputs have batch 1 at serving time and are broadcast by the model; training passes one
row per candidate.

=============  =======  ========  =========================================================
name           dtype    shape     meaning
=============  =======  ========  =========================================================
ctx_cat        int64    (B, 4)    ids of task, country, user cluster and personalization
                                  level, in ``CTX_CAT`` order (columns: ``CAT_COL``)
ctx_source     int64    (B,)      source entity index, ``n_entities`` = null token
ctx_tokens     int64    (B, T)    hashed query tokens, 0 = padding
user_vec       float32  (B, d)    per-user vector (zeros unless personalization is full)
target         int64    (N,)      candidate entity index
item_vec       float32  (N, d)    candidate vector of the pre-trained user-item model
dense          float32  (N, F)    numeric features, in ``DENSE_FEATURES`` order (raw; the
                                  model normalises them with constants from training;
                                  columns: ``COL``)
=============  =======  ========  =========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import (
    NULL_SOURCE,
    Context,
    Personalization,
    Task,
    clean_country,
    tokenize,
)
from app.core.feature_tables import FeatureTables, country_index, unit_rows
from app.core.text_index import TextIndex, query_trigrams, stable_hash

MAX_QUERY_TOKENS = 8
TOKEN_BUCKETS = 1 << 15
BM25_K1, BM25_B = 1.2, 0.75
CTR_SMOOTHING = 5.0  # pseudo-impressions at the prior rate
GENRE_SHRINKAGE = 10.0  # pseudo-positives pulling a member's genre profile to the prior
TASK_IDS: dict[Task, int] = {t: i for i, t in enumerate(Task)}
LEVEL_IDS: dict[Personalization, int] = {p: i for i, p in enumerate(Personalization)}

# The columns of ``ctx_cat``, by name: ``ctx_cat[:, CAT_COL["task"]]``.
CTX_CAT: tuple[str, ...] = ("task", "country", "cluster", "level")
CAT_COL: dict[str, int] = {name: i for i, name in enumerate(CTX_CAT)}

# Dense features of the context alone: filled once per request (ContextFeatures.context_dense)
CONTEXT_DENSE: tuple[str, ...] = (
    "query_chars_log",
    "query_tokens",
    "query_imputed",
    # share of query tokens that some catalogue name holds (exactly, as a prefix for the
    # last typed token, or within the typo budget): a title search reads near 1, a
    # description ("in netflix queue") lower; tells the model when text match decides
    "query_in_catalogue",
)
DENSE_FEATURES: tuple[str, ...] = (
    *CONTEXT_DENSE,
    # query x target text match (every token of a name is an anchor; the last token of a
    # typed search query may be incomplete and matches as a prefix)
    "name_prefix",  # the query is a prefix of the whole name
    "name_exact",  # the query is the whole name
    "word_prefix",  # the query is a prefix of the name from one of its words
    "token_overlap",  # share of query tokens found exactly as name tokens
    "fuzzy_overlap",  # share of query tokens found exactly or within the typo budget
    "last_token_prefix",
    "bm25",
    "trigram_containment",  # share of the query's word-anchored trigrams in the name
    # query x target engagement (search logs, every typed prefix)
    "query_target_pos_share",  # log share of the window's search positives
    "query_target_ctr",
    # source x target
    "co_engagement_lift",  # log1p(P(target | source page) / P(target))
    "co_engagement_share",
    "linked_to_source",
    "source_similarity",  # cosine of source and target in the pre-trained item space
    # popularity
    "country_pop_log",
    "global_pop_log",
    "global_ctr",
    # personalization
    "cluster_pop_log",
    "cluster_share",
    "user_item_dot",
    "user_genre_affinity",  # the user's genre profile x the target's genres, as a lift
)
# The columns of ``dense``, by name: ``dense[:, COL["bm25"]]``. Never index by number.
COL: dict[str, int] = {name: i for i, name in enumerate(DENSE_FEATURES)}
# The dense features by what they describe, each feature in exactly one group: the units
# that ``"explain": true`` on /rank occludes (app.core.explain).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "query": CONTEXT_DENSE,
    "text_match": DENSE_FEATURES[len(CONTEXT_DENSE) : COL["query_target_pos_share"]],
    "query_engagement": ("query_target_pos_share", "query_target_ctr"),
    "source": ("co_engagement_lift", "co_engagement_share", "linked_to_source",
               "source_similarity"),
    "popularity": ("country_pop_log", "global_pop_log", "global_ctr"),
    "personal": ("cluster_pop_log", "cluster_share", "user_item_dot", "user_genre_affinity"),
}  # fmt: skip
_CONTEXT_COLS = np.array([COL[name] for name in CONTEXT_DENSE])

# Inputs with one row per request context (batch 1 at serving time, broadcast by the
# model over the candidates), then the inputs with one row per candidate.
CONTEXT_INPUTS: tuple[str, ...] = ("ctx_cat", "ctx_source", "ctx_tokens", "user_vec")
CANDIDATE_INPUTS: tuple[str, ...] = ("target", "item_vec", "dense")
INPUT_NAMES: tuple[str, ...] = (*CONTEXT_INPUTS, *CANDIDATE_INPUTS)  # the model's order


@dataclass(frozen=True)
class ContextFeatures:
    """Everything about a request that does not depend on the candidate."""

    context: Context
    level: Personalization
    ctx_cat: np.ndarray  # (1, len(CTX_CAT))
    ctx_source: np.ndarray  # (1,)
    ctx_tokens: np.ndarray  # (1, T)
    user_vec: np.ndarray  # (1, d)
    genre_lift: np.ndarray | None  # (G,) log lift of the user's genre profile (full only)
    tokens: tuple[str, ...]
    is_prefix: tuple[bool, ...]  # per token: matched as a prefix (the last one typed)
    idfs: np.ndarray  # (len(tokens),)
    trigrams: np.ndarray
    trigram_hits: np.ndarray  # (E,) how many of ``trigrams`` each name holds
    source_index: int  # -1 for the null source
    country_row: int
    cluster: int
    query_row: int
    context_dense: np.ndarray  # (len(CONTEXT_DENSE),) in CONTEXT_DENSE order
    # per query token: sorted entity indices holding a name token within the token's typo
    # budget (the last token of a search query as a prefix); empty below 4 characters
    fuzzy_postings: tuple[np.ndarray, ...]
    # per query token: (E,) bool, the name holds the token (the last token of a search
    # query: a token starting with it); retrieval and the text features both read it
    token_marks: tuple[np.ndarray, ...]

    def containment(self, entities: np.ndarray) -> np.ndarray:
        """The share of the query's trigrams each of ``entities`` holds (float64)."""
        return self.trigram_hits[entities] / max(len(self.trigrams), 1)

    @property
    def trigram_containment(self) -> np.ndarray:
        """(E,) ``containment`` of every entity."""
        return self.containment(np.arange(len(self.trigram_hits)))

    def trigram_matches(self, share: float) -> np.ndarray:
        """Sorted entity indices holding at least ``share`` of the query's trigrams (none
        without trigrams); the count is compared, so no E-wide division is made."""
        n = len(self.trigrams)
        need = next((m for m in range(1, n + 1) if m / n >= share), None)
        if need is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.trigram_hits >= need)


class FeatureBuilder:
    """Turns (context, candidate indices) into model inputs; reads only bundle tables."""

    def __init__(self, catalogue: Catalogue, tables: FeatureTables, text: TextIndex) -> None:
        self.catalogue = catalogue
        self.tables = tables
        self.text = text
        self.n_entities = len(catalogue)
        self.country_index = country_index(catalogue)
        # Popularity as a log share (per 10k positives), not a raw count: the model learns
        # from tables of the history window and is served with tables of the whole training
        # split, about twice the volume; shares mean the same thing in both.
        self.pop_log = _log_share(tables.entity_pos[None, :])[0]
        prior = float(tables.prior_ctr)
        self.global_ctr = (tables.entity_pos + CTR_SMOOTHING * prior) / (
            tables.entity_imp + CTR_SMOOTHING
        )
        self.country_pop_log = _log_share(tables.country_pos)
        self.cluster_pop_log = _log_share(tables.cluster_pos)
        cluster_tot = tables.cluster_pos.sum(axis=1, keepdims=True)
        self.cluster_share = tables.cluster_pos / np.maximum(cluster_tot, 1.0) * 1000.0
        self.zero_vec = np.zeros((1, tables.vec_dim), dtype=np.float32)
        self.no_trigram_match = np.zeros(self.n_entities, dtype=np.int64)
        self.no_trigram_match.flags.writeable = False
        self.item_unit = unit_rows(tables.item_vec)
        # Shares, not counts, for the same reason: P(target) over the window's positives,
        # and each genre's share of them (the prior a member's genre profile is read against).
        self.pos_share = tables.entity_pos / max(float(tables.entity_pos.sum()), 1.0)
        self.genres = catalogue.genre_matrix
        self.n_genres_of = np.maximum(self.genres.sum(axis=1), 1.0)
        genre_pos = tables.entity_pos @ self.genres
        self.genre_prior = (genre_pos + 1.0) / (float(genre_pos.sum()) + len(genre_pos))
        self.search_pos_total = max(float(tables.query_pos.sum()), 1.0)

    def user_cluster(self, user_id: str, level: Personalization) -> int:
        """The user's cluster id as the model sees it at ``level`` (``ctx_cat``'s
        ``cluster``): 0 at ``none`` and for an unknown user."""
        return self._cluster_of(self.tables.user_row(user_id), level)

    def _cluster_of(self, user_row: int, level: Personalization) -> int:
        if level is Personalization.NONE or user_row < 0:
            return 0
        return int(self.tables.user_cluster[user_row])

    def context(self, ctx: Context, level: Personalization) -> ContextFeatures:
        tokens = tuple(tokenize(ctx.query))[:MAX_QUERY_TOKENS]
        ctx_tokens = np.zeros((1, MAX_QUERY_TOKENS), dtype=np.int64)
        for i, tok in enumerate(tokens):
            ctx_tokens[0, i] = stable_hash(tok, TOKEN_BUCKETS)
        # The last token of a typed search query may be incomplete: it matches as a prefix.
        search = ctx.task is Task.SEARCH
        is_prefix = tuple(search and i == len(tokens) - 1 for i in range(len(tokens)))
        idfs = np.array(
            [self.text.idf(t, prefix=p) for t, p in zip(tokens, is_prefix, strict=True)],
            dtype=np.float32,
        )
        user_row = self.tables.user_row(ctx.user_id)  # the one lookup of the user
        cluster = self._cluster_of(user_row, level)
        user_vec = self.zero_vec
        genre_lift = None
        if level is Personalization.FULL and user_row >= 0:
            user_vec = self.tables.user_vec[user_row : user_row + 1]
            genre_lift = self._genre_lift(self.tables.user_genre_pos[user_row])
        source_index = -1
        if ctx.source_entity_id != NULL_SOURCE:
            source_index = self.catalogue.index.get(ctx.source_entity_id, -1)
        country_row = self.country_index.get(clean_country(ctx.country), 0)
        cat = {
            "task": TASK_IDS[ctx.task],
            "country": country_row,
            "cluster": cluster,
            "level": LEVEL_IDS[level],
        }
        ctx_cat = np.array([[cat[name] for name in CTX_CAT]], dtype=np.int64)
        # Typos are a search box's problem: a page's query is the source's own name.
        fuzzy = tuple(
            self.text.fuzzy_postings(t, prefix=p) if search else np.zeros(0, dtype=np.int64)
            for t, p in zip(tokens, is_prefix, strict=True)
        )
        known = [
            len(post) > 0 or self.text.has_token(t, prefix=p)
            for t, p, post in zip(tokens, is_prefix, fuzzy, strict=True)
        ]
        values = {
            "query_chars_log": np.log1p(len(ctx.query)),
            "query_tokens": len(tokens),
            "query_imputed": float(ctx.query_imputed),
            "query_in_catalogue": float(np.mean(known)) if known else 0.0,
        }
        context_dense = np.array([values[name] for name in CONTEXT_DENSE], dtype=np.float32)
        trigrams = (
            query_trigrams(ctx.query, prefix=search) if ctx.query else np.zeros(0, dtype=np.int64)
        )
        # Once per request over the inverted index (every name at once): retrieval ranks by
        # it and the candidates' feature reads it, instead of an (N x 96) membership test.
        hits = self.no_trigram_match  # pre-query: no text, and no E-wide work
        if len(trigrams):
            hits = np.bincount(self.text.trigram_postings(trigrams), minlength=self.n_entities)
        return ContextFeatures(
            context=ctx,
            level=level,
            ctx_cat=ctx_cat,
            ctx_source=np.array(
                [source_index if source_index >= 0 else self.n_entities], dtype=np.int64
            ),
            ctx_tokens=ctx_tokens,
            user_vec=user_vec,
            genre_lift=genre_lift,
            tokens=tokens,
            is_prefix=is_prefix,
            idfs=idfs,
            trigrams=trigrams,
            trigram_hits=hits,
            source_index=source_index,
            country_row=country_row,
            cluster=cluster,
            query_row=self.tables.query_row(ctx.query) if ctx.task is Task.SEARCH else -1,
            context_dense=context_dense,
            fuzzy_postings=fuzzy,
            token_marks=tuple(
                self._token_mark(t, p) for t, p in zip(tokens, is_prefix, strict=True)
            ),
        )

    def _token_mark(self, token: str, prefix: bool) -> np.ndarray:
        mark = np.zeros(self.n_entities, dtype=bool)
        mark[self.text.postings(token, prefix=prefix)] = True
        return mark

    def _genre_lift(self, genre_pos: np.ndarray) -> np.ndarray:
        """log(P(genre | member) / P(genre)), the member's share shrunk towards the prior
        with ``GENRE_SHRINKAGE`` pseudo-positives: 0 for a member with no history."""
        total = float(genre_pos.sum())
        share = (genre_pos + GENRE_SHRINKAGE * self.genre_prior) / (total + GENRE_SHRINKAGE)
        return np.log(share / self.genre_prior).astype(np.float32)

    def candidates(self, cf: ContextFeatures, cand: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for ``cand`` (int64 entity indices) under context ``cf``."""
        n = len(cand)
        dense = np.zeros((n, len(DENSE_FEATURES)), dtype=np.float32)
        dense[:, _CONTEXT_COLS] = cf.context_dense
        if cf.tokens:
            self._text_features(cf, cand, dense)
        self._engagement_features(cf, cand, dense)
        tables = self.tables
        dense[:, COL["country_pop_log"]] = self.country_pop_log[cf.country_row, cand]
        dense[:, COL["global_pop_log"]] = self.pop_log[cand]
        dense[:, COL["global_ctr"]] = self.global_ctr[cand]
        item_vec = tables.item_vec[cand]
        if cf.cluster > 0:
            dense[:, COL["cluster_pop_log"]] = self.cluster_pop_log[cf.cluster, cand]
            dense[:, COL["cluster_share"]] = self.cluster_share[cf.cluster, cand]
        if cf.level is Personalization.FULL:
            # Row-wise, not a BLAS mat-vec: a candidate's value must not depend on N or on
            # the other candidates (BLAS blocking changes the rounding with the batch).
            dense[:, COL["user_item_dot"]] = (item_vec * cf.user_vec[0]).sum(axis=1)
        if cf.genre_lift is not None:
            dense[:, COL["user_genre_affinity"]] = (self.genres[cand] * cf.genre_lift[None, :]).sum(
                axis=1
            ) / self.n_genres_of[cand]
        return {
            "ctx_cat": cf.ctx_cat,
            "ctx_source": cf.ctx_source,
            "ctx_tokens": cf.ctx_tokens,
            "user_vec": cf.user_vec,
            "target": cand.astype(np.int64),
            "item_vec": item_vec,
            "dense": dense,
        }

    def _text_features(self, cf: ContextFeatures, cand: np.ndarray, dense: np.ndarray) -> None:
        text = self.text
        names = text.names[cand]
        padded = text.padded_names[cand]
        query = cf.context.query
        # (N, Q): does query token q occur as a whole name token (or start one, for the
        # last token of a typed query)? ``near``: exactly or within its typo budget.
        match = np.empty((len(cand), len(cf.tokens)), dtype=np.float32)
        near = np.empty_like(match)
        for q in range(len(cf.tokens)):  # loop over <= 8 query tokens, not candidates
            match[:, q] = cf.token_marks[q][cand]
            post = cf.fuzzy_postings[q]
            near[:, q] = 0.0
            if len(post):  # sorted entity indices: one binary search per candidate
                near[:, q] = post[np.minimum(np.searchsorted(post, cand), len(post) - 1)] == cand
        near = np.maximum(near, match)
        dense[:, COL["name_prefix"]] = np.strings.startswith(names, query)
        dense[:, COL["name_exact"]] = names == query
        # " name " holds " query" where the query starts at a word: "story" in "toy story"
        dense[:, COL["word_prefix"]] = np.strings.find(padded, " " + query) >= 0
        dense[:, COL["token_overlap"]] = match.mean(axis=1)
        dense[:, COL["fuzzy_overlap"]] = near.mean(axis=1)
        dense[:, COL["last_token_prefix"]] = match[:, -1]
        doc_len = text.name_n_tokens[cand][:, None]
        norm = BM25_K1 * (1 - BM25_B + BM25_B * doc_len / text.avg_tokens)
        bm25 = cf.idfs[None, :] * match * (BM25_K1 + 1) / (match + norm)
        dense[:, COL["bm25"]] = bm25.sum(axis=1)
        dense[:, COL["trigram_containment"]] = cf.containment(cand)

    def _engagement_features(
        self, cf: ContextFeatures, cand: np.ndarray, dense: np.ndarray
    ) -> None:
        tables = self.tables
        prior = float(tables.prior_ctr)
        if cf.query_row >= 0:
            lo, hi = tables.query_indptr[cf.query_row], tables.query_indptr[cf.query_row + 1]
            pos, imp = _sparse_row_lookup(
                tables.query_targets[lo:hi],
                (tables.query_pos[lo:hi], tables.query_imp[lo:hi]),
                cand,
            )
            dense[:, COL["query_target_pos_share"]] = np.log1p(1e4 * pos / self.search_pos_total)
            ctr = (pos + CTR_SMOOTHING * prior) / (imp + CTR_SMOOTHING)
            dense[:, COL["query_target_ctr"]] = ctr
        elif cf.context.task is Task.SEARCH:  # a query never typed: the prior rate
            dense[:, COL["query_target_ctr"]] = prior
        if cf.source_index >= 0:
            targets, counts = tables.co_engaged(cf.source_index)
            (co,) = _sparse_row_lookup(targets, (counts,), cand)
            share = co / max(float(counts.sum()), 1.0)
            # P(target | source page) / P(target): how much more the source's page engages
            # the target than the catalogue at large (a share of shares: window-free).
            dense[:, COL["co_engagement_lift"]] = np.log1p(
                share / np.maximum(self.pos_share[cand], 1e-6)
            ) * (co > 0)
            dense[:, COL["co_engagement_share"]] = share
            dense[:, COL["source_similarity"]] = (
                self.item_unit[cand] * self.item_unit[cf.source_index]
            ).sum(axis=1)
            linked = self.catalogue.linked(cf.source_index)
            if len(linked):
                dense[:, COL["linked_to_source"]] = np.isin(cand, linked)


def one_row_per_candidate(requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several requests' inputs as one, in the layout the model trains on: each request's
    context rows (batch 1) repeated to its candidate count, then all rows concatenated."""
    counts = [len(r["target"]) for r in requests]
    out = {
        name: np.concatenate(
            [np.repeat(r[name], n, axis=0) for r, n in zip(requests, counts, strict=True)]
        )
        for name in CONTEXT_INPUTS
    }
    out.update({name: np.concatenate([r[name] for r in requests]) for name in CANDIDATE_INPUTS})
    return {name: out[name] for name in INPUT_NAMES}


def _log_share(counts: np.ndarray) -> np.ndarray:
    """log1p of each row's counts as a share of the row's total, per 10,000."""
    total = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(1e4 * counts / total).astype(np.float32)


def _sparse_row_lookup(
    keys: np.ndarray, values: tuple[np.ndarray, ...], cand: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Values at ``cand`` from a sorted sparse row (``keys`` ascending); 0 where absent."""
    if len(keys) == 0:
        return tuple(np.zeros(len(cand), dtype=np.float32) for _ in values)
    pos = np.clip(np.searchsorted(keys, cand), 0, len(keys) - 1)
    hit = keys[pos] == cand
    return tuple(np.where(hit, v[pos], 0.0).astype(np.float32) for v in values)
