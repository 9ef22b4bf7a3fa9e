"""The bundle: the only thing passed from training to serving.

A directory holding ``manifest.json``, ``model.onnx`` and the tables the features and
retrieval read. ``load_bundle`` verifies it (format version, every file's sha256, the
feature contract, a smoke inference) before anything serves from it, and raises
``BundleError`` with a clear message otherwise. Needs numpy + onnxruntime only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.core.catalogue import Catalogue
from app.core.errors import BundleError
from app.core.feature_tables import FeatureTables
from app.core.features import DENSE_FEATURES, INPUT_NAMES, FeatureBuilder
from app.core.retrieval import CandidateRetriever
from app.core.scoring import OUTPUT_NAME, OnnxScorer, ScorerOptions
from app.core.table_io import TableError
from app.core.text_index import TextIndex

FORMAT_VERSION = 3  # 2: model_version bound to the files; 3: tables hold item neighbours
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
CATALOGUE_FILE = "catalogue.npz"
TABLES_FILE = "feature_tables.npz"
TEXT_INDEX_FILE = "text_index.npz"
BUNDLE_FILES = (MODEL_FILE, CATALOGUE_FILE, TABLES_FILE, TEXT_INDEX_FILE)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A verified, loaded bundle: ready to retrieve, featurise and score."""

    path: Path
    manifest: dict[str, Any]
    catalogue: Catalogue
    tables: FeatureTables
    text: TextIndex
    features: FeatureBuilder
    retriever: CandidateRetriever
    scorer: OnnxScorer

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])


def content_digest(files: dict[str, str]) -> str:
    """12 hex digits of the sha256 over every bundle file's name and sha256."""
    lines = "".join(f"{name} {files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def bound_version(model_name: str, files: dict[str, str]) -> str:
    """The model version: a human label, then the digest of the files it names. Two
    bundles that differ in any byte never share a version, so never share cache keys."""
    return f"{model_name}-{content_digest(files)}"


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Add the sha256 of every bundle file and the model version bound to them
    (``model_name`` + their digest) to ``manifest`` and write it."""
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_of(bundle_dir / name) for name in BUNDLE_FILES}
    manifest["model_version"] = bound_version(str(manifest["model_name"]), manifest["files"])
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: manifest.json is missing", field="bundle")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc})", field="bundle") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest must be a JSON object", field="bundle")
    return manifest


def verify_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Check format version, file checksums and the feature contract; return the manifest."""
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: bundle directory does not exist", field="bundle")
    manifest = read_manifest(bundle_dir)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{bundle_dir}: format_version {version!r} is not supported (this service reads "
            f"{FORMAT_VERSION})",
            field="bundle",
        )
    for key in ("model_name", "model_version", "files", "dense_features", "inputs"):
        if key not in manifest:
            raise BundleError(f"{bundle_dir}: manifest lacks {key!r}", field="bundle")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{bundle_dir}: manifest 'files' must be an object", field="bundle")
    for name in BUNDLE_FILES:
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path}: bundle file is missing", field="bundle")
        if files.get(name) != sha256_of(path):
            raise BundleError(
                f"{path}: sha256 does not match the manifest (corrupt or tampered file)",
                field="bundle",
            )
    expected = bound_version(str(manifest["model_name"]), files)
    if manifest["model_version"] != expected:
        raise BundleError(
            f"{bundle_dir}: model_version {manifest['model_version']!r} is not bound to the "
            f"bundle's files (it must be model_name + their digest: {expected!r}); a "
            f"relabelled bundle is refused",
            field="bundle",
        )
    inputs, dense = manifest["inputs"], manifest["dense_features"]
    if not isinstance(dense, list) or not isinstance(inputs, list):
        raise BundleError(
            f"{bundle_dir}: manifest 'dense_features' and 'inputs' must be lists", field="bundle"
        )
    if dense != list(DENSE_FEATURES):
        raise BundleError(
            f"{bundle_dir}: the model was trained on features {manifest['dense_features']}, "
            f"this service computes {list(DENSE_FEATURES)}",
            field="bundle",
        )
    names = [i.get("name") if isinstance(i, dict) else i for i in inputs]
    if names != list(INPUT_NAMES):
        raise BundleError(
            f"{bundle_dir}: model inputs {names} differ from {list(INPUT_NAMES)}", field="bundle"
        )
    return manifest


def load_bundle(bundle_dir: Path | str, options: ScorerOptions | None = None) -> Bundle:
    """Verify and load a bundle, then warm it with one real inference."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    try:
        catalogue = Catalogue.load(bundle_dir / CATALOGUE_FILE)
        tables = FeatureTables.load(bundle_dir / TABLES_FILE)
        text = TextIndex.load(bundle_dir / TEXT_INDEX_FILE)
        features = FeatureBuilder(catalogue, tables, text)
        retriever = CandidateRetriever(features)
    except (TableError, ValueError, TypeError) as exc:
        raise BundleError(f"{bundle_dir}: tables are inconsistent ({exc})", field="bundle") from exc
    vocab = manifest.get("vocab")
    expected_entities = vocab.get("n_entities") if isinstance(vocab, dict) else None
    if expected_entities != len(catalogue) or tables.item_vec.shape[0] != len(catalogue):
        raise BundleError(
            f"{bundle_dir}: model was built for {expected_entities} entities, the catalogue has "
            f"{len(catalogue)}",
            field="bundle",
        )
    scorer = OnnxScorer.open(bundle_dir / MODEL_FILE, options or ScorerOptions())
    # The manifest describes the model; check the graph itself agrees before serving it.
    unknown = [name for name in scorer.input_names if name not in INPUT_NAMES]
    outputs = [o.name for o in scorer.session.get_outputs()]
    if unknown or OUTPUT_NAME not in outputs:
        raise BundleError(
            f"{bundle_dir}: model.onnx has inputs {scorer.input_names} and outputs {outputs}; "
            f"this service feeds {list(INPUT_NAMES)} and reads {OUTPUT_NAME!r}",
            field="bundle",
        )
    bundle = Bundle(bundle_dir, manifest, catalogue, tables, text, features, retriever, scorer)
    _warm(bundle)
    return bundle


def _warm(bundle: Bundle) -> None:
    """One real inference through every stage, so a broken model fails here, not live."""
    from app.core.context import Personalization, impute_context

    first = (
        int(np.flatnonzero(bundle.catalogue.rankable)[0]) if bundle.catalogue.rankable.any() else 0
    )
    ctx = impute_context("prequery", None, None, None, None, lambda _: None)
    cf = bundle.features.context(ctx, Personalization.NONE)
    cand = bundle.retriever.retrieve(cf, limit=8)
    if len(cand) == 0:
        cand = np.array([first], dtype=np.int64)
    try:
        scores = bundle.scorer.score(bundle.features.candidates(cf, cand))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BundleError(
            f"{bundle.path}: warm-up inference failed ({exc})", field="bundle"
        ) from exc
    if scores.shape != (len(cand),) or not np.all(np.isfinite(scores)):
        raise BundleError(
            f"{bundle.path}: warm-up inference returned shape {scores.shape} or non-finite scores",
            field="bundle",
        )
