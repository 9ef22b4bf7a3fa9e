"""The benchmark's server: ``unicorn serve`` with the Floor B route (``loadtest.floor``).

    UNICORN_BUNDLE=bundles/demo UNICORN_WORKERS=2 python -m loadtest.serve [--http h11]

This is ``app.http.server.run`` itself (settings from the ``UNICORN_*`` environment, the same
uvicorn options, workers and multiprocess metrics) with one difference: the app factory.
The event loop is the ``event_loop`` setting (``UNICORN_EVENT_LOOP=uvloop``); ``--http``
exists to measure what httptools buys.
"""

from __future__ import annotations

import argparse
import sys

from app.http.server import run
from app.serving.config import Settings

FACTORY = "loadtest.floor:create_app_with_floor"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.serve", description=__doc__)
    parser.add_argument("--http", default="httptools", choices=["httptools", "h11"])
    args = parser.parse_args(argv)
    run(Settings(), app_factory=FACTORY, http=args.http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
