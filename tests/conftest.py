"""Shared test fixtures: real parts, started once where they can be shared.

- ``tiny_bundle``: a REAL bundle (synthetic world -> train -> ONNX export -> manifest),
  built once per session into a temp dir by ``model_export.bundle_builder.build_bundle``
  (a few seconds). Set ``UNICORN_TEST_TINY_BUNDLE=/path`` to reuse one you built
  while iterating; it is read before the per-test environment isolation.
- ``second_bundle`` / ``tampered_bundle``: copies of it with another model version, or
  with one byte of ``model.onnx`` flipped.
- ``redis_server``: a real ``redis-server`` on a free port in a temp dir, which a test can
  kill, restart, pause (SIGSTOP) and resume (SIGCONT); ``DEBUG SLEEP`` is enabled for
  local connections, so a test can also stall it from inside.
- ``start_server`` / ``live_server``: a real uvicorn server in a thread on a free port,
  started and stopped cleanly (after encode/httpx's ``tests/conftest.py``).
- ``running_app``: ``async with running_app(settings) as (app, client)``, the app
  in-process (httpx ``ASGITransport``) with its lifespan running.
- ``settings_for(**overrides)``: settings serving the tiny bundle; ``read_metric``: one
  sample from a ``/metrics`` text; ``free_port_factory``: a free TCP port.
- Every test runs with the ``UNICORN_*`` and ``PROMETHEUS_MULTIPROC_DIR`` variables removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.serving.config import Settings
from loadtest.processes import REDIS, RedisServer, free_port

REUSE_BUNDLE_ENV = "UNICORN_TEST_TINY_BUNDLE"
ADMIN_TOKEN = "test-admin-token-0123456789"


# --- environment --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's or another test's UNICORN_* settings."""
    for name in list(os.environ):
        if name.startswith("UNICORN_") or name == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# --- bundles ------------------------------------------------------------------------------
def _build_tiny_bundle(out: Path) -> Path:
    from model_export.bundle_builder import build_bundle
    from model_export.synthetic import WorldConfig
    from model_export.train import TrainConfig

    world = WorldConfig(
        seed=7, n_users=200, n_videos=200, n_games=10, n_genres=6, n_collections=6,
        n_people=10, n_countries=3, n_clusters=4, search_sessions=200, prequery_sessions=200,
        more_like_this_sessions=200, entity_sessions=150,
    )  # fmt: skip
    # One torch thread: on a shared 2-core box two threads are 10x slower, not 2x faster.
    train = TrainConfig(epochs=2, progress=False, threads=1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build_bundle(
            out, source="synthetic", quick=True, seed=7, world=world, train_config=train,
            eval_per_task=60,
        )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle, built once per session (or reused from $UNICORN_TEST_TINY_BUNDLE)."""
    reuse = os.environ.get(REUSE_BUNDLE_ENV)
    if reuse:
        return Path(reuse)
    pytest.importorskip("torch", reason="building a bundle needs the train extra (torch)")
    return _build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def copy_bundle(source: Path, target: Path, model_version: str | None = None) -> Path:
    """A copy of ``source``; with ``model_version`` the manifest is rewritten (and re-hashed)."""
    from app.core.bundle import MANIFEST, write_manifest

    shutil.copytree(source, target)
    if model_version is not None:
        manifest = json.loads((target / MANIFEST).read_text())
        manifest["model_version"] = model_version
        write_manifest(target, manifest)
    return target


@pytest.fixture(scope="session")
def second_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle under another model version: what a retrained model looks like."""
    version = json.loads((tiny_bundle / "manifest.json").read_text())["model_version"]
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("second") / "b", version + "-next")


@pytest.fixture(scope="session")
def tampered_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with one byte of model.onnx flipped (checksum no longer matches)."""
    target = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("tampered") / "t")
    model = target / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return target


@pytest.fixture
def settings_for(tiny_bundle: Path) -> Callable[..., Settings]:
    """``settings_for(**overrides)``: test settings serving the tiny bundle."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"bundle": tiny_bundle, "log_user_salt": "test-salt"}
        values.update(overrides)
        return Settings(**values)

    return make


# --- metrics ------------------------------------------------------------------------------
def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of one sample (e.g. ``unicorn_cache_errors_total``) in exposition ``text``;
    0.0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.fixture(scope="session")
def read_metric() -> Callable[..., float]:
    """``read_metric(metrics_text, sample_name, **labels) -> float``."""
    return metric_value


# --- redis --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def free_port_factory() -> Callable[[], int]:
    return free_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test (about 10 ms to start)."""
    if not Path(REDIS).exists():
        pytest.skip(f"redis-server binary not found ({REDIS}); CI installs it")
    server = RedisServer(directory=tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


# --- uvicorn ------------------------------------------------------------------------------
class LiveServer:
    """A uvicorn server running ``app`` in a thread on its own socket."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # As app.http.server does for its workers: asyncio leaves TCP_NODELAY off on sockets
        # of protocol 0, and each response would wait for a delayed ACK (~40 ms).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, loop="asyncio", http="httptools", lifespan="on", log_config=None,
            access_log=False, timeout_graceful_shutdown=5,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.app = app

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)


@pytest.fixture
def start_server() -> Iterator[Callable[[Settings], LiveServer]]:
    """``start_server(settings)``: a live uvicorn server; all are stopped at teardown."""
    from app.http.main import create_app

    servers: list[LiveServer] = []

    def start(settings: Settings) -> LiveServer:
        server = LiveServer(create_app(settings))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(
    start_server: Callable[[Settings], LiveServer], settings_for: Callable[..., Settings]
) -> LiveServer:
    """A live server on the tiny bundle with the in-process cache and an admin token."""
    return start_server(settings_for(admin_token=ADMIN_TOKEN))


# --- in-process app -----------------------------------------------------------------------
RunningApp = Callable[
    [Settings], contextlib.AbstractAsyncContextManager[tuple[Any, httpx.AsyncClient]]
]


@contextlib.asynccontextmanager
async def _running_app(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    from app.http.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://unicorn") as client:
            yield app, client


@pytest.fixture(scope="session")
def running_app() -> RunningApp:
    """``async with running_app(settings) as (app, client)``: the app with its lifespan
    running and an httpx client bound to it in-process."""
    return _running_app
