"""Locust load test of UniCoRn: simulated members using every product surface.

Members (user classes; weights via ``--search-weight`` etc., or ``LOCUST_SEARCH_WEIGHT``...):

- ``SearchingMember``: types a query one keystroke at a time with human think time; every
  prefix is a ``POST /rank`` (task ``search``); then may click a result, which opens its
  title page (``more_like_this`` on the clicked title).
- ``OpeningMember``: opens the app (``prequery``), then may open a title page from it.
- ``PageMember``: opens an entity page (genre, collection, person: task ``entity``), then
  may open a title page from it.

Queries, titles, entity pages and countries come from the SERVED bundle: ``GET
/catalogue/sample`` at test start (or ``--catalogue-file``, a JSON file of the same
shape). Member ids come from the sample's ``user_ids`` when the service provides them;
otherwise each simulated member is a stable anonymous id (cold start, cluster 0).

Requests are reported per task AND cache outcome, e.g. ``/rank search [hit]``,
``/rank more_like_this [miss]``; a non-2xx answer or a body without items is a failure
(``/rank search [error]``). Think times are paced from the START of each request, so a
member's request schedule does not slow down when the service does: with a fixed number
of users the arrival rate is fixed (an open workload per member, as long as a response
takes less than the think time). ``--think-scale`` multiplies every think time.

At the end the run prints, and writes to ``--slo-report`` (JSON), per request name: the
share of requests slower than ``--slo-ms`` (default 25 ms), and the share of one-second
windows whose p99 exceeded it.

Headless, fixed time, CSV + HTML reports (docs/BENCHMARKS.md, "Locust"):

    .venv/bin/locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 40 -r 10 -t 2m --csv reports/locust --html reports/locust.html \\
        --slo-report reports/locust_slo.json
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
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


@dataclass
class Catalogue:
    """What members draw from: filled once per process at test start."""

    queries: list[str] = field(default_factory=list)
    video_ids: list[str] = field(default_factory=list)
    entity_ids: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=lambda: [""])
    user_ids: list[str] = field(default_factory=list)


CATALOGUE = Catalogue()


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("UniCoRn members")
    for name, default in (("search", 6), ("open", 3), ("page", 1)):
        group.add_argument(
            f"--{name}-weight",
            type=int,
            default=default,
            env_var=f"LOCUST_{name.upper()}_WEIGHT",
            help=f"relative number of {name} members (default {default})",
        )
    group.add_argument(
        "--think-scale",
        type=float,
        default=1.0,
        env_var="LOCUST_THINK_SCALE",
        help="multiply every think time (1 = human pace; 0.05 for smoke tests)",
    )
    group.add_argument(
        "--catalogue-file",
        default="",
        env_var="LOCUST_CATALOGUE_FILE",
        help="JSON with queries/video_ids/entity_ids/countries (default: GET /catalogue/sample)",
    )
    group.add_argument("--slo-ms", type=float, default=25.0, env_var="LOCUST_SLO_MS")
    group.add_argument("--slo-report", default="", env_var="LOCUST_SLO_REPORT")


@events.init.add_listener
def _configure(environment: Environment, **_kwargs: Any) -> None:
    _ENVIRONMENT[:] = [environment]
    options = environment.parsed_options
    if options is None:
        return
    SearchingMember.weight = options.search_weight
    OpeningMember.weight = options.open_weight
    PageMember.weight = options.page_weight


@events.test_start.add_listener
def _load_catalogue(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    path = getattr(options, "catalogue_file", "") if options else ""
    if path:
        sample = json.loads(Path(path).read_text())
    else:
        url = f"{environment.host}/catalogue/sample?n={SAMPLE_SIZE}&seed={random.randrange(2**31)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            sample = json.loads(resp.read())
    CATALOGUE.queries = [q for q in sample.get("queries", []) if q.strip()]
    CATALOGUE.video_ids = list(sample.get("video_ids", []))
    CATALOGUE.entity_ids = list(sample.get("entity_ids", []))
    CATALOGUE.countries = list(sample.get("countries", [])) or [""]
    CATALOGUE.user_ids = list(sample.get("user_ids", []))
    if not CATALOGUE.queries or not CATALOGUE.video_ids:
        raise RuntimeError(f"the catalogue sample has no queries or titles: {sorted(sample)}")


class Member(FastHttpUser):
    """A member of the service: a profile, a country, and paced think times."""

    abstract = True

    def on_start(self) -> None:
        self.user_id = (
            random.choice(CATALOGUE.user_ids)
            if CATALOGUE.user_ids
            else f"m-{uuid.uuid4().hex[:12]}"
        )
        self.country = random.choice(CATALOGUE.countries)
        options = self.environment.parsed_options
        self.think_scale = float(getattr(options, "think_scale", 1.0)) if options else 1.0

    def wait_time(self) -> float:
        return random.uniform(*BETWEEN_VISITS_S) * self.think_scale

    def pause(self, bounds: tuple[float, float], since: float) -> None:
        """Think for a random time counted from ``since`` (the start of the last request)."""
        wait = random.uniform(*bounds) * self.think_scale - (time.perf_counter() - since)
        if wait > 0:
            self._sleep(wait)

    def _sleep(self, seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

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

    def title_page(self, items: list[dict[str, Any]]) -> None:
        """Maybe click one of ``items``: its title page ranks similar titles."""
        if not items or random.random() > CLICK_PROBABILITY:
            return
        clicked = random.choice(items[:10])
        self.rank({"task": "more_like_this", "source_entity_id": clicked["entity_id"]})


class SearchingMember(Member):
    weight = 6

    @task
    def search_session(self) -> None:
        query = random.choice(CATALOGUE.queries)
        # Sample queries include prefixes: type towards the longest query it begins.
        longer = [q for q in CATALOGUE.queries if q.startswith(query)]
        query = max(longer, key=len) if longer else query
        items: list[dict[str, Any]] = []
        started = time.perf_counter()
        for typed in range(1, len(query) + 1):
            if typed > 1:
                self.pause(KEYSTROKE_S, started)
            started = time.perf_counter()
            prefix = query[:typed]
            if prefix.strip():
                items = self.rank({"task": "search", "query": prefix})
            if typed >= 3 and random.random() < FOUND_IT_PROBABILITY:
                break
        self.pause(READ_RESULTS_S, started)
        self.title_page(items)


class OpeningMember(Member):
    weight = 3

    @task
    def open_app(self) -> None:
        started = time.perf_counter()
        items = self.rank({"task": "prequery"})
        self.pause(READ_RESULTS_S, started)
        self.title_page(items)


class PageMember(Member):
    weight = 1

    @task
    def entity_page(self) -> None:
        if not CATALOGUE.entity_ids:  # a bundle without page entities: browse a title
            started = time.perf_counter()
            items = self.rank(
                {"task": "more_like_this", "source_entity_id": random.choice(CATALOGUE.video_ids)}
            )
        else:
            started = time.perf_counter()
            items = self.rank(
                {"task": "entity", "source_entity_id": random.choice(CATALOGUE.entity_ids)}
            )
        self.pause(READ_RESULTS_S, started)
        self.title_page(items)


# --- SLO report -------------------------------------------------------------------------------
class SloTracker:
    """Per request name: response times, and per-second windows of them."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.windows: dict[tuple[str, int], list[float]] = defaultdict(list)

    def record(self, name: str, ms: float) -> None:
        second = int(time.time())
        for key in (name, "Aggregated"):
            self.times[key].append(ms)
            self.windows[(key, second)].append(ms)

    def summary(self, slo_ms: float) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, times in sorted(self.times.items()):
            ordered = sorted(times)
            windows = [w for (n, _), w in self.windows.items() if n == name]
            over = sum(1 for w in windows if _p99(sorted(w)) > slo_ms)
            out[name] = {
                "requests": len(times),
                "p50_ms": _percentile(ordered, 50),
                "p99_ms": _percentile(ordered, 99),
                "share_over_slo": sum(1 for t in times if t > slo_ms) / len(times),
                "seconds": len(windows),
                "share_of_seconds_p99_over_slo": over / len(windows) if windows else 0.0,
            }
        return out


def _percentile(ordered: list[float], pct: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)]


def _p99(ordered: list[float]) -> float:
    return _percentile(ordered, 99)


SLO = SloTracker()


@events.spawning_complete.add_listener
def _reset_after_ramp_up(**_kwargs: Any) -> None:
    """With ``--reset-stats`` Locust forgets the ramp-up; so does the SLO report."""
    environment = _ENVIRONMENT[0] if _ENVIRONMENT else None
    options = environment.parsed_options if environment is not None else None
    if options is not None and getattr(options, "reset_stats", False):
        SLO.times.clear()
        SLO.windows.clear()


_ENVIRONMENT: list[Environment] = []


@events.request.add_listener
def _on_request(name: str, response_time: float, exception: Any, **_kwargs: Any) -> None:
    if exception is None:
        SLO.record(name, float(response_time))


@events.quitting.add_listener
def _report_slo(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    slo_ms = float(getattr(options, "slo_ms", 25.0)) if options else 25.0
    summary = SLO.summary(slo_ms)
    if not summary:
        return
    print(f"\nSLO {slo_ms:g} ms per request name:")
    print(f"{'name':<34} {'requests':>8} {'p50':>7} {'p99':>7} {'>SLO':>7} {'s p99>SLO':>10}")
    for name, s in summary.items():
        print(
            f"{name:<34} {s['requests']:>8.0f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} "
            f"{s['share_over_slo']:>7.2%} {s['share_of_seconds_p99_over_slo']:>10.2%}"
        )
    path = getattr(options, "slo_report", "") if options else ""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"slo_ms": slo_ms, "names": summary}, indent=1))
