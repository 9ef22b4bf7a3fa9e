"""What an optional HTTP layer costs a cache hit, without sockets or wrk: the app called
directly over ASGI, the default app and the app with the layer on alternating in rounds,
so both see the same machine (docs/BENCHMARKS.md, "Settings chosen by measurement").

    .venv/bin/python -m loadtest.asgi_overhead          # CORS, gzip, tracing, variants
    .venv/bin/python -m loadtest.asgi_overhead --rounds 40 --calls 500

The request is what a browser page sends: a search with ``Origin`` and ``Accept-Encoding:
gzip``; its 20-item answer (~2.2 KB) stays under the gzip threshold, so the figure is the
layer's own cost on every request, not compression.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from app.http.main import create_app
from app.serving.config import Settings

BODY = json.dumps(
    {"task": "search", "query": "sta", "country": "US", "user_id": "u1", "k": 20}
).encode()
ORIGIN = "https://app.example.com"
LAYERS: dict[str, dict[str, Any]] = {
    "default (CORS off, gzip off)": {},
    "CORS on": {"cors_origins": ORIGIN},
    "gzip layer on (4096)": {"gzip_min_bytes": 4096},
    # every request traced (ratio 1); the collector is a closed port, so the export thread
    # fails in the background and the spans are dropped: the request path's cost alone
    "tracing on": {"otlp_endpoint": "http://127.0.0.1:9/v1/traces"},
    # two variants of the bundle, half the members each: the split's hash per request
    "variants on (2)": {"variants": "a={bundle},b={bundle}:50"},
}  # the shadow runs in a process of its own: make bench's shadow cells measure it


def scope() -> dict[str, Any]:
    headers = [
        (b"host", b"unicorn"), (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip"), (b"origin", ORIGIN.encode()),
        (b"content-length", str(len(BODY)).encode()),
    ]  # fmt: skip
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/rank", "raw_path": b"/rank", "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip


async def call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope(), receive, send)
    return sent


async def measure(bundle: Path, rounds: int, calls: int) -> dict[str, list[float]]:
    async with AsyncExitStack() as stack:
        apps = {}
        for name, extra in LAYERS.items():
            extra = {k: v.format(bundle=bundle) if isinstance(v, str) else v
                     for k, v in extra.items()}  # fmt: skip
            app = create_app(Settings(bundle=bundle, log_level="WARNING", **extra))
            await stack.enter_async_context(app.router.lifespan_context(app))
            for _ in range(200):  # warm: the first call scores, the rest are hits
                sent = await call(app)
            assert sent[0]["status"] == 200, sent[0]
            apps[name] = app
        per_call: dict[str, list[float]] = {name: [] for name in apps}
        for _ in range(rounds):
            for name, app in apps.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    await call(app)
                per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
        return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200, help="calls per app and round")
    args = parser.parse_args()
    per_call = asyncio.run(measure(args.bundle, args.rounds, args.calls))
    base = statistics.median(next(iter(per_call.values())))
    print("| app | median µs per hit | best | vs default |\n|---|---:|---:|---:|")
    for name, values in per_call.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
