"""OpenTelemetry spans of ``POST /rank`` (docs/OPERATIONS.md, "Tracing"): off unless
``UNICORN_OTLP_ENDPOINT`` is set, and then imported and built at start only.

One SERVER span per request, ``POST /rank``, a child of the caller's W3C ``traceparent``
when it sends one, with one child span per stage the request went through: ``parse``,
``impute``, ``cache`` (each get and set), ``admission`` (the wait for a scoring slot),
``retrieve``, ``features``, ``score``, ``top_k``. The stages are stamped with
``perf_counter`` as the request runs (``RankOutcome.stages``) and the spans are made from
the stamps once the answer is built, so the answer never waits for the tracer; a
``BatchSpanProcessor`` exports them over OTLP/HTTP from its own thread, and drops spans
when its queue is full rather than block. Sampling: ``UNICORN_TRACE_SAMPLE_RATIO`` of the
traces that start here, and whatever the caller decided for those that do not
(parent-based).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

Stage = tuple[str, float, float]  # name, start and end (time.perf_counter seconds)
SERVICE_NAME = "unicorn-ranking"


class Tracing:
    """The service's tracer; ``record`` turns one request's stamps into spans."""

    def __init__(
        self, endpoint: str | None, sample_ratio: float = 1.0, exporter: Any | None = None
    ) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:  # pragma: no cover - the serving install has them
            raise RuntimeError(f"tracing needs opentelemetry-sdk ({exc})") from exc
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, timeout=2)
        self._trace = trace
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("app.serving.tracing")
        self.propagator = TraceContextTextMapPropagator()
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def _ns(self, perf_seconds: float) -> int:
        return int(perf_seconds * 1e9) + self._offset_ns

    def record(
        self,
        headers: Mapping[str, str],
        name: str,
        start: float,
        end: float,
        stages: Sequence[Stage],
        attributes: Mapping[str, str | int | bool],
    ) -> None:
        """The request's span and its stages' spans, from ``perf_counter`` stamps."""
        parent = self.propagator.extract(headers)
        kind = self._trace.SpanKind.SERVER
        span = self.tracer.start_span(
            name, context=parent, kind=kind, start_time=self._ns(start), attributes=attributes
        )
        inside = self._trace.set_span_in_context(span)
        if span.is_recording():
            for stage, s, e in stages:
                self.tracer.start_span(stage, context=inside, start_time=self._ns(s)).end(
                    end_time=self._ns(e)
                )
        span.end(end_time=self._ns(end))

    def close(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop."""
        self.provider.shutdown()
