"""Settings: defaults, the UNICORN_ environment prefix, validators with messages that say
the rule, and the round trip to worker processes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from app.http.server import add_serve_arguments, settings_from_args
from app.serving.config import Settings

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def documented_settings() -> dict[str, tuple[str, str]]:
    """``{field: (default, meaning)}`` from the settings table of docs/API.md."""
    rows = re.findall(r"^\| `UNICORN_(\w+)` \| `([^`]*)` \| (.*) \|$", API_DOC.read_text(), re.M)
    return {name.lower(): (default, meaning) for name, default, meaning in rows}


def test_the_documented_settings_are_the_settings_with_their_defaults() -> None:
    """docs/API.md lists every setting, with the default the code really has (the first
    word of the cell; ``unset`` for None) and the field's own description."""
    documented = documented_settings()
    undocumented = sorted(set(Settings.model_fields) - set(documented))
    unknown = sorted(set(documented) - set(Settings.model_fields))
    assert not undocumented and not unknown, (
        f"docs/API.md lacks {undocumented} and lists settings that do not exist: {unknown}"
    )
    defaults = Settings()  # no UNICORN_* variable is set (tests/conftest.py)
    for name, (default, meaning) in documented.items():
        value = getattr(defaults, name)
        assert default.split(" (")[0] == ("unset" if value is None else str(value)), name
        assert meaning == Settings.model_fields[name].description, name
    assert defaults.cache_backend == "memory"  # no Redis URL: the in-process cache


def test_environment_variables_use_the_unicorn_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNICORN_MAX_IN_FLIGHT", "8")
    monkeypatch.setenv("UNICORN_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("UNICORN_BUNDLE", "~/bundles/x")
    monkeypatch.setenv("MAX_IN_FLIGHT", "999")  # no prefix: ignored
    s = Settings()
    assert s.max_in_flight == 8 and s.cache_backend == "redis"
    assert s.bundle == Path("~/bundles/x").expanduser()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_url": "http://cache"}, "redis_url must start with one of"),
        ({"admin_token": "short"}, "admin_token must have at least 16 characters"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"max_batch_size": 500}, "max_batch_size (500) must be >= the largest request"),
        ({"max_in_flight": 0}, "greater than or equal to 1"),
        ({"event_loop": "tokio"}, "Input should be 'asyncio' or 'uvloop'"),
        ({"cache_timeout_ms": 0}, "greater than 0"),
        ({"no_such_setting": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_settings_are_refused_with_the_rule(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**overrides)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_blank_optional_values_mean_unset_and_the_token_is_never_echoed() -> None:
    assert Settings(redis_url="", admin_token=SecretStr("  ")).admin_token is None
    with pytest.raises(ValidationError) as info:
        Settings(admin_token=SecretStr("tiny-secret"))
    assert "tiny-secret" not in str(info.value)
    s = Settings(admin_token=SecretStr("a-long-enough-admin-token"))
    assert "a-long-enough-admin-token" not in repr(s)


def test_settings_reach_workers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        max_in_flight=9,
        redis_url="redis://h:1/0",
        admin_token=SecretStr("x" * 20),
        log_queries=True,
        batch_window_ms=2.5,
        event_loop="asyncio",
    )
    for name, value in original.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_cli_options_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNICORN_PORT", "9000")
    monkeypatch.setenv("UNICORN_WORKERS", "3")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    s = settings_from_args(
        parser.parse_args(
            ["--port", "8123", "--no-cache", "--log-queries", "--event-loop", "asyncio"]
        )
    )
    assert (s.port, s.workers, s.cache_enabled, s.log_queries) == (8123, 3, False, True)
    assert s.event_loop == "asyncio"
    assert s.cache_backend == "off"


def test_scoring_slots_default_to_more_when_micro_batching_holds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().max_in_flight == 4  # inline: requests scored per event-loop turn
    assert Settings(batch_window_ms=2).max_in_flight == 64  # a batch window holds its slots
    assert Settings(batch_window_ms=2, max_in_flight=3).max_in_flight == 3
    monkeypatch.setenv("UNICORN_BATCH_WINDOW_MS", "5")
    assert Settings().max_in_flight == 64
    monkeypatch.setenv("UNICORN_MAX_IN_FLIGHT", "7")
    assert Settings().max_in_flight == 7


def test_several_workers_listen_on_a_socket_with_tcp_nodelay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accepted connections inherit TCP_NODELAY from the listening socket; uvicorn's has
    protocol 0, so asyncio would not set it (responses then waited for delayed ACKs)."""
    import socket

    import uvicorn
    import uvicorn.supervisors

    from app.http.server import WORKER_ENTRY, _run_workers

    seen: list[int] = []

    class Supervisor:
        def __init__(self, config: object, sockets: list[socket.socket]) -> None:
            seen.extend(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
            for s in sockets:
                s.close()

        def run(self) -> None:
            return None

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", Supervisor)
    _run_workers(uvicorn.Config(WORKER_ENTRY, factory=True, workers=2, port=0))
    assert seen and all(seen)


def test_every_unicorn_variable_the_docs_name_is_a_setting() -> None:
    """A variable in README.md or docs/*.md that no setting reads would be set in vain
    (e.g. the examples of docs/API.md, "Model variants and shadow scoring")."""
    root = API_DOC.parents[1]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    named = {m for p in texts for m in re.findall(r"UNICORN_([A-Z][A-Z_]*[A-Z])", p.read_text())}
    assert {"VARIANTS", "SHADOW_BUNDLE", "SHADOW_SAMPLE_RATIO"} <= named
    unknown = sorted(n for n in named if n.lower() not in Settings.model_fields)
    assert not unknown, f"the docs name UNICORN_* variables no setting reads: {unknown}"
