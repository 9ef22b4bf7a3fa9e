"""Train/serve skew: does each model input mean the same on the rows the model learned
from as on the candidates the bundle serves?

Training rows are fit-window impressions featurised with the history tables; serving
rows are held-out (test) impressions featurised with the bundle's serving tables, both
on the retriever's candidates by the same rule (``model_export.dataset.featurise``) and
with the same mix of personalization levels, so any difference is skew, not sampling.
Per dense feature the report gives mean and standard deviation on both sides and the
largest per-task standardised mean difference |mean_serve - mean_train| / std_train.
``SKEW_BOUND`` is the documented limit: a raw count, which grows with the window's length
(the serving tables hold about twice the history's volume), moves by about half a
standard deviation, the window-free shares and rates stay well below the bound (the
figures: docs/MODEL.md, "No raw counts" and "Train/serve skew report").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.core.context import Personalization
from app.core.features import COL, DENSE_FEATURES
from model_export.dataset import FeaturisedRows, featurise, impression_groups
from model_export.training_pipeline import Prepared

SKEW_BOUND = 0.3  # standardised mean difference above which a feature counts as skewed
STD_FLOOR = 1e-3
MIN_ROWS = 200  # rows of a task on each side before its difference counts


def serving_rows(prep: Prepared, max_impressions: int = 3000) -> FeaturisedRows:
    """Test impressions on the retriever's candidates, featurised with serving tables."""
    groups = impression_groups(prep.test)
    rng = np.random.default_rng(prep.config.seed)
    keep = rng.permutation(len(groups))[:max_impressions]
    rows = np.sort(np.concatenate([groups[g] for g in keep]))
    sample = prep.test.select(rows)
    levels = rng.integers(0, len(Personalization), len(impression_groups(sample)))
    builder = prep.builder(serving=True)
    return featurise(
        sample,
        builder,
        levels,
        prep.retriever(),
        prep.config.negatives,
        prep.config.max_retrieved,
        prep.config.seed,
    )


def skew_report(train: FeaturisedRows, serve: FeaturisedRows) -> dict[str, dict[str, Any]]:
    """{feature: {train_mean, train_std, serve_mean, serve_std, smd, task}} over dense
    inputs. Means and spreads are over all rows; ``smd`` is the largest standardised mean
    difference within one task (``task``), so a different task mix on the two sides (the
    share of page tasks moves ``query_imputed``) is not read as skew."""
    a, b = train.inputs["dense"].astype(np.float64), serve.inputs["dense"].astype(np.float64)
    overall_std = a.std(0)
    worst = np.zeros(a.shape[1])
    worst_task = np.full(a.shape[1], "", dtype=object)
    for task in np.unique(train.task).tolist():
        ta, tb = a[train.task == task], b[serve.task == task]
        if len(ta) < MIN_ROWS or len(tb) < MIN_ROWS:
            continue
        d = _smd(ta, tb, overall_std)
        bigger = d > worst
        worst[bigger], worst_task[bigger] = d[bigger], task
    return {
        name: {
            "train_mean": float(a[:, COL[name]].mean()),
            "train_std": float(a[:, COL[name]].std()),
            "serve_mean": float(b[:, COL[name]].mean()),
            "serve_std": float(b[:, COL[name]].std()),
            "smd": float(worst[COL[name]]),
            "task": str(worst_task[COL[name]]),
        }
        for name in DENSE_FEATURES
    }


def _smd(a: np.ndarray, b: np.ndarray, overall_std: np.ndarray) -> np.ndarray:
    # The task's own training spread; for an input (nearly) constant within the task (the
    # prior CTR of a query-less page) a tenth of its spread over all rows instead.
    scale = np.maximum(a.std(0), np.maximum(0.1 * overall_std, STD_FLOOR))
    return np.abs(b.mean(0) - a.mean(0)) / scale


def skewed(report: dict[str, dict[str, Any]], bound: float = SKEW_BOUND) -> list[str]:
    return [name for name, r in report.items() if r["smd"] > bound]


def format_report(report: dict[str, dict[str, Any]], bound: float = SKEW_BOUND) -> str:
    lines = [
        f"train/serve skew (standardised mean difference, bound {bound}):",
        f"  {'feature':26s} {'train mean':>11s} {'std':>8s} {'serve mean':>11s} "
        f"{'std':>8s} {'smd':>6s}  task",
    ]
    for name, r in report.items():
        flag = "  SKEWED" if r["smd"] > bound else ""
        lines.append(
            f"  {name:26s} {r['train_mean']:11.4f} {r['train_std']:8.4f} "
            f"{r['serve_mean']:11.4f} {r['serve_std']:8.4f} {r['smd']:6.3f}  {r['task']}{flag}"
        )
    return "\n".join(lines)
