"""Model inputs (app.core.features) over feature tables (app.core.feature_tables), and the temporal
splits that keep the tables free of the rows being evaluated (model_export.split).

Shapes and dtypes are checked on a small synthetic world; the meaning of each feature on
the hand-built world of ``hand_world``, where every count is known.
"""

from __future__ import annotations

from collections.abc import Callable

import hand_world
import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import (
    MAX_QUERY_CHARS,
    TASKS,
    Context,
    Personalization,
    Task,
    impute_context,
    logged_in,
)
from app.core.feature_tables import FeatureTables, country_rows
from app.core.features import (
    CANDIDATE_INPUTS,
    CAT_COL,
    COL,
    CONTEXT_DENSE,
    CONTEXT_INPUTS,
    CTR_SMOOTHING,
    CTX_CAT,
    DENSE_FEATURES,
    INPUT_NAMES,
    LEVEL_IDS,
    MAX_QUERY_TOKENS,
    TASK_IDS,
    TOKEN_BUCKETS,
    FeatureBuilder,
    one_row_per_candidate,
)
from app.core.text_index import TextIndex, stable_hash
from model_export.dataset import featurise
from model_export.engagement_log import EngagementLog
from model_export.split import history_split, temporal_split
from model_export.synthetic import WorldConfig, generate_world
from model_export.table_builder import (
    USER_SHRINKAGE,
    assign_clusters,
    build_feature_tables,
    fold_in_users,
)

VEC_DIM = 8
N_CLUSTERS = 4
SMALL = WorldConfig(
    seed=5,
    n_users=200,
    n_videos=200,
    n_games=20,
    n_collections=6,
    n_people=10,
    search_sessions=120,
    prequery_sessions=250,
    more_like_this_sessions=150,
    entity_sessions=150,
)
DTYPES = {
    "ctx_cat": np.int64,
    "ctx_source": np.int64,
    "ctx_tokens": np.int64,
    "user_vec": np.float32,
    "target": np.int64,
    "item_vec": np.float32,
    "dense": np.float32,
}


def name_lookup(catalogue: Catalogue) -> Callable[[str], str | None]:
    def name(entity_id: str) -> str | None:
        i = catalogue.index.get(entity_id)
        return None if i is None else str(catalogue.display_name[i])

    return name


# ------------------------------------------------------------------ synthetic world


@pytest.fixture(scope="module")
def world() -> tuple[Catalogue, EngagementLog]:
    return generate_world(SMALL)


@pytest.fixture(scope="module")
def synthetic_builder(world: tuple[Catalogue, EngagementLog]) -> FeatureBuilder:
    catalogue, log = world
    rng = np.random.default_rng(0)
    item_vec = rng.normal(size=(len(catalogue), VEC_DIM)).astype(np.float32)
    centroids = rng.normal(size=(N_CLUSTERS, VEC_DIM)).astype(np.float32)
    tables = build_feature_tables(log, catalogue, item_vec, centroids)
    return FeatureBuilder(catalogue, tables, TextIndex.build(catalogue))


def first_context_of(log: EngagementLog, catalogue: Catalogue, task: str) -> Context:
    """The imputed context of the first logged-in impression of ``task``."""
    r = int(np.flatnonzero((log.task == task) & logged_in(log.user_id))[0])
    return impute_context(
        task,
        str(log.user_id[r]),
        str(log.query[r]),
        str(log.country[r]),
        str(log.source_entity_id[r]),
        name_lookup(catalogue),
    )


@pytest.mark.parametrize("level", list(Personalization))
@pytest.mark.parametrize("task", TASKS)
def test_every_input_has_its_shape_dtype_and_finite_values(
    world: tuple[Catalogue, EngagementLog],
    synthetic_builder: FeatureBuilder,
    task: str,
    level: Personalization,
) -> None:
    catalogue, log = world
    cf = synthetic_builder.context(first_context_of(log, catalogue, task), level)
    cand = np.flatnonzero(catalogue.rankable)[:57]
    inputs = synthetic_builder.candidates(cf, cand)
    assert tuple(inputs) == INPUT_NAMES
    n = len(cand)
    shapes = {
        "ctx_cat": (1, len(CTX_CAT)),
        "ctx_source": (1,),
        "ctx_tokens": (1, MAX_QUERY_TOKENS),
        "user_vec": (1, VEC_DIM),
        "target": (n,),
        "item_vec": (n, VEC_DIM),
        "dense": (n, len(DENSE_FEATURES)),
    }
    for name in INPUT_NAMES:
        assert inputs[name].shape == shapes[name], name
        assert inputs[name].dtype == DTYPES[name], name
        assert np.all(np.isfinite(inputs[name])), name
    assert np.array_equal(inputs["target"], cand)
    assert inputs["ctx_cat"][0, CAT_COL["task"]] == TASK_IDS[Task(task)]
    assert inputs["ctx_cat"][0, CAT_COL["level"]] == LEVEL_IDS[level]
    assert inputs["ctx_tokens"].min() >= 0 and inputs["ctx_tokens"].max() < TOKEN_BUCKETS


def test_features_of_a_candidate_do_not_depend_on_the_others(
    world: tuple[Catalogue, EngagementLog], synthetic_builder: FeatureBuilder
) -> None:
    catalogue, log = world
    rankable = np.flatnonzero(catalogue.rankable)
    for task in TASKS:
        cf = synthetic_builder.context(first_context_of(log, catalogue, task), Personalization.FULL)
        cand = rankable[[3, 17, 42, 99, 150]]
        full = synthetic_builder.candidates(cf, cand)
        again = synthetic_builder.candidates(cf, cand[[4, 0, 2, 0]])  # reordered, duplicated
        for name in CANDIDATE_INPUTS:
            assert np.array_equal(again[name], full[name][[4, 0, 2, 0]]), (task, name)
        for i, c in enumerate(cand):
            alone = synthetic_builder.candidates(cf, np.array([c]))
            for name in CANDIDATE_INPUTS:
                assert np.array_equal(alone[name][0], full[name][i]), (task, name)


def test_no_candidates_give_empty_candidate_inputs(
    world: tuple[Catalogue, EngagementLog], synthetic_builder: FeatureBuilder
) -> None:
    catalogue, log = world
    cf = synthetic_builder.context(first_context_of(log, catalogue, "search"), Personalization.FULL)
    inputs = synthetic_builder.candidates(cf, np.zeros(0, dtype=np.int64))
    assert inputs["dense"].shape == (0, len(DENSE_FEATURES))
    assert inputs["item_vec"].shape == (0, VEC_DIM)
    assert inputs["target"].shape == (0,)
    assert inputs["ctx_cat"].shape == (1, len(CTX_CAT))


def test_a_long_query_keeps_at_most_max_tokens(synthetic_builder: FeatureBuilder) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    ctx = impute_context("search", "u1", words, "US", None, lambda _: None)
    cf = synthetic_builder.context(ctx, Personalization.NONE)
    assert len(cf.tokens) == MAX_QUERY_TOKENS
    assert cf.ctx_tokens[0].tolist() == [stable_hash(f"w{i}", TOKEN_BUCKETS) for i in range(8)]
    dense = synthetic_builder.candidates(cf, np.array([0]))["dense"][0]
    assert dense[COL["query_tokens"]] == MAX_QUERY_TOKENS
    assert dense[COL["query_chars_log"]] == pytest.approx(np.log1p(len(ctx.query)))
    assert len(ctx.query) <= MAX_QUERY_CHARS


# ------------------------------------------------------------------ hand-built world


@pytest.fixture(scope="module")
def builder() -> FeatureBuilder:
    return hand_world.builder()


def idx(builder: FeatureBuilder, *entity_ids: str) -> np.ndarray:
    return np.array([builder.catalogue.index[e] for e in entity_ids], dtype=np.int64)


def dense_for(
    builder: FeatureBuilder,
    task: str,
    candidates: tuple[str, ...],
    query: str | None = None,
    source: str | None = None,
    user: str | None = "searcher",
    country: str | None = "US",
    level: Personalization = Personalization.FULL,
) -> dict[str, dict[str, float]]:
    """{candidate id: {feature: value}}."""
    ctx = impute_context(task, user, query, country, source, name_lookup(builder.catalogue))
    dense = builder.candidates(builder.context(ctx, level), idx(builder, *candidates))["dense"]
    return {
        c: {f: float(dense[i, COL[f]]) for f in DENSE_FEATURES} for i, c in enumerate(candidates)
    }


def test_exact_name_match(builder: FeatureBuilder) -> None:
    d = dense_for(builder, "search", ("v_star", "v_starriv", "v_dark"), query="Star")
    assert d["v_star"]["name_exact"] == 1 and d["v_star"]["name_prefix"] == 1
    assert d["v_starriv"]["name_exact"] == 0 and d["v_starriv"]["name_prefix"] == 1
    assert d["v_dark"]["name_exact"] == 0 and d["v_dark"]["name_prefix"] == 0
    assert d["v_dark"]["token_overlap"] == 0 and d["v_dark"]["bm25"] == 0
    assert d["v_star"]["token_overlap"] == 1 and d["v_star"]["bm25"] > 0


def test_a_typed_prefix_matches_the_last_token_as_a_prefix(builder: FeatureBuilder) -> None:
    d = dense_for(builder, "search", ("v_stranger", "v_strange", "v_dark"), query="stranger th")
    assert d["v_stranger"]["last_token_prefix"] == 1
    assert d["v_stranger"]["token_overlap"] == 1
    assert d["v_stranger"]["name_prefix"] == 1 and d["v_stranger"]["name_exact"] == 0
    # "stranger" is a whole token: "strange days" does not hold it
    assert d["v_strange"]["token_overlap"] == 0 and d["v_strange"]["last_token_prefix"] == 0
    assert d["v_dark"]["last_token_prefix"] == 0
    assert d["v_stranger"]["bm25"] > d["v_strange"]["bm25"] == 0


def test_prefix_matching_is_for_search_only(builder: FeatureBuilder) -> None:
    # On a page the (explicit or imputed) query is complete: "stra" is not a token.
    d = dense_for(builder, "more_like_this", ("v_stranger",), query="stra", source="v_dark")
    assert d["v_stranger"]["last_token_prefix"] == 0
    assert d["v_stranger"]["name_prefix"] == 1  # the whole-name prefix still holds
    d = dense_for(builder, "search", ("v_stranger",), query="stra")
    assert d["v_stranger"]["last_token_prefix"] == 1


def test_trigram_containment_tolerates_a_typo(builder: FeatureBuilder) -> None:
    d = dense_for(builder, "search", ("v_stranger", "v_dark", "v_crown"), query="strnger things")
    typo = d["v_stranger"]
    assert typo["name_exact"] == 0 and typo["name_prefix"] == 0
    assert 0.5 < typo["trigram_containment"] < 1.0
    # every word is anchored: of the query's 12 trigrams, "dark water" holds only "er$"
    assert d["v_dark"]["trigram_containment"] == pytest.approx(1 / 12)
    assert typo["fuzzy_overlap"] == 1 and typo["token_overlap"] == 0.5  # "strnger": a typo
    exact = dense_for(builder, "search", ("v_stranger",), query="Stranger Things")["v_stranger"]
    assert exact["trigram_containment"] == 1.0


def test_query_target_engagement_is_counted_per_normalised_query(builder: FeatureBuilder) -> None:
    prior = float(builder.tables.prior_ctr)
    d = dense_for(builder, "search", ("v_stranger", "v_strange", "v_dark"), query="STRA")
    # "Stra" -> Stranger Things (positive) and "stra" -> Strange Days (impressed only) are
    # the same normalised query
    assert d["v_stranger"]["query_target_pos_share"] == pytest.approx(
        np.log1p(1e4 * 1 / builder.search_pos_total)
    )
    assert d["v_stranger"]["query_target_ctr"] == pytest.approx(
        (1 + CTR_SMOOTHING * prior) / (1 + CTR_SMOOTHING)
    )
    assert d["v_strange"]["query_target_pos_share"] == 0
    assert d["v_strange"]["query_target_ctr"] == pytest.approx(
        CTR_SMOOTHING * prior / (1 + CTR_SMOOTHING)
    )
    assert d["v_dark"]["query_target_pos_share"] == 0
    assert d["v_dark"]["query_target_ctr"] == pytest.approx(prior)
    # a query never typed has no statistics
    d = dense_for(builder, "search", ("v_stranger",), query="str")
    assert d["v_stranger"]["query_target_pos_share"] == 0
    assert d["v_stranger"]["query_target_ctr"] == pytest.approx(prior)


def test_query_statistics_are_for_search_only(builder: FeatureBuilder) -> None:
    d = dense_for(builder, "entity", ("v_stranger",), query="stra", source="p_winona")
    assert d["v_stranger"]["query_target_pos_share"] == 0
    assert d["v_stranger"]["query_target_ctr"] == 0


def test_co_engagement_of_source_and_target(builder: FeatureBuilder) -> None:
    cands = ("v_dark", "v_strange", "v_crown", "v_star")
    d = dense_for(builder, "more_like_this", cands, source="v_stranger")
    assert d["v_dark"]["co_engagement_lift"] == pytest.approx(lift(builder, "v_dark", 3 / 4))
    assert d["v_dark"]["co_engagement_share"] == pytest.approx(3 / 4)
    assert d["v_strange"]["co_engagement_lift"] == pytest.approx(lift(builder, "v_strange", 1 / 4))
    assert d["v_strange"]["co_engagement_share"] == pytest.approx(1 / 4)
    # an impression without engagement is not co-engagement
    assert d["v_crown"]["co_engagement_lift"] == 0
    assert d["v_star"]["co_engagement_lift"] == 0
    # the imputed query: the source's name
    assert d["v_dark"]["query_imputed"] == 1
    assert d["v_dark"]["query_tokens"] == 2
    # no source, no co-engagement
    d = dense_for(builder, "search", ("v_dark",), query="dark")
    assert d["v_dark"]["co_engagement_lift"] == 0


def test_linked_to_source(builder: FeatureBuilder) -> None:
    d = dense_for(builder, "entity", ("v_crown", "v_dark", "v_star"), source="g_drama")
    assert (d["v_crown"]["linked_to_source"], d["v_dark"]["linked_to_source"]) == (1, 1)
    assert d["v_star"]["linked_to_source"] == 0
    share = d["v_crown"]["co_engagement_share"]
    assert share > 0
    assert d["v_crown"]["co_engagement_lift"] == pytest.approx(lift(builder, "v_crown", share))


def lift(builder: FeatureBuilder, entity: str, share: float) -> float:
    """co_engagement_lift: log1p(P(target | source page) / P(target))."""
    return float(np.log1p(share / builder.pos_share[builder.catalogue.index[entity]]))


def log_share(count: float, total: float) -> float:
    """Popularity features are log1p of a share of the row's positives, per 10k."""
    return float(np.log1p(1e4 * count / total))


def country_total(builder: FeatureBuilder, country: str) -> float:
    row = builder.catalogue.country_names.index(country) + 1
    return float(builder.tables.country_pos[row].sum())


def test_country_popularity_is_per_country(builder: FeatureBuilder) -> None:
    # The Crown: one positive in the US (prequery), one in GB (the Drama page)
    # Dark Water: one US positive (prequery) + three US more_like_this positives
    us = dense_for(builder, "prequery", ("v_crown", "v_dark"), country="us")
    gb = dense_for(builder, "prequery", ("v_crown", "v_dark"), country="GB")
    nowhere = dense_for(builder, "prequery", ("v_crown", "v_dark"), country=None)
    us_total, gb_total = country_total(builder, "US"), country_total(builder, "GB")
    assert us["v_dark"]["country_pop_log"] == pytest.approx(log_share(4, us_total))
    assert gb["v_dark"]["country_pop_log"] == 0
    assert gb["v_crown"]["country_pop_log"] == pytest.approx(log_share(1, gb_total))
    assert nowhere["v_dark"]["country_pop_log"] == 0  # no positive had an unknown country
    all_pos = float(builder.tables.entity_pos.sum())
    assert us["v_crown"]["global_pop_log"] == pytest.approx(log_share(2, all_pos))


def test_personalization_none_masks_every_user_signal(builder: FeatureBuilder) -> None:
    ctx = impute_context("prequery", "dark_fan", None, "US", None, lambda _: None)
    cf = builder.context(ctx, Personalization.NONE)
    assert cf.cluster == 0 and cf.ctx_cat[0, CAT_COL["cluster"]] == 0
    assert not cf.user_vec.any()
    dense = builder.candidates(cf, idx(builder, "v_stranger", "v_dark"))["dense"]
    for f in ("cluster_pop_log", "cluster_share", "user_item_dot"):
        assert not dense[:, COL[f]].any(), f


def test_personalization_cluster_gives_the_cluster_only(builder: FeatureBuilder) -> None:
    ctx = impute_context("prequery", "dark_fan", None, "US", None, lambda _: None)
    cf = builder.context(ctx, Personalization.CLUSTER)
    assert cf.cluster == 1 and cf.ctx_cat[0, CAT_COL["cluster"]] == 1
    assert not cf.user_vec.any()
    dense = builder.candidates(cf, idx(builder, "v_stranger", "v_crown"))["dense"]
    assert dense[0, COL["cluster_pop_log"]] > 0  # dark fans played Stranger Things
    assert dense[1, COL["cluster_pop_log"]] == 0
    assert not dense[:, COL["user_item_dot"]].any()
    bright = impute_context("prequery", "bright_fan", None, "US", None, lambda _: None)
    assert builder.context(bright, Personalization.CLUSTER).cluster == 2


def test_personalization_full_adds_the_user_vector(builder: FeatureBuilder) -> None:
    ctx = impute_context("prequery", "dark_fan", None, "US", None, lambda _: None)
    cf = builder.context(ctx, Personalization.FULL)
    assert cf.cluster == 1
    # three dark positives, shrunk: 3 / (3 + USER_SHRINKAGE) along the dark axis
    assert cf.user_vec[0] == pytest.approx([3 / (3 + USER_SHRINKAGE), 0.0])
    dense = builder.candidates(cf, idx(builder, "v_stranger", "v_crown"))["dense"]
    assert dense[0, COL["user_item_dot"]] == pytest.approx(3 / (3 + USER_SHRINKAGE))
    assert dense[1, COL["user_item_dot"]] == 0


@pytest.mark.parametrize("level", list(Personalization))
def test_an_unknown_user_is_cold_start_at_every_level(
    builder: FeatureBuilder, level: Personalization
) -> None:
    ctx = impute_context("prequery", "someone_new", None, "US", None, lambda _: None)
    cf = builder.context(ctx, level)
    assert cf.cluster == 0 and not cf.user_vec.any()
    logged_out = impute_context("prequery", None, None, "US", None, lambda _: None)
    assert builder.context(logged_out, level).cluster == 0


def test_context_ids(builder: FeatureBuilder) -> None:
    n = len(builder.catalogue)
    search = builder.context(
        impute_context("search", None, "the crown", "gb", None, lambda _: None),
        Personalization.NONE,
    )
    assert search.ctx_source.tolist() == [n]  # the null source token
    assert search.source_index == -1
    gb_row = 1 + builder.catalogue.country_names.index("GB")
    cat = dict(zip(CTX_CAT, search.ctx_cat[0].tolist(), strict=True))
    assert cat == {"task": TASK_IDS[Task.SEARCH], "country": gb_row, "cluster": 0, "level": 0}
    assert search.ctx_tokens[0, :2].tolist() == [
        stable_hash("the", TOKEN_BUCKETS),
        stable_hash("crown", TOKEN_BUCKETS),
    ]
    assert not search.ctx_tokens[0, 2:].any()
    page = builder.context(
        impute_context(
            "more_like_this", None, None, None, "v_dark", name_lookup(builder.catalogue)
        ),
        Personalization.NONE,
    )
    assert page.ctx_source.tolist() == [builder.catalogue.index["v_dark"]]
    assert page.ctx_cat[0, CAT_COL["country"]] == 0  # unknown country


def test_the_cluster_is_the_one_the_features_use(builder: FeatureBuilder) -> None:
    # the cache keys results by FeatureBuilder.user_cluster: it must be ctx_cat's cluster
    for user in ("dark_fan", "bright_fan", "someone_new", None):
        ctx = impute_context("prequery", user, None, "US", None, lambda _: None)
        for level in Personalization:
            cf = builder.context(ctx, level)
            assert builder.user_cluster(ctx.user_id, level) == cf.cluster, (user, level)
            assert cf.ctx_cat[0, CAT_COL["cluster"]] == cf.cluster


def test_ids_of_tasks_and_levels_are_the_enums_in_order() -> None:
    # the model's embedding tables have len(Task) and len(Personalization) rows
    assert list(TASK_IDS) == list(Task) and list(TASK_IDS.values()) == list(range(len(Task)))
    assert list(LEVEL_IDS) == list(Personalization)
    assert list(LEVEL_IDS.values()) == list(range(len(Personalization)))


def test_context_features_fill_their_named_columns(
    world: tuple[Catalogue, EngagementLog], synthetic_builder: FeatureBuilder
) -> None:
    catalogue, log = world
    cf = synthetic_builder.context(first_context_of(log, catalogue, "search"), Personalization.NONE)
    dense = synthetic_builder.candidates(cf, np.flatnonzero(catalogue.rankable)[:5])["dense"]
    for i, name in enumerate(CONTEXT_DENSE):
        assert np.all(dense[:, COL[name]] == cf.context_dense[i]), name
    assert dense[0, COL["query_tokens"]] == len(cf.tokens)
    assert dense[0, COL["query_imputed"]] == 0.0


def test_one_row_per_candidate_repeats_each_context_over_its_candidates(
    world: tuple[Catalogue, EngagementLog], synthetic_builder: FeatureBuilder
) -> None:
    catalogue, log = world
    rankable = np.flatnonzero(catalogue.rankable)
    requests = [
        synthetic_builder.candidates(
            synthetic_builder.context(first_context_of(log, catalogue, task), level), cand
        )
        for task, level, cand in (
            ("search", Personalization.FULL, rankable[:3]),
            ("prequery", Personalization.CLUSTER, rankable[3:4]),
            ("entity", Personalization.NONE, rankable[4:9]),
        )
    ]
    rows = one_row_per_candidate(requests)
    assert tuple(rows) == INPUT_NAMES
    owner = np.repeat([0, 1, 2], [3, 1, 5])
    offset = np.array([0, 3, 4])
    for r, (o, start) in enumerate(zip(owner, offset[owner], strict=True)):
        for name in CONTEXT_INPUTS:
            assert np.array_equal(rows[name][r], requests[o][name][0]), (r, name)
        for name in CANDIDATE_INPUTS:
            assert np.array_equal(rows[name][r], requests[o][name][r - start]), (r, name)


# ------------------------------------------------------------------ feature tables


def test_fold_in_users_is_a_shrunk_mean() -> None:
    item_vec = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    out = fold_in_users(np.array([0, 0, 1]), np.array([0, 1, 2]), 3, item_vec)
    assert out.dtype == np.float32 and out.shape == (3, 2)
    assert out[0] == pytest.approx(np.array([1.0, 1.0]) / (2 + USER_SHRINKAGE))
    assert out[1] == pytest.approx(np.array([1.0, 1.0]) / (1 + USER_SHRINKAGE))
    assert not out[2].any()  # no positives: zero vector


def test_assign_clusters_is_nearest_by_cosine_and_zero_without_signal() -> None:
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    users = np.array([[5.0, 1.0], [0.1, 0.2], [0.0, 0.0]], dtype=np.float32)
    assert assign_clusters(users, centroids).tolist() == [1, 2, 0]
    assert assign_clusters(users, centroids[:0]).tolist() == [0, 0, 0]


def test_country_rows_map_codes_to_rows(builder: FeatureBuilder) -> None:
    names = builder.catalogue.country_names
    assert names == ("DE", "GB", "US")
    assert country_rows(builder.catalogue, np.array(["US", "gb", "", "XX"])).tolist() == [
        3,
        2,
        0,
        0,
    ]


@pytest.mark.parametrize(
    ("logged_user", "logged_country", "asked_user", "asked_country"),
    [
        (" dark_fan ", " us ", "dark_fan", "US"),
        ("dark_fan\t", "Us", " dark_fan", "us "),
        ("\u00a0dark_fan\u3000", "\u2003US\n", "dark_fan", "uS"),  # unicode whitespace
    ],
)
def test_tables_key_users_and_countries_as_the_context_imputes_them(
    logged_user: str, logged_country: str, asked_user: str, asked_country: str
) -> None:
    # a log with untidy raw values: the tables and the context clean them by one rule
    b = hand_world.builder([(100, "prequery", logged_user, "", logged_country, "", "v_dark", 1)])
    assert b.tables.user_ids.tolist() == ["dark_fan"]
    ctx = impute_context("prequery", asked_user, None, asked_country, None, lambda _: None)
    cf = b.context(ctx, Personalization.FULL)
    assert cf.cluster == 1 and cf.user_vec.any()
    assert b.user_cluster(ctx.user_id, Personalization.FULL) == cf.cluster
    us_row = 1 + b.catalogue.country_names.index("US")
    assert cf.country_row == us_row
    assert country_rows(b.catalogue, np.array([logged_country, asked_country])).tolist() == [
        us_row,
        us_row,
    ]
    dense = b.candidates(cf, idx(b, "v_dark"))["dense"]
    # the only US positive: a share of 1/1
    assert dense[0, COL["country_pop_log"]] == pytest.approx(log_share(1, 1))


@pytest.mark.parametrize("blank", ["", "  ", "\t\u00a0", "<unknown_user>"])
def test_a_blank_user_id_or_the_unknown_token_is_no_user_in_the_tables(blank: str) -> None:
    b = hand_world.builder([(100, "prequery", blank, "", "", "", "v_dark", 1)])
    assert len(b.tables.user_ids) == 0
    assert b.tables.cluster_pos[1:].sum() == 0  # its positive is in no cluster


def test_tables_refuse_item_vectors_of_the_wrong_size() -> None:
    cat = hand_world.catalogue()
    log = hand_world.make_log(hand_world.ROWS)
    with pytest.raises(ValueError, match=r"^item_vec has 3 rows, catalogue has 11$"):
        build_feature_tables(log, cat, np.zeros((3, 2), np.float32), hand_world.CENTROIDS)


def test_tables_refuse_targets_missing_from_the_catalogue() -> None:
    cat = hand_world.catalogue()
    rows = [*hand_world.ROWS, (500, "prequery", "x", "", "US", "", "ghost", 1)]
    with pytest.raises(ValueError, match=r"names targets missing from the catalogue: \['ghost'\]"):
        hand_world.tables(cat, hand_world.make_log(rows))


def test_tables_of_an_empty_log_serve_zeros() -> None:
    cat = hand_world.catalogue()
    b = FeatureBuilder(cat, hand_world.tables(cat, hand_world.make_log([])), TextIndex.build(cat))
    assert b.tables.entity_pos.sum() == 0 and float(b.tables.prior_ctr) == 0.0
    ctx = impute_context("search", "u", "star", "US", None, lambda _: None)
    dense = b.candidates(b.context(ctx, Personalization.FULL), np.arange(8))["dense"]
    assert np.all(np.isfinite(dense))
    assert not dense[:, COL["query_target_pos_share"]].any()


def test_tables_save_load_round_trip(builder: FeatureBuilder, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "feature_tables.npz"
    builder.tables.save(path)
    loaded = FeatureTables.load(path)
    for name, column in builder.tables.columns().items():
        assert np.array_equal(column, loaded.columns()[name]), name
    assert loaded.user_row("dark_fan") == builder.tables.user_row("dark_fan") >= 0
    assert loaded.user_row("nobody") == -1
    assert loaded.query_row("stra") >= 0 and loaded.query_row("zz") == -1


# ----------------------------------------------------------------------- leakage

# A user with five impressions: with test_fraction 0.2 the last one is the test split.
# The query "midnight" -> Midnight Gospel and the page Star -> The Crown occur ONLY there.
LATE_USER: tuple[hand_world.Row, ...] = (
    (1000, "prequery", "late", "", "DE", "", "v_dark", 1),
    (1010, "prequery", "late", "", "DE", "", "v_crown", 0),
    (1020, "search", "late", "dark", "DE", "", "v_dark", 1),
    (1030, "prequery", "late", "", "DE", "", "v_crown", 1),
    (1040, "search", "late", "midnight", "DE", "", "v_gospel", 1),
)
LATE_PAGE_USER: tuple[hand_world.Row, ...] = (
    (1000, "prequery", "late2", "", "GB", "", "v_star", 1),
    (1010, "prequery", "late2", "", "GB", "", "v_starriv", 1),
    (1020, "prequery", "late2", "", "GB", "", "v_crown", 0),
    (1030, "prequery", "late2", "", "GB", "", "v_dark", 1),
    (1040, "more_like_this", "late2", "", "GB", "v_star", "v_crown", 1),
)


def test_statistics_never_count_a_test_split_row() -> None:
    cat = hand_world.catalogue()
    log = hand_world.make_log([*hand_world.ROWS, *LATE_USER, *LATE_PAGE_USER])
    train_mask, test_mask = temporal_split(log, test_fraction=0.2)
    test = log.select(test_mask)
    pairs = set(zip(test.user_id.tolist(), test.timestamp.tolist(), strict=True))
    assert {("late", 1040), ("late2", 1040)} <= pairs

    def features(tables: FeatureTables) -> tuple[dict[str, float], dict[str, float]]:
        b = FeatureBuilder(cat, tables, TextIndex.build(cat))
        search = dense_for(b, "search", ("v_gospel",), query="midnight", country="DE")
        page = dense_for(b, "more_like_this", ("v_crown",), source="v_star", country="GB")
        return search["v_gospel"], page["v_crown"]

    leaky_search, leaky_page = features(hand_world.tables(cat, log))
    assert leaky_search["query_target_pos_share"] > 0  # the check below can fail
    assert leaky_page["co_engagement_lift"] > 0
    search, page = features(hand_world.tables(cat, log.select(train_mask)))
    assert search["query_target_pos_share"] == 0
    assert search["global_pop_log"] == 0 and search["country_pop_log"] == 0
    assert page["co_engagement_lift"] == 0 and page["co_engagement_share"] == 0


def test_tables_from_the_train_split_count_exactly_its_rows(
    world: tuple[Catalogue, EngagementLog],
) -> None:
    catalogue, log = world
    train = log.select(temporal_split(log, 0.2)[0])
    vec = np.zeros((len(catalogue), 2), dtype=np.float32)
    tables = build_feature_tables(train, catalogue, vec, hand_world.CENTROIDS)
    assert tables.entity_imp.sum() == len(train) < len(log)
    assert tables.entity_pos.sum() == train.label.sum()
    assert tables.query_imp.sum() == np.sum(train.task == "search")
    assert tables.query_pos.sum() == train.label[train.task == "search"].sum()
    paged = np.isin(train.task, ("more_like_this", "entity")) & (train.label == 1)
    assert tables.co_count.sum() == paged.sum()


def test_temporal_split_puts_each_users_later_impressions_in_test(
    world: tuple[Catalogue, EngagementLog],
) -> None:
    _, log = world
    train_mask, test_mask = temporal_split(log, test_fraction=0.2)
    assert np.array_equal(train_mask, ~test_mask)
    assert 0.1 < test_mask.mean() < 0.3
    # whole impressions stay together
    train_imps = set(log.impression_id[train_mask].tolist())
    assert train_imps.isdisjoint(log.impression_id[test_mask].tolist())
    users = np.unique(log.user_id[log.user_id != ""])
    n_with_test = 0
    for user in users.tolist():
        mine = log.user_id == user
        tr, te = log.timestamp[mine & train_mask], log.timestamp[mine & test_mask]
        if len(te):
            n_with_test += 1
            assert len(tr) and tr.max() <= te.min(), user
    assert n_with_test > len(users) // 4
    anonymous = log.user_id == ""
    assert anonymous.any()
    tr, te = log.timestamp[anonymous & train_mask], log.timestamp[anonymous & test_mask]
    assert len(te) and tr.max() <= te.min()


def test_temporal_split_tests_the_last_fraction_of_each_user() -> None:
    rows = [(t, "prequery", "a", "", "US", "", "v_dark", 1) for t in range(10)]
    rows += [(t, "prequery", "b", "", "US", "", "v_dark", 1) for t in (50, 3)]
    log = hand_world.make_log(rows)
    _, test = temporal_split(log, test_fraction=0.3)
    # user a: 10 impressions -> the last 3; user b: 2 impressions -> floor(0.6) = none
    assert log.timestamp[test].tolist() == [7, 8, 9]
    assert set(log.user_id[test].tolist()) == {"a"}


def test_history_and_fit_windows_are_disjoint_and_ordered(
    world: tuple[Catalogue, EngagementLog],
) -> None:
    _, log = world
    train = log.select(temporal_split(log, 0.2)[0])
    history, fit = history_split(train, history_fraction=0.5)
    assert np.array_equal(history, ~fit)
    assert 0.3 < history.mean() < 0.7
    # per user: every history impression precedes every fit impression of that user
    for user in np.unique(train.user_id[train.user_id != ""]).tolist()[:50]:
        mine = train.user_id == user
        if (mine & history).any() and (mine & fit).any():
            assert train.timestamp[mine & history].max() <= train.timestamp[mine & fit].min()
    assert set(train.impression_id[history].tolist()).isdisjoint(train.impression_id[fit].tolist())


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fractions_are_checked(
    world: tuple[Catalogue, EngagementLog], fraction: float
) -> None:
    _, log = world
    with pytest.raises(ValueError, match=rf"^test_fraction must be in \(0, 1\), got {fraction}$"):
        temporal_split(log, fraction)
    with pytest.raises(
        ValueError, match=rf"^history_fraction must be in \(0, 1\), got {fraction}$"
    ):
        history_split(log, fraction)


def test_fit_labels_never_reach_fit_features(world: tuple[Catalogue, EngagementLog]) -> None:
    """Flip every fit-window label: the fit rows' features (history tables, per-user
    split) stay bit-identical; with tables over the whole training split they would not."""
    catalogue, log = world
    train = log.select(temporal_split(log, 0.2)[0])
    history_mask, fit_mask = history_split(train, 0.5)
    vec = np.random.default_rng(0).normal(size=(len(catalogue), 2)).astype(np.float32)
    text = TextIndex.build(catalogue)
    flipped = train.select(np.arange(len(train)))
    flipped.label[fit_mask] = 1 - flipped.label[fit_mask]

    def fit_inputs(window: EngagementLog, rows: EngagementLog) -> dict[str, np.ndarray]:
        tables = build_feature_tables(window, catalogue, vec, hand_world.CENTROIDS)
        b = FeatureBuilder(catalogue, tables, text)
        return featurise(rows, b, Personalization.FULL).inputs

    honest = fit_inputs(train.select(history_mask), train.select(fit_mask))
    after_flip = fit_inputs(flipped.select(history_mask), flipped.select(fit_mask))
    for name in INPUT_NAMES:
        assert np.array_equal(honest[name], after_flip[name]), name
    leaky = fit_inputs(train, train.select(fit_mask))
    leaky_flip = fit_inputs(flipped, flipped.select(fit_mask))
    assert not np.array_equal(leaky["dense"], leaky_flip["dense"])  # the check can fail
