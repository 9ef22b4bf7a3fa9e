"""Locust smoke test: the load test drives a live server for a few seconds, with no failure.

Locust runs as a headless SUBPROCESS (``python -m locust``): Locust monkey-patches the
standard library with gevent at import, which must never happen inside pytest. The server
is the real uvicorn server of ``tests/conftest.py`` (``start_server``) serving the tiny
bundle; the members draw their queries and pages from its ``GET /catalogue/sample``.
Think times are scaled down so a few seconds exercise every member type.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# find_spec, not import: importing locust would monkey-patch this pytest process.
if importlib.util.find_spec("locust") is None:
    pytest.skip("the load test needs the loadtest extra (locust)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RUN_SECONDS = 5


@pytest.fixture
def smoke_server(start_server, settings_for):
    """The live server of ``tests/conftest.py`` on the tiny bundle. Admission control may
    wait up to 5 s for a scoring slot: a slow CI machine must not turn into 503s (shedding
    has its own tests); this test checks that the load test runs clean end to end."""
    return start_server(settings_for(queue_timeout_ms=5000.0))


@pytest.mark.integration
def test_locust_members_drive_a_live_server_without_failures(smoke_server, tmp_path: Path) -> None:
    live_server = smoke_server
    prefix = tmp_path / "locust"
    slo = tmp_path / "slo.json"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", live_server.url, "-u", "4", "-r", "4", "-t", f"{RUN_SECONDS}s",
        "--stop-timeout", "2", "--think-scale", "0.05",
        "--search-weight", "2", "--open-weight", "1", "--page-weight", "1",  # one of each
        "--csv", str(prefix), "--html", str(tmp_path / "locust.html"),
        "--slo-report", str(slo), "--only-summary",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_SECONDS + 13, check=False
    )
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output

    with (tmp_path / "locust_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    total = rows.pop("Aggregated")
    assert int(total["Failure Count"]) == 0, output
    assert int(total["Request Count"]) >= 20, output
    # Reported per task and cache outcome, every member type present.
    assert all(
        name.startswith("/rank ") and name.endswith(("[hit]", "[miss]", "[bypass]"))
        for name in rows
    )
    tasks = {name.split()[1] for name in rows}
    assert {"search", "prequery", "entity"} <= tasks, sorted(rows)
    # Typing a query keystroke by keystroke repeats prefixes: some are served from cache.
    assert any(name.endswith("[hit]") for name in rows), sorted(rows)

    report = json.loads(slo.read_text())
    assert report["slo_ms"] == 25.0
    # Locust's own statistics at quitting: requests finished during --stop-timeout count too.
    aggregated = report["names"]["Aggregated"]
    assert aggregated["requests"] >= int(total["Request Count"]), aggregated
    assert aggregated["failures"] == 0 and aggregated["p50_ms"] <= aggregated["p99_ms"]
    assert 0.0 <= aggregated["share_over_slo"] <= 1.0
    assert 0.0 <= aggregated["share_of_seconds_p99_over_slo"] <= 1.0
    assert (tmp_path / "locust.html").stat().st_size > 0
