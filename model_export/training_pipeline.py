"""From engagement log to trained models: the steps shared by ``build-bundle`` and
``evaluate``.

    log -> temporal split per user (train | test) -> train split per user (history | fit)
        -> pre-trained item vectors + user clusters (history)
        -> feature tables: history (for training rows), whole train split (for serving)
        -> fit impressions on the retriever's candidates, featurised with the service's
           feature code -> train UniCoRn
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import Personalization
from app.core.feature_tables import FeatureTables
from app.core.features import DENSE_FEATURES, TOKEN_BUCKETS, FeatureBuilder
from app.core.retrieval import CandidateRetriever
from app.core.text_index import TextIndex
from model_export.dataset import FeaturisedRows, featurise, impression_groups
from model_export.engagement_log import EngagementLog
from model_export.model import ModelConfig, UniCoRn
from model_export.pretrain import fit_clusters, train_item_vectors
from model_export.split import history_split, temporal_split
from model_export.table_builder import build_feature_tables, nearest_items
from model_export.train import TrainConfig, train_model


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 7
    test_fraction: float = 0.2
    history_fraction: float = 0.5
    n_clusters: int = 16
    vec_dim: int = 16
    mf_epochs: int = 15
    max_retrieved: int = 300
    negatives: int = 30  # label-0 rows per training impression, from the retriever


@dataclass(frozen=True)
class ItemSpace:
    """The pre-trained item vectors and the user-cluster centroids over them. Learnt from
    the history window, or carried over from an earlier bundle (``build-bundle
    --warm-start``): a small log, such as a few days of a deployment's own events, is
    enough to retrain the ranker but too little to learn the geometry of the catalogue."""

    item_vec: np.ndarray  # (E, d) float32, rows in catalogue order
    centroids: np.ndarray  # (K, d) float32

    @classmethod
    def of_bundle(cls, bundle: Path, catalogue: Catalogue) -> ItemSpace:
        """The item space of a verified bundle whose catalogue is ``catalogue`` (the same
        entities in the same order: the vectors are keyed by entity index)."""
        from app.core.bundle import CATALOGUE_FILE, TABLES_FILE, verify_bundle

        bundle = Path(bundle)
        verify_bundle(bundle)
        prior = Catalogue.load(bundle / CATALOGUE_FILE)
        if not np.array_equal(prior.entity_id, catalogue.entity_id):
            raise ValueError(
                f"--warm-start {bundle}: its catalogue ({len(prior)} entities) is not the "
                f"catalogue being trained on ({len(catalogue)} entities); the item space is "
                "keyed by entity index, so both must list the same entities in the same order"
            )
        tables = FeatureTables.load(bundle / TABLES_FILE)
        return cls(tables.item_vec.astype(np.float32), tables.centroids.astype(np.float32))


@dataclass
class Prepared:
    """Everything derived from the log before the ranker is trained."""

    catalogue: Catalogue
    log: EngagementLog
    train: EngagementLog
    test: EngagementLog
    fit: EngagementLog
    text: TextIndex
    history_tables: FeatureTables
    serving_tables: FeatureTables
    config: PipelineConfig
    timings: dict[str, float] = field(default_factory=dict)

    def builder(self, serving: bool = True) -> FeatureBuilder:
        tables = self.serving_tables if serving else self.history_tables
        return FeatureBuilder(self.catalogue, tables, self.text)

    def retriever(self) -> CandidateRetriever:
        return CandidateRetriever(self.builder(serving=True))


def load_source(
    source: str,
    path: Path | None,
    seed: int,
    world: object | None = None,
    catalogue_from: Path | None = None,
) -> tuple[Catalogue, EngagementLog]:
    """The catalogue and log of a data source: ``synthetic``, ``movielens`` or ``events``
    (the service's event logs in ``path``, the catalogue of the bundle ``catalogue_from``;
    prints the join report)."""
    if source == "synthetic":
        from model_export.synthetic import WorldConfig, generate_world

        config = world if isinstance(world, WorldConfig) else WorldConfig(seed=seed)
        return generate_world(config)
    if source == "movielens":
        if path is None:
            raise ValueError("--path is required for source movielens")
        from model_export.movielens import load_movielens

        catalogue, log, _report = load_movielens(Path(path), seed=seed)
        return catalogue, log
    if source == "events":
        from model_export.event_source import load_events_source

        catalogue, log, report = load_events_source(path, catalogue_from)
        print(report.format(), flush=True)
        return catalogue, log
    raise ValueError(f"source must be 'synthetic', 'movielens' or 'events', got {source!r}")


def prepare(
    catalogue: Catalogue,
    log: EngagementLog,
    config: PipelineConfig,
    item_space: ItemSpace | None = None,
) -> Prepared:
    """Split, pre-train (or take ``item_space`` as it is) and build the feature tables."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    train_mask, test_mask = temporal_split(log, config.test_fraction)
    train, test = log.select(train_mask), log.select(test_mask)
    hist_mask, fit_mask = history_split(train, config.history_fraction)
    history, fit = train.select(hist_mask), train.select(fit_mask)
    timings["split"] = time.perf_counter() - t
    t = time.perf_counter()
    if item_space is None:
        item_vec = train_item_vectors(
            history, catalogue, config.vec_dim, config.mf_epochs, config.seed
        )
        centroids = fit_clusters(history, catalogue, item_vec, config.n_clusters, seed=config.seed)
    else:
        item_vec, centroids = item_space.item_vec, item_space.centroids
        config = dataclasses.replace(
            config, vec_dim=int(item_vec.shape[1]), n_clusters=int(centroids.shape[0])
        )
    timings["pretrain"] = time.perf_counter() - t
    t = time.perf_counter()
    text = TextIndex.build(catalogue)
    neighbours = nearest_items(item_vec)  # of the item space: the same for both windows
    history_tables = build_feature_tables(history, catalogue, item_vec, centroids, neighbours)
    serving_tables = build_feature_tables(train, catalogue, item_vec, centroids, neighbours)
    timings["tables"] = time.perf_counter() - t
    return Prepared(
        catalogue, log, train, test, fit, text, history_tables, serving_tables, config, timings
    )


def training_rows(prep: Prepared, tasks: tuple[str, ...] | None = None) -> FeaturisedRows:
    """Fit-window impressions on the retriever's candidates, featurised with history
    tables; each impression gets a random personalization level, so one model learns to
    serve all three."""
    fit = prep.fit if tasks is None else prep.fit.select(np.isin(prep.fit.task, tasks))
    n_imp = len(impression_groups(fit))
    levels = np.random.default_rng(prep.config.seed).integers(0, len(Personalization), n_imp)
    builder = prep.builder(serving=False)
    return featurise(
        fit,
        builder,
        levels,
        CandidateRetriever(builder),
        prep.config.negatives,
        prep.config.max_retrieved,
        prep.config.seed,
    )


def model_config_for(prep: Prepared) -> ModelConfig:
    return ModelConfig(
        n_entities=len(prep.catalogue),
        n_countries=len(prep.catalogue.country_names) + 1,
        n_clusters=prep.config.n_clusters + 1,
        n_dense=len(DENSE_FEATURES),
        vec_dim=prep.config.vec_dim,
        token_buckets=TOKEN_BUCKETS,
    )


def train_unicorn(
    prep: Prepared, rows: FeaturisedRows, train_config: TrainConfig, desc: str = "unified"
) -> tuple[UniCoRn, dict[str, float]]:
    return train_model(rows, model_config_for(prep), train_config, desc=desc)
