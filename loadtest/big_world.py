"""Build the benchmark's large bundle: a 1M-user / 100k-entity synthetic world.

    python -m loadtest.big_world --out bundles/big      # `make bench` runs this when needed

The world is ``WorldConfig(n_users=1_000_000, n_videos=95_000, n_games=4_000,
n_collections=300, n_people=684)`` (plus the default 16 genres: 100,000 entities), built
with ``build_bundle(..., quick=True)``. Sessions per task are the default world's, so the
engagement log has about as many rows as the demo world's: the catalogue and the user
population grow, not the training set. It is used to show that serving cost follows the
number of candidates, not the size of the catalogue.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BIG_WORLD = {
    "n_users": 1_000_000,
    "n_videos": 95_000,
    "n_games": 4_000,
    "n_collections": 300,
    "n_people": 684,
}


def build_big_bundle(out: Path) -> Path:
    from model_export.bundle_builder import build_bundle
    from model_export.synthetic import WorldConfig

    started = time.perf_counter()
    path = build_bundle(Path(out), world=WorldConfig(**BIG_WORLD), quick=True)
    print(f"big bundle built in {time.perf_counter() - started:.0f}s: {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.big_world", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bundles/big"))
    build_big_bundle(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
