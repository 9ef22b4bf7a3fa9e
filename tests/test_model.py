"""The UniCoRn network (model_export.model) and its training (model_export.train), and
the pre-trained item vectors and clusters (model_export.pretrain). The tests that train
are marked slow."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import hand_world
import numpy as np
import pytest
import torch

from app.core.features import INPUT_NAMES
from model_export.dataset import FeaturisedRows
from model_export.engagement_log import EngagementLog
from model_export.model import CrossLayer, ModelConfig, ResidualBlock, UniCoRn, UniCoRnScorer
from model_export.pretrain import fit_clusters, train_item_vectors
from model_export.train import (
    TrainConfig,
    dense_normalisation,
    predict,
    to_tensors,
    train_model,
)

CONFIG = ModelConfig(
    n_entities=30,
    n_countries=4,
    n_clusters=5,
    n_dense=6,
    vec_dim=4,
    token_buckets=64,
    emb_dim=8,
    cross_rank=4,
    mlp_width=16,
)
FAST = TrainConfig(epochs=2, batch_size=64, seed=3, threads=1, progress=False)
# Tests that run a torch optimiser (however small) are out of the fast lane, which trains
# nothing (tests/conftest.py).
trains = pytest.mark.slow(reason="trains with torch")


def context_inputs(rng: np.random.Generator, batch: int = 1) -> dict[str, np.ndarray]:
    tokens = rng.integers(0, CONFIG.token_buckets, size=(batch, 8))
    tokens[:, 5:] = 0  # padding
    return {
        "ctx_cat": np.stack(
            [
                rng.integers(0, CONFIG.n_tasks, batch),
                rng.integers(0, CONFIG.n_countries, batch),
                rng.integers(0, CONFIG.n_clusters, batch),
                rng.integers(0, CONFIG.n_levels, batch),
            ],
            axis=1,
        ).astype(np.int64),
        "ctx_source": rng.integers(0, CONFIG.n_entities + 1, batch).astype(np.int64),
        "ctx_tokens": tokens.astype(np.int64),
        "user_vec": rng.normal(size=(batch, CONFIG.vec_dim)).astype(np.float32),
    }


def candidate_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "target": rng.integers(0, CONFIG.n_entities, n).astype(np.int64),
        "item_vec": rng.normal(size=(n, CONFIG.vec_dim)).astype(np.float32),
        "dense": rng.normal(size=(n, CONFIG.n_dense)).astype(np.float32),
    }


def request(seed: int = 0, n: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return context_inputs(rng) | candidate_inputs(rng, n)


def fresh_model(seed: int = 0, config: ModelConfig = CONFIG) -> UniCoRn:
    torch.manual_seed(seed)
    return UniCoRn(config).eval()


@torch.no_grad()
def logits(model: UniCoRn, inputs: dict[str, np.ndarray]) -> torch.Tensor:
    return model(*to_tensors(inputs))


# ------------------------------------------------------------------------------ forward


def test_forward_returns_one_logit_per_candidate() -> None:
    out = logits(fresh_model(), request(n=7))
    assert out.shape == (7,)
    assert out.dtype == torch.float32
    assert torch.all(torch.isfinite(out))


def test_context_batch_one_is_broadcast_like_one_row_per_candidate() -> None:
    model = fresh_model()
    inputs = request(n=9)
    repeated = {
        name: np.repeat(arr, 9, axis=0) if name in INPUT_NAMES[:4] else arr
        for name, arr in inputs.items()
    }
    assert repeated["ctx_cat"].shape == (9, 4)
    torch.testing.assert_close(logits(model, inputs), logits(model, repeated), rtol=0, atol=1e-6)


def test_each_candidate_is_scored_independently() -> None:
    model = fresh_model()
    inputs = request(n=6)
    together = logits(model, inputs)
    for i in range(6):
        alone = inputs | {k: inputs[k][i : i + 1] for k in ("target", "item_vec", "dense")}
        torch.testing.assert_close(logits(model, alone)[0], together[i], rtol=0, atol=1e-6)


def test_the_context_changes_the_scores() -> None:
    model = fresh_model()
    a = request(seed=1)
    b = a | {"ctx_cat": a["ctx_cat"].copy()}
    b["ctx_cat"][0, 0] = (a["ctx_cat"][0, 0] + 1) % CONFIG.n_tasks  # another task
    assert not torch.allclose(logits(model, a), logits(model, b))


def test_token_padding_does_not_change_the_pooled_query() -> None:
    model = fresh_model()
    a = request(seed=2)
    a["ctx_tokens"][0] = [3, 9, 0, 0, 0, 0, 0, 0]
    b = a | {"ctx_tokens": np.array([[9, 3, 0, 0, 0, 0, 0, 0]])}  # mean pooling: order-free
    torch.testing.assert_close(logits(model, a), logits(model, b))
    # the mean of [e3, e3] is e3: padding slots must not add anything to the mean
    once = a | {"ctx_tokens": np.array([[3, 0, 0, 0, 0, 0, 0, 0]])}
    twice = a | {"ctx_tokens": np.array([[3, 3, 0, 0, 0, 0, 0, 0]])}
    torch.testing.assert_close(logits(model, once), logits(model, twice), rtol=0, atol=1e-6)
    assert torch.count_nonzero(model.token_emb.weight[0]) == 0


def test_dense_features_are_normalised_and_clamped() -> None:
    config = replace(CONFIG, dense_mean=[1.0] * 6, dense_std=[2.0] * 6)
    model = fresh_model(config=config)
    base = request(seed=3)
    far = base | {"dense": np.full_like(base["dense"], 1.0 + 2.0 * 50)}  # 50 std away
    farther = base | {"dense": np.full_like(base["dense"], 1.0 + 2.0 * 5000)}
    torch.testing.assert_close(logits(model, far), logits(model, farther))  # clamped at 10
    assert model.dense_mean.tolist() == [1.0] * 6
    assert model.dense_std.tolist() == [2.0] * 6


def test_the_null_source_token_has_an_embedding() -> None:
    inputs = request(seed=4)
    inputs["ctx_source"] = np.array([CONFIG.n_entities])
    assert torch.all(torch.isfinite(logits(fresh_model(), inputs)))


def test_scorer_is_the_sigmoid_of_the_logits() -> None:
    model = fresh_model()
    inputs = request(seed=5)
    with torch.no_grad():
        probability = UniCoRnScorer(model)(*to_tensors(inputs))
    torch.testing.assert_close(probability, torch.sigmoid(logits(model, inputs)))
    assert np.allclose(predict(model, inputs), probability.numpy())


def test_user_and_item_adapters_start_as_the_identity() -> None:
    model = fresh_model()
    x = torch.randn(3, CONFIG.vec_dim)
    torch.testing.assert_close(model.user_adapter(x), x)
    torch.testing.assert_close(model.item_adapter(x), x)


# ------------------------------------------------------------------------------ layers


def test_full_rank_cross_layer_formula() -> None:
    layer = CrossLayer(dim=2, rank=0)
    assert isinstance(layer.proj, torch.nn.Linear)
    with torch.no_grad():
        layer.proj.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.proj.bias.copy_(torch.tensor([0.5, -1.0]))
        x0 = torch.tensor([[1.0, 2.0]])
        x = torch.tensor([[3.0, 4.0]])
        # W x + b = [11.5, 24]; x0 * (W x + b) + x = [1 * 11.5 + 3, 2 * 24 + 4]
        out = layer(x0, x)
    torch.testing.assert_close(out, torch.tensor([[14.5, 52.0]]))


def test_low_rank_cross_layer_is_x0_times_uvx_plus_b_plus_x() -> None:
    torch.manual_seed(0)
    layer = CrossLayer(dim=5, rank=2)
    assert isinstance(layer.proj, torch.nn.Sequential)
    first, second = layer.proj[0], layer.proj[1]
    assert isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.Linear)
    v, u, b = first.weight, second.weight, second.bias
    assert v.shape == (2, 5) and u.shape == (5, 2)
    x0, x = torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad():
        expected = x0 * (x @ v.T @ u.T + b) + x
        torch.testing.assert_close(layer(x0, x), expected)


def test_residual_block_adds_to_its_input() -> None:
    block = ResidualBlock(width=6, dropout=0.0)
    last = block.ff[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        h = torch.randn(3, 6)
        torch.testing.assert_close(block(h), h)


@pytest.mark.parametrize(
    ("n_cross", "n_res_blocks", "cross_rank"), [(0, 0, 4), (3, 1, 0), (1, 2, 2)]
)
def test_every_depth_the_config_allows_scores_every_candidate(
    n_cross: int, n_res_blocks: int, cross_rank: int
) -> None:
    """No cross layer, no residual block, a full-rank cross layer: the config accepts them,
    so the model built from it must score."""
    config = replace(CONFIG, n_cross=n_cross, n_res_blocks=n_res_blocks, cross_rank=cross_rank)
    out = logits(fresh_model(config=config), request(n=5))
    assert out.shape == (5,) and torch.all(torch.isfinite(out))


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field",
    [
        "n_entities",
        "n_countries",
        "n_clusters",
        "n_dense",
        "vec_dim",
        "token_buckets",
        "n_tasks",
        "n_levels",
        "emb_dim",
        "mlp_width",
    ],
)
def test_model_config_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be >= 1, got 0$"):
        replace(CONFIG, **cast(dict[str, Any], {field: 0}))


@pytest.mark.parametrize("field", ["n_cross", "cross_rank", "n_res_blocks"])
def test_model_config_counts_must_not_be_negative(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be >= 0, got -1$"):
        replace(CONFIG, **cast(dict[str, Any], {field: -1}))
    replace(CONFIG, **cast(dict[str, Any], {field: 0}))  # zero is allowed


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_model_config_dropout_is_a_probability(dropout: float) -> None:
    with pytest.raises(ValueError, match=rf"^dropout must be in \[0, 1\), got {dropout}$"):
        replace(CONFIG, dropout=dropout)


@pytest.mark.parametrize("field", ["dense_mean", "dense_std"])
def test_model_config_normalisation_must_match_n_dense(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must have n_dense=6 values, got 2$"):
        replace(CONFIG, **cast(dict[str, Any], {field: [0.0, 1.0]}))


def test_model_config_round_trips_through_a_dict() -> None:
    config = replace(CONFIG, dense_mean=[0.5] * 6, dense_std=[2.0] * 6)
    assert ModelConfig(**config.to_dict()) == config  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- training


def training_rows(n: int = 384, seed: int = 0) -> FeaturisedRows:
    """Rows whose label is learnable: positive when the first dense feature is > 0."""
    rng = np.random.default_rng(seed)
    inputs = {
        name: np.repeat(arr, n, axis=0) for name, arr in context_inputs(rng).items()
    } | candidate_inputs(rng, n)
    inputs["dense"][:, 0] += 3.0  # not centred: the model must normalise it
    label = (inputs["dense"][:, 0] > 3.0).astype(np.float32)
    return FeaturisedRows(inputs, label, np.arange(n, dtype=np.int64), np.full(n, "search"))


@trains
def test_training_is_deterministic_given_the_seed() -> None:
    rows = training_rows()
    a, stats_a = train_model(rows, CONFIG, FAST)
    b, stats_b = train_model(rows, CONFIG, FAST)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert stats_a["final_loss"] == stats_b["final_loss"]
    c, _ = train_model(rows, CONFIG, replace(FAST, seed=4))
    assert not torch.equal(a.inp.weight, c.inp.weight)


@trains
def test_training_learns_and_leaves_the_callers_config_alone() -> None:
    rows = training_rows()
    model, stats = train_model(rows, CONFIG, replace(FAST, epochs=6, lr=1e-2))
    assert not model.training  # returned in eval mode
    assert torch.count_nonzero(model.token_emb.weight[0]) == 0  # padding never trained
    assert CONFIG.dense_mean == []  # the caller's config is not mutated
    mean, std = dense_normalisation(rows.inputs["dense"])
    assert model.config.dense_mean == mean and model.config.dense_std == std
    assert stats["rows"] == len(rows)
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["final_loss"] < 0.4  # log(2) = 0.69 is chance
    p = predict(model, rows.inputs)
    accuracy = float(np.mean((p > 0.5) == (rows.label > 0.5)))
    assert accuracy > 0.85


def test_dense_normalisation_floors_the_std() -> None:
    dense = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    mean, std = dense_normalisation(dense)
    assert mean == [2.0, 5.0]
    assert std == [1.0, 1e-3]


def test_training_refuses_no_rows() -> None:
    empty = training_rows().select(np.zeros(384, dtype=bool))
    with pytest.raises(ValueError, match=r"^cannot train on an empty set of rows$"):
        train_model(empty, CONFIG, FAST)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, r"^epochs must be >= 1, got 0$"),
        ({"batch_size": 1}, r"^batch_size must be >= 2, got 1$"),
        ({"lr": 0.0}, r"^lr must be > 0, got 0.0$"),
    ],
)
def test_train_config_validation(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)  # type: ignore[arg-type]


# ------------------------------------------------- pre-trained user-item vectors, clusters


def two_taste_log(users_per_taste: int = 6) -> EngagementLog:
    """Half the users play the dark titles, half the bright ones (see hand_world)."""
    rows: list[hand_world.Row] = []
    for u in range(users_per_taste):
        for t, title in enumerate(("v_stranger", "v_strange", "v_dark")):
            rows.append((100 * u + t, "prequery", f"dark{u}", "", "US", "", title, 1))
        for t, title in enumerate(("v_starriv", "v_crown", "g_crownq")):
            rows.append((100 * u + t, "prequery", f"bright{u}", "", "US", "", title, 1))
    return hand_world.make_log(rows)


@trains
def test_item_vectors_are_deterministic_and_shaped() -> None:
    catalogue, log = hand_world.catalogue(), two_taste_log()
    a = train_item_vectors(log, catalogue, dim=4, epochs=3, seed=1)
    b = train_item_vectors(log, catalogue, dim=4, epochs=3, seed=1)
    assert a.shape == (len(catalogue), 4) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, train_item_vectors(log, catalogue, dim=4, epochs=3, seed=2))


@trains
def test_item_vectors_learn_who_plays_what() -> None:
    catalogue = hand_world.catalogue()
    vec = train_item_vectors(two_taste_log(), catalogue, dim=4, epochs=60, seed=1)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    i = catalogue.index
    same = unit[i["v_stranger"]] @ unit[i["v_dark"]]
    other = unit[i["v_stranger"]] @ unit[i["v_crown"]]
    assert same > other


def test_item_vectors_without_positives_are_the_initial_vectors() -> None:
    catalogue = hand_world.catalogue()
    log = hand_world.make_log([(1, "prequery", "u", "", "US", "", "v_dark", 0)])
    vec = train_item_vectors(log, catalogue, dim=3, epochs=1)
    assert vec.shape == (len(catalogue), 3) and np.all(np.isfinite(vec))


def test_item_vector_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^dim and epochs must be >= 1, got dim=0, epochs=2$"):
        train_item_vectors(two_taste_log(), hand_world.catalogue(), dim=0, epochs=2)


def test_clusters_separate_two_tastes() -> None:
    catalogue = hand_world.catalogue()
    centroids = fit_clusters(
        two_taste_log(), catalogue, hand_world.item_vectors(catalogue), k=2, seed=0
    )
    assert centroids.shape == (2, 2) and centroids.dtype == np.float32
    assert sorted(np.round(centroids, 3).tolist()) == [[0.0, 1.0], [1.0, 0.0]]


def test_clusters_with_fewer_distinct_users_than_k_do_not_crash() -> None:
    # every user played the same title: k-means++ has no distance left to sample by
    catalogue = hand_world.catalogue()
    log = hand_world.make_log(
        [(i, "prequery", f"u{i}", "", "US", "", "v_dark", 1) for i in range(20)]
    )
    centroids = fit_clusters(log, catalogue, hand_world.item_vectors(catalogue), k=4)
    assert centroids.shape == (4, 2) and np.all(np.isfinite(centroids))


def test_clusters_are_padded_when_there_are_few_users() -> None:
    catalogue = hand_world.catalogue()
    log = hand_world.make_log([(1, "prequery", "u", "", "US", "", "v_dark", 1)])
    centroids = fit_clusters(log, catalogue, hand_world.item_vectors(catalogue), k=3)
    assert centroids.shape == (3, 2)
    assert centroids[0].tolist() == [1.0, 0.0]


def test_cluster_count_is_checked() -> None:
    catalogue = hand_world.catalogue()
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        fit_clusters(two_taste_log(), catalogue, hand_world.item_vectors(catalogue), k=0)
