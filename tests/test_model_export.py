"""From engagement log to a trained bundle: featurised training rows, ONNX export with
its parity gate, evaluation on retrieved candidates, and what the bundle builder records
of training (model_export.dataset / export / evaluate / bundle_builder). All of it trains
(item vectors, the ranker), so it is marked slow; the bundle as the service loads it is
tested on the fast bundle in ``test_bundle.py``.

The end-to-end bundle is the session's ``tiny_bundle`` (tests/conftest.py); the export
and parity tests train their own small model, because they need the PyTorch side too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from app.core.bundle import load_bundle, read_manifest
from app.core.context import TASKS, Personalization, impute_context
from app.core.features import DENSE_FEATURES, INPUT_NAMES
from app.core.retrieval import CandidateRetriever
from app.core.scoring import OUTPUT_NAME, OnnxScorer, ScorerOptions
from model_export import evaluate
from model_export.bundle_builder import parity_samples
from model_export.dataset import featurise, impression_groups
from model_export.export import PARITY_TOLERANCE, ParityError, check_parity, export_onnx
from model_export.model import UniCoRn
from model_export.synthetic import WorldConfig, generate_world
from model_export.train import TrainConfig, predict
from model_export.training_pipeline import (
    PipelineConfig,
    Prepared,
    prepare,
    train_unicorn,
    training_rows,
)

pytestmark = pytest.mark.slow

WORLD = WorldConfig(
    seed=3,
    n_users=150,
    n_videos=150,
    n_games=10,
    n_genres=6,
    n_collections=5,
    n_people=8,
    n_countries=3,
    n_clusters=4,
    search_sessions=100,
    prequery_sessions=200,
    more_like_this_sessions=150,
    entity_sessions=120,
)
PIPELINE = PipelineConfig(seed=3, n_clusters=4, vec_dim=8, mf_epochs=2, negatives=6)
ONE_EPOCH = TrainConfig(epochs=1, batch_size=512, seed=3, threads=1, progress=False)


# ------------------------------------------------------------- training rows and export


@pytest.fixture(scope="module")
def prep() -> Prepared:
    catalogue, log = generate_world(WORLD)
    return prepare(catalogue, log, PIPELINE)


@pytest.fixture(scope="module")
def trained(prep: Prepared) -> UniCoRn:
    rows = training_rows(prep)
    model, _ = train_unicorn(prep, rows, ONE_EPOCH)
    return model


@pytest.fixture(scope="module")
def exported(prep: Prepared, trained: UniCoRn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    rows = featurise(
        prep.fit.select(np.arange(200)), prep.builder(serving=False), Personalization.FULL
    )
    export_onnx(trained, rows.inputs, path)
    return path


def test_prepare_keeps_test_rows_out_of_every_table(prep: Prepared) -> None:
    assert set(prep.train.impression_id.tolist()).isdisjoint(prep.test.impression_id.tolist())
    assert len(prep.train) + len(prep.test) == len(prep.log)
    history_rows = len(prep.train) - len(prep.fit)
    assert 0 < history_rows < len(prep.train)
    # training rows are featurised from the history window only, serving from all of train
    assert prep.history_tables.entity_imp.sum() == history_rows
    assert prep.serving_tables.entity_imp.sum() == len(prep.train)
    # per user, history precedes fit
    hist_mask = ~np.isin(prep.train.impression_id, prep.fit.impression_id)
    users = prep.train.user_id
    for user in np.unique(users[users != ""]).tolist()[:40]:
        mine = users == user
        if (mine & hist_mask).any() and (mine & ~hist_mask).any():
            assert prep.train.timestamp[mine & hist_mask].max() <= (
                prep.train.timestamp[mine & ~hist_mask].min()
            )


def test_featurise_gives_one_row_per_logged_row_plus_negatives(prep: Prepared) -> None:
    log = prep.fit.select(np.arange(300))
    builder = prep.builder(serving=False)
    plain = featurise(log, builder, Personalization.CLUSTER)
    assert len(plain) == len(log)
    for name in INPUT_NAMES:
        assert plain.inputs[name].shape[0] == len(log), name
    groups = impression_groups(log)
    assert plain.impression.max() == len(groups) - 1
    assert np.all(plain.inputs["ctx_cat"][:, 3] == 1)  # the cluster level, every row
    # rows of one impression share the context inputs
    for g in range(len(groups)):
        same = plain.impression == g
        assert len(np.unique(plain.inputs["ctx_cat"][same], axis=0)) == 1
    # labels in the log's impression order
    order = np.concatenate(groups)
    assert np.array_equal(plain.label, log.label[order].astype(np.float32))


def test_training_rows_are_the_retrievers_candidates(prep: Prepared) -> None:
    """Every training candidate is one the service's retriever returns for that context;
    positives it misses drop their impression (counted); at most ``negatives`` label-0
    rows per impression."""
    log, builder = prep.fit, prep.builder(serving=False)
    retriever = CandidateRetriever(builder)
    rows = featurise(log, builder, Personalization.NONE, retriever, negatives=4)
    groups = impression_groups(log)
    kept = np.unique(rows.impression)
    assert len(kept) + sum(rows.dropped.values()) == len(groups)
    assert sum(rows.dropped.values()) > 0  # the tiny world's retriever misses some
    for g in kept.tolist()[:40]:
        r0 = groups[g][0]
        ctx = impute_context(
            str(log.task[r0]), str(log.user_id[r0]), str(log.query[r0]),
            str(log.country[r0]), str(log.source_entity_id[r0]), builder.catalogue.name_of,
        )  # fmt: skip
        pool = retriever.retrieve(builder.context(ctx, Personalization.NONE), limit=300)
        mine = rows.impression == g
        assert np.isin(rows.inputs["target"][mine], pool).all()
        assert rows.label[mine].sum() >= 1 and (rows.label[mine] == 0).sum() <= 4
        logged_pos = builder.catalogue.lookup(log.target_entity_id[groups[g]])[
            log.label[groups[g]] == 1
        ]
        positives = rows.inputs["target"][mine][rows.label[mine] == 1]
        assert set(positives.tolist()) == set(logged_pos[np.isin(logged_pos, pool)].tolist())


def test_featurise_checks_its_arguments(prep: Prepared) -> None:
    builder = prep.builder(serving=False)
    with pytest.raises(ValueError, match=r"^cannot featurise an empty log$"):
        featurise(prep.fit.select(np.zeros(len(prep.fit), bool)), builder, Personalization.FULL)


def test_training_rows_mix_the_three_personalization_levels(prep: Prepared) -> None:
    rows = training_rows(prep, tasks=("prequery",))
    assert set(rows.task.tolist()) == {"prequery"}
    levels = set(rows.inputs["ctx_cat"][:, 3].tolist())
    assert levels == {0, 1, 2}


def test_exported_graph_has_the_contract_names(exported: Path) -> None:
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    # The exporter drops inputs the graph does not read: `target` is read only when the
    # model has a target-id embedding (off by default, see ModelConfig).
    expected = [n for n in INPUT_NAMES if n != "target"]
    assert [i.name for i in proto.graph.input] == expected
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]


def test_onnx_matches_pytorch_on_held_out_requests(
    prep: Prepared, trained: UniCoRn, exported: Path
) -> None:
    samples = parity_samples(prep, n=8)
    assert any(s["ctx_cat"].shape[0] == 1 for s in samples)  # per-request (serving)
    assert any(s["ctx_cat"].shape[0] > 1 for s in samples)  # row-batched (training)
    worst = check_parity(trained, exported, samples)
    assert 0.0 <= worst <= PARITY_TOLERANCE


def test_the_exported_batch_axes_are_dynamic(prep: Prepared, exported: Path) -> None:
    scorer = OnnxScorer.open(exported, ScorerOptions())
    builder, retriever = prep.builder(), prep.retriever()
    ctx = impute_context("search", "u1", "star", None, None, lambda _: None)
    cf = builder.context(ctx, Personalization.FULL)
    for n in (1, 3, 257):
        cand = retriever.retrieve(cf, limit=n)
        scores = scorer.score(builder.candidates(cf, cand))
        assert scores.shape == (len(cand),) and np.all((scores >= 0) & (scores <= 1))


def test_parity_gate_fails_a_model_that_differs(
    prep: Prepared, trained: UniCoRn, exported: Path
) -> None:
    other = UniCoRn(trained.config).eval()  # same architecture, other weights
    with pytest.raises(ParityError, match=r"^onnxruntime differs from PyTorch by .* > 1e-05$"):
        check_parity(other, exported, parity_samples(prep, n=4))


def test_export_needs_two_rows_to_trace_a_dynamic_axis(
    prep: Prepared, trained: UniCoRn, tmp_path: Path
) -> None:
    rows = featurise(prep.fit.select(np.arange(1)), prep.builder(), Personalization.FULL)
    one = {k: v[:1] for k, v in rows.inputs.items()}
    with pytest.raises(ValueError, match=r"^example must have at least 2 candidate rows"):
        export_onnx(trained, one, tmp_path / "m.onnx")


def test_predict_returns_probabilities(prep: Prepared, trained: UniCoRn) -> None:
    rows = featurise(prep.fit.select(np.arange(50)), prep.builder(), Personalization.FULL)
    p = predict(trained, rows.inputs)
    assert p.shape == (len(rows),) and p.dtype == np.float32
    assert np.all((p > 0) & (p < 1))


# --------------------------------------------------------------------------- evaluation


def test_evaluation_scores_every_task_on_retrieved_candidates(prep: Prepared) -> None:
    builder, retriever = prep.builder(), prep.retriever()
    imps = evaluate.test_impressions(prep.test, builder, per_task=5, seed=1)
    assert set(imps) == set(TASKS)
    assert all(0 < len(v) <= 5 for v in imps.values())
    assert all(len(i.positives) for v in imps.values() for i in v)
    systems = [
        evaluate.System("pop", Personalization.NONE, evaluate.column_scorer("global_pop_log")),
        evaluate.System("bm25", Personalization.NONE, evaluate.column_scorer("bm25"), ("search",)),
    ]
    results = evaluate.evaluate_systems(systems, imps, builder, retriever, max_retrieved=50)
    assert set(results["pop"]) == set(TASKS) and set(results["bm25"]) == {"search"}
    for metrics in results["pop"].values():
        assert set(metrics) == {"ndcg@10", "recall@10", "mrr", "candidate_recall", "n"}
        assert all(0.0 <= metrics[m] <= 1.0 for m in ("ndcg@10", "recall@10", "mrr"))


# ------------------------------------------------------------------- the tiny bundle


def test_a_trained_bundle_records_its_training_and_parity(tiny_bundle: Path) -> None:
    """What only a bundle built by training holds; the input contract and the files are
    checked on the fast bundle (test_bundle.py), which write_bundle writes alike."""
    manifest = read_manifest(tiny_bundle)
    assert manifest["model_version"].startswith("synthetic-s7-")
    norm = manifest["normalisation"]
    assert len(norm["mean"]) == len(norm["std"]) == len(DENSE_FEATURES)
    assert all(s > 0 for s in norm["std"])
    assert manifest["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert all(manifest["data"]["rows_per_task"][t] > 0 for t in TASKS)
    load_bundle(tiny_bundle)  # and it loads


def test_bundle_manifest_has_offline_metrics_for_every_task(tiny_bundle: Path) -> None:
    metrics = read_manifest(tiny_bundle)["offline_metrics"]
    for level in Personalization:
        per_task = metrics[f"unified ({level.value})"]
        assert set(per_task) == set(TASKS), level
        for task, m in per_task.items():
            assert 0.0 <= m["ndcg@10"] <= 1.0 and m["n"] > 0, (level, task)
    assert set(metrics["bm25"]) == {"search"}
