"""The soak: a steady rate of mixed ``/rank`` traffic for a long time against ``unicorn
serve --workers 2`` with Redis. docs/RELIABILITY.md, "Soak", describes the load, the
criteria and the figures.

    .venv/bin/python -m loadtest.soak                                   # 10 min
    .venv/bin/python -m loadtest.soak --minutes 1 --warmup-seconds 0    # a quick look
    .venv/bin/python -m loadtest.soak --write docs/RELIABILITY.md       # update the doc

Exit status 1 when a criterion fails: a failed request; RSS at the end 5% or more above
RSS after the warm-up (medians of 30 s); a minute's p99 after the warm-up above 2x the
median of those minutes' p99.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.open_loop import LoadRunner, Sample, Window, summarise
from loadtest.processes import ROOT, RedisServer, ServiceProcess, metric
from loadtest.request_bodies import mixed_bodies

RSS_EVERY_S, RSS_WINDOW_S = 5.0, 30.0
MAX_RSS_GROWTH, MAX_P99_RATIO = 0.05, 2.0
DISTINCT_BODIES = 5000
CACHE_TTL_S = 30.0  # the hit / miss mix is stationary after one TTL (docs/RELIABILITY.md)


def request_stream(
    bodies: list[dict[str, Any]], rate: float, minutes: float, seed: int = 11
) -> list[dict[str, Any]]:
    """The bodies to send, in order: drawn with replacement, Zipf-distributed (exponent 1)
    over ``bodies`` (a few popular requests, a long tail), one per request of the run."""
    weights = 1.0 / np.arange(1, len(bodies) + 1)
    n = int(rate * minutes * 60.0) + int(rate * 60)  # a minute of spare
    picks = np.random.default_rng(seed).choice(len(bodies), size=n, p=weights / weights.sum())
    return [bodies[i] for i in picks.tolist()]


@dataclass
class SoakResult:
    minutes: list[list[Any]]  # minute, sent, failed, p50, p99, max (ms), cache mix, load avg
    rss: list[tuple[float, int]]  # (seconds into the run, bytes)
    warm_rss: float  # median of the RSS_WINDOW_S after the warm-up
    end_rss: float  # median of the last RSS_WINDOW_S
    total: Window  # the whole run
    warmup_s: float
    server_cpu_s: float

    @property
    def rss_growth(self) -> float:
        return (self.end_rss - self.warm_rss) / self.warm_rss

    @property
    def steady_p99s(self) -> list[float]:
        """The p99 of every minute that starts after the warm-up."""
        return [m[4] for m in self.minutes if (m[0] - 1) * 60.0 >= self.warmup_s]

    @property
    def p99_ratio(self) -> float:
        return max(self.steady_p99s) / statistics.median(self.steady_p99s)

    @property
    def passed(self) -> bool:
        growth_ok, p99_ok = self.rss_growth < MAX_RSS_GROWTH, self.p99_ratio <= MAX_P99_RATIO
        return self.total.failed == 0 and growth_ok and p99_ok


def _rss_median(samples: list[tuple[float, int]], start: float, end: float) -> float:
    values = [rss for t, rss in samples if start <= t < end]
    if not values:
        raise ValueError(f"no RSS sample between {start:.0f} s and {end:.0f} s")
    return float(statistics.median(values))


def run_load(server: ServiceProcess, minutes: float, rate: float, warmup_s: float) -> SoakResult:
    """The open-loop load for ``minutes``; RSS every 5 s, the load average every minute."""
    sample = server.get("/catalogue/sample", params={"n": 1000, "seed": 11}).json()
    bodies = request_stream(mixed_bodies(sample, DISTINCT_BODIES, seed=11), rate, minutes)
    rss: list[tuple[float, int]] = []
    loads: list[float] = []  # the machine's (shared) 1-minute load average, once a minute
    stop, cpu0, duration = threading.Event(), server.cpu_seconds(), minutes * 60.0
    load = LoadRunner(server.url, bodies, rate, timeout_s=30.0).start()

    def watch() -> None:
        while not stop.is_set():
            rss.append((load.now(), server.rss_bytes()))
            stop.wait(RSS_EVERY_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for minute in range(1, math.ceil(minutes) + 1):
        time.sleep(max(0.0, min(minute * 60.0, duration) - load.now()))
        if load.now() >= minute * 60.0:
            loads.append(os.getloadavg()[0])
            w = summarise(list(load.samples), (minute - 1) * 60.0, minute * 60.0)
            print(f"minute {minute}: {w.sent} sent, {w.failed} failed, p99 {w.p99_ms:.1f} ms, "
                  f"RSS {rss[-1][1] / 2**20:.0f} MiB", file=sys.stderr, flush=True)  # fmt: skip
    samples: list[Sample] = load.stop()
    stop.set()
    watcher.join()
    rows = []
    for m in range(round(minutes)):
        w, inside = summarise(samples, m * 60.0, (m + 1) * 60.0), (m * 60.0, (m + 1) * 60.0)
        caches = Counter(s.cache for s in samples if inside[0] <= s.at < inside[1] and s.cache)
        load_avg = loads[m] if m < len(loads) else math.nan
        rows.append([m + 1, w.sent, w.failed, w.p50_ms, w.p99_ms, w.max_ms, caches, load_avg])
    end = samples[-1].at if samples else duration
    return SoakResult(
        rows, rss, _rss_median(rss, warmup_s, warmup_s + RSS_WINDOW_S),
        _rss_median(rss, end - RSS_WINDOW_S, end + RSS_EVERY_S), summarise(samples), warmup_s,
        server.cpu_seconds() - cpu0,
    )  # fmt: skip


def report(
    result: SoakResult, command: str, rate: float, workers: int, bundle: Path, cache_errors: float
) -> str:
    from loadtest.markdown import table

    headers = "minute|requests|failures|p50|p99|max|cache hit / miss / bypass|machine load avg"
    rows = [
        [m, sent, failed, *(f"{x:.1f} ms" for x in (p50, p99, worst)),
         " / ".join(str(caches.get(k, 0)) for k in ("hit", "miss", "bypass")), f"{load:.1f}"]
        for m, sent, failed, p50, p99, worst, caches, load in result.minutes
    ]  # fmt: skip
    p99s, mib, total = result.steady_p99s, [r / 2**20 for _, r in result.rss], result.total
    problems = f" ({total.problems})" if total.problems else ""
    return "\n".join([
        table(headers, rows, align="rrrrrrlr"),
        "",
        f"- **{'PASS' if result.passed else 'FAIL'}**: {total.sent} requests, {total.failed} "
        f"failed{problems}.",
        f"- RSS of the server process tree (supervisor + {workers} workers): "
        f"{result.warm_rss / 2**20:.1f} MiB after the {result.warmup_s:.0f} s warm-up, "
        f"{result.end_rss / 2**20:.1f} MiB at the end: **{result.rss_growth:+.2%}** "
        f"(limit {MAX_RSS_GROWTH:.0%}; medians of {RSS_WINDOW_S:.0f} s; min {min(mib):.1f}, "
        f"max {max(mib):.1f} MiB over the run).",
        f"- Per-minute p99 after the warm-up: median {statistics.median(p99s):.1f} ms, worst "
        f"{max(p99s):.1f} ms (**{result.p99_ratio:.2f}x** the median; limit {MAX_P99_RATIO:g}x).",
        f"- Server CPU: {result.server_cpu_s / (len(result.minutes) * 60.0):.2f} cores on average.",
        f"- Redis cache errors over the run (a healthy Redis: any error is a spurious one, and "
        f"the breaker opens only on failures in a row): **{cache_errors:.0f}**.",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} "
        f"shared cores, load average {os.getloadavg()[0]:.1f} at the end; bundle "
        f"`{bundle.name}`, {workers} workers + Redis, {rate:g} req/s open loop).",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from loadtest.markdown import write_block

    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/demo")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup-seconds", type=float, default=60.0)
    parser.add_argument("--write", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (build one: unicorn build-bundle ...)")
    if args.minutes * 60.0 < args.warmup_seconds + 60.0:
        parser.error("--minutes must leave a minute after the warm-up")
    redis = RedisServer().start()
    settings = {"bundle": args.bundle, "redis_url": redis.url, "workers": args.workers,
                "cache_ttl_seconds": CACHE_TTL_S}  # fmt: skip
    try:
        with ServiceProcess(settings) as server:
            result = run_load(server, args.minutes, args.rate, args.warmup_seconds)
            text = server.metrics()
    finally:
        redis.stop()
    outcomes = ("hit", "miss", "bypass")
    mix = {o: int(metric(text, "unicorn_cache_requests_total", outcome=o)) for o in outcomes}
    print(f"cache outcomes over the run: {mix}", file=sys.stderr)
    command = shlex.join(["python", "-m", "loadtest.soak", *(argv or sys.argv[1:])])
    errors = metric(text, "unicorn_cache_errors_total")
    body = report(result, command, args.rate, args.workers, args.bundle, errors)
    print(body)
    if args.write:
        write_block(args.write, "soak", body)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
