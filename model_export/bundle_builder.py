"""``unicorn build-bundle``: data -> train -> quick evaluation -> ONNX export -> bundle.

The bundle (see ``app.core.bundle``) holds the ONE model that serves all three
personalization levels (the level is a model input), the serving feature tables (built
from the whole training split), the catalogue and the name index, and a manifest with
the input contract, normalisation constants, data summary, offline metrics and the
sha256 of every file.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.core.bundle import (
    CATALOGUE_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    TABLES_FILE,
    TEXT_INDEX_FILE,
    read_manifest,
    write_manifest,
)
from app.core.catalogue import Catalogue
from app.core.context import Personalization
from app.core.feature_tables import FeatureTables
from app.core.features import DENSE_FEATURES, INPUT_NAMES, MAX_QUERY_TOKENS, TOKEN_BUCKETS
from app.core.ranking import ranking_key
from app.core.scoring import OUTPUT_NAME
from app.core.text_index import TextIndex
from model_export.dataset import featurise
from model_export.evaluate import (
    BASELINES,
    System,
    column_scorer,
    evaluate_systems,
    test_impressions,
)
from model_export.export import check_parity, export_onnx
from model_export.model import UniCoRn
from model_export.skew import SKEW_BOUND, format_report, serving_rows, skew_report, skewed
from model_export.train import TrainConfig, predict
from model_export.training_pipeline import (
    ItemSpace,
    PipelineConfig,
    Prepared,
    load_source,
    prepare,
    train_unicorn,
    training_rows,
)

INPUT_SPECS = {
    "ctx_cat": ("int64", ["ctx_batch", 4]),
    "ctx_source": ("int64", ["ctx_batch"]),
    "ctx_tokens": ("int64", ["ctx_batch", MAX_QUERY_TOKENS]),
    "user_vec": ("float32", ["ctx_batch", "vec_dim"]),
    "target": ("int64", ["candidates"]),
    "item_vec": ("float32", ["candidates", "vec_dim"]),
    "dense": ("float32", ["candidates", len(DENSE_FEATURES)]),
}


def model_systems(model: UniCoRn, prefix: str = "unified", rules: bool = True) -> list[System]:
    """The model at each personalization level, ordered as the service orders
    (``app.core.ranking.ranking_key``); ``rules=False``: by the model's probability alone."""

    def score(inputs: dict[str, np.ndarray]) -> np.ndarray:
        p = predict(model, inputs)
        return ranking_key(inputs, p) if rules else p

    return [System(f"{prefix} ({level.value})", level, score) for level in Personalization]


def baseline_systems() -> list[System]:
    return [
        System(name, Personalization.FULL, column_scorer(*cols), tasks)
        for name, cols, tasks in BASELINES
    ]


def parity_samples(prep: Prepared, n: int = 24) -> list[dict[str, np.ndarray]]:
    """Held-out requests (test split), featurised per request as the service does, plus one
    row-batched block as training does."""
    builder, retriever = prep.builder(serving=True), prep.retriever()
    imps = test_impressions(prep.test, builder, per_task=max(n // 4, 1), seed=prep.config.seed)
    samples = []
    for i, imp in enumerate(x for task in imps.values() for x in task):
        level = list(Personalization)[i % 3]
        cf = builder.context(imp.context, level)
        samples.append(builder.candidates(cf, retriever.retrieve(cf, prep.config.max_retrieved)))
    rows = featurise(
        prep.test.select(np.arange(min(len(prep.test), 2000))), builder, Personalization.FULL
    )
    samples.append(rows.inputs)
    return samples


def data_summary(prep: Prepared, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "rows": len(prep.log),
        "rows_per_task": prep.log.rows_per_task(),
        "train_rows": len(prep.train),
        "fit_rows": len(prep.fit),
        "test_rows": len(prep.test),
        "entities": len(prep.catalogue),
        "rankable_entities": int(prep.catalogue.rankable.sum()),
        "countries": list(prep.catalogue.country_names),
        "users_with_vectors": len(prep.serving_tables.user_ids),
        "positive_rate": float(prep.log.label.mean()),
    }


def write_bundle(
    out: Path,
    catalogue: Catalogue,
    tables: FeatureTables,
    text: TextIndex,
    manifest: dict[str, Any],
) -> Path:
    """Complete the bundle around ``out/model.onnx`` (exported, or made by any other means):
    the catalogue, the serving tables, the name index, and the manifest: the input
    contract the service verifies, then ``manifest`` (``model_name`` and ``vocab`` at
    least), then the sha256 of every file and the model version bound to them."""
    catalogue.save(out / CATALOGUE_FILE)
    tables.save(out / TABLES_FILE)
    text.save(out / TEXT_INDEX_FILE)
    contract: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "inputs": [
            {"name": n, "dtype": INPUT_SPECS[n][0], "shape": INPUT_SPECS[n][1]} for n in INPUT_NAMES
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["candidates"]}],
        "dense_features": list(DENSE_FEATURES),
    }
    write_manifest(out, contract | manifest)
    return out


def build_bundle(
    out: Path,
    source: str = "synthetic",
    path: Path | None = None,
    quick: bool = False,
    seed: int = 7,
    world: object | None = None,
    train_config: TrainConfig | None = None,
    eval_per_task: int | None = None,
    catalogue_from: Path | None = None,
    warm_start: Path | None = None,
) -> Path:
    """Build a verified bundle in ``out`` and return its path. ``catalogue_from``: the
    bundle whose catalogue the ``events`` source uses. ``warm_start``: a bundle of the same
    catalogue whose item space (item vectors, user clusters) is carried over instead of
    pre-trained from this log (``ItemSpace``)."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = PipelineConfig(seed=seed)
    catalogue, log = load_source(source, path, seed, world, catalogue_from)
    print(f"data: {len(log)} rows {log.rows_per_task()}", flush=True)
    item_space = None if warm_start is None else ItemSpace.of_bundle(warm_start, catalogue)
    prep = prepare(catalogue, log, config, item_space)
    config = prep.config
    rows = training_rows(prep)
    train_config = train_config or TrainConfig(epochs=1 if quick else 2, seed=seed)
    model, stats = train_unicorn(prep, rows, train_config)
    print(
        f"trained on {len(rows)} rows in {stats['train_seconds']:.1f}s, "
        f"loss {stats['final_loss']:.4f}",
        flush=True,
    )

    skew = skew_report(rows, serving_rows(prep))
    print(format_report(skew), flush=True)
    if skewed(skew):
        print(f"WARNING: skewed beyond {SKEW_BOUND}: {skewed(skew)}", flush=True)

    n_eval = eval_per_task or (100 if quick else 400)
    builder, retriever = prep.builder(serving=True), prep.retriever()
    imps = test_impressions(prep.test, builder, n_eval, seed)
    metrics = evaluate_systems(
        model_systems(model) + baseline_systems(), imps, builder, retriever, config.max_retrieved
    )

    model_path = out / MODEL_FILE
    export_onnx(model, rows.select(np.arange(min(len(rows), 64))).inputs, model_path)
    parity = check_parity(model, model_path, parity_samples(prep))
    print(f"onnx parity: max |diff| = {parity:.2e}", flush=True)

    manifest: dict[str, Any] = {
        "model_name": f"{source}-s{seed}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "normalisation": {"mean": model.config.dense_mean, "std": model.config.dense_std},
        "vocab": {
            "n_entities": len(catalogue),
            "n_countries": model.config.n_countries,
            "n_clusters": model.config.n_clusters,
            "token_buckets": TOKEN_BUCKETS,
            "max_query_tokens": MAX_QUERY_TOKENS,
            "vec_dim": model.config.vec_dim,
        },
        "model_config": model.config.to_dict() | {"dense_mean": None, "dense_std": None},
        "personalization": "one model serves none|cluster|full (level is an input)",
        "train_config": train_config.to_dict(),
        "pipeline_config": config.__dict__,
        "warm_start": None if warm_start is None else read_manifest(warm_start)["model_version"],
        "training": stats | {"timings": prep.timings},
        "data": data_summary(prep, source),
        "offline_metrics": metrics,
        "train_serve_skew": {"bound": SKEW_BOUND, "features": skew},
        "training_impressions_dropped": rows.dropped,
        "parity_max_abs_diff": parity,
        "build_seconds": round(time.perf_counter() - started, 1),
        "platform": platform.platform(),
    }
    write_bundle(out, catalogue, prep.serving_tables, prep.text, manifest)
    version = read_manifest(out)["model_version"]
    print(f"bundle {out} ({version}) in {manifest['build_seconds']}s", flush=True)
    print(
        json.dumps(
            {s: {t: round(m["ndcg@10"], 3) for t, m in r.items()} for s, r in metrics.items()},
            indent=1,
        ),
        flush=True,
    )
    return out
