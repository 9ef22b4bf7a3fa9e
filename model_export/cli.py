"""The ``unicorn`` command.

    unicorn data --source synthetic|movielens [--path P] --out DIR [--seed N]
    unicorn data --source events --path EVENTS_DIR --catalogue-from BUNDLE --out DIR
    unicorn build-bundle --source synthetic|movielens [--path P] --out bundles/NAME [--quick]
    unicorn build-bundle --source events --path EVENTS_DIR --catalogue-from BUNDLE --out ...
        [--warm-start BUNDLE]
    unicorn evaluate --source synthetic|movielens [--path P] [--seeds 7 8 9] [--out docs/...]
    unicorn serve --bundle P [--host H] [--port N] [--workers N]

Training commands import torch lazily: ``unicorn serve`` works on the serving install.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.catalogue import Catalogue
    from model_export.engagement_log import EngagementLog


def _add_source(p: argparse.ArgumentParser, events: bool = False) -> None:
    sources = ["synthetic", "movielens", "events"] if events else ["synthetic", "movielens"]
    p.add_argument("--source", choices=sources, default="synthetic")
    help_path = "MovieLens folder (movies.csv...)" + (
        "; events: the service's event log folder (impressions-*.parquet...)" if events else ""
    )
    p.add_argument("--path", type=Path, default=None, help=help_path)
    p.add_argument("--seed", type=int, default=7)
    if events:
        p.add_argument(
            "--catalogue-from",
            type=Path,
            default=None,
            help="events: the bundle (or catalogue.npz) whose catalogue the events name",
        )


def cmd_data(args: argparse.Namespace) -> int:
    from app.core.context import TASKS
    from model_export.training_pipeline import load_source

    started = time.perf_counter()
    if args.source == "events":
        catalogue, log = _events_data(args)
    else:
        catalogue, log = load_source(args.source, args.path, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log.save(args.out / "engagements.npz")
    catalogue.save(args.out / "catalogue.npz")
    counts = log.rows_per_task()
    print(
        f"wrote {args.out}/engagements.npz and catalogue.npz "
        f"in {time.perf_counter() - started:.1f}s"
    )
    print(f"{'task':<16}{'rows':>10}{'positives':>11}")
    for task in TASKS:
        pos = int(log.label[log.task == task].sum())
        print(f"{task:<16}{counts[task]:>10}{pos:>11}")
    print(f"{'total':<16}{len(log):>10}{int(log.label.sum()):>11}")
    print(f"catalogue: {len(catalogue)} entities, {int(catalogue.rankable.sum())} rankable")
    missing = [t for t in TASKS if counts[t] == 0]
    if missing:
        print(f"error: no rows for task(s) {missing}", file=sys.stderr)
        return 1
    return 0


def _events_data(args: argparse.Namespace) -> tuple[Catalogue, EngagementLog]:
    """The events source for ``data``: prints the join report and also writes it
    (``events_report.json``) and each row's position shown (``positions.npz``)."""
    import json

    from app.core.table_io import save_table
    from model_export.event_source import load_events_source

    catalogue, log, report = load_events_source(args.path, args.catalogue_from)
    print(report.format())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "events_report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    save_table(args.out / "positions.npz", {"position": report.position})
    return catalogue, log


def cmd_build_bundle(args: argparse.Namespace) -> int:
    from model_export.bundle_builder import build_bundle

    build_bundle(
        args.out,
        source=args.source,
        path=args.path,
        quick=args.quick,
        seed=args.seed,
        catalogue_from=args.catalogue_from,
        warm_start=args.warm_start,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model_export.report import run_evaluation

    run_evaluation(
        args.source,
        args.path,
        seeds=args.seeds,
        out_dir=args.out,
        per_task=args.per_task,
        epochs=args.epochs,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.http.server import serve_from_args

    return serve_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unicorn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="write the unified engagement log and the catalogue")
    _add_source(p, events=True)
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("build-bundle", help="data -> train -> evaluate -> export a bundle")
    _add_source(p, events=True)
    p.add_argument("--out", type=Path, default=Path("bundles/demo"))
    p.add_argument("--quick", action="store_true", help="fewer epochs, smaller evaluation")
    p.add_argument(
        "--warm-start",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="carry the item space (item vectors, user clusters) over from BUNDLE, of the "
        "same catalogue, instead of pre-training it from this log (default: pre-train)",
    )
    p.set_defaults(func=cmd_build_bundle)

    p = sub.add_parser("evaluate", help="the offline evaluation table (docs/EVALUATION.md)")
    _add_source(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[7])
    p.add_argument("--per-task", type=int, default=1500, help="test impressions per task")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a bundle over HTTP (settings: UNICORN_* env vars)")
    from app.http.server import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"unicorn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
