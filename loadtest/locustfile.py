"""Locust load test of UniCoRn: simulated members using every product surface
(docs/BENCHMARKS.md, "Locust", describes them). Only Locust and the standard library: the
compose stack's Locust image runs this file alone.

Queries, titles, pages, countries (and member ids, when the service gives them) come from
the served bundle: ``GET /catalogue/sample`` at test start, or ``--catalogue-file``.
Requests are named per task and cache outcome (``/rank search [hit]``; a failure is
``/rank search [error]``). Think times are paced from the START of each request, so a
fixed number of members is a fixed arrival rate. At the end ``--slo-report`` (JSON) gets,
per request name, Locust's own figures, the share of requests slower than ``--slo-ms`` and
the share of one-second windows whose p99 exceeded it.

    .venv/bin/locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 40 -r 10 -t 2m --csv reports/locust --slo-report reports/locust_slo.json
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment

SAMPLE_SIZE = 500
KEYSTROKE_S = (0.12, 0.35)  # between keystrokes of a fast typist
READ_RESULTS_S = (1.0, 4.0)  # looking at results before clicking
BETWEEN_VISITS_S = (2.0, 8.0)  # between two sessions of one member
CLICK_PROBABILITY = 0.5
FOUND_IT_PROBABILITY = 0.15  # per keystroke after the 3rd: stop typing, the title is there
# What members draw from (queries, video_ids, entity_ids, countries, user_ids): filled once
# per process at test start.
CATALOGUE: dict[str, list[str]] = {}
# Response times (ms) of the successful requests per (request name, second): the one thing
# Locust's statistics do not keep for the whole run.
SECONDS: dict[tuple[str, int], list[float]] = defaultdict(list)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("UniCoRn members")
    for name, weight in (("search", 6), ("open", 3), ("page", 1)):
        group.add_argument(f"--{name}-weight", type=int, default=weight,
                           env_var=f"LOCUST_{name.upper()}_WEIGHT",
                           help=f"relative number of {name} members")  # fmt: skip
    for name, kind, default, text in (
        ("think-scale", float, 1.0, "multiply every think time (1 = human pace)"),
        ("catalogue-file", str, "", "JSON shaped like GET /catalogue/sample (default: ask)"),
        ("slo-ms", float, 25.0, "the latency of the SLO report"),
        ("slo-report", str, "", "where to write the SLO report (JSON)"),
    ):
        env_var = "LOCUST_" + name.upper().replace("-", "_")
        group.add_argument(f"--{name}", type=kind, default=default, env_var=env_var, help=text)


def _option(environment: Environment, name: str, default: Any) -> Any:
    return getattr(environment.parsed_options, name, default)


@events.init.add_listener
def _configure(environment: Environment, **_kwargs: Any) -> None:
    SearchingMember.weight = _option(environment, "search_weight", SearchingMember.weight)
    OpeningMember.weight = _option(environment, "open_weight", OpeningMember.weight)
    PageMember.weight = _option(environment, "page_weight", PageMember.weight)

    @events.spawning_complete.add_listener
    def _reset_after_ramp_up(**_kwargs: Any) -> None:
        """With ``--reset-stats`` Locust forgets the ramp-up; so do the windows."""
        if _option(environment, "reset_stats", False):
            SECONDS.clear()


@events.test_start.add_listener
def _load_catalogue(environment: Environment, **_kwargs: Any) -> None:
    path = _option(environment, "catalogue_file", "")
    if path:
        sample = json.loads(Path(path).read_text())
    else:
        url = f"{environment.host}/catalogue/sample?n={SAMPLE_SIZE}&seed={random.randrange(2**31)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            sample = json.loads(resp.read())
    for key in ("queries", "video_ids", "entity_ids", "countries", "user_ids"):
        CATALOGUE[key] = [str(v) for v in sample.get(key, []) if str(v).strip() or key != "queries"]
    CATALOGUE["countries"] = CATALOGUE["countries"] or [""]
    if not CATALOGUE["queries"] or not CATALOGUE["video_ids"]:
        raise RuntimeError(f"the catalogue sample has no queries or titles: {sorted(sample)}")


class Member(FastHttpUser):
    """A member of the service: a profile, a country, and paced think times."""

    abstract = True

    def on_start(self) -> None:
        users = CATALOGUE["user_ids"]
        self.user_id = random.choice(users) if users else f"m-{uuid.uuid4().hex[:12]}"
        self.country = random.choice(CATALOGUE["countries"])
        self.think_scale = float(_option(self.environment, "think_scale", 1.0))

    def wait_time(self) -> float:
        return random.uniform(*BETWEEN_VISITS_S) * self.think_scale

    def pause(self, bounds: tuple[float, float], since: float) -> None:
        """Think for a random time counted from ``since`` (the start of the last request)."""
        import gevent

        wait = random.uniform(*bounds) * self.think_scale - (time.perf_counter() - since)
        if wait > 0:
            gevent.sleep(wait)

    def rank(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """POST /rank; reported as ``/rank <task> [<cache outcome>]``; returns the items."""
        body = {"user_id": self.user_id, "country": self.country, "k": 20, **body}
        name = f"/rank {body['task']}"
        with self.client.post("/rank", json=body, name=name, catch_response=True) as resp:
            try:
                data = resp.json() if resp.status_code == 200 else None
            except ValueError:
                data = None
            if data is None or not isinstance(data.get("items"), list):
                resp.request_meta["name"] = f"{name} [error]"
                resp.failure(f"status {resp.status_code}: {str(resp.text)[:200]}")
                return []
            resp.request_meta["name"] = f"{name} [{data.get('cache', '?')}]"
            resp.success()
            return list(data["items"])

    def visit(self, body: dict[str, Any]) -> None:
        """One ranked page, read, then maybe a click on one of its items: the clicked
        title's page ranks similar titles."""
        started = time.perf_counter()
        self.page(self.rank(body), started)

    def page(self, items: list[dict[str, Any]], started: float) -> None:
        self.pause(READ_RESULTS_S, started)
        if items and random.random() <= CLICK_PROBABILITY:
            clicked = random.choice(items[:10])
            self.rank({"task": "more_like_this", "source_entity_id": clicked["entity_id"]})


class SearchingMember(Member):
    weight = 6

    @task
    def search_session(self) -> None:
        query = random.choice(CATALOGUE["queries"])
        # Sample queries include prefixes: type towards the longest query it begins.
        query = max((q for q in CATALOGUE["queries"] if q.startswith(query)), key=len)
        items: list[dict[str, Any]] = []
        started = time.perf_counter()
        for typed in range(1, len(query) + 1):
            if typed > 1:
                self.pause(KEYSTROKE_S, started)
            started = time.perf_counter()
            if query[:typed].strip():
                items = self.rank({"task": "search", "query": query[:typed]})
            if typed >= 3 and random.random() < FOUND_IT_PROBABILITY:
                break
        self.page(items, started)


class OpeningMember(Member):
    weight = 3

    @task
    def open_app(self) -> None:
        self.visit({"task": "prequery"})


class PageMember(Member):
    weight = 1

    @task
    def entity_page(self) -> None:
        pages = CATALOGUE["entity_ids"]  # without page entities: browse a title
        source = random.choice(pages or CATALOGUE["video_ids"])
        self.visit({"task": "entity" if pages else "more_like_this", "source_entity_id": source})


# --- SLO report -------------------------------------------------------------------------------
@events.request.add_listener
def _per_second(name: str, response_time: float, exception: Any, **_kwargs: Any) -> None:
    if exception is None:
        for key in (name, "Aggregated"):
            SECONDS[key, int(time.time())].append(float(response_time))


def _p99(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def slo_summary(environment: Environment, slo_ms: float) -> dict[str, dict[str, float]]:
    """Per request name: Locust's own statistics, and the shares over ``slo_ms``."""
    stats = environment.stats
    out: dict[str, dict[str, float]] = {}
    for e in [*sorted(stats.entries.values(), key=lambda e: e.name), stats.total]:
        if not e.num_requests:
            continue
        windows = [_p99(w) for (n, _), w in SECONDS.items() if n == e.name]
        slower = sum(count for ms, count in e.response_times.items() if ms > slo_ms)
        out[e.name] = {
            "requests": e.num_requests, "rps": e.total_rps, "failures": e.num_failures,
            "p50_ms": float(e.get_response_time_percentile(0.5) or 0),
            "p99_ms": float(e.get_response_time_percentile(0.99) or 0),
            "share_over_slo": slower / e.num_requests,
            "share_of_seconds_p99_over_slo": sum(p > slo_ms for p in windows) / (len(windows) or 1),
        }  # fmt: skip
    return out


@events.quitting.add_listener
def _report_slo(environment: Environment, **_kwargs: Any) -> None:
    slo_ms, path = (
        float(_option(environment, "slo_ms", 25.0)),
        _option(environment, "slo_report", ""),
    )
    if path:
        report = {"slo_ms": slo_ms, "names": slo_summary(environment, slo_ms)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1))
