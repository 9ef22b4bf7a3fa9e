"""The latency benchmark: ``make bench`` (or ``python -m loadtest.bench [--quick]``).

Measures on this machine Floor A and the in-process ranking path, onnxruntime session
options, Floor B and ``POST /rank`` over HTTP with ``wrk`` (every task, cache miss and hit,
in-process cache and Redis, concurrency 1/8/32, 1 and 2 workers), serving options, the
1M-user / 100k-entity world against the demo world, and a peer (BentoML serving the demo
bundle's model.onnx, score only; ``loadtest/peer.py``) against our miss and hit; prints
the tables and writes them, with the exact command, into the generated block of
docs/BENCHMARKS.md, whose "How to read the numbers" says how each figure is measured.
Builds the bundles it lacks (``bundles/demo``, ``bundles/ml`` when ml-latest-small is
there, ``bundles/big``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest import processes
from loadtest.bench_report import (
    CANDIDATE_COUNTS,
    PATH_COUNTS,
    TARGET_N,
    HttpRow,
    Results,
    render,
)
from loadtest.floor_b import FLOOR_PATH
from loadtest.processes import BLAS_ENV, ROOT, RedisServer, ServiceProcess, run_wrk

ML_DATA = ROOT.parent / "shared" / "datasets" / "ml-latest-small"
HIT_SET, MISS_SET = 100, 600  # distinct bodies per task in a cache-hit / cache-miss run
MISS_TTL_S = 0.001  # a miss still pays the cache get + set; the key never comes back in 1 ms
CONCURRENCY = (1, 8, 32)
SECTIONS = ("inprocess", "sessions", "http", "options", "features", "scale", "peer")
Say = Callable[[str], None]
Bundles = dict[str, Any]  # name -> app.core.bundle.Bundle


@dataclass
class Plan:
    seconds: int  # per timed wrk run (whole seconds: wrk's unit)
    reps: int  # in-process requests per (bundle, N, task)
    session_reps: int
    bundles: list[str]


def ensure_bundles(names: list[str], log: Say) -> Bundles:
    """The bundles of ``names``, built first where missing (or refused by this code: an
    older format) and possible."""
    from app.core.bundle import load_bundle, verify_bundle
    from app.core.errors import BundleError

    unicorn = [sys.executable, "-m", "model_export.cli", "build-bundle"]
    builds = {
        "demo": [*unicorn, "--source", "synthetic", "--out", "bundles/demo"],
        "ml": [*unicorn, "--source", "movielens", "--path", str(ML_DATA), "--out", "bundles/ml"],
        "big": [sys.executable, "-m", "loadtest.big_world", "--out", "bundles/big"],
    }
    bundles = {}
    for name in names:
        path, build = ROOT / "bundles" / name, builds[name]
        try:
            verify_bundle(path)
        except BundleError as refused:
            if path.exists():
                log(f"bundle {name}: refused ({refused}), rebuilt")
            if name == "ml" and not ML_DATA.is_dir():
                log(f"bundle {name}: cannot build ({ML_DATA} is missing); skipped")
                continue
            log(f"bundle {name}: building ({shlex.join(build)})")
            started = time.perf_counter()
            subprocess.run(build, cwd=ROOT, check=True)
            log(f"bundle {name}: built in {time.perf_counter() - started:.0f}s")
        bundles[name] = load_bundle(path)
    return bundles


def machine_info() -> dict[str, Any]:
    import numpy as np
    import onnxruntime

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu or "unknown", "cores": os.cpu_count(), "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
        "wrk": (wrk.stdout.splitlines() or ["?"])[0], "load_at_start": os.getloadavg(),
    }  # fmt: skip


def bundle_summary(name: str, bundle: Any) -> dict[str, Any]:
    c, t = bundle.catalogue, bundle.tables
    return {
        "bundle": name, "model_version": bundle.model_version, "entities": len(c),
        "rankable": int(c.rankable.sum()), "users_in_tables": len(t.user_ids),
        "queries": len(t.query_keys),
        "model_mb": (bundle.path / "model.onnx").stat().st_size / 2**20,
    }  # fmt: skip


# --- in-process sections -----------------------------------------------------------------
def run_inprocess(res: Results, plan: Plan, bundles: Bundles, say: Say) -> None:
    from loadtest.inprocess_timing import measure_path
    from loadtest.request_bodies import TASKS, request_bodies

    for (name, bundle), n, task in itertools.product(bundles.items(), PATH_COUNTS, TASKS):
        try:
            bodies = request_bodies(bundle, task, 64, seed=1)
        except ValueError as exc:
            say(f"in-process {name} {task}: skipped ({exc})")
            continue
        r = measure_path(bundle, bodies, n, plan.reps)
        res.inprocess.append(
            {"bundle": name, "n": n, "task": task, "candidates": r.n_candidates,
             "floor_p50": r.floor.p50, "floor_p99": r.floor.p99, "path_p50": r.path.p50,
             "path_p99": r.path.p99, "ratio": r.ratio_p50,
             **{f"{s}_p50": d.p50 for s, d in r.stages.items()}}
        )  # fmt: skip
        say(f"in-process {name} N={n} {task}: floor A {r.floor}, path {r.path} ms (p50/p99)")


def run_catalogue(res: Results, plan: Plan, bundles: Bundles, say: Say) -> None:
    """The in-process path at ``TARGET_N`` on every bundle (demo 2k, ml 10k, big 100k
    entities), the bundles in turns on each task's request mix."""
    from loadtest.inprocess_timing import compare_worlds
    from loadtest.request_bodies import TASKS

    for task in TASKS:
        d = compare_worlds(bundles, TARGET_N, task, plan.reps)
        for name, dist in d.items():
            res.catalogue.append({"task": task, "bundle": name, "p50": dist.p50, "p99": dist.p99})
        say(f"catalogue N={TARGET_N} {task}: " + ", ".join(f"{k} {v}" for k, v in d.items()))


def run_sessions(res: Results, plan: Plan, bundle: Any, say: Say) -> None:
    from loadtest.inprocess_timing import compare_sessions, feeds_for
    from loadtest.request_bodies import request_bodies

    bodies = request_bodies(bundle, "search", 16, seed=2)
    feeds = {n: feeds_for(bundle, bodies, n) for n in CANDIDATE_COUNTS}
    out = compare_sessions(bundle, feeds, plan.session_reps)
    res.sessions = {name: {n: asdict(d) for n, d in per_n.items()} for name, per_n in out.items()}
    for name, per_n in out.items():
        say(f"session {name}: " + ", ".join(f"N={n} {d}" for n, d in per_n.items()))


def run_serialisation(res: Results, bundle: Any) -> None:
    """orjson vs the standard library for what /rank encodes and parses per request."""
    import timeit

    import orjson

    from app.core.ranking import Ranker
    from app.http.schemas import RankLimits, RankRequest
    from loadtest.request_bodies import rank_query, request_bodies

    body = request_bodies(bundle, "search", 1, seed=3)[0]
    result = Ranker(bundle).rank(rank_query(body))
    items = [
        {"entity_id": i.entity_id, "score": i.score, "name": i.name, "entity_type": i.entity_type}
        for i in result.items
    ]
    response = {
        "items": items, "task": "search", "model_version": bundle.model_version,
        "personalization": "cluster", "cache": "miss", "context": result.context.as_dict(),
        "unknown_candidates": [],
    }  # fmt: skip
    raw, limits = json.dumps(body).encode(), RankLimits()

    def per_call(fn: Callable[[], object], n: int = 3000) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6

    def validate(parse: Callable[[bytes], Any]) -> Callable[[], object]:
        return lambda: RankRequest.model_validate(parse(raw), context=limits)

    res.serialisation = {
        "response_bytes": float(len(orjson.dumps(response))),
        "encode_orjson_us": per_call(lambda: orjson.dumps(response)),
        "encode_json_us": per_call(lambda: json.dumps(response).encode()),
        "parse_pydantic_json_us": per_call(
            lambda: RankRequest.model_validate_json(raw, context=limits)
        ),
        "parse_json_then_validate_us": per_call(validate(json.loads)),
        "parse_orjson_then_validate_us": per_call(validate(orjson.loads)),
    }


# --- HTTP sections -------------------------------------------------------------------------
@dataclass
class Served:
    """A benchmark server and the labels of the cells measured on it."""

    process: ServiceProcess
    labels: dict[str, Any]


class HttpRunner:
    """Starts servers and runs wrk cells, recording rows into ``Results``."""

    def __init__(self, res: Results, plan: Plan, bundles: Bundles, workdir: Path, say: Say):
        self.res, self.plan, self.bundles, self.workdir, self.say = res, plan, bundles, workdir, say
        self.redis = RedisServer().start()
        self.files: dict[tuple[str, str, str], Path | None] = {}
        self.offset = 0  # wrk starts where the previous run stopped in a file of bodies

    def bodies(self, bundle: str, task: str, kind: str) -> Path | None:
        """The file of ``kind`` (hit | miss) bodies of ``task``; None: the bundle has none."""
        from loadtest.request_bodies import request_bodies

        key, (size, seed) = (bundle, task, kind), (HIT_SET, 11) if kind == "hit" else (MISS_SET, 12)
        if key not in self.files:
            self.files[key], path = None, self.workdir / f"{bundle}-{task}-{kind}.jsonl"
            with contextlib.suppress(ValueError):  # e.g. a bundle without pages
                self.files[key] = processes.write_bodies(
                    path, request_bodies(self.bundles[bundle], task, size, seed)
                )
        return self.files[key]

    @contextmanager
    def server(
        self, bundle: str, n: int, case: str, backend: str, workers: int, http: str = "httptools",
        env: dict[str, str] | None = None, **settings: Any,
    ) -> Iterator[Served]:  # fmt: skip
        """The benchmark server (``loadtest.floor_b``) on ``bundle`` for ``case`` cells."""
        ttl = MISS_TTL_S if case == "miss" else 300.0
        settings = {"bundle": self.bundles[bundle].path, "max_retrieved": n, "workers": workers,
                    "cache_ttl_seconds": ttl, **settings}  # fmt: skip
        if backend == "redis":
            settings["redis_url"] = self.redis.url
            self.redis.flush()
        log = Path(tempfile.mkstemp(".log", dir=self.workdir)[1])
        with ServiceProcess(
            settings, log_path=log, module="loadtest.floor_b", args=("--http", http), env=env
        ) as process:
            labels = {"bundle": bundle, "n": n, "case": case, "backend": backend}
            yield Served(process, {**labels, "workers": workers})

    def cells(
        self, srv: Served, route: str, bodies: Path, concs: Iterable[int], task: str,
        intended: str | None, **extra: Any,
    ) -> None:  # fmt: skip
        """One wrk cell per concurrency; ``extra`` overrides labels (case, backend) or is
        recorded with the row (option, value)."""
        server = srv.process
        relabel = {k: v for k, v in extra.items() if k in ("case", "backend")}
        labels = {**srv.labels, "task": task, **relabel}
        extra = {k: v for k, v in extra.items() if k not in relabel}

        def counters() -> tuple[str, float, float, list[float], float]:
            return (server.metrics(), server.cpu_seconds(), self.redis.cpu_seconds(),
                    server.worker_cpu_seconds(), processes.machine_busy_seconds())  # fmt: skip

        for conc in concs:
            (m0, c0, r0, w0, b0) = counters()
            wrk = run_wrk(server.url + route, bodies, conc, self.plan.seconds, self.offset)
            (m1, c1, r1, w1, b1), secs = counters(), wrk.seconds or float("nan")
            self.offset += wrk.requests
            server_cpu, redis_cpu = (c1 - c0) / secs, (r1 - r0) / secs
            # What else kept the machine busy meanwhile (other users' processes): noise.
            other_cpu = max((b1 - b0) / secs - server_cpu - redis_cpu - wrk.wrk_cpu, 0.0)

            def delta(name: str, m0: str = m0, m1: str = m1, **match: str) -> float:
                return processes.metric(m1, name, **match) - processes.metric(m0, name, **match)

            outcomes = {
                o: delta("unicorn_cache_requests_total", outcome=o)
                for o in ("hit", "miss", "bypass")
            }
            total, scored = sum(outcomes.values()), delta("unicorn_candidates_per_request_count")
            nan = float("nan")  # purity and candidates where not applicable
            row = HttpRow(
                **labels, conc=conc, p50=wrk.p50_ms, p99=wrk.p99_ms, rps=wrk.rps, errors=wrk.errors,
                wrk_cpu=wrk.wrk_cpu, server_cpu=server_cpu, outcomes=outcomes,
                purity=outcomes[intended] / total if intended and total else nan,
                candidates=delta("unicorn_candidates_per_request_sum") / scored if scored else nan,
                extra={"redis_cpu": redis_cpu if labels["backend"] == "redis" else 0.0,
                       "worker_cpu": [(b - a) / secs for a, b in zip(w0, w1, strict=True)],
                       "other_cpu": other_cpu, **extra}, seconds=wrk.seconds,
            )  # fmt: skip
            self.res.http.append(row)
            self.say(
                f"http {row.bundle} N={row.n} {task} {row.case} {row.backend} w{row.workers} "
                f"c{conc}: p50 {row.p50:.2f} p99 {row.p99:.2f} ms, {row.rps:.0f} req/s, "
                f"{row.errors} errors, purity {row.purity:.3f} {outcomes} {extra}"
            )

    def warm(self, srv: Served, route: str, bodies: Path, seconds: int = 0) -> None:
        """``seconds`` = 0: a few requests (connections, first-call costs); > 0: a wrk run
        of that length, which caches every hit body in every worker."""
        if seconds > 0:
            run_wrk(srv.process.url + route, bodies, 32, seconds, self.offset)
        for line in bodies.read_text().splitlines()[:8] if seconds <= 0 else []:
            srv.process.post(route, content=line).raise_for_status()

    def record_rss(self, srv: Served, case: str) -> None:
        rss, labels = srv.process.rss_mib(), {k: srv.labels[k] for k in ("bundle", "backend")}
        self.res.rss.append({**labels, "workers": len(rss), "case": case, "rss_mib": rss})


def run_http_grid(runner: HttpRunner, bundle: str) -> None:
    """Every task, miss and hit, memory and Redis, concurrency x workers, at N=500; Floor B
    on the memory hit servers."""
    from loadtest.request_bodies import TASKS

    for workers, backend, case in itertools.product((1, 2), ("memory", "redis"), ("miss", "hit")):
        with runner.server(bundle, TARGET_N, case, backend, workers) as srv:
            if case == "hit" and backend == "memory":
                floor = runner.bodies(bundle, "search", "hit")
                assert floor is not None
                runner.warm(srv, FLOOR_PATH, floor)
                runner.cells(
                    srv, FLOOR_PATH, floor, CONCURRENCY, "-", None, case="floor B", backend="-"
                )
            for task in TASKS:
                bodies = runner.bodies(bundle, task, case)
                if bodies is not None:
                    # Hits: every body must be cached in every worker before timing.
                    runner.warm(srv, "/rank", bodies, workers if case == "hit" else 0)
                    runner.cells(srv, "/rank", bodies, CONCURRENCY, task, case)
            runner.record_rss(srv, case)
    for n, case in itertools.product((100, 1000), ("miss", "hit")):  # 500 is in the grid
        with runner.server(bundle, n, case, "memory", 1) as srv:
            bodies = runner.bodies(bundle, "search", case)
            assert bodies is not None
            runner.warm(srv, "/rank", bodies, 1 if case == "hit" else 0)
            runner.cells(srv, "/rank", bodies, (1, 8), "search", case)


def option_cells(
    runner: HttpRunner, bundle: str, option: str, value: Any, workers: int, case: str,
    concs: Iterable[int], **settings: Any,
) -> None:  # fmt: skip
    """Search cells (N=500, in-process cache) on a server with ``settings``, labelled
    ``option=value``."""
    bodies = runner.bodies(bundle, "search", case)
    assert bodies is not None
    with runner.server(bundle, TARGET_N, case, "memory", workers, **settings) as srv:
        runner.warm(srv, "/rank", bodies, 1 if case == "hit" else 0)
        runner.cells(srv, "/rank", bodies, concs, "search", case, option=option, value=value)


def run_http_options(runner: HttpRunner, bundle: str) -> None:
    """Micro-batching, loop/parser, intra-op threads, access log: search, N=500."""
    files = {case: runner.bodies(bundle, "search", case) for case in ("miss", "hit")}
    hits = files["hit"]
    assert hits is not None and files["miss"] is not None

    def measure(option: str, value: Any, workers: int, case: str, concs: Iterable[int],
                **settings: Any) -> None:  # fmt: skip
        option_cells(runner, bundle, option, value, workers, case, concs, **settings)

    # Micro-batching: 0 = inline (the default); 0.01 ms = a thread-pool hop that batches
    # only what is already queued; 1 and 2 ms = real batching windows.
    for workers, window in itertools.product((1, 2), (0.0, 0.01, 1.0, 2.0)):
        measure("batch_window_ms", window, workers, "miss", CONCURRENCY, batch_window_ms=window)
    # The event loop on scored requests (the cells below measure it on hits and Floor B).
    for loop in ("asyncio", "uvloop"):
        measure("event_loop", loop, 1, "miss", (1, 8), event_loop=loop)
    for loop, http in (("asyncio", "httptools"), ("uvloop", "httptools"), ("asyncio", "h11")):
        with runner.server(bundle, TARGET_N, "hit", "memory", 1, http, event_loop=loop) as srv:
            runner.warm(srv, "/rank", hits, 1)
            option = {"option": "loop/http", "value": f"{loop}+{http}"}
            runner.cells(srv, FLOOR_PATH, hits, (1, 32), "-", None, case="floor B", **option)
            runner.cells(srv, "/rank", hits, (1, 32), "search", "hit", **option)
    for threads in (1, 2):
        measure("ort_intra_op_threads", threads, 2, "miss", (1, 8), ort_intra_op_threads=threads)
    # One JSON access-log line per request (INFO, the default) against none (WARNING).
    for level in ("INFO", "WARNING"):
        measure("log_level", level, 1, "hit", (1, 32), log_level=level)
    # Browser-ready HTTP off (the default) and on, on hits, where a fixed cost shows most:
    # wrk sends Origin and Accept-Encoding: gzip (loadtest/rank.lua); a 20-item answer
    # (~2.2 KB) stays under the gzip threshold, so the cell is the layer's own cost.
    for value, extra in (("off", {}), ("on", {"cors_origins": "https://app.example.com"})):
        measure("cors", value, 1, "hit", (1, 32), **extra)
    for size in (0, 4096):
        measure("gzip_min_bytes", size, 1, "hit", (1, 32), gzip_min_bytes=size)
    # The feedback loop's impression per answer (Parquet files) against events off.
    for case, events in itertools.product(("hit", "miss"), ("off", "on")):
        sink = {"events_dir": str(runner.workdir / f"events-{case}")} if events == "on" else {}
        measure("events", events, 1, case, (1, 32), **sink)


def run_http_features(runner: HttpRunner, bundle: str) -> None:
    """Tracing, variants, the shadow and explain, each off (the default) and on, in one
    run: search, N=500, one worker, in-process cache."""
    misses = runner.bodies(bundle, "search", "miss")
    assert misses is not None

    def measure(option: str, value: Any, case: str, concs: Iterable[int], **settings: Any) -> None:
        option_cells(runner, bundle, option, value, 1, case, concs, **settings)

    # Tracing: every request sampled, the collector a closed port (the spans are dropped in
    # the background): the request path's cost alone.
    for value, extra in (("off", {}), ("on", {"otlp_endpoint": "http://127.0.0.1:9/v1/traces"})):
        measure("tracing", value, "hit", (1, 32), **extra)
    # Variants: two of the same bundle, half the members each (the bodies carry user ids).
    path = str(runner.bundles[bundle].path)
    for value, extra in (("off", {}), ("on", {"variants": f"a={path},b={path}:50"})):
        measure("variants", value, "hit", (1, 32), **extra)
    # The shadow: the same bundle again, every answer or one in ten sampled; on misses too,
    # where its share of a scored answer is smaller.
    for case, ratio in itertools.product(("hit", "miss"), ("off", 0.1, 1.0)):
        shadow: dict[str, Any] = {"shadow_bundle": path, "shadow_sample_ratio": ratio}
        measure("shadow", ratio, case, (1, 8), **({} if ratio == "off" else shadow))
    # Explain: the same misses with "explain": true, on one server (never cached: bypass).
    explained = processes.write_bodies(
        runner.workdir / f"{bundle}-search-miss-explain.jsonl",
        ({**json.loads(line), "explain": True} for line in misses.read_text().splitlines()),
    )
    with runner.server(bundle, TARGET_N, "miss", "memory", 1) as srv:
        for value, bodies, intended in (("off", misses, "miss"), ("on", explained, "bypass")):
            runner.cells(srv, "/rank", bodies, (1, 8), "search", intended, option="explain",
                         value=value)  # fmt: skip


def run_scale(res: Results, runner: HttpRunner, plan: Plan, say: Say) -> None:
    """The default world vs the 1M-user / 100k-entity world, same N, interleaved: in
    process, then over HTTP (both servers up, short wrk runs in turns, median of 3 rounds)
    as shipped and with numpy's BLAS limited to one thread."""
    from loadtest.inprocess_timing import compare_worlds
    from loadtest.request_bodies import TASKS

    worlds = {k: runner.bundles[k] for k in ("demo", "big")}
    for n, task in itertools.product(CANDIDATE_COUNTS, TASKS):
        d = compare_worlds(worlds, n, task, plan.reps)
        res.scale.append({"where": "in-process", "n": n, "task": task} | {
            f"{k}_{p}": getattr(d[k], p) for k in worlds for p in ("p50", "p99")
        })  # fmt: skip
        say_entry(say, res.scale[-1])
    seconds = max(1, round(plan.seconds / 2))
    for variant, env in (("as shipped", None), ("1 BLAS thread", dict.fromkeys(BLAS_ENV, "1"))):
        with (
            runner.server("demo", TARGET_N, "miss", "memory", 1, env=env) as demo,
            runner.server("big", TARGET_N, "miss", "memory", 1, env=env) as big,
        ):
            servers = {"demo": demo, "big": big}
            for task, conc in itertools.product(TASKS, (1, 8)):
                files = {k: runner.bodies(k, task, "miss") for k in servers}
                paths = {k: f for k, f in files.items() if f is not None}
                if len(paths) < len(servers):
                    continue
                for k, srv in servers.items() if conc == 1 else ():
                    runner.warm(srv, "/rank", paths[k])
                rounds: dict[str, list[Any]] = {"demo": [], "big": []}
                for r in range(3):
                    for k in ("demo", "big") if r % 2 == 0 else ("big", "demo"):
                        url = servers[k].process.url + "/rank"
                        rounds[k].append(run_wrk(url, paths[k], conc, seconds, r * 97))
                entry = {
                    "where": f"http miss w1, {variant}",
                    "n": TARGET_N,
                    "task": task,
                    "conc": conc,
                }
                for k, runs in rounds.items():
                    entry[f"{k}_p50"] = statistics.median(w.p50_ms for w in runs)
                    entry[f"{k}_p99"] = statistics.median(w.p99_ms for w in runs)
                    entry[f"{k}_errors"] = sum(w.errors for w in runs)
                res.scale.append(entry)
                say_entry(say, entry)
            for srv in servers.values():
                runner.record_rss(srv, f"miss (scale, {variant})")
    with runner.server("big", TARGET_N, "hit", "memory", 2) as srv:  # RSS per worker
        runner.record_rss(srv, "idle")


def say_entry(say: Say, entry: dict[str, Any]) -> None:
    say("scale " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in entry.items()))  # fmt: skip


# --- the peer ------------------------------------------------------------------------------
PEER_FEEDS = 16  # distinct feeds per task the peer is sent: the first bodies of the miss set
PEER_ROUNDS = 3  # rounds of (ours miss, peer, ours hit), the order rotated each round
PEER_RACE_ROUNDS = 2  # rounds of the transport race


def run_peer(res: Results, runner: HttpRunner, plan: Plan, bundle: str, say: Say) -> None:
    """BentoML serving ``bundle``'s model.onnx (``loadtest/peer.py``, one worker) against our
    miss and hit servers (one worker, in-process cache), all three up at once: first the
    peer's transports race on the search feeds (rounds alternated), the fastest is kept;
    then per task and concurrency 1 and 8, ``PEER_ROUNDS`` rounds of one short wrk run each
    of ours-miss, peer and ours-hit (order rotated every round). The peer's feeds are the
    model inputs our service builds for the first ``PEER_FEEDS`` bodies of the miss set."""
    import numpy as np

    from app.core.bundle import MODEL_FILE
    from loadtest import peer
    from loadtest.request_bodies import TASKS

    version = peer.bentoml_version()
    if version is None:
        res.log.append("peer: not measured (bentoml is not installed: pip install -e '.[peers]')")
        say(res.log[-1])
        return
    b, seconds = runner.bundles[bundle], max(1, round(plan.seconds / 2))
    files: dict[str, tuple[Path, Path]] = {}  # task -> its (miss, hit) bodies
    for t in TASKS:
        miss_file, hit_file = runner.bodies(bundle, t, "miss"), runner.bodies(bundle, t, "hit")
        if miss_file is not None and hit_file is not None:
            files[t] = (miss_file, hit_file)
    tasks = list(files)
    feeds = {
        t: peer.feeds(b, [json.loads(x) for x in _lines(files[t][0], PEER_FEEDS)], TARGET_N)
        for t in tasks
    }
    info: dict[str, Any] = {
        "bentoml": version, "bundle": bundle, "n": TARGET_N, "feeds": PEER_FEEDS,
        "seconds": seconds, "rounds": PEER_ROUNDS, "race_rounds": PEER_RACE_ROUNDS,
        "candidates": {t: float(np.mean([len(f["dense"]) for f in fs])) for t, fs in feeds.items()},
        "body_bytes": {k: len(enc(feeds["search"][0])) for k, enc in peer.ENCODERS.items()},
        "transports": {k: t.about for k, t in peer.TRANSPORTS.items()},
    }  # fmt: skip
    res.peer = {"info": info, "transports": [], "cells": []}
    with (
        runner.server(bundle, TARGET_N, "miss", "memory", 1) as miss,
        runner.server(bundle, TARGET_N, "hit", "memory", 1) as hit,
        peer.PeerServer(b.path / MODEL_FILE, feeds["search"][0], runner.workdir / "peer") as bento,
    ):
        for name in peer.TRANSPORTS:  # the peer scores as onnxruntime does, in every transport
            for feed in feeds["search"][:4]:
                got, want = bento.score(name, feed), b.scorer.score(feed)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    raise RuntimeError(f"peer transport {name}: scores differ from onnxruntime")
        manifests = {
            (t, name): bento.request_files(name, feeds[t], t)
            for t in tasks for name in (peer.TRANSPORTS if t == "search" else ())
        }  # fmt: skip

        def peer_cell(task: str, name: str, conc: int) -> dict[str, Any]:
            url, lua = bento.url + peer.TRANSPORTS[name].route, bento.lua
            c0 = bento.process.cpu_seconds()
            wrk = run_wrk(url, manifests[task, name], conc, seconds, runner.offset, script=lua)
            runner.offset += wrk.requests
            cpu = (bento.process.cpu_seconds() - c0) / (wrk.seconds or float("nan"))
            return _peer_row(wrk, cpu, task=task, conc=conc, side="peer", transport=name)

        for r, conc in itertools.product(range(PEER_RACE_ROUNDS), (1, 8)):
            for name in list(peer.TRANSPORTS)[:: -1 if r % 2 else 1]:
                res.peer["transports"].append(peer_cell("search", name, conc) | {"round": r})
                say_peer(say, res.peer["transports"][-1])
        info["transport"] = chosen = _fastest_transport(res.peer["transports"])
        say(f"peer: fastest transport {chosen}")
        ours = {"ours miss": miss, "ours hit": hit}
        for t in tasks:
            if (t, chosen) not in manifests:
                manifests[t, chosen] = bento.request_files(chosen, feeds[t], t)
            runner.warm(miss, "/rank", files[t][0])  # a few requests
            runner.warm(hit, "/rank", files[t][1], 1)  # every hit body cached
            for conc in (1, 8):
                sides = ["ours miss", "peer", "ours hit"]
                for r in range(PEER_ROUNDS):
                    for side in sides[r % 3 :] + sides[: r % 3]:
                        if side == "peer":
                            row = peer_cell(t, chosen, conc)
                        else:
                            case, srv = side.split()[1], ours[side]
                            body_file = files[t][case == "hit"]
                            row = _ours_cell(runner, srv, body_file, case, seconds, conc)
                            row |= {"task": t, "conc": conc, "side": side}
                        res.peer["cells"].append(row | {"round": r})
                        say_peer(say, res.peer["cells"][-1])


def _lines(path: Path, n: int) -> list[str]:
    return path.read_text().splitlines()[:n]


def _peer_row(wrk: processes.WrkResult, server_cpu: float, **labels: Any) -> dict[str, Any]:
    """A peer-section cell; ``rps`` counts successful answers only (a shed 503 is quick)."""
    ok_rps = (wrk.requests - wrk.errors) / wrk.seconds if wrk.seconds > 0 else 0.0
    return labels | {
        "rps": max(ok_rps, 0.0), "p50": wrk.p50_ms, "p99": wrk.p99_ms, "errors": wrk.errors,
        "status_errors": wrk.status_errors, "server_cpu": server_cpu, "wrk_cpu": wrk.wrk_cpu,
    }  # fmt: skip


def _ours_cell(
    runner: HttpRunner, srv: Served, bodies: Path, case: str, seconds: int, conc: int
) -> dict[str, Any]:
    """One wrk run of ``/rank`` on ``srv``, with the share of requests that had the
    intended cache outcome (``purity``, from the server's counters)."""
    server = srv.process
    m0, c0 = server.metrics(), server.cpu_seconds()
    wrk = run_wrk(server.url + "/rank", bodies, conc, seconds, runner.offset)
    m1, cpu = server.metrics(), (server.cpu_seconds() - c0) / (wrk.seconds or float("nan"))
    runner.offset += wrk.requests
    name = "unicorn_cache_requests_total"
    outcomes = {
        o: processes.metric(m1, name, outcome=o) - processes.metric(m0, name, outcome=o)
        for o in ("hit", "miss", "bypass")
    }
    total = sum(outcomes.values())
    return _peer_row(wrk, cpu, purity=outcomes[case] / total if total else float("nan"))


def _fastest_transport(rows: list[dict[str, Any]]) -> str:
    """The transport with the highest geometric mean, over concurrencies, of its median
    req/s."""
    by: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        by.setdefault(row["transport"], {}).setdefault(row["conc"], []).append(row["rps"])
    score = {
        name: statistics.geometric_mean([max(statistics.median(v), 1e-9) for v in c.values()])
        for name, c in by.items()
    }
    return max(score, key=score.__getitem__)


def say_peer(say: Say, row: dict[str, Any]) -> None:
    labels = " ".join(str(row[k]) for k in ("task", "side", "transport") if k in row)
    say(
        f"peer r{row['round']} {labels} c{row['conc']}: p50 {row['p50']:.2f} p99 "
        f"{row['p99']:.2f} ms, {row['rps']:.0f} req/s, {row['errors']} errors, server CPU "
        f"{row['server_cpu']:.2f}" + (f", purity {row['purity']:.3f}" if "purity" in row else "")
    )


# --- main ----------------------------------------------------------------------------------
def measure(res: Results, plan: Plan, sections: list[str], say: Say) -> None:
    """Every section of ``sections`` into ``res``."""

    def note(line: str) -> None:
        res.log.append(line)
        say(line)

    bundles = ensure_bundles(plan.bundles, note)
    res.bundle_info = {name: bundle_summary(name, b) for name, b in bundles.items()}
    measured, demo = {k: b for k, b in bundles.items() if k != "big"}, bundles.get("demo")
    if "inprocess" in sections:
        run_inprocess(res, plan, measured, say)
        if len(bundles) > 1:
            run_catalogue(res, plan, bundles, say)
    if demo is not None and "sessions" in sections:
        run_sessions(res, plan, demo, say)
    if demo is not None and "options" in sections:
        run_serialisation(res, demo)
    with tempfile.TemporaryDirectory(prefix="unicorn-bench-") as tmp:
        runner = HttpRunner(res, plan, bundles, Path(tmp), say)
        try:
            for name in measured if "http" in sections else []:
                run_http_grid(runner, name)
            if demo is not None and "options" in sections:
                run_http_options(runner, "demo")
            if demo is not None and "features" in sections:
                run_http_features(runner, "demo")
            if demo is not None and "scale" in sections and "big" in bundles:
                run_scale(res, runner, plan, say)
            elif demo is not None and "scale" in sections:
                note("scale: bundles/big not measured (add `--bundles ... big`)")
            if demo is not None and "peer" in sections:
                run_peer(res, runner, plan, "demo", say)
        finally:
            runner.redis.stop()


def main(argv: list[str] | None = None) -> int:
    from loadtest.bench_report import load_results
    from loadtest.markdown import write_block

    # One BLAS thread in this process, set before numpy loads: the in-process numbers then
    # match a serving process configured as docs/BENCHMARKS.md recommends, and a bundle's
    # multi-threaded mat-vec cannot spin into the next measurement. The servers it starts
    # do not inherit this (``ServiceProcess``).
    assert "numpy" not in sys.modules, "the BLAS threads must be set before numpy loads"
    for name in BLAS_ENV:
        os.environ.setdefault(name, "1")
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="demo bundle only, 1 s cells")
    add("--seconds", type=int, help="seconds per timed wrk cell (default 2, quick 1)")
    add("--bundles", nargs="+", choices=["demo", "ml", "big"], help="bundles to measure")
    add("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md", help="report file")
    add("--no-write", action="store_true", help="print only")
    add("--render", type=Path, metavar="JSON", help="only re-render the report of a saved run")
    add("--json", type=Path, default=ROOT / "reports/bench.json", help="raw results")
    add("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    add("--block", default="bench", help="the generated block of --out to replace")
    args = parser.parse_args(argv)
    default_bundles = ["demo"] if args.quick else ["demo", "ml", "big"]
    plan = Plan(args.seconds or (1 if args.quick else 2), 120 if args.quick else 300,
                80 if args.quick else 200, args.bundles or default_bundles)  # fmt: skip
    os.chdir(ROOT)
    if args.render is not None:
        res = load_results(args.render)
    else:
        command = shlex.join(
            ["python", "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)]
        )
        res = Results(
            time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            os.environ.get("BENCH_COMMAND", command),
            machine_info(),
        )
        started = time.perf_counter()
        measure(res, plan, args.sections, lambda line: print(line, flush=True))
        res.seconds, res.machine["load_at_end"] = time.perf_counter() - started, os.getloadavg()
    text = render(res, plan.seconds)
    print("\n" + text)
    if not args.no_write:
        write_block(args.out, args.block, text)
    if not args.no_write and args.render is None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(res), indent=1, default=str))
        print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
