"""Training rows: the engagement log featurised by the service's own feature code, on the
candidates the service's retriever returns.

Each impression (one request) is imputed with ``app.core.context.impute_context`` and
featurised with ``FeatureBuilder.context`` + ``FeatureBuilder.candidates``, exactly the
calls the service makes, and its context inputs are repeated to one row per candidate
(``app.core.features.one_row_per_candidate``, the micro-batcher's layout too).

The rule for labels (docs/MODEL.md, "Training rows"): the candidates of a training
impression are drawn the way the service draws them, from ``CandidateRetriever.retrieve``
for the impression's context with the same limit. A logged positive the retriever
returns is a label-1 row; an impression whose positives the retriever all misses is
dropped (counted in ``FeaturisedRows.dropped``): the ranker is never asked to order an
item retrieval does not return, and keeping such positives taught it the signals
backwards (text match and co-engagement as evidence against a click). Label-0 rows are
the logged negatives the retriever returns plus retrieved non-positives sampled
uniformly, up to ``negatives`` per impression. Uniformly: the model must learn what
engages among what retrieval returns; negatives drawn towards the top of the retrieval
order are more popular than the positives, and taught it to rank popularity down
(the figures: docs/MODEL.md, "Training rows").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import Context, Personalization, impute_context
from app.core.features import FeatureBuilder, one_row_per_candidate
from app.core.retrieval import CandidateRetriever
from model_export.engagement_log import EngagementLog

LEVELS = tuple(Personalization)


@dataclass
class FeaturisedRows:
    inputs: dict[str, np.ndarray]  # every input with one row per (impression, target)
    label: np.ndarray  # (R,) float32
    impression: np.ndarray  # (R,) int64 index of the impression
    task: np.ndarray  # (R,) str
    dropped: dict[str, int] = field(default_factory=dict)  # impressions per task

    def __len__(self) -> int:
        return len(self.label)

    def select(self, mask: np.ndarray) -> FeaturisedRows:
        return FeaturisedRows(
            {k: v[mask] for k, v in self.inputs.items()},
            self.label[mask],
            self.impression[mask],
            self.task[mask],
            self.dropped,
        )


def impression_groups(log: EngagementLog) -> list[np.ndarray]:
    """Row indices of each impression, in impression-id order."""
    order = np.argsort(log.impression_id, kind="stable")
    ids = log.impression_id[order]
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    return np.split(order, cuts) if len(order) else []


def impression_context(log: EngagementLog, row: int, catalogue: Catalogue) -> Context:
    """The imputed context of the impression holding log row ``row``: the service's
    ``impute_context`` on the row's raw values."""
    return impute_context(
        str(log.task[row]),
        str(log.user_id[row]),
        str(log.query[row]),
        str(log.country[row]),
        str(log.source_entity_id[row]),
        catalogue.name_of,
    )


def featurise(
    log: EngagementLog,
    builder: FeatureBuilder,
    levels: np.ndarray | Personalization,
    retriever: CandidateRetriever | None = None,
    negatives: int = 30,
    retrieve_limit: int = 300,
    seed: int = 7,
) -> FeaturisedRows:
    """Featurise ``log``. ``levels``: one personalization level for all impressions, or
    an array with one level index per impression (in impression order).

    Without a ``retriever`` every logged row is featurised as it is (the parity check and
    tests use this). With one, each impression is featurised on retrieved candidates by
    the rule in the module docstring."""
    rng = np.random.default_rng(seed)
    groups = impression_groups(log)
    if not groups:
        raise ValueError("cannot featurise an empty log")
    catalogue = builder.catalogue
    targets = catalogue.lookup(log.target_entity_id)
    if np.any(targets < 0):
        raise ValueError("log targets must all be in the catalogue")
    per_impression: list[dict[str, np.ndarray]] = []
    impressions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    tasks: list[np.ndarray] = []
    dropped: dict[str, int] = {}

    for g, rows in enumerate(groups):
        task = str(log.task[rows[0]])
        ctx = impression_context(log, rows[0], catalogue)
        level = levels if isinstance(levels, Personalization) else LEVELS[int(levels[g])]
        cf = builder.context(ctx, level)
        cand = targets[rows]
        label = log.label[rows].astype(np.float32)
        if retriever is not None:
            pool = retriever.retrieve(cf, limit=retrieve_limit)
            cand, label = retrieved_candidates(pool, cand, label, negatives, rng)
            if not len(cand):
                dropped[task] = dropped.get(task, 0) + 1
                continue
        per_impression.append(builder.candidates(cf, cand))
        n = len(cand)
        impressions.append(np.full(n, g, dtype=np.int64))
        labels.append(label)
        tasks.append(np.full(n, task))
    if not labels:
        raise ValueError("no impression has a retrieved positive")
    return FeaturisedRows(
        one_row_per_candidate(per_impression),
        np.concatenate(labels),
        np.concatenate(impressions),
        np.concatenate(tasks).astype(str),
        dropped,
    )


def retrieved_candidates(
    pool: np.ndarray,
    logged: np.ndarray,
    logged_label: np.ndarray,
    negatives: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, labels) of one impression on the retrieved ``pool`` (best first):
    the logged positives in the pool, the logged negatives in the pool, and other pool
    items sampled uniformly, up to ``negatives`` label-0 rows. Empty when
    no logged positive is in the pool."""
    positive = np.unique(logged[logged_label > 0])
    pos = positive[np.isin(positive, pool)]
    if not len(pos):
        return pos, np.zeros(0, dtype=np.float32)
    shown = np.unique(logged[logged_label <= 0])
    shown = shown[np.isin(shown, pool) & ~np.isin(shown, positive)][:negatives]
    free = ~np.isin(pool, positive) & ~np.isin(pool, shown)
    rest = pool[free]
    n_extra = min(negatives - len(shown), len(rest))
    rest = rng.choice(rest, size=max(n_extra, 0), replace=False)
    neg = np.concatenate([shown, rest])
    cand = np.concatenate([pos, neg]).astype(np.int64)
    label = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]).astype(np.float32)
    return cand, label
