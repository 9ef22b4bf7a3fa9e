"""The latency benchmark: ``make bench`` (or ``python -m loadtest.bench [--quick]``).

One run measures, on this machine, and prints as tables, then writes into
``docs/BENCHMARKS.md`` (the block between the ``bench:`` markers) with the exact command:

1. Floor A (onnxruntime ``run`` of the bundle's model) and the in-process ranking path
   (impute -> retrieve -> features -> score -> top-k, stage by stage), for the demo and the
   ml-latest-small bundles at 100, 500 and 1000 candidates, per task.
2. onnxruntime session options (threads, executor, spinning, graph optimisation).
3. Floor B (the same HTTP stack: a route that only parses the ``RankRequest`` and returns
   a fixed body) and ``POST /rank`` per task, cache miss and hit, in-process cache and
   Redis, concurrency 1/8/32, 1 and 2 uvicorn workers, with ``wrk`` (its CPU reported);
   RSS per worker.
4. Micro-batching on/off, event loop + HTTP parser, orjson, intra-op threads.
5. The 1M-user / 100k-entity world against the demo world at the same candidate counts.

Cache misses are made with a server whose cache TTL is 1 ms: each request still pays the
full cache get + set, but finds nothing (the bodies cycle through hundreds of distinct
keys, so a key never comes back within 1 ms). Hits use a 300 s TTL and a set of 100
bodies per task warmed before the timed run. Every cell checks the server's own counters
(``unicorn_cache_requests_total``, ``unicorn_candidates_per_request``) and reports the
fraction of requests with the intended outcome and the candidates actually scored.

Bundles are built when missing: ``bundles/demo`` and ``bundles/ml`` with ``unicorn
build-bundle``, ``bundles/big`` with ``python -m loadtest.big_world``.
"""

from __future__ import annotations

import argparse
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

from loadtest.report import CANDIDATE_COUNTS, TARGET_N, HttpRow, Results, render, write_generated

ROOT = Path(__file__).resolve().parents[1]
ML_DATA = ROOT.parent / "shared" / "datasets" / "ml-latest-small"
HIT_SET = 100  # distinct bodies per task in a cache-hit run
MISS_SET = 600  # distinct bodies per task in a cache-miss run
MISS_TTL_S = 0.001


@dataclass(frozen=True)
class BundleSpec:
    name: str
    path: Path
    build: list[str] | None  # command that builds it, None when it cannot be built here
    why_not: str = ""


def bundle_specs() -> dict[str, BundleSpec]:
    py = sys.executable
    unicorn = [py, "-m", "model_export.cli"]
    ml_build = None
    if ML_DATA.is_dir():
        ml_build = [*unicorn, "build-bundle", "--source", "movielens", "--path", str(ML_DATA)]
    return {
        "demo": BundleSpec(
            "demo",
            ROOT / "bundles/demo",
            [*unicorn, "build-bundle", "--source", "synthetic", "--out", "bundles/demo"],
        ),
        "ml": BundleSpec(
            "ml",
            ROOT / "bundles/ml",
            None if ml_build is None else [*ml_build, "--out", "bundles/ml"],
            f"{ML_DATA} is missing",
        ),
        "big": BundleSpec(
            "big", ROOT / "bundles/big", [py, "-m", "loadtest.big_world", "--out", "bundles/big"]
        ),
    }


def ensure_bundle(spec: BundleSpec, log: Callable[[str], None]) -> Path | None:
    if (spec.path / "manifest.json").is_file():
        return spec.path
    if spec.build is None:
        log(f"bundle {spec.name}: cannot build ({spec.why_not}); skipped")
        return None
    log(f"bundle {spec.name}: building ({shlex.join(spec.build)})")
    started = time.perf_counter()
    subprocess.run(spec.build, cwd=ROOT, check=True)
    log(f"bundle {spec.name}: built in {time.perf_counter() - started:.0f}s")
    return spec.path


# --- configuration -----------------------------------------------------------------------
@dataclass
class Plan:
    quick: bool
    seconds: int  # per timed wrk run (whole seconds: wrk's unit)
    reps: int  # in-process requests per (bundle, N, task)
    session_reps: int
    bundles: list[str]
    concurrency: tuple[int, ...]
    workers: tuple[int, ...]
    backends: tuple[str, ...] = ("memory", "redis")

    @classmethod
    def make(cls, quick: bool, seconds: int | None, bundles: list[str] | None) -> Plan:
        if quick:
            return cls(
                quick=True,
                seconds=seconds or 1,
                reps=120,
                session_reps=80,
                bundles=bundles or ["demo"],
                concurrency=(1, 8, 32),
                workers=(1, 2),
            )
        return cls(
            quick=False,
            seconds=seconds or 2,
            reps=300,
            session_reps=200,
            bundles=bundles or ["demo", "ml", "big"],
            concurrency=(1, 8, 32),
            workers=(1, 2),
        )


def machine_info() -> dict[str, Any]:
    import numpy as np
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run(
        ["wrk", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "wrk": wrk_version[0] if wrk_version else "?",
        "load_at_start": os.getloadavg(),
    }


# --- sections ------------------------------------------------------------------------------
def bundle_summary(name: str, path: Path) -> dict[str, Any]:
    from app.core.bundle import load_bundle

    bundle = load_bundle(path)
    c, t = bundle.catalogue, bundle.tables
    return {
        "bundle": name,
        "model_version": bundle.model_version,
        "entities": len(c),
        "rankable": int(c.rankable.sum()),
        "users_in_tables": len(t.user_ids),
        "queries": len(t.query_keys),
        "model_mb": (path / "model.onnx").stat().st_size / 2**20,
    }


def run_inprocess(
    res: Results, plan: Plan, paths: dict[str, Path], say: Callable[[str], None]
) -> None:
    from app.core.bundle import load_bundle
    from loadtest.inprocess import measure_path
    from loadtest.workload import TASKS, request_bodies

    for name, path in paths.items():
        bundle = load_bundle(path)
        for n in CANDIDATE_COUNTS:
            for task in TASKS:
                try:
                    bodies = request_bodies(bundle, task, 64, seed=1)
                except ValueError as exc:
                    say(f"in-process {name} {task}: skipped ({exc})")
                    continue
                r = measure_path(bundle, bodies, n, plan.reps, task)
                res.inprocess.append(
                    {
                        "bundle": name,
                        "n": n,
                        "task": task,
                        "candidates": r.n_candidates,
                        "floor_p50": r.floor.p50,
                        "floor_p99": r.floor.p99,
                        "path_p50": r.path.p50,
                        "path_p99": r.path.p99,
                        "ratio": r.ratio_p50,
                        **{f"{s}_p50": d.p50 for s, d in r.stages.items()},
                    }
                )
                say(
                    f"in-process {name} N={n} {task}: floor A {r.floor.p50:.3f}/{r.floor.p99:.3f} "
                    f"path {r.path.p50:.3f}/{r.path.p99:.3f} ms (x{r.ratio_p50:.2f})"
                )


def run_sessions(res: Results, plan: Plan, path: Path, say: Callable[[str], None]) -> None:
    from app.core.bundle import load_bundle
    from loadtest.inprocess import compare_sessions, feeds_for
    from loadtest.workload import request_bodies

    bundle = load_bundle(path)
    bodies = request_bodies(bundle, "search", 16, seed=2)
    feeds = {n: feeds_for(bundle, bodies, n) for n in CANDIDATE_COUNTS}
    out = compare_sessions(bundle, feeds, plan.session_reps)
    res.sessions = {name: {n: asdict(d) for n, d in per_n.items()} for name, per_n in out.items()}
    for name, per_n in out.items():
        say(f"session {name}: " + ", ".join(f"N={n} p50 {d.p50:.3f}" for n, d in per_n.items()))


def run_serialisation(res: Results, path: Path) -> None:
    """orjson vs the standard library for what /rank encodes and parses per request."""
    import timeit

    import orjson

    from app.core.bundle import load_bundle
    from app.core.ranking import Ranker
    from app.http.schemas import RankLimits, RankRequest
    from loadtest.workload import rank_query, request_bodies

    bundle = load_bundle(path)
    body = request_bodies(bundle, "search", 1, seed=3)[0]
    result = Ranker(bundle).rank(rank_query(body))
    response = {
        "items": [
            {
                "entity_id": i.entity_id,
                "score": i.score,
                "name": i.name,
                "entity_type": i.entity_type,
            }
            for i in result.items
        ],
        "task": "search",
        "model_version": bundle.model_version,
        "personalization": "cluster",
        "cache": "miss",
        "context": result.context.as_dict(),
        "unknown_candidates": [],
    }
    raw = json.dumps(body).encode()
    limits = RankLimits()
    n = 3000

    def per_call(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6

    res.serialisation = {
        "response_bytes": float(len(orjson.dumps(response))),
        "encode_orjson_us": per_call(lambda: orjson.dumps(response)),
        "encode_json_us": per_call(lambda: json.dumps(response).encode()),
        "parse_pydantic_json_us": per_call(
            lambda: RankRequest.model_validate_json(raw, context=limits)
        ),
        "parse_json_then_validate_us": per_call(
            lambda: RankRequest.model_validate(json.loads(raw), context=limits)
        ),
        "parse_orjson_then_validate_us": per_call(
            lambda: RankRequest.model_validate(orjson.loads(raw), context=limits)
        ),
    }


class HttpRunner:
    """Starts servers and runs wrk cells, recording rows into ``Results``."""

    def __init__(self, res: Results, plan: Plan, workdir: Path, say: Callable[[str], None]):
        from loadtest.processes import RedisServer

        self.res, self.plan, self.workdir, self.say = res, plan, workdir, say
        self.redis = RedisServer().start()
        self.files: dict[tuple[str, str, str], Path] = {}
        self.offset = 0

    def close(self) -> None:
        self.redis.stop()

    def bodies_file(self, bundle_name: str, path: Path, task: str, kind: str) -> Path | None:
        from app.core.bundle import load_bundle
        from loadtest.httpbench import write_bodies
        from loadtest.workload import request_bodies

        key = (bundle_name, task, kind)
        if key not in self.files:
            bundle = load_bundle(path)
            size = HIT_SET if kind == "hit" else MISS_SET
            try:
                bodies = request_bodies(bundle, task, size, seed=11 if kind == "hit" else 12)
            except ValueError:
                return None
            self.files[key] = write_bodies(
                self.workdir / f"{bundle_name}-{task}-{kind}.jsonl", bodies
            )
        return self.files[key]

    @contextmanager
    def server(
        self,
        path: Path,
        n: int,
        case: str,
        backend: str,
        workers: int,
        http: str = "httptools",
        env: dict[str, str] | None = None,
        **extra: Any,
    ) -> Iterator[Any]:
        from loadtest.httpbench import BenchServer

        settings: dict[str, Any] = {
            "bundle": path,
            "max_retrieved": n,
            "cache_ttl_seconds": MISS_TTL_S if case == "miss" else 300.0,
        }
        if backend == "redis":
            settings["redis_url"] = self.redis.url
            self.redis.flush()
        elif backend == "off":
            settings["cache_enabled"] = False
        settings.update(extra)
        server = BenchServer(settings, workers=workers, http=http, log_dir=self.workdir, env=env)
        try:
            yield server
        finally:
            server.stop()

    def cell(
        self,
        server: Any,
        route: str,
        bodies: Path,
        conc: int,
        *,
        bundle: str,
        n: int,
        task: str,
        case: str,
        backend: str,
        workers: int,
        intended: str | None,
        seconds: int | None = None,
        **extra: Any,
    ) -> HttpRow:
        from loadtest.httpbench import machine_busy_seconds, run_wrk

        m0, c0, r0 = server.metrics(), server.cpu_seconds(), self.redis.cpu_seconds()
        w0, b0 = server.worker_cpu_seconds(), machine_busy_seconds()
        wrk = run_wrk(server.url + route, bodies, conc, seconds or self.plan.seconds, self.offset)
        m1, c1, r1 = server.metrics(), server.cpu_seconds(), self.redis.cpu_seconds()
        w1, b1 = server.worker_cpu_seconds(), machine_busy_seconds()
        secs = wrk.seconds or float("nan")
        server_cpu, redis_cpu = (c1 - c0) / secs, (r1 - r0) / secs
        # What else kept the machine busy meanwhile (other users' processes): noise.
        other_cpu = max((b1 - b0) / secs - server_cpu - redis_cpu - wrk.wrk_cpu, 0.0)
        self.offset += wrk.requests

        def delta(name: str) -> float:
            return m1.get(name, 0.0) - m0.get(name, 0.0)

        outcomes = {
            o: delta(f"unicorn_cache_requests_total{{outcome={o}}}")
            for o in ("hit", "miss", "bypass")
        }
        total = sum(outcomes.values())
        purity = outcomes[intended] / total if intended and total else float("nan")
        scored = delta("unicorn_candidates_per_request_count{}")
        candidates = (
            delta("unicorn_candidates_per_request_sum{}") / scored if scored else float("nan")
        )
        row = HttpRow(
            bundle=bundle,
            n=n,
            task=task,
            case=case,
            backend=backend,
            workers=workers,
            conc=conc,
            p50=wrk.p50_ms,
            p99=wrk.p99_ms,
            rps=wrk.rps,
            errors=wrk.errors,
            wrk_cpu=wrk.wrk_cpu,
            server_cpu=server_cpu,
            purity=purity,
            candidates=candidates,
            outcomes=outcomes,
            extra={
                "redis_cpu": redis_cpu if backend == "redis" else 0.0,
                "worker_cpu": [(b - a) / secs for a, b in zip(w0, w1, strict=True)],
                "other_cpu": other_cpu,
                **extra,
            },
        )
        self.res.http.append(row)
        self.say(
            f"http {bundle} N={n} {task:<14} {case:<7} {backend:<6} w{workers} c{conc:<2} "
            f"p50 {row.p50:7.2f} p99 {row.p99:7.2f} ms {row.rps:7.0f} rps err {row.errors} "
            f"wrk {row.wrk_cpu:.2f} srv {row.server_cpu:.2f} "
            f"({'+'.join(f'{x:.2f}' for x in row.extra['worker_cpu'])}) "
            f"other {other_cpu:.2f} purity {purity:.3f} "
            f"{'' if not purity < 0.99 else outcomes} "
            f"{' '.join(f'{k}={v}' for k, v in extra.items())}"
        )
        return row

    def warm(self, server: Any, route: str, bodies: Path, seconds: int = 0, conc: int = 32) -> None:
        """``seconds`` = 0: a few requests (connections, first-call costs); > 0: a wrk run
        of that length, which caches every hit body in every worker."""
        from loadtest.httpbench import http_json, run_wrk

        if seconds <= 0:
            for line in bodies.read_text().splitlines()[:8]:
                http_json(server.url + route, json.loads(line))
            return
        run_wrk(server.url + route, bodies, conc, seconds, self.offset)

    def record_rss(self, server: Any, bundle: str, backend: str, case: str) -> None:
        rss = server.rss_mib()
        self.res.rss.append(
            {
                "bundle": bundle,
                "workers": len(rss),
                "backend": backend,
                "case": case,
                "rss_mib": rss,
            }
        )


def run_http_grid(runner: HttpRunner, bundle: str, path: Path, plan: Plan) -> None:
    """Item 4: every task, miss and hit, memory and Redis, concurrency x workers, at N=500."""
    from loadtest.floor import FLOOR_PATH
    from loadtest.workload import TASKS

    for workers in plan.workers:
        for backend in plan.backends:
            for case in ("miss", "hit"):
                with runner.server(path, TARGET_N, case, backend, workers) as server:
                    if case == "hit" and backend == "memory":
                        floor_bodies = runner.bodies_file(bundle, path, "search", "hit")
                        assert floor_bodies is not None
                        runner.warm(server, FLOOR_PATH, floor_bodies)
                        for conc in plan.concurrency:
                            runner.cell(
                                server,
                                FLOOR_PATH,
                                floor_bodies,
                                conc,
                                bundle=bundle,
                                n=TARGET_N,
                                task="-",
                                case="floor B",
                                backend="-",
                                workers=workers,
                                intended=None,
                            )
                    for task in TASKS:
                        bodies = runner.bodies_file(bundle, path, task, case)
                        if bodies is None:
                            continue
                        # Hits: every body must be cached in every worker before timing.
                        runner.warm(server, "/rank", bodies, workers if case == "hit" else 0)
                        for conc in plan.concurrency:
                            runner.cell(
                                server,
                                "/rank",
                                bodies,
                                conc,
                                bundle=bundle,
                                n=TARGET_N,
                                task=task,
                                case=case,
                                backend=backend,
                                workers=workers,
                                intended=case,
                            )
                    runner.record_rss(server, bundle, backend, case)


def run_http_candidates(runner: HttpRunner, bundle: str, path: Path, plan: Plan) -> None:
    """/rank search at 100 and 1000 candidates (500 is in the grid): 1 worker, memory."""
    for n in (100, 1000):
        for case in ("miss", "hit"):
            with runner.server(path, n, case, "memory", 1) as server:
                bodies = runner.bodies_file(bundle, path, "search", case)
                assert bodies is not None
                runner.warm(server, "/rank", bodies, 1 if case == "hit" else 0)
                for conc in (1, 8):
                    runner.cell(
                        server,
                        "/rank",
                        bodies,
                        conc,
                        bundle=bundle,
                        n=n,
                        task="search",
                        case=case,
                        backend="memory",
                        workers=1,
                        intended=case,
                    )


def run_http_options(runner: HttpRunner, bundle: str, path: Path, plan: Plan) -> None:
    """Micro-batching, loop/parser, intra-op threads: search, N=500."""
    from loadtest.floor import FLOOR_PATH

    bodies = runner.bodies_file(bundle, path, "search", "miss")
    hit_bodies = runner.bodies_file(bundle, path, "search", "hit")
    assert bodies is not None and hit_bodies is not None

    def measure(option: str, value: Any, workers: int, case: str, concs: Iterable[int],
                **settings: Any) -> None:  # fmt: skip
        """Search cells at N=500 on a server with ``settings``, labelled ``option=value``."""
        cell_bodies = bodies if case == "miss" else hit_bodies
        with runner.server(path, TARGET_N, case, "memory", workers, **settings) as server:
            runner.warm(server, "/rank", cell_bodies, *((1,) if case == "hit" else ()))
            for conc in concs:
                runner.cell(
                    server,
                    "/rank",
                    cell_bodies,
                    conc,
                    bundle=bundle,
                    n=TARGET_N,
                    task="search",
                    case=case,
                    backend="memory",
                    workers=workers,
                    intended=case,
                    option=option,
                    value=value,
                )

    # Micro-batching: 0 = inline (the default); 0.01 ms = a thread-pool hop that batches
    # only what is already queued; 1 and 2 ms = real batching windows.
    for workers, window in itertools.product((1, 2), (0.0, 0.01, 1.0, 2.0)):
        measure("batch_window_ms", window, workers, "miss", runner.plan.concurrency,
                batch_window_ms=window)  # fmt: skip
    # The event loop on scored requests (the cells below measure it on hits and Floor B).
    for loop in ("asyncio", "uvloop"):
        measure("event_loop", loop, 1, "miss", (1, 8), event_loop=loop)
    for loop, http in (("asyncio", "httptools"), ("uvloop", "httptools"), ("asyncio", "h11")):
        with runner.server(
            path, TARGET_N, "hit", "memory", 1, http=http, event_loop=loop
        ) as server:
            runner.warm(server, "/rank", hit_bodies, 1)
            for route, case, b in (
                (FLOOR_PATH, "floor B", hit_bodies),
                ("/rank", "hit", hit_bodies),
            ):
                for conc in (1, 32):
                    runner.cell(
                        server,
                        route,
                        b,
                        conc,
                        bundle=bundle,
                        n=TARGET_N,
                        task="search" if case == "hit" else "-",
                        case=case,
                        backend="memory",
                        workers=1,
                        intended="hit" if case == "hit" else None,
                        option="loop/http",
                        value=f"{loop}+{http}",
                    )
    for threads in (1, 2):
        measure("ort_intra_op_threads", threads, 2, "miss", (1, 8), ort_intra_op_threads=threads)
    # One JSON access-log line per request (INFO, the default) against none (WARNING).
    for level in ("INFO", "WARNING"):
        measure("log_level", level, 1, "hit", (1, 32), log_level=level)


def run_scale(
    res: Results, runner: HttpRunner, plan: Plan, small: Path, big: Path, say: Callable[[str], None]
) -> None:
    """Item 5: default world vs the 1M-user / 100k-entity world, same N, interleaved."""
    from app.core.bundle import load_bundle
    from loadtest.httpbench import BLAS_ENV
    from loadtest.inprocess import Dist
    from loadtest.workload import TASKS, rank_query, request_bodies

    bundles = {"demo": load_bundle(small), "big": load_bundle(big)}
    from app.core.ranking import Ranker

    perf = time.perf_counter
    for n in CANDIDATE_COUNTS:
        for task in TASKS:
            rankers = {k: Ranker(b, max_retrieved=n) for k, b in bundles.items()}
            queries = {
                k: [rank_query(x) for x in request_bodies(b, task, 64, seed=5)]
                for k, b in bundles.items()
            }
            for k in bundles:  # warm
                for q in queries[k][:8]:
                    rankers[k].rank(q)
            times: dict[str, list[float]] = {k: [] for k in bundles}
            for i in range(plan.reps):
                order = ("demo", "big") if i % 2 == 0 else ("big", "demo")
                for k in order:
                    q = queries[k][i % len(queries[k])]
                    t = perf()
                    rankers[k].rank(q)
                    times[k].append(perf() - t)
            d = {k: Dist.of(v) for k, v in times.items()}
            res.scale.append(
                {
                    "where": "in-process",
                    "n": n,
                    "task": task,
                    "demo_p50": d["demo"].p50,
                    "demo_p99": d["demo"].p99,
                    "big_p50": d["big"].p50,
                    "big_p99": d["big"].p99,
                }
            )
            say(
                f"scale in-process N={n} {task}: demo {d['demo'].p50:.2f}/{d['demo'].p99:.2f} "
                f"big {d['big'].p50:.2f}/{d['big'].p99:.2f} ms"
            )
    # HTTP: both servers up at once, short runs alternating, median of the rounds; the
    # service as shipped, and with numpy's BLAS limited to one thread.
    for variant, env in (("as shipped", None), ("1 BLAS thread", dict.fromkeys(BLAS_ENV, "1"))):
        run_scale_http(res, runner, plan, small, big, variant, env, say)
    # Two workers on the big bundle: RSS per worker.
    with runner.server(big, TARGET_N, "hit", "memory", 2) as s:
        runner.record_rss(s, "big", "memory", "idle")


def run_scale_http(
    res: Results,
    runner: HttpRunner,
    plan: Plan,
    small: Path,
    big: Path,
    variant: str,
    env: dict[str, str] | None,
    say: Callable[[str], None],
) -> None:
    from loadtest.httpbench import run_wrk
    from loadtest.workload import TASKS

    with (
        runner.server(small, TARGET_N, "miss", "memory", 1, env=env) as s_small,
        runner.server(big, TARGET_N, "miss", "memory", 1, env=env) as s_big,
    ):
        servers = {"demo": (s_small, small), "big": (s_big, big)}
        for task in TASKS:
            maybe = {k: runner.bodies_file(k, p, task, "miss") for k, (_, p) in servers.items()}
            files = {k: f for k, f in maybe.items() if f is not None}
            if len(files) < len(servers):
                continue
            for k, (s, _) in servers.items():
                runner.warm(s, "/rank", files[k])
            for conc in (1, 8):
                rounds: dict[str, list[Any]] = {"demo": [], "big": []}
                for r in range(3):
                    order = ("demo", "big") if r % 2 == 0 else ("big", "demo")
                    for k in order:
                        url = servers[k][0].url + "/rank"
                        seconds = max(1, round(plan.seconds / 2))
                        rounds[k].append(run_wrk(url, files[k], conc, seconds, r * 97))
                entry: dict[str, Any] = {
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
                say(
                    f"scale http ({variant}) N={TARGET_N} {task} c{conc}: demo "
                    f"{entry['demo_p50']:.2f}/{entry['demo_p99']:.2f} big "
                    f"{entry['big_p50']:.2f}/{entry['big_p99']:.2f} ms"
                )
        for k, (s, _) in servers.items():
            runner.record_rss(s, k, "memory", f"miss (scale, {variant})")


# --- main ----------------------------------------------------------------------------------
def limit_blas_threads() -> None:
    """One BLAS thread in this process, set before numpy loads: the in-process numbers then
    match a serving process configured as docs/BENCHMARKS.md recommends, and a bundle's
    multi-threaded mat-vec cannot spin into the next measurement. Servers started by the
    benchmark do NOT inherit this (``loadtest.httpbench.BenchServer``)."""
    if "numpy" in sys.modules:
        raise RuntimeError("limit_blas_threads() must run before numpy is imported")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def main(argv: list[str] | None = None) -> int:
    limit_blas_threads()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="demo bundle only, 1 s cells (~4 min)")
    parser.add_argument(
        "--seconds", type=int, help="seconds per timed wrk cell (default 2, quick 1)"
    )
    parser.add_argument(
        "--bundles", nargs="+", choices=["demo", "ml", "big"], help="bundles to measure"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md", help="report file")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only re-render the report of a saved run"
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "reports/bench.json", help="raw results"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["inprocess", "sessions", "http", "options", "scale"],
        choices=["inprocess", "sessions", "http", "options", "scale"],
    )
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick, args.seconds, args.bundles)
    os.chdir(ROOT)
    if args.render is not None:
        from loadtest.report import load_results

        saved = load_results(args.render)
        text = render(saved, plan.seconds)
        print(text)
        if not args.no_write:
            write_generated(args.out, text)
        return 0
    command = "python -m loadtest.bench" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv or sys.argv[1:])
        else ""
    )
    res = Results(
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        command=os.environ.get("BENCH_COMMAND", command),
        machine=machine_info(),
    )
    started = time.perf_counter()

    def say(line: str) -> None:
        print(line, flush=True)

    def note(line: str) -> None:
        res.log.append(line)
        say(line)

    specs = bundle_specs()
    paths: dict[str, Path] = {}
    for name in plan.bundles:
        path = ensure_bundle(specs[name], note)
        if path is not None:
            paths[name] = path
            res.bundle_info[name] = bundle_summary(name, path)
    measured = {k: v for k, v in paths.items() if k != "big"}

    if "inprocess" in args.sections:
        run_inprocess(res, plan, measured, say)
    if "sessions" in args.sections and "demo" in paths:
        run_sessions(res, plan, paths["demo"], say)
    if "options" in args.sections and "demo" in paths:
        run_serialisation(res, paths["demo"])
    with tempfile.TemporaryDirectory(prefix="unicorn-bench-") as tmp:
        runner = HttpRunner(res, plan, Path(tmp), say)
        try:
            if "http" in args.sections:
                for name, path in measured.items():
                    run_http_grid(runner, name, path, plan)
                    run_http_candidates(runner, name, path, plan)
            if "options" in args.sections and "demo" in paths:
                run_http_options(runner, "demo", paths["demo"], plan)
            if "scale" in args.sections and "demo" in paths:
                if "big" in paths:
                    run_scale(res, runner, plan, paths["demo"], paths["big"], say)
                else:
                    note("scale: bundles/big not measured (add `--bundles ... big`)")
        finally:
            runner.close()

    res.seconds = time.perf_counter() - started
    res.machine["load_at_end"] = os.getloadavg()
    text = render(res, plan.seconds)
    print("\n" + text)
    if not args.no_write:
        write_generated(args.out, text)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(res), indent=1, default=str))
        print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
