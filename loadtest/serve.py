"""The benchmark's server: ``unicorn serve`` with the Floor B route (``loadtest.floor``).

    UNICORN_BUNDLE=bundles/demo UNICORN_WORKERS=2 python -m loadtest.serve [--loop asyncio]

Settings come from the ``UNICORN_*`` environment exactly as for ``unicorn serve``, and the
uvicorn options are the ones ``app.server.run`` uses (uvloop + httptools, no uvicorn
access log, the service's JSON logging, multiprocess metrics with several workers); the
only difference is the app factory. ``--loop`` / ``--http`` exist to measure what
uvloop and httptools buy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.config import Settings

FACTORY = "loadtest.floor:create_app_with_floor"


def run(settings: Settings, loop: str = "uvloop", http: str = "httptools") -> None:
    import uvicorn

    from app.access_log import configure_logging
    from app.metrics import MULTIPROC_ENV

    configure_logging(settings.log_level)
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": loop,
        "http": http,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
    }
    if settings.workers > 1:
        directory = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="unicorn-metrics-"))
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        os.environ[MULTIPROC_ENV] = str(directory)
        os.environ.update(settings.to_env())
        uvicorn.run(FACTORY, factory=True, workers=settings.workers, **common)
    else:
        from loadtest.floor import create_app_with_floor

        uvicorn.run(create_app_with_floor(settings), **common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.serve", description=__doc__)
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--http", default="httptools", choices=["httptools", "h11"])
    args = parser.parse_args(argv)
    run(Settings(), loop=args.loop, http=args.http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
