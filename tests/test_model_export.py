"""From engagement log to a verified bundle: featurised training rows, ONNX export with
its parity gate, the bundle builder's manifest, loading without torch, and the refusal of
damaged bundles (model_export.dataset / export / bundle_builder / evaluate, app.core.bundle).

The end-to-end bundle is the session's ``tiny_bundle`` (tests/conftest.py); the export
and parity tests train their own small model, because they need the PyTorch side too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.core.bundle import (
    BUNDLE_FILES,
    CATALOGUE_FILE,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    TEXT_INDEX_FILE,
    load_bundle,
    sha256_of,
    verify_bundle,
    write_manifest,
)
from app.core.catalogue import Catalogue
from app.core.context import TASKS, Personalization, impute_context
from app.core.errors import BundleError
from app.core.features import DENSE_FEATURES, INPUT_NAMES
from app.core.ranking import Ranker, RankQuery
from app.core.retrieval import CandidateRetriever
from app.core.scoring import OUTPUT_NAME, OnnxScorer, ScorerOptions
from model_export import evaluate
from model_export.bundle_builder import parity_samples
from model_export.dataset import featurise, impression_groups
from model_export.export import PARITY_TOLERANCE, ParityError, check_parity, export_onnx
from model_export.model import UniCoRn
from model_export.pipeline import PipelineConfig, Prepared, prepare, train_unicorn, training_rows
from model_export.synthetic import WorldConfig, generate_world
from model_export.train import TrainConfig, predict

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


def test_ranking_metrics_on_a_known_list() -> None:
    ndcg, recall, mrr = evaluate.ranking_metrics(np.array([5, 3, 9]), np.array([3]))
    assert ndcg == pytest.approx(1 / np.log2(3))
    assert (recall, mrr) == (1.0, 0.5)
    ndcg, recall, mrr = evaluate.ranking_metrics(np.array([1, 2]), np.array([1, 2]))
    assert (ndcg, recall, mrr) == (1.0, 1.0, 1.0)
    assert evaluate.ranking_metrics(np.array([4, 5]), np.array([9])) == (0.0, 0.0, 0.0)
    # a positive past the cut-off counts for MRR only
    ranked = np.arange(20)
    ndcg, recall, mrr = evaluate.ranking_metrics(ranked, np.array([15]), k=10)
    assert (ndcg, recall) == (0.0, 0.0) and mrr == pytest.approx(1 / 16)


def test_ranking_metrics_need_a_positive() -> None:
    with pytest.raises(ValueError, match=r"^positives must not be empty$"):
        evaluate.ranking_metrics(np.array([1]), np.array([], dtype=np.int64))


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


def manifest_of(bundle: Path) -> dict[str, Any]:
    return dict(json.loads((bundle / MANIFEST).read_text()))


def test_bundle_has_every_file_with_its_checksum(tiny_bundle: Path) -> None:
    manifest = manifest_of(tiny_bundle)
    assert set(manifest["files"]) == set(BUNDLE_FILES)
    for name in BUNDLE_FILES:
        assert manifest["files"][name] == sha256_of(tiny_bundle / name), name
    assert {p.name for p in tiny_bundle.iterdir()} == {*BUNDLE_FILES, MANIFEST}


def test_bundle_manifest_describes_the_model(tiny_bundle: Path) -> None:
    manifest = manifest_of(tiny_bundle)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["model_version"].startswith("synthetic-s7-")
    assert [i["name"] for i in manifest["inputs"]] == list(INPUT_NAMES)
    dtypes = {i["name"]: i["dtype"] for i in manifest["inputs"]}
    assert dtypes["dense"] == dtypes["user_vec"] == dtypes["item_vec"] == "float32"
    assert dtypes["target"] == dtypes["ctx_cat"] == "int64"
    assert manifest["dense_features"] == list(DENSE_FEATURES)
    norm = manifest["normalisation"]
    assert len(norm["mean"]) == len(norm["std"]) == len(DENSE_FEATURES)
    assert all(s > 0 for s in norm["std"])
    catalogue = Catalogue.load(tiny_bundle / CATALOGUE_FILE)
    assert manifest["vocab"]["n_entities"] == len(catalogue)
    assert manifest["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert all(manifest["data"]["rows_per_task"][t] > 0 for t in TASKS)


def test_bundle_manifest_has_offline_metrics_for_every_task(tiny_bundle: Path) -> None:
    metrics = manifest_of(tiny_bundle)["offline_metrics"]
    for level in Personalization:
        per_task = metrics[f"unified ({level.value})"]
        assert set(per_task) == set(TASKS), level
        for task, m in per_task.items():
            assert 0.0 <= m["ndcg@10"] <= 1.0 and m["n"] > 0, (level, task)
    assert set(metrics["bm25"]) == {"search"}


def test_bundle_loads_and_ranks(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.model_version == manifest_of(tiny_bundle)["model_version"]
    assert set(bundle.scorer.input_names) <= set(INPUT_NAMES)
    ranker = Ranker(bundle)
    name = str(bundle.catalogue.display_name[np.flatnonzero(bundle.catalogue.rankable)[0]])
    result = ranker.rank(RankQuery(task="search", query=name, k=5))
    assert 0 < len(result.items) <= 5
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    assert result.context.query_imputed is False
    some = bundle.catalogue.entity_id[np.flatnonzero(bundle.catalogue.rankable)[:3]].tolist()
    result = ranker.rank(RankQuery(task="prequery", candidates=(*some, "nope", some[0]), k=10))
    assert sorted(i.entity_id for i in result.items) == sorted(some)
    assert result.unknown_candidates == ["nope"]


def test_ranker_breaks_ties_by_entity_index_whatever_the_input_order(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    ranker = Ranker(bundle)
    ids = bundle.catalogue.entity_id[np.flatnonzero(bundle.catalogue.rankable)[:6]].tolist()
    best = ids[5]
    for order in (ids, ids[::-1], ids[2:] + ids[:2]):
        prepared = ranker.prepare(RankQuery(task="prequery", candidates=tuple(order), k=3))
        scores = np.full(len(order), 0.5, dtype=np.float32)
        scores[order.index(best)] = 0.9
        result = ranker.finish(prepared, scores)
        # the best first, then the tied ones with the lowest entity indices
        assert [i.entity_id for i in result.items] == [best, ids[0], ids[1]], order


def test_loading_a_bundle_never_imports_torch(tiny_bundle: Path) -> None:
    code = (
        "import sys\n"
        "from app.core.bundle import load_bundle\n"
        f"bundle = load_bundle({str(tiny_bundle)!r})\n"
        "leaked = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'model_export', 'onnx'})\n"
        "print(bundle.model_version, leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split()[0] == manifest_of(tiny_bundle)["model_version"]


# -------------------------------------------------------------------- damaged bundles


@pytest.fixture
def copy_of(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the manifest and re-hash the files (as a careless retrain would)."""
    manifest = manifest_of(bundle)
    change(manifest)
    write_manifest(bundle, manifest)


def refused(bundle: Path, match: str) -> None:
    with pytest.raises(BundleError, match=match) as info:
        load_bundle(bundle)
    assert info.value.field == "bundle"
    assert info.value.status_code == 409


def test_a_flipped_byte_in_the_model_is_refused(copy_of: Path) -> None:
    data = bytearray((copy_of / MODEL_FILE).read_bytes())
    data[len(data) // 3] ^= 0x01
    (copy_of / MODEL_FILE).write_bytes(bytes(data))
    refused(copy_of, r"model\.onnx: sha256 does not match the manifest")


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_a_missing_file_is_refused(copy_of: Path, name: str) -> None:
    (copy_of / name).unlink()
    refused(copy_of, rf"{name}: bundle file is missing")


def test_a_missing_manifest_is_refused(copy_of: Path) -> None:
    (copy_of / MANIFEST).unlink()
    refused(copy_of, r"manifest\.json is missing")


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "nowhere", r"bundle directory does not exist")


def test_an_unknown_format_version_is_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda m: m.update(format_version=999))
    refused(copy_of, r"format_version 999 is not supported \(this service reads 1\)")


def test_changed_dense_features_are_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda m: m["dense_features"].reverse())
    refused(copy_of, r"the model was trained on features \['user_genre_affinity', 'user_item_dot'")


def test_changed_inputs_are_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda m: m["inputs"].pop())
    refused(copy_of, r"model inputs \[.*\] differ from \['ctx_cat'")


def test_an_entity_count_mismatch_is_refused(copy_of: Path) -> None:
    edit_manifest(copy_of, lambda m: m["vocab"].update(n_entities=m["vocab"]["n_entities"] + 1))
    refused(copy_of, r"model was built for \d+ entities, the catalogue has \d+")


def test_invalid_json_is_refused(copy_of: Path) -> None:
    (copy_of / MANIFEST).write_text('{"format_version": 1,')
    refused(copy_of, r"manifest is not valid JSON")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.clear() or m.update(x=[1]), r"format_version None is not supported"),
        (lambda m: m.pop("model_version"), r"manifest lacks 'model_version'"),
        (lambda m: m.update(files=["model.onnx"]), r"manifest 'files' must be an object"),
        (lambda m: m.update(inputs="ctx_cat"), r"'dense_features' and 'inputs' must be lists"),
        (lambda m: m.update(dense_features=7), r"'dense_features' and 'inputs' must be lists"),
        (lambda m: m.update(vocab=[1, 2]), r"model was built for None entities"),
    ],
)
def test_a_malformed_manifest_is_refused_not_crashed(
    copy_of: Path, change: Callable[[dict[str, Any]], object], match: str
) -> None:
    manifest = manifest_of(copy_of)
    change(manifest)
    (copy_of / MANIFEST).write_text(json.dumps(manifest))
    refused(copy_of, match)


def test_a_manifest_that_is_not_an_object_is_refused(copy_of: Path) -> None:
    (copy_of / MANIFEST).write_text("[1, 2, 3]")
    refused(copy_of, r"manifest must be a JSON object")


def test_a_garbage_model_with_a_matching_checksum_is_refused(copy_of: Path) -> None:
    (copy_of / MODEL_FILE).write_bytes(b"this is not an onnx model" * 100)
    edit_manifest(copy_of, lambda m: None)
    assert verify_bundle(copy_of)  # the checksums agree ...
    refused(copy_of, r"model\.onnx: onnxruntime cannot load the model")  # ... the model not


def test_a_garbage_table_with_a_matching_checksum_is_refused(copy_of: Path) -> None:
    (copy_of / TEXT_INDEX_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    edit_manifest(copy_of, lambda m: None)
    refused(copy_of, r"tables are inconsistent \(.*text_index\.npz: cannot read table")


def fake_model(path: Path, inputs: list[tuple[str, int, list[Any]]]) -> None:
    """A valid ONNX graph whose output is the mean of its last input over axis 1."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [inputs[-1][0]], [OUTPUT_NAME], axes=[1], keepdims=0)],
        "fake",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_a_model_with_other_inputs_is_refused(copy_of: Path) -> None:
    fake_model(copy_of / MODEL_FILE, [("x", TensorProto.FLOAT, ["n", 3])])
    edit_manifest(copy_of, lambda m: None)
    refused(copy_of, r"model\.onnx has inputs \['x'\] and outputs \['probability'\]")


def test_a_model_that_cannot_score_the_features_is_refused(copy_of: Path) -> None:
    # right input names, but it expects 5 dense features where the service computes 20
    fake_model(copy_of / MODEL_FILE, [("dense", TensorProto.FLOAT, ["n", 5])])
    edit_manifest(copy_of, lambda m: None)
    refused(copy_of, r"warm-up inference failed")


def test_the_same_fake_model_with_the_right_width_loads(copy_of: Path) -> None:
    # the check above refuses the width, not every model it did not train
    fake_model(copy_of / MODEL_FILE, [("dense", TensorProto.FLOAT, ["n", len(DENSE_FEATURES)])])
    edit_manifest(copy_of, lambda m: None)
    bundle = load_bundle(copy_of)
    assert bundle.scorer.input_names == ["dense"]
