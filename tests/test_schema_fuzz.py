"""Schemathesis against the service's OWN OpenAPI schema, on a live server: every route,
generated valid and invalid inputs (examples, coverage and fuzzing phases), zero 5xx and
every response conforming to the schema (status code, content type, headers, body).

Schemathesis 4 runs as its CLI (``st run``) in a subprocess against the live test server
(``start_server`` of ``tests/conftest.py``), with a fixed seed and a bounded number of
examples per operation (a few seconds). The admin route gets the token, so reloads are
fuzzed too (a bad ``bundle`` is a documented 409).

One check is left out: ``positive_data_acceptance`` expects every schema-valid body to be
accepted, but the contract has rules JSON Schema does not state: a search query must be
non-empty AFTER normalisation (``" ?! "`` is refused), and a ``source_entity_id`` must be
in the catalogue (404). ``test_api.py`` checks those rules one by one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.serving.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~500 requests from a subprocess

TOKEN = "schema-fuzz-admin-token-0123"
MAX_EXAMPLES = 100  # per operation and phase: ~500 requests, a few seconds


def _schemathesis() -> str:
    st = Path(sys.executable).with_name("st")
    if st.exists():
        return str(st)
    found = shutil.which("st")
    if found is None:
        pytest.skip("schemathesis is not installed (the dev extra has it)")
    return found


def test_every_route_answers_generated_requests_by_its_schema_and_never_5xx(
    start_server: Callable[[Settings], Any],
    settings_for: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    server = start_server(settings_for(admin_token=TOKEN, events_dir=tmp_path / "events"))
    command = [
        _schemathesis(),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20240610",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--no-color",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-6000:]
    assert "Operations:       7 selected / 7 total" in output, output[-3000:]
