"""LambdaMART anchor: gradient-boosted trees (LightGBM ``lambdarank``) trained on the very
rows the deep model trains on.

A learned ranker should at least match a well-tuned tree ensemble over the same hand-made
features, so the evaluation reports this one beside the baselines. Features: every dense
column (``app.core.features.DENSE_FEATURES``, ``user_item_dot`` included) plus the task id and
the personalization level id (the ``task`` and ``level`` columns of ``ctx_cat``, categorical). The
objective is listwise: LambdaRank with NDCG truncated at 20, over the impressions of
``FeaturisedRows`` (``lightgbm.train`` with ``objective="lambdarank"``: the model that
``LGBMRanker`` fits, without its scikit-learn dependency). Impressions without a positive
carry no LambdaRank gradient and are dropped. Deterministic: fixed seed, one thread,
``deterministic=True``.

Training extra only: lightgbm is imported inside ``train_lambdamart``; ``app/`` never
imports this module.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.core.context import Personalization
from app.core.features import CAT_COL, DENSE_FEATURES
from model_export.dataset import FeaturisedRows
from model_export.evaluate import System

# The ``ctx_cat`` columns the trees read, after the dense ones, as "<name>_id".
CATEGORICAL_INPUTS: tuple[str, ...] = ("task", "level")
FEATURE_NAMES: tuple[str, ...] = (*DENSE_FEATURES, *(f"{c}_id" for c in CATEGORICAL_INPUTS))
CATEGORICAL: tuple[int, ...] = tuple(FEATURE_NAMES.index(f"{c}_id") for c in CATEGORICAL_INPUTS)


@dataclass(frozen=True)
class LambdaMARTConfig:
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 50
    truncation_level: int = 20  # lambdarank_truncation_level: pairs below it are ignored
    seed: int = 7
    threads: int = 1  # one thread: deterministic, and the box is shared

    def __post_init__(self) -> None:
        for name in ("n_estimators", "num_leaves", "min_child_samples", "truncation_level"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ranker_features(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) float32: the dense columns, then task and level ids
    (context inputs of batch 1 are broadcast to the N candidates)."""
    dense = np.asarray(inputs["dense"], dtype=np.float32)
    cols = [CAT_COL[c] for c in CATEGORICAL_INPUTS]
    ids = np.asarray(inputs["ctx_cat"])[:, cols].astype(np.float32)
    return np.hstack([dense, np.broadcast_to(ids, (len(dense), len(cols)))])


@dataclass
class LambdaMART:
    """A trained LightGBM ranker and how it was trained."""

    booster: Any  # lightgbm.Booster
    config: LambdaMARTConfig
    stats: dict[str, Any] = field(default_factory=dict)

    def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        x = ranker_features(inputs)
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self.booster.predict(x, num_threads=self.config.threads))

    def systems(
        self,
        levels: tuple[Personalization, ...] = tuple(Personalization),
        prefix: str = "lambdamart",
    ) -> list[System]:
        """One ``System`` per personalization level, named ``"{prefix} ({level})"``."""
        return [System(f"{prefix} ({level.value})", level, self.score) for level in levels]


def train_lambdamart(rows: FeaturisedRows, config: LambdaMARTConfig | None = None) -> LambdaMART:
    """Fit a LambdaMART ranker on ``rows``, grouped by ``rows.impression``."""
    import lightgbm  # training extra only

    config = config or LambdaMARTConfig()
    if len(rows) == 0:
        raise ValueError("cannot train on an empty set of rows")
    order = np.argsort(rows.impression, kind="stable")  # lightgbm needs contiguous groups
    groups, starts, sizes = np.unique(rows.impression[order], return_index=True, return_counts=True)
    label = rows.label[order]
    has_pos = np.maximum.reduceat(label, starts) > 0
    if not has_pos.any():
        raise ValueError("no impression has a positive: nothing to rank")
    keep = np.repeat(has_pos, sizes)
    order, label = order[keep], label[keep]
    x = ranker_features({k: rows.inputs[k][order] for k in ("dense", "ctx_cat")})
    # The native API, not LGBMRanker: the same model without scikit-learn.
    params = {
        "objective": "lambdarank",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_child_samples,
        "lambdarank_truncation_level": config.truncation_level,
        "seed": config.seed,
        "num_threads": config.threads,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    data = lightgbm.Dataset(
        x,
        label.astype(np.int32),
        group=sizes[has_pos],
        feature_name=list(FEATURE_NAMES),
        categorical_feature=list(CATEGORICAL),
        free_raw_data=True,
    )
    started = time.perf_counter()
    booster = lightgbm.train(params, data, num_boost_round=config.n_estimators)
    gain = booster.feature_importance(importance_type="gain")
    top = np.argsort(-gain, kind="stable")[:10]
    stats: dict[str, Any] = {
        "train_seconds": time.perf_counter() - started,
        "rows": float(len(label)),
        "impressions": float(has_pos.sum()),
        "impressions_dropped_without_positive": float(len(groups) - has_pos.sum()),
        "trees": float(booster.num_trees()),
        "top_features_by_gain": {
            FEATURE_NAMES[i]: round(float(gain[i] / max(gain.sum(), 1e-12)), 4) for i in top
        },
    }
    return LambdaMART(booster, config, stats)
