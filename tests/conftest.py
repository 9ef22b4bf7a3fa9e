"""Shared test fixtures: real parts, started once where they can be shared.

- ``fast_bundle``: a real, verified bundle made WITHOUT training (``tests/handmade_bundle.py``:
  a small synthetic world, its feature tables, and a hand-written ONNX graph scoring a
  fixed weighted sum of features), built once per session in about a second. Every test
  that needs a bundle to serve, but not a model that learnt anything, uses it.
- ``tiny_bundle``: a TRAINED bundle (synthetic world -> train -> ONNX export -> manifest),
  built once per session by ``model_export.bundle_builder.build_bundle``, for what needs
  a trained model: quality, the manifest's training and evaluation numbers. Set
  ``UNICORN_TEST_TINY_BUNDLE=/path`` to reuse one you built while iterating.
- ``second_bundle`` / ``tampered_bundle``: copies of the fast bundle with another model
  version, or with one byte of ``model.onnx`` flipped.
- ``redis_server``: a real ``redis-server`` on a free port in a temp dir, which a test can
  kill, restart, pause (SIGSTOP) and resume (SIGCONT); ``DEBUG SLEEP`` is enabled for
  local connections, so a test can also stall it from inside.
- ``start_server`` / ``live_server``: a real uvicorn server in a thread on a free port,
  started and stopped cleanly (after encode/httpx's ``tests/conftest.py``).
- ``running_app``: ``async with running_app(settings) as (app, client)``, the app
  in-process (httpx ``ASGITransport``) with its lifespan running.
- ``settings_for(**overrides)``: settings serving the fast bundle (the trained one in a
  test that also uses ``tiny_bundle``, to compare with it); ``read_metric``: one
  sample from a ``/metrics`` text; ``free_port_factory``: a free TCP port;
  ``finish_without_waiting(coroutine)``: its result, failing if it would have waited.
- Every test runs with the ``UNICORN_*`` and ``PROMETHEUS_MULTIPROC_DIR`` variables removed.

The fast lane is ``pytest -m "not slow"`` (``make test-fast``). A test is marked ``slow``
here, so that none can forget it, when its fixtures include one of ``SLOW_FIXTURES``
(training, the real data set) or it is in one of ``SLOW_MODULES``; other slow tests carry
the mark themselves. With ``UNICORN_TEST_NO_TRAINING=1`` (``make test-fast`` sets it)
``tiny_bundle`` fails and so does any torch ``backward()``: a fast test that trains is an
error, not a slow lane.
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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.serving.config import Settings
from loadtest.processes import REDIS, RedisServer, free_port

REUSE_BUNDLE_ENV = "UNICORN_TEST_TINY_BUNDLE"
NO_TRAINING_ENV = "UNICORN_TEST_NO_TRAINING"
# Read at import, before the per-test environment isolation removes UNICORN_* variables.
REUSE_BUNDLE = os.environ.get(REUSE_BUNDLE_ENV)
NO_TRAINING = os.environ.get(NO_TRAINING_ENV, "") not in ("", "0")
ADMIN_TOKEN = "test-admin-token-0123456789"

# fixture -> why a test that uses it (directly or through another fixture) is slow
SLOW_FIXTURES = {
    "tiny_bundle": "trains a model",
    "ml_small": "reads the real MovieLens data set",
}
# test module -> why all of it is slow (these modules belong to loadtest/'s owners)
SLOW_MODULES = {
    "test_faults.py": "fault scenarios under load, on real servers and processes",
    "test_locust_smoke.py": "Locust drives a live server for seconds",
}


# --- markers ------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = sorted(set(getattr(item, "fixturenames", ())) & SLOW_FIXTURES.keys())
        if fixtures:
            item.add_marker(pytest.mark.slow(reason=SLOW_FIXTURES[fixtures[0]]))
        elif item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow(reason=SLOW_MODULES[item.path.name]))


def pytest_configure(config: pytest.Config) -> None:
    if not NO_TRAINING:
        return
    try:
        import torch
    except ImportError:  # no train extra: nothing can train
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{NO_TRAINING_ENV} is set (the fast lane) but a test trains a torch model: "
            f"use fast_bundle, or mark the test slow"
        )

    torch.Tensor.backward = refuse  # type: ignore[method-assign]


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
    from handmade_bundle import WORLD

    from model_export.bundle_builder import build_bundle
    from model_export.train import TrainConfig

    # The fast bundle's world, trained. One torch thread: on a shared 2-core box two
    # threads are 10x slower, not 2x faster.
    train = TrainConfig(epochs=2, progress=False, threads=1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build_bundle(
            out, source="synthetic", quick=True, seed=WORLD.seed, world=WORLD, train_config=train,
            eval_per_task=60,
        )  # fmt: skip


@pytest.fixture(scope="session")
def fast_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle made without training (tests/handmade_bundle.py), once per session."""
    from handmade_bundle import build_handmade_bundle

    return build_handmade_bundle(tmp_path_factory.mktemp("bundles") / "handmade")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained bundle, built once per session (or reused from $UNICORN_TEST_TINY_BUNDLE).
    Tests using it are marked slow (``SLOW_FIXTURES``)."""
    if REUSE_BUNDLE:
        return Path(REUSE_BUNDLE)
    if NO_TRAINING:
        pytest.fail(f"{NO_TRAINING_ENV} is set but the test needs tiny_bundle (training)")
    pytest.importorskip("torch", reason="building a bundle needs the train extra (torch)")
    return _build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def copy_bundle(source: Path, target: Path, retrained: bool = False) -> Path:
    """A copy of ``source``. ``retrained``: model.onnx gains a metadata entry (same scores,
    other bytes) and the manifest is rewritten, so the copy has a model version of its
    own, as a retrained model would."""
    from app.core.bundle import MANIFEST, MODEL_FILE, write_manifest

    shutil.copytree(source, target)
    if retrained:
        import onnx

        model = onnx.load(target / MODEL_FILE)
        onnx.helper.set_model_props(model, {"retrained": "1"})
        onnx.save(model, target / MODEL_FILE)
        write_manifest(target, json.loads((target / MANIFEST).read_text()))
    return target


def model_version(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["model_version"])


@pytest.fixture(scope="session")
def second_bundle(fast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fast bundle retrained: same scores, another model version."""
    return copy_bundle(fast_bundle, tmp_path_factory.mktemp("second") / "b", retrained=True)


@pytest.fixture(scope="session")
def tampered_bundle(fast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fast bundle with one byte of model.onnx flipped (checksum no longer matches)."""
    target = copy_bundle(fast_bundle, tmp_path_factory.mktemp("tampered") / "t")
    model = target / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return target


@pytest.fixture
def served_bundle(request: pytest.FixtureRequest) -> Path:
    """The bundle ``settings_for`` serves: ``tiny_bundle`` in a test that uses it (it
    compares what is served with that bundle), the fast bundle everywhere else."""
    trained = "tiny_bundle" in request.fixturenames
    return Path(request.getfixturevalue("tiny_bundle" if trained else "fast_bundle"))


@pytest.fixture
def settings_for(
    served_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """``settings_for(**overrides)``: test settings serving ``served_bundle``; reloads may
    name any bundle of this test session (the reload root is pytest's temporary root)."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "bundle": served_bundle,
            "log_user_salt": "test-salt",
            "reload_root": tmp_path_factory.getbasetemp(),
        }
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


# --- asyncio ------------------------------------------------------------------------------
def _finish_without_waiting(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` in ONE step and return its result (or raise its exception); fail
    if it suspends instead, that is if it would have waited for anything. "It does not
    wait" without timing it."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError(f"{coroutine!r} suspended: it would have waited")


@pytest.fixture(scope="session")
def finish_without_waiting() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``finish_without_waiting(coroutine)``: its result, or an assertion error if it
    would have waited (suspended)."""
    return _finish_without_waiting


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
    """A live server on ``served_bundle`` with the in-process cache and an admin token."""
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
