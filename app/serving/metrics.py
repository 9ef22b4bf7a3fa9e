"""Prometheus metrics of the ranking service: the names dashboards and alerts are built on.

One ``ServiceMetrics`` per app, each in its own registry, so tests can run several apps in
one process. With several uvicorn workers ``unicorn serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker imports ``prometheus_client``; every worker then writes its values to
that directory and ``render`` aggregates them (``multiprocess_mode`` says how per gauge).

Labels are bounded enums only (task, personalization level, cache outcome, stage, route
template, status code, model version, configured variant name): never a user id or query
text.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from app.core.context import Personalization, Task

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client's per-process file of a "live" gauge: gauge_livesum_<pid>.db ...
LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")

# The latency objective (deploy/prometheus/rules: p99 of POST /rank within 25 ms) is a
# bucket bound, so the alert compares against a boundary rather than an interpolation.
SLO_SECONDS = 0.025
# Fine below 5 ms so that a p99 near 1 ms can be read; coarse above.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, SLO_SECONDS, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS: tuple[float, ...] = (
    1, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 4096, 8192,
)  # fmt: skip
CANDIDATE_BUCKETS: tuple[float, ...] = (0, 1, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000)
AGREEMENT_BUCKETS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# le=0 holds every correlation at or below 0; a negative first bound would make
# prometheus_client drop the _sum (the mean a panel shows).
CORRELATION_BUCKETS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SHADOW_OUTCOMES = ("scored", "dropped", "failed")
STAGES: tuple[str, ...] = ("retrieval", "features", "inference", "cache")
CACHE_OUTCOMES: tuple[str, ...] = ("hit", "miss", "bypass")
# Every status the service answers (499: the client went away first). Each (route,
# status) series exists at zero from the start, so that increase() sees a first burst.
EVENT_OUTCOMES = ("queued", "written", "dropped", "duplicate")
STATUSES: tuple[int, ...] = (
    200, 400, 401, 403, 404, 405, 408, 409, 413, 414, 415, 422, 431, 499, 500, 503,
)  # fmt: skip


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ServiceMetrics:
    """Every metric the service exports (see docs/API.md, "Metrics")."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rank_latency = Histogram(
            "unicorn_rank_latency_seconds",
            "POST /rank handling time (body parse to response body), by outcome and variant.",
            ["task", "personalization", "cache", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "unicorn_stage_latency_seconds",
            "Time per ranking stage: retrieval, features, inference, cache (get + set), by "
            "variant.",
            ["stage", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_batch_size = Histogram(
            "unicorn_inference_batch_size",
            "Candidate rows per onnxruntime run (several requests when micro-batching).",
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.candidates_per_request = Histogram(
            "unicorn_candidates_per_request",
            "Candidates scored per request (cache misses and bypasses).",
            buckets=CANDIDATE_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "unicorn_cache_requests_total",
            "Ranking requests by cache outcome: hit, miss, bypass (full personalization, "
            "explain, cache off or degraded).",
            ["outcome"],
            registry=r,
        )
        self.cache_errors = Counter(
            "unicorn_cache_errors_total",
            "Cache operations that failed (the request was scored instead).",
            ["backend", "operation"],
            registry=r,
        )
        self.cache_degraded = Gauge(
            "unicorn_cache_degraded",
            "1 while the cache circuit breaker is open (requests skip the cache).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.responses = Counter(
            "unicorn_responses_total",
            "HTTP responses by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "unicorn_in_flight_requests",
            "Requests inside the scoring section now (admitted).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.scoring_slots = Gauge(
            "unicorn_scoring_slots",
            "Scoring slots now: max_in_flight, more while refusals crowd scoring out of the "
            "event loop (fair share, a sign of clients retrying at once).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events = Counter(
            "unicorn_events_total",
            "Feedback events by kind (impression, engagement) and outcome: queued, written "
            "(in a complete file or a stream), dropped (queue full, sink failed), duplicate "
            "(an engagement event id seen already).",
            ["kind", "outcome"],
            registry=r,
        )
        self.shed = Counter(
            "unicorn_shed_requests_total",
            "Requests refused with 503 by admission control (no scoring slot in time).",
            registry=r,
        )
        self.model_info = Gauge(
            "unicorn_model_info",
            "1 for the model version each variant (and the shadow) serves, 0 for versions "
            "it served before.",
            ["variant", "model_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_reloads = Counter(
            "unicorn_model_reloads_total",
            "Model reloads by result: ok, refused (the old model kept serving).",
            ["result"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "unicorn_shadow_requests_total",
            "Answers sampled for the shadow bundle, by the variant that served them and "
            "outcome: scored, dropped (its queue was full), failed (the shadow raised).",
            ["variant", "outcome"],
            registry=r,
        )
        self.shadow_overlap = Histogram(
            "unicorn_shadow_top10_overlap",
            "Share of the served top 10 that the shadow's own top 10 also holds.",
            ["variant"],
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.shadow_correlation = Histogram(
            "unicorn_shadow_rank_correlation",
            "Spearman correlation of the served order and the shadow's order of the same "
            "served items (1 = same order, -1 = reversed).",
            ["variant"],
            buckets=CORRELATION_BUCKETS,
            registry=r,
        )
        self.shadow_latency = Histogram(
            "unicorn_shadow_latency_seconds",
            "Time the shadow took per sampled request (off the request path).",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.process_memory = Gauge(
            "unicorn_process_resident_memory_bytes",
            "Resident memory of each serving process (VmRSS).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_cpu = Gauge(
            "unicorn_process_cpu_seconds",
            "CPU time (user + system) each serving process has used; rate() it.",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_fds = Gauge(
            "unicorn_process_open_fds",
            "Open file descriptors of each serving process (connections included).",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_max_fds = Gauge(
            "unicorn_process_max_fds",
            "The file-descriptor limit of each serving process.",
            registry=r,
            multiprocess_mode="liveall",
        )
        # Export zeros so that dashboards and increase() see every series from the start.
        for outcome in CACHE_OUTCOMES:
            self.cache_requests.labels(outcome)
        for result in ("ok", "refused"):
            self.model_reloads.labels(result)
        for kind in ("impression", "engagement"):
            for outcome in EVENT_OUTCOMES:
                self.events.labels(kind, outcome)
        self.sample_process()

    def init_variants(self, variants: tuple[str, ...], shadow: bool = False) -> None:
        """Every variant's latency series at zero, and the shadow's agreement series."""
        for variant in variants:
            for stage in STAGES:
                self.stage_latency.labels(stage, variant)
            for outcome in CACHE_OUTCOMES:
                for task in Task:
                    for level in Personalization:
                        self.rank_latency.labels(task.value, level.value, outcome, variant)
            if shadow:
                for result in SHADOW_OUTCOMES:
                    self.shadow_requests.labels(variant, result)
                self.shadow_overlap.labels(variant)
                self.shadow_correlation.labels(variant)
                self.shadow_latency.labels(variant)

    def init_routes(self, routes: frozenset[str] | tuple[str, ...]) -> None:
        """Every (route, status) response series at zero, ``unmatched`` included."""
        for route in (*sorted(routes), "unmatched"):
            for status in STATUSES:
                self.responses.labels(route, str(status))

    def sample_process(self) -> None:
        """Read this process's RSS, CPU time and descriptors from /proc (Linux; elsewhere
        the gauges stay at zero)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            statm = Path("/proc/self/statm").read_text().split()
            self.process_memory.set(int(statm[1]) * os.sysconf("SC_PAGE_SIZE"))
            stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            self.process_cpu.set((int(stat[11]) + int(stat[12])) / ticks)
            self.process_fds.set(len(os.listdir("/proc/self/fd")))
            self.process_max_fds.set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def set_model(self, variant: str, version: str, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.model_info.labels(variant, previous).set(0)
        self.model_info.labels(variant, version).set(1)

    def render(self) -> tuple[bytes, str]:
        """The exposition text: this app's registry, or every worker's when multiprocess."""
        self.sample_process()  # the answering worker's own figures are current
        directory = multiprocess_dir()
        if directory:
            sweep_dead_workers(Path(directory))
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def mark_process_dead(pid: int) -> None:
        """Drop a finished worker's live gauges (multiprocess mode only)."""
        if multiprocess_dir():
            # Two workers may sweep the same dead pid at once: a vanished file is fine.
            with contextlib.suppress(FileNotFoundError):
                prom_multiprocess.mark_process_dead(pid)


def sweep_dead_workers(directory: Path) -> list[int]:
    """Drop the live gauges of workers that died without shutting down (SIGKILL, OOM
    kill); returns their pids.

    A worker that exits cleanly drops its own (the app's lifespan), but uvicorn's
    supervisor replaces a killed worker without doing so, and its last values (e.g. a
    request in flight) would stay in the ``livesum``/``livemax`` gauges forever. Counters
    and histograms of a dead worker are kept: what it counted did happen. A pid reused
    by another process since is taken as alive (its stale values stay until that one
    ends), which is rare and only ever keeps a stale value.
    """
    dead = set()
    for path in directory.glob("gauge_live*_*.db"):
        match = LIVE_GAUGE_FILE.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in sorted(dead):
        ServiceMetrics.mark_process_dead(pid)
    return sorted(dead)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        # A killed worker that its supervisor has not reaped yet is a zombie: dead.
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
