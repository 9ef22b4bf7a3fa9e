"""The documented Locust run: ``unicorn serve`` with 2 workers + Redis, members at a fixed
arrival rate for 2 minutes, p50/p99 per task and cache outcome, failures, and how often
p99 exceeds 25 ms.

    python -m loadtest.locust_run                    # defaults below
    python -m loadtest.locust_run --users 120 --time 2m --bundle bundles/demo

It starts a throwaway redis-server and ``python -m app.http.server`` on free ports, runs
``locust`` headless (``loadtest/locustfile.py``) with CSV + HTML reports under
``reports/``, then prints a markdown summary and writes it into the Locust block of
``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from loadtest.markdown import table, write_block
from loadtest.processes import ROOT, RedisServer, ServiceProcess, metric_samples

Latency = dict[str, tuple[float, float, float]]


def server_latency(before: str, after: str) -> Latency:
    """``/rank <task> [<cache>]`` -> (count, p50 ms, p99 ms) of the calls between two
    ``/metrics`` texts, from the latency histogram (summed over personalization levels)."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for text, sign in ((after, 1.0), (before, -1.0)):
        for labels, value in metric_samples(text, "unicorn_rank_latency_seconds_bucket"):
            name = f"/rank {labels['task']} [{labels['cache']}]"
            buckets[name][float(labels["le"])] += sign * value
    out: Latency = {}
    for name, cumulative in buckets.items():
        total = cumulative[max(cumulative)]
        if total > 0:
            out[name] = (total, _quantile(cumulative, 0.5), _quantile(cumulative, 0.99))
    return out


def _quantile(cumulative: dict[float, float], q: float) -> float:
    """Linear interpolation inside the bucket holding the q-quantile (as PromQL does), ms."""
    bounds = sorted(cumulative)
    rank, lower, below = q * cumulative[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if cumulative[le] >= rank:
            if le == float("inf"):
                return lower * 1000.0
            inside = cumulative[le] - below
            return (lower + (le - lower) * (rank - below) / inside if inside else le) * 1000.0
        lower, below = le, cumulative[le]
    return lower * 1000.0


def run_locust(args: argparse.Namespace) -> dict[str, Any]:
    """Redis, the service and a headless Locust run; what the summary reports."""
    prefix, slo_path = args.reports / "locust", args.reports / "locust_slo.json"
    redis = RedisServer().start()
    settings = {"bundle": args.bundle, "redis_url": redis.url, "workers": args.workers}
    try:
        with ServiceProcess(settings, log_path=args.reports / "locust_server.log") as server:
            cmd = [
                sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py"),
                "--headless", "--host", server.url, "-u", str(args.users),
                "-r", f"{args.spawn_rate:g}", "-t", args.time, "--stop-timeout", "5",
                "--csv", str(prefix), "--html", f"{prefix}.html", "--slo-ms", f"{args.slo_ms:g}",
                "--slo-report", str(slo_path), "--only-summary", "--reset-stats",
            ]  # fmt: skip
            print("$ " + shlex.join(cmd), flush=True)
            cpu0, redis0 = server.cpu_seconds(), redis.cpu_seconds()
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT)
            # Locust forgets the ramp-up (--reset-stats); so does the server-side view.
            time.sleep(args.users / args.spawn_rate + 1.0)
            ramped = server.metrics()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            return {
                "exit_code": os.waitstatus_to_exitcode(status),
                "server_cpu": (server.cpu_seconds() - cpu0) / wall,
                "redis_cpu": (redis.cpu_seconds() - redis0) / wall,
                "locust_cpu": (usage.ru_utime + usage.ru_stime) / wall,
                "rss": server.rss_mib(),
                "server_side": server_latency(ramped, server.metrics()),
                "names": json.loads(slo_path.read_text())["names"],
            }
    finally:
        redis.stop()


def summary(args: argparse.Namespace, run: dict[str, Any], command: str) -> str:
    names, over = run["names"], f"> {args.slo_ms:g} ms"
    rows = [
        [name, int(s["requests"]), float(s["rps"]), s["p50_ms"], s["p99_ms"], int(s["failures"]),
         f"{s['share_over_slo']:.2%}", f"{s['share_of_seconds_p99_over_slo']:.1%}"]
        for name, s in names.items()
    ]  # fmt: skip
    failures = sum(int(s["failures"]) for n, s in names.items() if n != "Aggregated")
    text = (
        f"Run {time.strftime('%Y-%m-%d %H:%M')}: `{command}`\n\n`unicorn serve --workers "
        f"{args.workers} --redis-url ...` on {args.bundle.name}; {args.users} members (spawned at "
        f"{args.spawn_rate:g}/s; statistics reset once all have started) for {args.time} "
        f"({names['Aggregated']['rps']:.1f} req/s arrival rate); locust exit code "
        f"{run['exit_code']}; failures {failures}. CPU (cores): server {run['server_cpu']:.2f}, "
        f"redis {run['redis_cpu']:.2f}, locust {run['locust_cpu']:.2f}; RSS per worker "
        f"{', '.join(f'{x:.0f}' for x in run['rss'])} MiB. Latencies (ms) measured by Locust's "
        f"client, percentiles from Locust's own statistics (which keep response times in whole "
        f"ms below 100 ms); `{over}` = share of requests slower than that, `s p99 {over}` = "
        f"share of one-second windows whose p99 was above it.\n\n"
        + table(f"request|count|req/s|p50|p99|failures|{over}|s p99 {over}", rows, 1)
    )  # fmt: skip
    if run["server_side"]:
        side = [
            [name, int(n), p50, p99] for name, (n, p50, p99) in sorted(run["server_side"].items())
        ]
        text += (
            "\n\nThe same run seen by the server (`unicorn_rank_latency_seconds`, body parse to "
            "response body; quantiles interpolated within the histogram buckets): the gap to "
            "the table above is the client and the network stack, on the same 2 cores.\n\n"
            + table(["request", "count", "p50", "p99"], side, 2)
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.locust_run", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--spawn-rate", type=float, default=50.0)
    parser.add_argument("--time", default="2m")
    parser.add_argument("--slo-ms", type=float, default=25.0)
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    args.reports.mkdir(parents=True, exist_ok=True)
    run = run_locust(args)
    given = sys.argv[1:] if argv is None else argv
    text = summary(args, run, " ".join(["python -m loadtest.locust_run", *given]))
    print("\n" + text)
    if not args.no_write:
        write_block(args.out, "locust", text)
        print(f"wrote {args.out}; reports in {args.reports}/locust*")
    failures = sum(int(s["failures"]) for n, s in run["names"].items() if n != "Aggregated")
    return 0 if run["exit_code"] == 0 and failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
