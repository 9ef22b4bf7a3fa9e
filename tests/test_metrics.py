"""Metric names and buckets are the contract dashboards are built on; multiprocess mode
adds up the workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from app.serving.metrics import LATENCY_BUCKETS, ServiceMetrics

CONTRACT = {
    "unicorn_rank_latency_seconds": ("histogram", {"task", "personalization", "cache"}),
    "unicorn_stage_latency_seconds": ("histogram", {"stage"}),
    "unicorn_inference_batch_size": ("histogram", set()),
    "unicorn_candidates_per_request": ("histogram", set()),
    "unicorn_cache_requests": ("counter", {"outcome"}),
    "unicorn_cache_errors": ("counter", {"backend", "operation"}),
    "unicorn_cache_degraded": ("gauge", set()),
    "unicorn_responses": ("counter", {"route", "status"}),
    "unicorn_in_flight_requests": ("gauge", set()),
    "unicorn_shed_requests": ("counter", set()),
    "unicorn_model_info": ("gauge", {"model_version"}),
    "unicorn_model_reloads": ("counter", {"result"}),
}


def test_names_types_and_labels_match_the_contract() -> None:
    metrics = ServiceMetrics()
    metrics.rank_latency.labels("search", "cluster", "hit").observe(0.0009)
    metrics.cache_errors.labels("redis", "get").inc()
    metrics.responses.labels("/rank", "200").inc()
    metrics.set_model("m1")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}
    for name, (kind, labels) in CONTRACT.items():
        assert name in families, name
        assert families[name].type == kind, name
        sample_labels = {k for s in families[name].samples for k in s.labels} - {"le"}
        assert sample_labels == labels, name


def test_latency_buckets_resolve_a_one_millisecond_p99() -> None:
    assert LATENCY_BUCKETS[0] == 0.00025 and LATENCY_BUCKETS[-1] == 1.0
    below_5ms = [b for b in LATENCY_BUCKETS if b <= 0.005]
    assert len(below_5ms) >= 8 and {0.00075, 0.001, 0.0015}.issubset(below_5ms)


def test_model_info_marks_only_the_serving_version() -> None:
    metrics = ServiceMetrics()
    metrics.set_model("m1")
    metrics.set_model("m2", previous="m1")
    get = metrics.registry.get_sample_value
    assert get("unicorn_model_info", {"model_version": "m2"}) == 1
    assert get("unicorn_model_info", {"model_version": "m1"}) == 0


def test_multiprocess_mode_adds_up_every_worker(tmp_path: Path) -> None:
    """Two 'workers' (processes) write to one PROMETHEUS_MULTIPROC_DIR; a third renders."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from app.serving.metrics import ServiceMetrics\n"
        "m = ServiceMetrics()\n"
        "m.responses.labels('/rank', '200').inc(3)\n"
        "m.in_flight.inc()\n"
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)
    render = (
        "from app.serving.metrics import ServiceMetrics\n"
        "print(ServiceMetrics().render()[0].decode())"
    )
    text = subprocess.run(
        [sys.executable, "-c", render], env=env, check=True, capture_output=True, text=True,
        timeout=60,
    ).stdout  # fmt: skip
    assert 'unicorn_responses_total{route="/rank",status="200"} 6.0' in text
