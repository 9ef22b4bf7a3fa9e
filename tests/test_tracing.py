"""Tracing (app/serving/tracing.py) against a real OTLP/HTTP receiver: a live server sends
a ``POST /rank`` span per request with a span per stage, continues the caller's W3C
``traceparent``, samples as configured, and with no endpoint has no tracer, no export
thread and no exporter imported (FastAPI and redis-py import parts of OpenTelemetry
themselves when it is installed)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import LiveServer

from app.serving.config import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
BODY = {"task": "search", "query": "sta", "country": "US", "k": 5}


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        spans: list[Any] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.spans = spans
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_request_is_a_server_span_with_a_child_per_stage_under_the_callers_trace(
    receiver: Receiver,
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
) -> None:
    server = start_server(settings_for(otlp_endpoint=receiver.url))
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with server.client() as client:
        assert client.post("/rank", json=BODY, headers={"traceparent": traceparent}).is_success
    server.stop()  # the lifespan's close exports what is queued
    (root,) = [s for s in receiver.spans if s.name == "POST /rank"]
    assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value.string_value for a in root.attributes}
    assert attributes["unicorn.task"] == "search" and attributes["unicorn.cache"] == "miss"
    children = [s for s in receiver.spans if s.parent_span_id == root.span_id]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time_unix_nano)]
    assert names[:3] == ["parse", "impute", "cache"]
    for stage in ("admission", "retrieve", "features", "score", "top_k"):
        assert stage in names
    assert names.count("cache") == 2  # the get, then the set of the miss
    for child in children:
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano


def test_sampling_follows_the_ratio_and_a_sampled_caller(
    receiver: Receiver,
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
) -> None:
    server = start_server(settings_for(otlp_endpoint=receiver.url, trace_sample_ratio=0.0))
    with server.client() as client:
        for _ in range(5):  # traces that start here: ratio 0, none recorded
            assert client.post("/rank", json=BODY).is_success
        sampled = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        assert client.post("/rank", json=BODY, headers=sampled).is_success
    server.stop()
    roots = [s for s in receiver.spans if s.name == "POST /rank"]
    assert [s.trace_id.hex() for s in roots] == [TRACE_ID]


@pytest.mark.anyio
async def test_without_an_endpoint_there_is_no_tracer(
    running_app: Any, settings_for: Callable[..., Settings]
) -> None:
    async with running_app(settings_for()) as (app, client):
        assert (await client.post("/rank", json=BODY)).is_success
        assert app.state.served.tracing is None
        assert not [t for t in threading.enumerate() if "Otel" in t.name]
    code = (
        "import sys, asyncio\n"
        "from app.http.main import create_app\n"
        "from app.serving.config import Settings\n"
        "app = create_app(Settings(bundle=sys.argv[1]))\n"
        "async def main():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.exporter')]\n"
    )
    bundle = str(settings_for().bundle)
    done = subprocess.run([sys.executable, "-c", code, bundle], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
