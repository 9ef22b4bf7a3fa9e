"""Build the benchmark's large bundle, a 1M-user / 100k-entity synthetic world (sessions
per task as in the default world: the catalogue and the population grow, not the training
set; docs/BENCHMARKS.md). ``make bench`` runs ``python -m loadtest.big_world --out
bundles/big`` when it is missing."""

import argparse
import time
from pathlib import Path

BIG_WORLD = {"n_users": 1_000_000, "n_videos": 95_000, "n_games": 4_000, "n_collections": 300,
             "n_people": 684}  # fmt: skip

if __name__ == "__main__":
    from model_export.bundle_builder import build_bundle
    from model_export.synthetic import WorldConfig

    parser = argparse.ArgumentParser(prog="python -m loadtest.big_world", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bundles/big"))
    out, started = parser.parse_args().out, time.perf_counter()
    path = build_bundle(out, world=WorldConfig(**BIG_WORLD), quick=True)
    print(f"big bundle built in {time.perf_counter() - started:.0f}s: {path}", flush=True)
