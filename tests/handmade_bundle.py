"""A real bundle made without training, for the fast lane (``fast_bundle`` in
``tests/conftest.py``; imported by it, not a test itself).

Everything but the model is what ``unicorn build-bundle`` ships: a small synthetic world
(``model_export.synthetic``), feature tables built from its log by
``model_export.table_builder``, user clusters by ``model_export.pretrain.fit_clusters``
(numpy k-means), the name index, and the manifest with every file's sha256, all written by
``model_export.bundle_builder.write_bundle``. Two stand-ins replace the training steps:

- item vectors are each title's genres projected to ``VEC_DIM`` dimensions (plus a little
  noise) instead of BPR matrix factorisation;
- ``model.onnx`` is a graph written by hand with ``onnx.helper``: the sigmoid of a fixed
  weighted sum of a few dense features, the user x item vector dot product and a per-task
  bias. It reads ``ctx_cat``, ``user_vec``, ``item_vec`` and ``dense`` with the exported
  model's shapes (context rows broadcast over candidates), so the service verifies, loads,
  warms, batches and scores it as it does a trained one.

So what depends on the model having learnt something (quality, PyTorch/ONNX parity, the
training and evaluation numbers in the manifest) is tested on ``tiny_bundle`` instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.core.bundle import MODEL_FILE
from app.core.context import TASKS
from app.core.features import COL, DENSE_FEATURES, MAX_QUERY_TOKENS, TOKEN_BUCKETS
from app.core.scoring import OUTPUT_NAME
from app.core.text_index import TextIndex
from model_export.bundle_builder import write_bundle
from model_export.pretrain import fit_clusters
from model_export.synthetic import WorldConfig, generate_world
from model_export.table_builder import build_feature_tables

SEED = 7
VEC_DIM = 8
N_CLUSTERS = 4
# Also the world of the trained tiny bundle (tests/conftest.py).
WORLD = WorldConfig(
    seed=SEED, n_users=200, n_videos=200, n_games=10, n_genres=6, n_collections=6,
    n_people=10, n_countries=3, n_clusters=N_CLUSTERS, search_sessions=200,
    prequery_sessions=200, more_like_this_sessions=200, entity_sessions=150,
)  # fmt: skip
# logit = WEIGHTS . dense + USER_ITEM_WEIGHT * (user_vec . item_vec) + TASK_BIAS[task] + BIAS
WEIGHTS: dict[str, float] = {
    "name_exact": 2.0,
    "name_prefix": 1.0,
    "word_prefix": 0.5,
    "token_overlap": 1.0,
    "fuzzy_overlap": 0.5,
    "trigram_containment": 0.5,
    "bm25": 0.1,
    "query_target_ctr": 1.0,
    "co_engagement_lift": 0.5,
    "linked_to_source": 1.0,
    "source_similarity": 0.5,
    "country_pop_log": 0.1,
    "global_pop_log": 0.2,
    "cluster_share": 2.0,
    "user_genre_affinity": 0.5,
}
USER_ITEM_WEIGHT = 1.0
TASK_BIAS = (0.0, 0.1, 0.2, 0.3)  # in app.core.features.TASK_IDS order
BIAS = -3.0


DENSE_MEAN = np.linspace(0.05, 0.5, len(DENSE_FEATURES), dtype=np.float32)


def dense_weights() -> np.ndarray:
    weights = np.zeros(len(DENSE_FEATURES), dtype=np.float32)
    for name, weight in WEIGHTS.items():
        weights[COL[name]] = weight
    return weights


def handmade_model(path: Path, vec_dim: int = VEC_DIM) -> None:
    """Write the scoring graph (see the module docstring) to ``path``."""
    node = helper.make_node
    nodes = [
        node("MatMul", ["dense", "w"], ["dense_logit"]),  # (N, F) x (F,) -> (N,)
        node("Mul", ["user_vec", "item_vec"], ["user_item"]),  # (B, d) * (N, d), B = 1 or N
        node("ReduceSum", ["user_item", "last_axis"], ["dot"], keepdims=0),
        node("Mul", ["dot", "user_item_weight"], ["dot_logit"]),
        node("Gather", ["ctx_cat", "task_column"], ["task"], axis=1),  # (B,)
        node("Gather", ["task_bias", "task"], ["task_logit"], axis=0),
        node("Add", ["dense_logit", "dot_logit"], ["candidate_logit"]),
        node("Add", ["candidate_logit", "task_logit"], ["logit"]),
        node("Sigmoid", ["logit"], [OUTPUT_NAME]),
    ]
    initializers = [
        numpy_helper.from_array(dense_weights(), "w"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array(USER_ITEM_WEIGHT, dtype=np.float32), "user_item_weight"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "task_column"),
        numpy_helper.from_array(np.array(TASK_BIAS, dtype=np.float32) + BIAS, "task_bias"),
    ]
    float32, int64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("ctx_cat", int64, ["ctx_batch", 4]),
        helper.make_tensor_value_info("user_vec", float32, ["ctx_batch", vec_dim]),
        helper.make_tensor_value_info("item_vec", float32, ["candidates", vec_dim]),
        helper.make_tensor_value_info("dense", float32, ["candidates", len(DENSE_FEATURES)]),
    ]
    output = helper.make_tensor_value_info(OUTPUT_NAME, float32, ["candidates"])
    graph = helper.make_graph(nodes, "handmade", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime releases back to 1.15 read
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def genre_vectors(genre_matrix: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(E, dim): each entity's genres through a fixed random projection, plus noise, so
    members who play the same genres fold in to nearby vectors and share a cluster."""
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(genre_matrix.shape[1], dim))
    noise = rng.normal(scale=0.1, size=(genre_matrix.shape[0], dim))
    return (genre_matrix @ projection + noise).astype(np.float32)


def build_handmade_bundle(out: Path, world: WorldConfig = WORLD) -> Path:
    """A verified bundle in ``out`` (a tenth of a second on 2 cores); returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    catalogue, log = generate_world(world)
    item_vec = genre_vectors(catalogue.genre_matrix, VEC_DIM, world.seed)
    centroids = fit_clusters(log, catalogue, item_vec, N_CLUSTERS, seed=world.seed)
    tables = build_feature_tables(log, catalogue, item_vec, centroids)
    handmade_model(out / MODEL_FILE)
    manifest = {
        "model_name": f"handmade-s{world.seed}",
        "vocab": {
            "n_entities": len(catalogue),
            "n_countries": len(catalogue.country_names) + 1,
            "n_clusters": N_CLUSTERS + 1,
            "token_buckets": TOKEN_BUCKETS,
            "max_query_tokens": MAX_QUERY_TOKENS,
            "vec_dim": VEC_DIM,
        },
        "model": {
            "handmade": "sigmoid(w . dense + user_vec . item_vec + task bias), not trained",
            "weights": WEIGHTS,
            "task_bias": dict(zip(TASKS, TASK_BIAS, strict=True)),
            "bias": BIAS,
        },
        # training constants of the dense features (what ``"explain": true`` occludes
        # with); the handmade graph itself reads dense unnormalised
        "normalisation": {"mean": DENSE_MEAN.tolist(), "std": [2.0] * len(DENSE_FEATURES)},
    }
    return write_bundle(out, catalogue, tables, TextIndex.build(catalogue), manifest)
