"""``unicorn serve``: run the service with uvicorn (httptools; the stdlib asyncio loop by
default, uvloop with ``--event-loop uvloop``), behind the connection limits of
``app.http.protocol`` (head size, read deadlines, connections per worker, JSON refusals).

    unicorn serve --bundle bundles/demo --port 8000 --workers 2 --redis-url redis://...
    python -m app.http.server --bundle bundles/demo          # the same without the CLI

The CLI (``model_export/cli.py``) calls ``add_serve_arguments(parser)`` and then
``serve_from_args(args)``, which is ``run(settings_from_args(args))``. Every option
defaults to the ``UNICORN_*`` environment variable, then to the ``Settings`` default.
The admin token is read from ``UNICORN_ADMIN_TOKEN`` only: a command line is visible to
every user of the machine.

With ``--workers`` > 1, uvicorn's supervisor runs the workers, each on its own listening
socket bound with SO_REUSEPORT (Linux spreads new connections evenly over them; see
``_run_workers``); settings reach them as ``UNICORN_*`` variables
and ``PROMETHEUS_MULTIPROC_DIR`` is set (a fresh temp dir unless ``metrics_dir``) before
any worker imports ``prometheus_client``, so ``/metrics`` adds up every worker. A bundle
that fails verification stops the process before uvicorn starts, with the reason and a
non-zero exit status: checksums and the manifest are checked here; with several workers
the bundle is also loaded and warmed once in a short-lived child process, because a worker
that fails to load it makes uvicorn's supervisor stop with exit status 0 (and with one
worker the lifespan's refusal exits with status 3).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.serving.config import Settings

DEFAULT_FACTORY = "app.http.main:create_app"
# With several workers uvicorn imports this in each (spawned) worker; it reads the real
# factory from this variable, which ``run`` sets.
WORKER_ENTRY = "app.http.server:create_worker_app"
WORKER_FACTORY_ENV = "UNICORN_SERVE_FACTORY"
# (flag, settings field, type, help); booleans are store_true flags.
SERVE_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--bundle", "bundle", Path, "bundle directory to serve"),
    ("--host", "host", str, "interface to bind"),
    ("--port", "port", int, "TCP port"),
    ("--workers", "workers", int, "uvicorn worker processes"),
    ("--redis-url", "redis_url", str, "shared Redis cache; unset = the in-process cache"),
    ("--log-level", "log_level", str, "CRITICAL | ERROR | WARNING | INFO | DEBUG"),
    ("--event-loop", "event_loop", str, "asyncio | uvloop"),
    ("--batch-window-ms", "batch_window_ms", float, "micro-batching window, 0 = off"),
    ("--max-in-flight", "max_in_flight", int, "requests in the scoring section at once"),
    ("--queue-timeout-ms", "queue_timeout_ms", float, "wait for a scoring slot, then 503"),
    ("--log-queries", "log_queries", bool, "write raw query text to access logs"),
    ("--no-cache", "cache_enabled", bool, "score every request (no result cache)"),
    ("--max-header-bytes", "max_header_bytes", int, "largest request line + headers, then 431"),
    ("--max-url-bytes", "max_url_bytes", int, "longest request target, then 414"),
    ("--header-timeout-s", "header_timeout_s", float, "read deadline of a request's head"),
    ("--body-timeout-s", "body_timeout_s", float, "read deadline of a body, after the head"),
    ("--max-connections", "max_connections", int, "open connections per worker, then 503"),
    ("--cors-origins", "cors_origins", str, "browser origins allowed (CORS), comma-separated"),
    ("--gzip-min-bytes", "gzip_min_bytes", int, "compress answers this large, 0 = never"),
    ("--explain", "explain", str, "explain on /rank: on | admin | off"),
    ("--variants", "variants", str, "bundles served at once: name=path[:percent],..."),
    ("--shadow-bundle", "shadow_bundle", Path, "bundle that ranks a sample off the path"),
    ("--shadow-sample-ratio", "shadow_sample_ratio", float, "share of answers the shadow ranks"),
)
# Descriptors a serving process needs besides its connections: the bundle files, the
# Redis pool, metrics files, logs, the event loop's own (256), and the connections asyncio
# accepts in one go before those over the cap are closed (uvicorn's backlog, 2048). At
# the descriptor limit, asyncio's accept loop fails and logs ~20,000 times a second.
FD_RESERVE = 256 + 2048


def option_help(field: str, text: str) -> str:
    """``text`` with the setting's default and its environment variable, as ``--help``
    shows them (the default is Settings' own, so the two never disagree)."""
    default = Settings.model_fields[field].default
    if field == "cache_enabled":  # the --no-cache flag
        return f"{text} (default: the cache is on; env UNICORN_CACHE_ENABLED=false)"
    shown = "unset" if default in (None, "") else str(default)
    return f"{text} (default: {shown}; env UNICORN_{field.upper()})"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (defaults: environment, then Settings)."""
    for flag, field, kind, help_text in SERVE_OPTIONS:
        text = option_help(field, help_text)
        if kind is bool:
            value = field != "cache_enabled"  # --no-cache stores False into cache_enabled
            parser.add_argument(
                flag, dest=field, action="store_const", const=value, default=None, help=text
            )
        else:
            parser.add_argument(flag, dest=field, type=kind, default=None, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    overrides = {
        field: getattr(args, field)
        for _, field, _, _ in SERVE_OPTIONS
        if getattr(args, field, None) is not None
    }
    return Settings(**overrides)


def _prepare_multiprocess_metrics(settings: Settings) -> Path:
    from app.serving.metrics import MULTIPROC_ENV

    directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="unicorn-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # values of a previous run must not add up
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def create_worker_app() -> Any:
    """The app of one worker process (``--workers`` > 1): settings from the ``UNICORN_*``
    environment the supervisor set, and the service's JSON logging, which a spawned
    worker does not inherit (without it, access lines and every INFO line were lost)."""
    from uvicorn.importer import import_from_string

    from app.http import protocol
    from app.http.access_log import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    protocol.configure(protocol.ConnectionLimits.from_settings(settings))
    return import_from_string(os.environ.get(WORKER_FACTORY_ENV, DEFAULT_FACTORY))(settings)


def bundle_refusal(settings: Settings) -> str | None:
    """Load and warm the configured bundle as a worker would: why it is refused, or
    ``None`` when it serves."""
    from app.core.errors import BundleError
    from app.serving.model_holder import load_serving_model

    try:
        load_serving_model(settings.bundle, settings)
    except BundleError as exc:
        return exc.message
    return None


def _bundle_refusal_in_child(settings: Settings) -> str | None:
    """``bundle_refusal`` in a spawned child, so the supervisor never holds a model."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(bundle_refusal, settings).result()


def run(
    settings: Settings,
    *,
    app_factory: str = DEFAULT_FACTORY,
    http: str = "httptools",
    reuse_port: bool = True,
) -> None:
    """Serve until SIGINT/SIGTERM. Exits with a message when the bundle is refused.

    ``app_factory`` ("module:function", called with the settings) lets a benchmark serve
    the same stack with an extra route; ``http`` (``httptools`` or ``h11``) exists to
    measure what httptools buys, ``reuse_port=False`` (several workers on one shared
    listening socket) what a socket per worker buys. Either runs with the connection limits of
    ``app.http.protocol`` (head size, read deadlines, connection cap, JSON refusals);
    WebSocket upgrades are off (the service has no WebSocket route). The event loop is
    ``settings.event_loop``.
    """
    # One BLAS thread per process, set before numpy is first imported (app.core.bundle below):
    # with a pool per worker, a mat-vec over a large catalogue fights the event loop for
    # the cores (docs/BENCHMARKS.md measures it).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import uvicorn
    from uvicorn.importer import import_from_string

    from app.core.bundle import verify_bundle
    from app.core.errors import BundleError
    from app.http import protocol
    from app.http.access_log import configure_logging

    configure_logging(settings.log_level)
    try:
        verify_bundle(settings.bundle)
    except BundleError as exc:
        raise SystemExit(f"unicorn serve: cannot start: {exc.message}") from None
    protocol.configure(protocol.ConnectionLimits.from_settings(settings))  # workers: again
    _ensure_descriptors(settings.max_connections + FD_RESERVE)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": settings.event_loop if _importable(settings.event_loop) else "auto",
        "http": protocol.protocol_class(http),
        "ws": "none",
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "log_config": None,  # keep the JSON logging configured above
        "access_log": False,  # app.http.access_log writes structured access lines
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers > 1:
        refusal = _bundle_refusal_in_child(settings)
        if refusal is not None:
            raise SystemExit(f"unicorn serve: cannot start: {refusal}")
        _prepare_multiprocess_metrics(settings)
        os.environ.update(settings.to_env())
        os.environ[WORKER_FACTORY_ENV] = app_factory
        config = uvicorn.Config(WORKER_ENTRY, factory=True, workers=settings.workers, **common)
        _run_workers(config, reuse_port=reuse_port)
    else:
        uvicorn.run(import_from_string(app_factory)(settings), **common)


def _run_workers(config: Any, *, reuse_port: bool = True) -> None:
    """What ``uvicorn.run`` does with several workers (uvicorn's supervisor: a dead worker
    is replaced, SIGHUP restarts them, SIGINT/SIGTERM stop them gracefully), with one
    listening socket per worker bound with SO_REUSEPORT instead of one socket they all
    share, and TCP_NODELAY on the listening socket(s).

    On one shared socket, whichever worker's event loop woke first accepted every
    connection waiting, and a busy worker kept winning: 8 keep-alive connections landed
    all on one worker in 34 runs of 46, and 2 workers served what one does
    (docs/OPERATIONS.md, "Workers"). With a socket per worker, Linux hashes each new
    connection to one of the sockets (8 connections: never all on one in 40 runs; 2
    workers 1.9 to 2.1x one worker's throughput). Each worker binds its own socket as it
    starts (``WorkerListener``), replacements too, so a dead worker's socket closes with
    it and the kernel sends new connections to the others at once. The supervisor first
    binds the port as uvicorn does, to learn it and to fail at start (exit status 3) when
    another program holds it, even one with SO_REUSEPORT (a second server on the same
    port). Where SO_REUSEPORT does not balance (not Linux), or with ``reuse_port=False``,
    the workers share one socket, as before.

    uvicorn creates its sockets with protocol 0, and asyncio's transports only set
    TCP_NODELAY on sockets whose protocol is IPPROTO_TCP; so it is set on the listening
    socket, which the connections it accepts inherit. Without it, a response's header
    and body writes meet delayed ACKs (docs/BENCHMARKS.md, recommended change 8)."""
    import logging

    from uvicorn.supervisors import Multiprocess

    sock = config.bind_socket()  # logs the address; exits with status 3 if it is taken
    sockets: list[Any] = [sock]
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        if reuse_port and _reuse_port_balances():
            port = sock.getsockname()[1]
            sock.close()
            try:
                sockets = [WorkerListener(sock.family, config.host, port)]
            except OSError as exc:  # taken in between
                raise SystemExit(f"unicorn serve: cannot start: {exc}") from None
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            logging.getLogger("unicorn.serve").warning(
                "the %d workers share one listening socket (%s): connections may not "
                "split evenly between them",
                config.workers,
                "reuse_port=False" if not reuse_port else "no SO_REUSEPORT balancing here",
            )
    Multiprocess(config, sockets=sockets).run()


def _reuse_port_balances() -> bool:
    """Whether SO_REUSEPORT spreads connections over the listening sockets: Linux (3.9+);
    elsewhere it is missing or gives every connection to one socket."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class WorkerListener(socket.socket):
    """The listening socket uvicorn's supervisor hands every worker it starts. In the
    supervisor it is bound with the workers' options (``bind_worker_socket``) and never
    listens, so it takes no connection but holds the port while the supervisor runs, even
    when every worker is down. Pickled into a spawned worker, it becomes that worker's own
    socket, bound the same way there, which uvicorn listens on once the app has started."""

    def __init__(self, family: int, host: str, port: int) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.host = host
        try:
            _set_listener_options(self)
            self.bind((host, port))
        except OSError:
            self.close()
            raise

    def __reduce__(self) -> tuple[Callable[..., socket.socket], tuple[int, str, int]]:
        return bind_worker_socket, (int(self.family), self.host, self.getsockname()[1])


def _set_listener_options(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bind_worker_socket(family: int, host: str, port: int) -> socket.socket:
    """A worker's listening socket: bound to ``(host, port)`` with SO_REUSEPORT (and
    SO_REUSEADDR and TCP_NODELAY, see ``_run_workers``), not yet listening. Exits with
    uvicorn's startup-failure status (3) when it cannot bind, which stops the supervisor
    instead of having it replace the worker forever."""
    import logging

    from uvicorn.config import STARTUP_FAILURE

    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _set_listener_options(sock)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        logging.getLogger("unicorn.serve").error(
            "worker %d cannot bind %s:%d: %s", os.getpid(), host, port, exc
        )
        sys.exit(STARTUP_FAILURE)
    return sock


def _ensure_descriptors(needed: int) -> None:
    """Raise this process's soft descriptor limit to ``needed`` where the hard limit
    allows (workers inherit it), so the connection cap is reached before the descriptor
    limit; warn when it cannot be."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        logging.getLogger("unicorn.serve").warning(
            "the descriptor limit (%d) is below max_connections + %d (%d): connections "
            "may exhaust it before the cap refuses them; lower max_connections or raise "
            "ulimit -n",
            soft,
            FD_RESERVE,
            needed,
        )


def serve_from_args(args: argparse.Namespace) -> int:
    """What ``unicorn serve`` runs."""
    run(settings_from_args(args))
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    return module in ("asyncio", "auto") or importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.http.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
