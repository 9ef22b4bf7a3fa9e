"""How ``--workers 2`` splits connections and load over its two worker processes, and what
two workers buy over one (docs/OPERATIONS.md, "Workers"):

    python -m loadtest.worker_balance [--rounds 5] [--seconds 4] [--bundle bundles/demo]
                                      [--quiet-wait S] [--json cells.json]

Starts on free ports ``python -m app.http.server --no-cache`` on the bundle with 1 worker
(``1w``) and with 2 (``2w``: a listening socket per worker, SO_REUSEPORT), and ``2w-shared``,
the 2-worker server on one listening socket shared by both workers, which is what every
2-worker server did before (``python -m loadtest.worker_balance --serve-shared``, i.e.
``app.http.server.run(..., reuse_port=False)``). Then, in rounds, at concurrency 8 and
then 32, the servers take a ``wrk -t1`` run each, back to back (the order rotates),
POSTing cache-miss ``/rank`` bodies of every task (``loadtest/request_bodies.py``). During
each run it reads which worker holds each connection (``connections_per_worker``: the
server-side sockets of ``/proc/net/tcp`` mapped to processes through ``/proc/<pid>/fd``)
and each worker's CPU seconds. Every wrk run opens fresh connections, so each run is one
more draw of how 8 (or 32) connections land. A ratio compares cells that ran seconds
apart on the same noisy machine; each cell also records how many cores the rest of the
machine kept busy meanwhile (other users' jobs: a ratio where they held a quarter of a
core or more is starred), and ``--quiet-wait`` starts each group of cells only once the
machine is quiet, so that a 2-worker cell can have both cores.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.processes import (
    ROOT,
    ServiceProcess,
    WrkResult,
    machine_busy_seconds,
    run_wrk,
    write_bodies,
)

# name -> (workers, python -m module, its arguments)
VARIANTS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "1w": (1, "app.http.server", ()),
    "2w": (2, "app.http.server", ()),
    "2w-shared": (2, "loadtest.worker_balance", ("--serve-shared",)),
}
CONCURRENCY = (8, 32)
QUIET = 0.25  # a cell where the rest of the machine kept less than this busy (cores)
TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"  # the "st" column of /proc/net/tcp


def _port_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) bound to local port ``port`` in ``state``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, st, inode = fields[1], fields[3], int(fields[9])
                if st == state and inode and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (``/proc/<pid>/fd``)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def connections_per_worker(port: int, pids: Iterable[int]) -> list[int]:
    """How many accepted connections to ``port`` each process of ``pids`` holds."""
    established = _port_sockets(port, TCP_ESTABLISHED)
    return [len(socket_inodes(pid) & established) for pid in pids]


def listeners_per_process(port: int, pids: Iterable[int]) -> list[set[int]]:
    """The listening sockets on ``port`` each process of ``pids`` holds (inodes)."""
    listening = _port_sockets(port, TCP_LISTEN)
    return [socket_inodes(pid) & listening for pid in pids]


@dataclass(frozen=True)
class Cell:
    variant: str
    round: int
    conc: int
    rps: float  # answered with 200 (at c32 a worker sheds the excess with 503s, fast)
    errors: int
    connections: list[int]  # per worker, read mid-run
    worker_cpu: list[float]  # per worker, CPU seconds / wall seconds
    wrk_cpu: float
    other_cpu: float  # cores the rest of the machine (other users' jobs) kept busy meanwhile


def measure(variant: str, server: ServiceProcess, bodies: Path, conc: int, seconds: int,
            rnd: int, offset: int) -> Cell:  # fmt: skip
    """One wrk run against ``server``, with the connection split read halfway through."""
    pids = server.worker_pids()
    split: list[int] = []

    def sample() -> None:
        time.sleep(seconds / 2)
        split.extend(connections_per_worker(server.port, pids))

    reader = threading.Thread(target=sample, daemon=True)
    cpu0, busy0, started = server.worker_cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    reader.start()
    wrk: WrkResult = run_wrk(server.url + "/rank", bodies, conc, seconds, offset)
    wall = time.perf_counter() - started
    cpu = [(b - a) / wall for a, b in zip(cpu0, server.worker_cpu_seconds(), strict=True)]
    other = max((machine_busy_seconds() - busy0) / wall - sum(cpu) - wrk.wrk_cpu, 0.0)
    reader.join()
    ok = (wrk.requests - wrk.errors) / wrk.seconds if wrk.seconds else 0.0
    return Cell(variant, rnd, conc, ok, wrk.errors, split, cpu, wrk.wrk_cpu, other)


@contextlib.contextmanager
def servers(names: list[str], bundle: Path, workdir: Path) -> Iterator[dict[str, ServiceProcess]]:
    """Every variant's server, started together (an idle server costs no CPU)."""
    started: dict[str, ServiceProcess] = {}
    try:
        for name in names:
            workers, module, args = VARIANTS[name]
            settings = {"bundle": bundle, "workers": workers, "cache_enabled": False}
            started[name] = ServiceProcess(
                settings, module=module, args=args, log_path=workdir / f"{name}.log"
            ).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until the machine, the servers idle, kept under
    ``QUIET`` cores busy for a second; returns the last second's reading (cores)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = machine_busy_seconds()
        time.sleep(1.0)
        busy = machine_busy_seconds() - busy0
        if busy < QUIET or time.monotonic() > deadline:
            return busy


def miss_bodies(bundle_dir: Path, path: Path, per_task: int = 150) -> Path:
    """Cache-miss bodies of every task, interleaved (the server runs without a cache)."""
    from app.core.bundle import load_bundle
    from loadtest.request_bodies import TASKS, request_bodies

    bundle = load_bundle(bundle_dir)
    per = [request_bodies(bundle, task, per_task, seed=21) for task in TASKS]
    return write_bodies(path, [b for group in zip(*per, strict=True) for b in group])


def _split(values: list[int] | list[float], digits: int = 0) -> str:
    return "+".join(f"{v:.{digits}f}" for v in sorted(values, reverse=True))


def summarise(cells: list[Cell], names: list[str]) -> str:
    lines = []
    for name in (n for n in names if VARIANTS[n][0] > 1):
        for conc in CONCURRENCY:
            mine = [c for c in cells if c.variant == name and c.conc == conc]
            lines.append(
                f"{name} c{conc}: connections {', '.join(_split(c.connections) for c in mine)}; "
                f"cores {', '.join(_split(c.worker_cpu, 2) for c in mine)}"
            )
    for conc in CONCURRENCY:
        at = {n: {c.round: c for c in cells if c.variant == n and c.conc == conc} for n in names}
        medians = ", ".join(
            f"{n} {statistics.median(c.rps for c in at[n].values()):.0f}" for n in names
        )
        lines.append(f"c{conc} 200s/s (median): {medians}")
        for name in (n for n in names if n != "1w" and "1w" in names):
            pairs = [(at[name][r], at["1w"][r]) for r in sorted(at["1w"]) if at["1w"][r].rps]
            ratios = [(a.rps / b.rps, max(a.other_cpu, b.other_cpu) < QUIET) for a, b in pairs]
            quiet = [x for x, q in ratios if q]
            lines.append(
                f"c{conc} {name} / 1w: median {statistics.median(x for x, _ in ratios):.2f}, "
                f"quiet rounds {statistics.median(quiet) if quiet else float('nan'):.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' + ('' if q else '*') for x, q in ratios)}; "
                f"* = others kept >= {QUIET} core busy)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.worker_balance", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run (whole seconds)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="before each round, wait up to this many seconds for the machine to be quiet",
    )  # fmt: skip
    parser.add_argument("--serve-shared", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_shared:  # the 2w-shared server itself (settings from UNICORN_*)
        from app.http.server import run
        from app.serving.config import Settings

        run(Settings(), reuse_port=False)
        return 0
    names = [n for n in args.variants.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="unicorn-balance-"))
    bodies = miss_bodies(args.bundle.resolve(), workdir / "bodies.jsonl")
    cells: list[Cell] = []
    offset = 0
    with servers(names, args.bundle.resolve(), workdir) as started:
        for server in started.values():  # first calls, connections, onnxruntime warm-up
            run_wrk(server.url + "/rank", bodies, 8, 1, offset)
        for rnd, conc in itertools.product(range(args.rounds), CONCURRENCY):
            # The servers back to back at one concurrency: what a ratio compares ran
            # seconds apart; the order rotates so that none always goes first.
            if args.quiet_wait > 0:
                quiet = wait_for_quiet(args.quiet_wait)
                print(f"round {rnd} c{conc}: others {quiet:.2f} cores before")
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                cell = measure(name, started[name], bodies, conc, args.seconds, rnd, offset)
                offset += int(cell.rps * args.seconds) + cell.errors
                cells.append(cell)
                print(
                    f"round {rnd} {name} c{conc}: {cell.rps:.0f} ok/s, {cell.errors} errors, "
                    f"connections {_split(cell.connections)}, "
                    f"cores {_split(cell.worker_cpu, 2)}, wrk {cell.wrk_cpu:.2f}, "
                    f"others {cell.other_cpu:.2f}",
                    flush=True,
                )
    print(summarise(cells, names))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
