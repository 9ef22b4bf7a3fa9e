"""A real Prometheus scrapes real replicas of the service and answers every query of the
Grafana dashboard; it loads the alert rules, evaluates them without error, and fires the
one alert the test provokes.

The Prometheus configuration is the compose stack's own (``deploy/prometheus/prometheus.yml``,
with its rules file), with two changes only: a 1 s scrape and evaluation interval, and the
test's replicas as static targets of job ``unicorn`` instead of Docker DNS discovery.

Two replicas run, so every dashboard series exists: one with a real Redis (cache hits and
misses) and a shadow bundle, one whose Redis URL points at a closed port (cache errors,
degraded breaker) serving two variants. The
traffic covers every task and personalization level, a cache hit, a 422 and a 404, a model
reload and a refused one. It is sent in two phases a few scrapes apart, so that ``rate()``
sees every counter move. Skips only when the ``prometheus`` binary is absent.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import ADMIN_TOKEN, LiveServer, free_port
from test_ops_static import PROMETHEUS_CONFIG, RULES, dashboard_queries, load_dashboard

from app.serving.config import Settings
from loadtest.processes import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # Prometheus scrapes for ~10 s

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
RATE_WINDOW = "30s"  # what $__rate_interval stands for: spans both traffic phases
DEADLINE_SECONDS = 25.0
TASKS = ("search", "prequery", "more_like_this", "entity")
LEVELS = ("none", "cluster", "full")


class Prometheus:
    """A prometheus server on loopback with its HTTP API."""

    def __init__(self, config: Path, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (data.parent / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=5)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}")
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("prometheus was not ready within 20 s")

    def api(self, path: str, **params: Any) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", expr
        return list(data["result"])

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def scrape_config_for(targets: list[str], path: Path) -> Path:
    """The compose stack's prometheus.yml, scraping ``targets`` every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unicorn"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [job]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def replicas(
    start_server: Callable[[Settings], LiveServer],
    settings_for: Callable[..., Settings],
    redis_server: RedisServer,
    fast_bundle: Path,
    second_bundle: Path,
) -> tuple[LiveServer, LiveServer]:
    cached = start_server(
        settings_for(
            redis_url=redis_server.url, admin_token=ADMIN_TOKEN,
            shadow_bundle=second_bundle, shadow_sample_ratio=1.0,  # the shadow panels
        )
    )  # fmt: skip
    broken_cache = start_server(
        settings_for(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
            cache_timeout_ms=50, cache_retry_seconds=0.2,
            variants=f"champion={fast_bundle},challenger={second_bundle}:50",  # variants row
        )
    )  # fmt: skip
    return cached, broken_cache


@pytest.fixture
def prometheus(replicas: tuple[LiveServer, LiveServer], tmp_path: Path) -> Iterator[Prometheus]:
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"prometheus binary not found ({PROMETHEUS}); `make test` installs it")
    targets = [server.url.removeprefix("http://") for server in replicas]
    server = Prometheus(scrape_config_for(targets, tmp_path / "prometheus.yml"), tmp_path / "data")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def rank_bodies(client: httpx.Client) -> list[dict[str, Any]]:
    """One body per task and personalization level, from the served catalogue."""
    sample = client.get("/catalogue/sample", params={"n": 5}).raise_for_status().json()
    context = {
        "search": {"query": sample["queries"][0]},
        "prequery": {},
        "more_like_this": {"source_entity_id": sample["video_ids"][0]},
        "entity": {"source_entity_id": sample["entity_ids"][0]},
    }
    return [
        {"task": task, "user_id": "u1", "country": sample["countries"][0],
         "personalization": level, "k": 5, **context[task]}
        for task in TASKS for level in LEVELS
    ]  # fmt: skip


def drive_traffic(server: LiveServer) -> None:
    """Every task x level twice (the second none/cluster call is a hit when the cache
    works), plus a 422 and a 404."""
    with server.client() as client:
        for body in rank_bodies(client) * 2:
            assert client.post("/rank", json=body).status_code == 200, body
        bad_k = {"task": "search", "query": "x", "k": 0}
        assert client.post("/rank", json=bad_k).status_code == 422
        unknown = {"task": "more_like_this", "source_entity_id": "no-such-entity"}
        assert client.post("/rank", json=unknown).status_code == 404


def reload(server: LiveServer, bundle: Path | None = None) -> int:
    with server.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        body = {"bundle": str(bundle)} if bundle else None
        return client.post("/admin/reload", json=body).status_code


def wait_for(
    condition: Callable[[], Any], what: str, deadline_seconds: float = DEADLINE_SECONDS
) -> Any:
    deadline = time.monotonic() + deadline_seconds
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def as_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it: variables resolved (all replicas)."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".*")


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_prometheus_answers_every_dashboard_query_and_evaluates_the_rules(
    prometheus: Prometheus, replicas: tuple[LiveServer, LiveServer], tampered_bundle: Path
) -> None:
    cached = replicas[0]
    wait_for(lambda: len(prometheus.query('up{job="unicorn"} == 1')) == 2, "both targets up")

    # Phase 1: every series comes into existence; Prometheus scrapes it a few times.
    for server in replicas:
        drive_traffic(server)
    assert reload(cached) == 200
    wait_for(
        lambda: len(prometheus.query('unicorn_responses_total{route="/rank",status="404"}')) == 2,
        "phase-1 series scraped from both replicas",
    )
    time.sleep(2.5)  # two more scrapes: every counter has a sample before phase 2

    # Phase 2: every counter moves again, and a reload is refused (409).
    for server in replicas:
        drive_traffic(server)
    assert reload(cached, tampered_bundle) == 409

    queries = [(title, as_promql(expr)) for title, expr in dashboard_queries()]
    assert len(queries) >= 20
    pending = dict(queries)
    last: dict[str, list[dict[str, Any]]] = {}

    def all_answered() -> bool:
        for title, expr in list(pending.items()):
            last[title] = prometheus.query(expr)
            if has_finite_value(last[title]):
                del pending[title]
        return not pending

    try:
        wait_for(all_answered, "every dashboard query to return data")
    except AssertionError:
        raise AssertionError(
            "dashboard queries without data:\n"
            + "\n".join(f"{t}: {pending[t]} -> {last.get(t)}" for t in pending)
        ) from None

    # The numbers behind the panels are the ones the traffic produced.
    hits = prometheus.query(as_promql(next(e for t, e in queries if t == "Cache hit ratio")))
    assert 0.0 < float(hits[0]["value"][1]) < 1.0, "hits and misses both happened"
    errors = prometheus.query("sum(unicorn_cache_errors_total)")
    assert float(errors[0]["value"][1]) > 0, "the broken replica counted cache errors"
    (statuses,) = [e for t, e in queries if t == "Error rate by status"]
    assert {s["metric"]["status"] for s in prometheus.query(statuses)} >= {"404", "422"}
    first = 'unicorn_model_info{variant=~"default|champion"} == 1'  # each replica's first
    versions = prometheus.query(f"count by (model_version) ({first})")
    assert [float(v["value"][1]) for v in versions] == [2.0], "both replicas, one version"
    by_variant = prometheus.query("count by (variant) (unicorn_model_info == 1)")
    assert {v["metric"]["variant"] for v in by_variant} == {
        "default", "champion", "challenger", "shadow",
    }  # fmt: skip

    # The replica template variable lists both replicas.
    variable = load_dashboard()["templating"]["list"][0]
    assert variable["query"]["query"] == "label_values(unicorn_model_info, instance)"
    instances = prometheus.api("label/instance/values", **{"match[]": "unicorn_model_info"})
    assert sorted(instances) == sorted(s.url.removeprefix("http://") for s in replicas)

    # Rules: loaded, evaluated without error; recording rules produce series; the refused
    # reload fires its alert.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = wait_for(rules_evaluated, "every rule to evaluate")
    assert not [r["name"] for r in rules if r.get("lastError")]
    recorded = [rule["name"] for rule in rules if rule["type"] == "recording"]
    assert len(recorded) >= 4
    wait_for(lambda: all(prometheus.query(name) for name in recorded), "recorded series")

    def refused_alert_fires() -> bool:
        alerts = prometheus.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "UnicornModelReloadRefused" and a["state"] == "firing"
            for a in alerts
        )

    wait_for(refused_alert_fires, "UnicornModelReloadRefused to fire")
    firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert "UnicornServiceDown" not in firing and "UnicornHigh5xxRate" not in firing
