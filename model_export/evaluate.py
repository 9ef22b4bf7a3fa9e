"""Offline evaluation over the candidates the service would rank.

For each test impression with a positive: impute its context (shared code), retrieve
candidates with the service's retriever (a positive that retrieval misses is a miss),
featurise them, score, and compute NDCG@10, Recall@10 and MRR. Baselines re-rank the same
retrieved candidates with one feature column each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.context import Context, Personalization, impute_context
from app.engagement_log import TASKS, EngagementLog
from app.features import DENSE_FEATURES, FeatureBuilder
from app.retrieval import CandidateRetriever
from model_export.dataset import impression_groups

K = 10
Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]
_COL = {name: i for i, name in enumerate(DENSE_FEATURES)}


@dataclass(frozen=True)
class TestImpression:
    context: Context
    positives: np.ndarray  # entity indices with label 1


def ranking_metrics(
    ranked: np.ndarray, positives: np.ndarray, k: int = K
) -> tuple[float, float, float]:
    """(NDCG@k, Recall@k, MRR) of one ranked list of entity indices, binary relevance."""
    if len(positives) == 0:
        raise ValueError("positives must not be empty")
    hit = np.isin(ranked, positives)
    top = hit[:k]
    dcg = float(np.sum(top / np.log2(np.arange(2, len(top) + 2))))
    ideal = float(np.sum(1.0 / np.log2(np.arange(2, min(len(positives), k) + 2))))
    first = np.flatnonzero(hit)
    mrr = 1.0 / (first[0] + 1) if len(first) else 0.0
    return dcg / ideal, float(top.sum()) / min(len(positives), k), mrr


def test_impressions(
    log: EngagementLog, builder: FeatureBuilder, per_task: int, seed: int
) -> dict[str, list[TestImpression]]:
    """Up to ``per_task`` impressions with a positive, per task, sampled with ``seed``."""
    catalogue = builder.catalogue
    targets = catalogue.lookup(log.target_entity_id)
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    for rows in impression_groups(log):
        if log.label[rows].any():
            by_task[str(log.task[rows[0]])].append(rows)

    out: dict[str, list[TestImpression]] = {}
    for task, groups in by_task.items():
        pick = rng.permutation(len(groups))[:per_task]
        out[task] = []
        for g in sorted(pick.tolist()):
            rows = groups[g]
            r0 = rows[0]
            ctx = impute_context(
                task,
                str(log.user_id[r0]),
                str(log.query[r0]),
                str(log.country[r0]),
                str(log.source_entity_id[r0]),
                catalogue.name_of,
            )
            out[task].append(TestImpression(ctx, np.unique(targets[rows][log.label[rows] == 1])))
    return out


@dataclass(frozen=True)
class System:
    """Something that ranks: a scorer applied to inputs built at a personalization level."""

    name: str
    level: Personalization
    score: Scorer
    tasks: tuple[str, ...] = TASKS


def column_scorer(*columns: str) -> Scorer:
    """A baseline: rank by dense feature columns, the first dominant, the rest tie-breaks."""
    idx = [_COL[c] for c in columns]

    def score(inputs: dict[str, np.ndarray]) -> np.ndarray:
        dense = inputs["dense"]
        out = np.zeros(len(dense))
        for weight, i in zip([1.0, 1e-3, 1e-6], idx, strict=False):
            out += weight * dense[:, i]
        return out

    return score


BASELINES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("popularity", ("country_pop_log", "global_pop_log"), TASKS),
    ("bm25", ("bm25", "global_pop_log"), ("search",)),
    (
        "co-occurrence",
        ("co_engagement_log", "linked_to_source", "global_pop_log"),
        ("more_like_this", "entity"),
    ),
    ("matrix factorisation", ("user_item_dot", "global_pop_log"), ("prequery",)),
)


def evaluate_systems(
    systems: list[System],
    impressions: dict[str, list[TestImpression]],
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    max_retrieved: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {task: {ndcg@10, recall@10, mrr, n, candidate_recall}}}."""
    results: dict[str, dict[str, dict[str, float]]] = {s.name: {} for s in systems}
    for task, imps in impressions.items():
        sums = {s.name: np.zeros(4) for s in systems if task in s.tasks}
        for imp in imps:
            cache: dict[Personalization, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
            for s in systems:
                if task not in s.tasks:
                    continue
                if s.level not in cache:
                    cf = builder.context(imp.context, s.level)
                    cand = retriever.retrieve(cf, limit=max_retrieved)
                    cache[s.level] = (cand, builder.candidates(cf, cand))
                cand, inputs = cache[s.level]
                scores = np.asarray(s.score(inputs), dtype=np.float64)
                ranked = cand[np.lexsort((cand, -scores))]
                ndcg, recall, mrr = ranking_metrics(ranked, imp.positives)
                retrieved = float(np.isin(imp.positives, cand).mean())
                sums[s.name] += (ndcg, recall, mrr, retrieved)
        for name, total in sums.items():
            n = max(len(imps), 1)
            results[name][task] = {
                "ndcg@10": total[0] / n,
                "recall@10": total[1] / n,
                "mrr": total[2] / n,
                "candidate_recall": total[3] / n,
                "n": float(len(imps)),
            }
    return results


def relevance_guard(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    score: Scorer,
    n_pairs: int,
    max_retrieved: int,
    seed: int,
) -> dict[str, float]:
    """Share of (user, full-title query) pairs where that title ranks first under ``full``.

    Titles whose normalised name is shared with another entity are skipped (ambiguous)."""
    catalogue = builder.catalogue
    rng = np.random.default_rng(seed)
    names = builder.text.names
    uniq, counts = np.unique(names, return_counts=True)
    unique_name = np.isin(names, uniq[counts == 1]) & catalogue.rankable & (names != "")
    titles = np.flatnonzero(unique_name)
    users_rows = np.flatnonzero(log.user_id != "")
    if len(titles) == 0 or len(users_rows) == 0:
        return {"pairs": 0.0, "top1_share": float("nan")}
    firsts = 0
    done = 0
    for _ in range(n_pairs * 3):
        if done >= n_pairs:
            break
        r = users_rows[rng.integers(len(users_rows))]
        t = int(titles[rng.integers(len(titles))])
        country = str(log.country[r])
        if not retriever.allowed[
            builder.context(
                impute_context("prequery", None, None, country, None, lambda _: None),
                Personalization.NONE,
            ).country_row,
            t,
        ]:
            continue
        ctx = impute_context(
            "search",
            str(log.user_id[r]),
            str(catalogue.display_name[t]),
            country,
            None,
            lambda _: None,
        )
        cf = builder.context(ctx, Personalization.FULL)
        cand = retriever.retrieve(cf, limit=max_retrieved)
        if len(cand) == 0:
            continue
        scores = np.asarray(score(builder.candidates(cf, cand)))
        firsts += int(cand[int(np.argmax(scores))] == t)
        done += 1
    return {"pairs": float(done), "top1_share": firsts / max(done, 1)}
