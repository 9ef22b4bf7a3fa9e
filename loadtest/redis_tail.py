"""Redis cache hits against in-process cache hits over HTTP (issue #13 item 4).

    python -m loadtest.redis_tail [--rounds 3] [--seconds 2] [--conc 1 8 32]
        [--before-cache OLD_CACHE_PY] [--variants redis-gc-off memory-gc-off] [--probe]

Starts a throwaway redis-server and one server per variant (``app.http.server`` on the
demo bundle, through this module's ``serve`` entry point): ``memory`` (the in-process
cache) and ``redis`` (``redis_url`` set); with ``--before-cache`` also ``redis-before``,
the same with ``app.serving.cache`` loaded from that file instead (e.g. ``git show
HEAD:app/serving/cache.py > /tmp/old.py``), so a change is measured against what it
replaces in the same run; ``--variants`` adds servers with the cyclic garbage collector
off (``gc.disable()``: what the collector costs). Every server is warmed with every body
wrk will send (each timed request is a hit), then ``wrk`` POSTs those bodies at each
concurrency, the variants taking turns cell by cell (the order rotates each round), so a
noisy machine hurts them alike. Prints every cell (p50/p99 from wrk's latency histogram,
hit purity from the server's own counters) and, per concurrency, the median over the
rounds and the median of the per-round p99 ratios to ``memory`` (the goal: Redis <= 2x).

``--probe`` also records in each server process: every garbage collection and its pause
(by generation), the cache ``get`` durations, event-loop lateness (a 1 ms sleeper), and
the cyclic garbage that one second of wrk c8 hits leaves (``gc.DEBUG_SAVEALL``: objects
only the cyclic collector frees, by type); printed after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import processes
from loadtest.processes import ROOT, RedisServer, ServiceProcess, run_wrk

PROBE_ENV = "UNICORN_TAIL_PROBE"  # the serve entry point: install the probes
CACHE_SOURCE_ENV = "UNICORN_TAIL_CACHE_SOURCE"  # and load app.serving.cache from this file
GC_ENV = "UNICORN_TAIL_GC"  # and "off": run without the cyclic garbage collector
# name -> (cache backend, GC mode); ``redis-before`` also needs ``--before-cache``.
VARIANTS: dict[str, tuple[str, str]] = {
    "redis": ("redis", ""),
    "memory": ("memory", ""),
    "redis-before": ("redis", ""),
    "redis-gc-off": ("redis", "off"),
    "memory-gc-off": ("memory", "off"),
}


def _outcomes(server: ServiceProcess) -> dict[str, float]:
    text = server.metrics()
    return {
        o: processes.metric(text, "unicorn_cache_requests_total", outcome=o)
        for o in ("hit", "miss", "bypass")
    }


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from app.core.bundle import load_bundle
    from loadtest.request_bodies import request_bodies

    bundle = load_bundle(ROOT / args.bundle)
    variants = list(dict.fromkeys(["redis", "memory", *args.variants]))
    if args.before_cache:
        variants.append("redis-before")
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="tail-") as tmp:
        work = Path(tmp)
        redis_server = RedisServer().start()
        stack.callback(redis_server.stop)
        bodies = processes.write_bodies(
            work / "hits.jsonl", request_bodies(bundle, args.task, args.bodies, seed=11)
        )
        servers: dict[str, ServiceProcess] = {}
        for db, variant in enumerate(variants):
            settings: dict[str, Any] = {
                "bundle": ROOT / args.bundle,
                "max_retrieved": 500,
                "cache_ttl_seconds": 3600.0,
                "log_level": args.log_level,
            }
            backend, gc_mode = VARIANTS[variant]
            env: dict[str, str] = {GC_ENV: gc_mode}
            if backend == "redis":
                settings["redis_url"] = f"redis://127.0.0.1:{redis_server.port}/{db}"
            if variant == "redis-before":
                env[CACHE_SOURCE_ENV] = str(Path(args.before_cache).resolve())
            if args.probe:
                env[PROBE_ENV] = "1"
            proc = ServiceProcess(
                settings,
                log_path=work / f"{variant}.log",
                module="loadtest.redis_tail",
                args=("serve",),
                env=env,
            )
            servers[variant] = stack.enter_context(proc)
        for variant, server in servers.items():  # every body cached, connections warm
            for line in bodies.read_text().splitlines():
                server.post("/rank", content=line).raise_for_status()
            run_wrk(server.url + "/rank", bodies, 32, 1)
            if args.probe:
                server.post("/__probe__/garbage?start=true")
                wrk = run_wrk(server.url + "/rank", bodies, 8, 1)
                garbage = server.post("/__probe__/garbage").json()
                print(
                    f"--- cyclic garbage, {variant}, {wrk.requests} requests (wrk c8 1 s): "
                    f"{json.dumps(garbage)}",
                    flush=True,
                )
                server.post("/__probe__/reset")
        offset = 0
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for conc in args.conc:
                for variant in order:
                    server = servers[variant]
                    before = _outcomes(server)
                    wrk = run_wrk(server.url + "/rank", bodies, conc, args.seconds, offset)
                    after = _outcomes(server)
                    offset += wrk.requests
                    total = sum(after.values()) - sum(before.values()) or float("nan")
                    row = {
                        "round": r,
                        "variant": variant,
                        "conc": conc,
                        "p50": wrk.p50_ms,
                        "p99": wrk.p99_ms,
                        "rps": wrk.rps,
                        "errors": wrk.errors,
                        "purity": (after["hit"] - before["hit"]) / total,
                    }
                    rows.append(row)
                    print(
                        f"round {r} c{conc:<2} {variant:12}: p50 {wrk.p50_ms:6.2f} p99 "
                        f"{wrk.p99_ms:6.2f} ms {wrk.rps:6.0f} req/s purity "
                        f"{row['purity']:.3f} errors {wrk.errors}",
                        flush=True,
                    )
        if args.probe:
            for variant, server in servers.items():
                stats = server.get("/__probe__/stats").json()
                print(f"--- probe {variant}: {json.dumps(stats)}")
    return rows


def summarise(rows: list[dict[str, Any]], concs: list[int]) -> str:
    """Per concurrency and variant: median p50, p99 over the rounds, and the median of
    the per-round p99 ratios to ``memory`` (cells of the same round ran back to back)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "| conc | variant | p50 ms | p99 ms | p99 / memory p99 (median of rounds) |",
        "|---|---|---|---|---|",
    ]
    for conc, variant in ((c, v) for c in concs for v in variants):
        mine = {r["round"]: r for r in rows if r["variant"] == variant and r["conc"] == conc}
        memory = {r["round"]: r for r in rows if r["variant"] == "memory" and r["conc"] == conc}
        ratio = statistics.median(mine[k]["p99"] / memory[k]["p99"] for k in mine)
        lines.append(
            f"| {conc} | {variant} | {statistics.median(r['p50'] for r in mine.values()):.2f} "
            f"| {statistics.median(r['p99'] for r in mine.values()):.2f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


# --- the servers' entry point (``python -m loadtest.redis_tail serve``) --------------------
def serve() -> None:
    """``app.http.server``'s ``run`` with the settings from ``UNICORN_*``; with
    ``CACHE_SOURCE_ENV`` set, ``app.serving.cache`` is that file; with ``PROBE_ENV`` set,
    the probes are installed (``/__probe__/*`` routes)."""
    source = os.environ.get(CACHE_SOURCE_ENV)
    if source:
        import importlib.util

        import app.serving

        spec = importlib.util.spec_from_file_location("app.serving.cache", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["app.serving.cache"] = module
        spec.loader.exec_module(module)
        app.serving.cache = module
    if os.environ.get(PROBE_ENV):
        _install_probes()
    gc_mode = os.environ.get(GC_ENV, "")
    if gc_mode == "off":
        import gc

        gc.disable()

    from app.http.server import run
    from app.serving.config import Settings

    run(Settings())


def _install_probes() -> None:
    import asyncio
    import gc

    from app.http import main as http_main
    from app.serving import cache as cache_module

    stats: dict[str, list[float]] = {"gc2_ms": [], "gc01_ms": [], "get_ms": [], "late_ms": []}
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            key = "gc2_ms" if info["generation"] == 2 else "gc01_ms"
            stats[key].append((time.perf_counter() - gc_started[0]) * 1000)

    gc.callbacks.append(on_gc)
    original_get = cache_module.ClusterCache.get

    async def timed_get(self: Any, key: str) -> Any:
        t0 = time.perf_counter()
        try:
            return await original_get(self, key)
        finally:
            stats["get_ms"].append((time.perf_counter() - t0) * 1000)

    cache_module.ClusterCache.get = timed_get  # type: ignore[method-assign]

    async def sleeper() -> None:  # how late a 1 ms sleep wakes up (over 2 ms only)
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            late = (loop.time() - t0 - 0.001) * 1000
            if late > 2:
                stats["late_ms"].append(late)

    original_create = http_main.create_app

    def create_app(settings: Any = None) -> Any:
        app = original_create(settings)

        @app.post("/__probe__/reset")
        async def reset() -> dict[str, bool]:
            for values in stats.values():
                values.clear()
            if getattr(app.state, "probe_sleeper", None) is None:
                app.state.probe_sleeper = asyncio.get_running_loop().create_task(sleeper())
            return {"ok": True}

        @app.get("/__probe__/stats")
        async def summary() -> dict[str, Any]:
            def describe(values: list[float]) -> dict[str, float]:
                if not values:
                    return {"n": 0}
                s = sorted(values)
                return {"n": len(s), "p50": round(s[len(s) // 2], 3),
                        "p99": round(s[int(len(s) * 0.99)], 3), "max": round(s[-1], 3),
                        "over_5ms": sum(v > 5 for v in s)}  # fmt: skip

            return {k: describe(v) for k, v in stats.items()}

        @app.get("/__probe__/heap")
        async def heap() -> dict[str, Any]:
            """Live GC-tracked objects by type, the collector's counts and per-generation
            collection totals."""
            counts: dict[str, int] = {}
            for obj in gc.get_objects():
                counts[type(obj).__qualname__] = counts.get(type(obj).__qualname__, 0) + 1
            return {"types": counts, "count": gc.get_count(), "stats": gc.get_stats()}

        @app.post("/__probe__/garbage")
        async def garbage(start: bool = False) -> dict[str, Any]:
            """The cyclic garbage left since ``?start=true`` (which keeps, from then on,
            what the collector frees), its types counted; a call without it stops that."""
            gc.collect()
            counts: dict[str, int] = {}
            for obj in gc.garbage:
                counts[type(obj).__qualname__] = counts.get(type(obj).__qualname__, 0) + 1
            gc.garbage.clear()
            gc.set_debug(gc.DEBUG_SAVEALL if start else 0)
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:20]
            return {"objects": sum(counts.values()), "types": dict(top)}

        return app

    http_main.create_app = create_app


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve()
        return 0
    parser = argparse.ArgumentParser(prog="python -m loadtest.redis_tail", description=__doc__)
    add = parser.add_argument
    add("--bundle", default="bundles/demo")
    add("--task", default="search")
    add("--bodies", type=int, default=100, help="distinct hit bodies (the benchmark's 100)")
    add("--rounds", type=int, default=3)
    add("--seconds", type=int, default=2)
    add("--conc", type=int, nargs="+", default=[1, 8, 32])
    add("--log-level", default="INFO")
    add("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="also measure these")
    add("--before-cache", type=Path, help="also measure app.serving.cache loaded from this file")
    add("--probe", action="store_true", help="record stalls, GC and cache gets in the servers")
    add("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = measure(args)
    print(summarise(rows, args.conc))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
