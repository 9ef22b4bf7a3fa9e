"""The bundle the service loads (app.core.bundle, written by
model_export.bundle_builder.write_bundle): every file with its checksum, the input
contract in the manifest, loading without torch, ranking, and the refusal of damaged
bundles with a clear message. On the session's ``fast_bundle`` (a hand-made model: no
training); what a TRAINED bundle's manifest holds is in ``test_model_export.py``."""

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
    read_manifest,
    sha256_of,
    verify_bundle,
    write_manifest,
)
from app.core.catalogue import Catalogue
from app.core.errors import BundleError
from app.core.features import DENSE_FEATURES, INPUT_NAMES
from app.core.ranking import Ranker, RankQuery
from app.core.scoring import OUTPUT_NAME


def test_bundle_has_every_file_with_its_checksum(fast_bundle: Path) -> None:
    manifest = read_manifest(fast_bundle)
    assert set(manifest["files"]) == set(BUNDLE_FILES)
    for name in BUNDLE_FILES:
        assert manifest["files"][name] == sha256_of(fast_bundle / name), name
    assert {p.name for p in fast_bundle.iterdir()} == {*BUNDLE_FILES, MANIFEST}


def test_bundle_manifest_states_the_input_contract(fast_bundle: Path) -> None:
    manifest = read_manifest(fast_bundle)
    assert manifest["format_version"] == FORMAT_VERSION
    assert [i["name"] for i in manifest["inputs"]] == list(INPUT_NAMES)
    dtypes = {i["name"]: i["dtype"] for i in manifest["inputs"]}
    assert dtypes["dense"] == dtypes["user_vec"] == dtypes["item_vec"] == "float32"
    assert dtypes["target"] == dtypes["ctx_cat"] == "int64"
    assert [o["name"] for o in manifest["outputs"]] == [OUTPUT_NAME]
    assert manifest["dense_features"] == list(DENSE_FEATURES)
    catalogue = Catalogue.load(fast_bundle / CATALOGUE_FILE)
    assert manifest["vocab"]["n_entities"] == len(catalogue)


def test_bundle_loads_and_ranks(fast_bundle: Path) -> None:
    bundle = load_bundle(fast_bundle)
    assert bundle.model_version == read_manifest(fast_bundle)["model_version"]
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


def test_ranker_breaks_ties_by_entity_index_whatever_the_input_order(fast_bundle: Path) -> None:
    bundle = load_bundle(fast_bundle)
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


def test_loading_a_bundle_never_imports_torch(fast_bundle: Path) -> None:
    code = (
        "import sys\n"
        "from app.core.bundle import load_bundle\n"
        f"bundle = load_bundle({str(fast_bundle)!r})\n"
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
    assert done.stdout.split()[0] == read_manifest(fast_bundle)["model_version"]


# -------------------------------------------------------------------- damaged bundles


@pytest.fixture
def copy_of(fast_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fast_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the manifest and re-hash the files (as a careless retrain would)."""
    manifest = read_manifest(bundle)
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
    refused(
        copy_of, rf"format_version 999 is not supported \(this service reads {FORMAT_VERSION}\)"
    )


def _relabel(bundle: Path, version: str) -> None:
    """Write ``version`` into the manifest, every file hash kept right (a hand edit)."""
    manifest = read_manifest(bundle)
    manifest["model_version"] = version
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_a_relabelled_model_version_is_refused(copy_of: Path, second_bundle: Path) -> None:
    """The cache keys on the model version: a bundle calling itself another bundle's
    version would be served that bundle's cached answers."""
    _relabel(copy_of, read_manifest(second_bundle)["model_version"])
    refused(copy_of, r"model_version '.*' is not bound to the bundle's files")


def test_a_model_name_edited_without_its_digest_is_refused(copy_of: Path) -> None:
    manifest = read_manifest(copy_of)
    manifest["model_name"] = "champion"
    (copy_of / MANIFEST).write_text(json.dumps(manifest))
    refused(copy_of, r"it must be model_name \+ their digest: 'champion-[0-9a-f]{12}'")


def test_bundles_that_differ_in_one_file_never_share_a_version(
    fast_bundle: Path, second_bundle: Path
) -> None:
    first, second = read_manifest(fast_bundle), read_manifest(second_bundle)
    assert first["model_name"] == second["model_name"]
    differing = [n for n in BUNDLE_FILES if first["files"][n] != second["files"][n]]
    assert differing == [MODEL_FILE]
    assert first["model_version"] != second["model_version"]
    assert load_bundle(second_bundle).model_version == second["model_version"]


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
    manifest = read_manifest(copy_of)
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
