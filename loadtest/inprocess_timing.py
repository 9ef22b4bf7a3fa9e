"""In-process timings of the benchmark (no HTTP; docs/BENCHMARKS.md): Floor A and the
ranking path stage by stage (``measure_path``), onnxruntime session options
(``compare_sessions``), and two worlds side by side (``compare_worlds``). What is compared is
timed alternately (Floor A and the path on the same request, session configs in turns,
worlds in turns), so a ratio is not skewed by the noise of a shared machine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from app.core.bundle import MODEL_FILE, Bundle
from app.core.ranking import Ranker
from app.core.scoring import OUTPUT_NAME, ScorerOptions
from loadtest.request_bodies import rank_query, request_bodies

Feed = dict[str, np.ndarray]
STAGES = ("impute", "retrieval", "features", "score", "topk")
perf = time.perf_counter
# name -> ScorerOptions fields (and "parallel": the parallel executor)
SESSION_CONFIGS: dict[str, dict[str, Any]] = {
    "service default: intra 1, inter 1, sequential, no spin, opt all": {},
    "intra 2": {"intra_op_threads": 2},
    "intra 2 + spinning": {"intra_op_threads": 2, "allow_spinning": True},
    "intra 1 + spinning": {"allow_spinning": True},
    "parallel executor, inter 2": {"inter_op_threads": 2, "parallel": True},
    "opt extended": {"graph_optimization": "extended"},
    "opt basic": {"graph_optimization": "basic"},
    "opt disabled": {"graph_optimization": "disable"},
}


@dataclass(frozen=True)
class Dist:
    """Latency summary in milliseconds."""

    p50: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Dist:
        if len(seconds) == 0:
            return cls(float("nan"), float("nan"))
        p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
        return cls(float(p50), float(p99))

    def __str__(self) -> str:
        return f"{self.p50:.3f}/{self.p99:.3f}"


@dataclass
class PathResult:
    n_candidates: float  # mean candidates actually scored
    floor: Dist
    path: Dist
    stages: dict[str, Dist]  # impute, retrieval, features, score, topk

    @property
    def ratio_p50(self) -> float:
        return self.path.p50 / self.floor.p50


def feeds_for(bundle: Bundle, bodies: Sequence[dict[str, Any]], n_candidates: int) -> list[Feed]:
    """Model inputs of real requests at ``n_candidates``."""
    ranker, names = Ranker(bundle, max_retrieved=n_candidates), bundle.scorer.input_names
    prepared = (ranker.prepare(rank_query(b)) for b in bodies)
    return [{name: p.inputs[name] for name in names} for p in prepared]


def measure_path(
    bundle: Bundle, bodies: Sequence[dict[str, Any]], n_candidates: int, reps: int
) -> PathResult:
    """Floor A (``InferenceSession.run`` on a real request's inputs) and the path
    ``RankingPipeline`` runs on a cache miss, stage by stage: impute (``Ranker.context``),
    retrieval (context features + candidates), features, score (``OnnxScorer.score``),
    top-k (``Ranker.finish``); ``reps`` requests built from ``bodies``."""
    ranker, scorer = Ranker(bundle, max_retrieved=n_candidates), bundle.scorer
    queries, feeds = [rank_query(b) for b in bodies], feeds_for(bundle, bodies, n_candidates)
    for q in queries:  # a warm-up pass of the path
        prepared = ranker.prepare(q)
        ranker.finish(prepared, scorer.score(prepared.inputs))
    times: dict[str, list[float]] = {k: [] for k in ("floor", "path", *STAGES)}
    counts: list[int] = []

    def floor_a(feed: Feed) -> None:
        t = perf()
        scorer.session.run([OUTPUT_NAME], feed)
        times["floor"].append(perf() - t)

    gc.collect()
    for i in range(reps):
        q, feed = queries[i % len(queries)], feeds[i % len(queries)]
        if i % 2 == 0:  # Floor A before the path on even requests, after it on odd ones
            floor_a(feed)
        t0 = perf()
        ctx = ranker.context(q)
        t1 = perf()
        prepared = ranker.prepare(q, ctx)
        t2 = perf()
        scores = scorer.score(prepared.inputs)
        t3 = perf()
        ranker.finish(prepared, scores)
        t4 = perf()
        if i % 2 == 1:
            floor_a(feed)
        timings = prepared.timings  # prepare()'s two timed parts (it spends a little more)
        parts = (t1 - t0, timings["retrieval"], timings["features"], t3 - t2, t4 - t3)
        for stage, seconds in zip(STAGES, parts, strict=True):
            times[stage].append(seconds)
        times["path"].append(t4 - t0)
        counts.append(len(prepared.candidates))
    d = {k: Dist.of(v) for k, v in times.items()}
    return PathResult(float(np.mean(counts)), d["floor"], d["path"], {s: d[s] for s in STAGES})


def session(model: str, config: dict[str, Any]) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` with one of ``SESSION_CONFIGS``."""
    fields = {k: v for k, v in config.items() if k != "parallel"}
    opts = ScorerOptions(**fields).session_options()
    if config.get("parallel"):
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def compare_sessions(
    bundle: Bundle, feeds_by_n: dict[int, list[Feed]], reps: int, chunk: int = 10
) -> dict[str, dict[int, Dist]]:
    """``session.run`` latency per config of ``SESSION_CONFIGS`` and batch size. Configs
    take turns in chunks of ``chunk`` runs (order reversed every round), with a short pause
    between chunks: interleaved in time, so machine noise hits every config alike, yet a
    config's spinning thread pool cannot steal the CPU of the next one."""
    model = str(bundle.path / MODEL_FILE)
    sessions = {name: session(model, config) for name, config in SESSION_CONFIGS.items()}
    times: dict[str, dict[int, list[float]]] = {c: {n: [] for n in feeds_by_n} for c in sessions}
    for n, feeds in feeds_by_n.items():
        for s in sessions.values():  # warm every session at this batch size
            for feed in feeds[:3]:
                s.run([OUTPUT_NAME], feed)
        for r in range(max(1, reps // chunk)):
            for name, s in list(sessions.items())[:: -1 if r % 2 else 1]:
                time.sleep(0.005)
                for i in range(chunk):
                    t = perf()
                    s.run([OUTPUT_NAME], feeds[(r * chunk + i) % len(feeds)])
                    times[name][n].append(perf() - t)
    return {name: {n: Dist.of(v) for n, v in per_n.items()} for name, per_n in times.items()}


def compare_worlds(bundles: dict[str, Bundle], n: int, task: str, reps: int) -> dict[str, Dist]:
    """``Ranker.rank`` latency per bundle at ``n`` candidates, bundles in turns."""
    rankers = {k: Ranker(b, max_retrieved=n) for k, b in bundles.items()}
    queries = {
        k: [rank_query(x) for x in request_bodies(b, task, 64, seed=5)] for k, b in bundles.items()
    }
    for k in bundles:  # warm
        for q in queries[k][:8]:
            rankers[k].rank(q)
    times: dict[str, list[float]] = {k: [] for k in bundles}
    for i in range(reps):
        for k in list(bundles)[:: -1 if i % 2 else 1]:
            t = perf()
            rankers[k].rank(queries[k][i % len(queries[k])])
            times[k].append(perf() - t)
    return {k: Dist.of(v) for k, v in times.items()}
