"""In-process measurements (no HTTP): Floor A, the ranking path with its stage breakdown,
and the onnxruntime session-option comparison.

- Floor A: ``InferenceSession.run`` of the bundle's model on the inputs of a real request
  of N candidates (the bundle's own session, service defaults).
- Path: ``Ranker`` stage by stage, exactly what ``RankingPipeline`` runs on a cache miss:
  impute (``Ranker.context``) -> retrieval (context features + ``CandidateRetriever``) ->
  features (``FeatureBuilder.candidates``) -> score (``OnnxScorer.score``) -> top-k
  (``Ranker.finish``). ``Ranker(max_retrieved=N)`` makes retrieval return N candidates.

Floor A and the path are timed on the SAME request in alternating order, so their ratio
is not skewed by the noise of a shared machine.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.core.bundle import MODEL_FILE, Bundle
from app.core.ranking import Ranker
from app.core.scoring import OUTPUT_NAME, ScorerOptions
from loadtest.workload import rank_query

STAGES: tuple[str, ...] = ("impute", "retrieval", "features", "score", "topk")


@dataclass(frozen=True)
class Dist:
    """Latency summary in milliseconds."""

    p50: float
    p99: float
    mean: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray) -> Dist:
        a = np.asarray(seconds, dtype=np.float64) * 1000.0
        if len(a) == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(
            float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean()), len(a)
        )


@dataclass
class PathResult:
    task: str
    n_candidates: float  # mean candidates actually scored
    floor: Dist
    path: Dist
    stages: dict[str, Dist] = field(default_factory=dict)

    @property
    def ratio_p50(self) -> float:
        return self.path.p50 / self.floor.p50


def measure_path(
    bundle: Bundle, bodies: Sequence[dict[str, Any]], n_candidates: int, reps: int, task: str
) -> PathResult:
    """Floor A and the in-process path for ``reps`` requests built from ``bodies``."""
    ranker = Ranker(bundle, max_retrieved=n_candidates)
    session = bundle.scorer.session
    names = bundle.scorer.input_names
    queries = [rank_query(b) for b in bodies]
    feeds = []
    for q in queries:  # inputs for Floor A, and a warm-up pass of the path
        prepared = ranker.prepare(q)
        feeds.append({name: prepared.inputs[name] for name in names})
        ranker.finish(prepared, bundle.scorer.score(prepared.inputs))
    floor_s: list[float] = []
    path_s: list[float] = []
    stage_s: dict[str, list[float]] = {s: [] for s in STAGES}
    counts: list[int] = []
    perf = time.perf_counter
    gc.collect()
    for i in range(reps):
        j = i % len(queries)
        q, feed = queries[j], feeds[j]
        if i % 2 == 0:
            t = perf()
            session.run([OUTPUT_NAME], feed)
            floor_s.append(perf() - t)
        t0 = perf()
        ctx = ranker.context(q)
        t1 = perf()
        prepared = ranker.prepare(q, ctx)
        t2 = perf()
        scores = bundle.scorer.score(prepared.inputs)
        t3 = perf()
        ranker.finish(prepared, scores)
        t4 = perf()
        if i % 2 == 1:
            t = perf()
            session.run([OUTPUT_NAME], feed)
            floor_s.append(perf() - t)
        retrieval = prepared.timings["retrieval"]
        features = prepared.timings["features"]
        stage_s["impute"].append(t1 - t0)
        stage_s["retrieval"].append(retrieval)
        stage_s["features"].append(features)
        stage_s["score"].append(t3 - t2)
        stage_s["topk"].append(t4 - t3)
        # prepare() also spends a little time outside its two timed parts (dataclass
        # construction); the total is the wall time of the whole path.
        path_s.append(t4 - t0)
        counts.append(len(prepared.candidates))
    return PathResult(
        task=task,
        n_candidates=float(np.mean(counts)),
        floor=Dist.of(floor_s),
        path=Dist.of(path_s),
        stages={s: Dist.of(v) for s, v in stage_s.items()},
    )


# --- onnxruntime session options -----------------------------------------------------------
@dataclass(frozen=True)
class SessionConfig:
    name: str
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    parallel: bool = False
    spinning: bool = False
    graph_optimization: str = "all"

    def session(self, model: Path) -> ort.InferenceSession:
        base = ScorerOptions(
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            allow_spinning=self.spinning,
            graph_optimization=self.graph_optimization,
        )
        opts = base.session_options()
        if self.parallel:
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        return ort.InferenceSession(
            str(model), sess_options=opts, providers=["CPUExecutionProvider"]
        )


SESSION_CONFIGS: tuple[SessionConfig, ...] = (
    SessionConfig("service default: intra 1, inter 1, sequential, no spin, opt all"),
    SessionConfig("intra 2", intra_op_threads=2),
    SessionConfig("intra 2 + spinning", intra_op_threads=2, spinning=True),
    SessionConfig("intra 1 + spinning", spinning=True),
    SessionConfig("parallel executor, inter 2", inter_op_threads=2, parallel=True),
    SessionConfig("opt extended", graph_optimization="extended"),
    SessionConfig("opt basic", graph_optimization="basic"),
    SessionConfig("opt disabled", graph_optimization="disable"),
)


def compare_sessions(
    bundle: Bundle,
    feeds_by_n: dict[int, list[dict[str, np.ndarray]]],
    reps: int,
    configs: Sequence[SessionConfig] = SESSION_CONFIGS,
    chunk: int = 10,
) -> dict[str, dict[int, Dist]]:
    """``session.run`` latency per config and batch size.

    Configs take turns in chunks of ``chunk`` runs (order reversed every round), with a
    short pause between chunks: interleaved in time, so machine noise hits every config
    alike, yet a config's spinning thread pool cannot steal the CPU of the next one.
    """
    model = bundle.path / MODEL_FILE
    sessions = {c.name: c.session(model) for c in configs}
    times: dict[str, dict[int, list[float]]] = {
        c.name: {n: [] for n in feeds_by_n} for c in configs
    }
    perf = time.perf_counter
    for n, feeds in feeds_by_n.items():
        for s in sessions.values():  # warm every session at this batch size
            for feed in feeds[:3]:
                s.run([OUTPUT_NAME], feed)
        for r in range(max(1, reps // chunk)):
            order = list(sessions.items())
            if r % 2:
                order.reverse()
            for name, s in order:
                time.sleep(0.005)
                for i in range(chunk):
                    feed = feeds[(r * chunk + i) % len(feeds)]
                    t = perf()
                    s.run([OUTPUT_NAME], feed)
                    times[name][n].append(perf() - t)
    return {name: {n: Dist.of(v) for n, v in per_n.items()} for name, per_n in times.items()}


def feeds_for(
    bundle: Bundle, bodies: Sequence[dict[str, Any]], n_candidates: int
) -> list[dict[str, np.ndarray]]:
    """Model inputs of real requests at ``n_candidates`` (for session comparisons)."""
    ranker = Ranker(bundle, max_retrieved=n_candidates)
    names = bundle.scorer.input_names
    out = []
    for body in bodies:
        prepared = ranker.prepare(rank_query(body))
        out.append({name: prepared.inputs[name] for name in names})
    return out
