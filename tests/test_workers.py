"""``--workers 2`` on a real ``python -m app.http.server`` (``app.http.server._run_workers``):
each worker listens on its own socket bound with SO_REUSEPORT, so that Linux spreads new
connections over both; a replacement worker binds its own; a port another program holds
still stops the start; with ``reuse_port=False`` the workers share one socket, as before.

Which process holds a socket is read from ``/proc`` (``loadtest.worker_balance``): the
port's sockets in ``/proc/net/tcp`` by inode, and each process's ``/proc/<pid>/fd``. How
connections split over one shared socket is a race (docs/OPERATIONS.md, "Workers": under
load, 8 connections all on one worker in 34 runs of 46, but not always so), so what is
asserted is what SO_REUSEPORT guarantees: one listener per worker, none in the supervisor,
the option set on them (only then may another socket with SO_REUSEPORT bind the port),
and that fresh connections reach both workers (16 all hashed to one: p = 2**-15).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.http.server import WorkerListener, bind_worker_socket
from loadtest.processes import ServiceProcess, wait_until
from loadtest.worker_balance import connections_per_worker, listeners_per_process

FRESH = 16  # fresh connections per check
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing, /proc"
)


def _serves(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that runs real 2-worker servers for seconds."""
    return pytest.mark.integration(pytest.mark.slow(test))


def _two_workers(
    bundle: Path, log: Path, module: str = "app.http.server", args: tuple[str, ...] = ()
) -> ServiceProcess:
    settings = {"bundle": bundle, "workers": 2, "cache_enabled": False}
    return ServiceProcess(settings, log_path=log, module=module, args=args)


@pytest.fixture(scope="module")
def server(fast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = _two_workers(fast_bundle, tmp_path_factory.mktemp("workers") / "server.log")
    with process:
        yield process


@contextlib.contextmanager
def answered_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` fresh keep-alive connections, opened at once (then each answered once, so a
    worker accepted it). On one shared socket, the worker that wakes first accepts every
    connection waiting: 16 opened at once all landed on one worker 4 times in 10."""
    with contextlib.ExitStack() as stack:
        conns = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(n)
        ]
        for sock in conns:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in conns:
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
        yield conns


def _own_listeners(server: ServiceProcess) -> list[set[int]]:
    """Each worker's listening socket, after checking the supervisor holds none and the
    workers hold one each, not the same one."""
    assert server.process is not None
    workers = server.worker_pids()
    assert len(workers) == 2, workers
    supervisor, *held = listeners_per_process(server.port, [server.process.pid, *workers])
    assert supervisor == set(), "the supervisor holds a listening socket"
    assert [len(h) for h in held] == [1, 1] and held[0] != held[1], held
    return held


def _listening(server: ServiceProcess) -> int:
    return sum(map(len, listeners_per_process(server.port, server.worker_pids())))


@_serves
def test_each_worker_listens_on_its_own_socket_bound_with_so_reuseport(
    server: ServiceProcess,
) -> None:
    _own_listeners(server)
    # Linux lets a socket bind a port sockets listen on only if every one of them, and the
    # newcomer, set SO_REUSEPORT (same user). Bound but never listening, it gets no
    # connection; without the option the port is refused as before.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(("127.0.0.1", server.port))
    with socket.socket() as plain, pytest.raises(OSError) as refused:
        plain.bind(("127.0.0.1", server.port))
    assert refused.value.errno == errno.EADDRINUSE


@_serves
def test_fresh_connections_reach_both_workers(server: ServiceProcess) -> None:
    with answered_connections(server.port, FRESH):
        split = connections_per_worker(server.port, server.worker_pids())
    assert sum(split) == FRESH and min(split) >= 1, split


@_serves
def test_a_replacement_worker_binds_its_own_socket_and_the_survivor_takes_new_connections(
    fast_bundle: Path, tmp_path: Path
) -> None:
    with _two_workers(fast_bundle, tmp_path / "server.log") as server:
        victim, survivor = server.worker_pids()
        startups = server.startups()
        os.kill(victim, signal.SIGKILL)
        # Its socket closed with it: the kernel hashes new connections to the survivor's.
        wait_until(lambda: len(listeners_per_process(server.port, [survivor])[0]) == 1, 10)
        wait_until(lambda: not listeners_per_process(server.port, [victim])[0], 10)
        with answered_connections(server.port, 8):
            assert connections_per_worker(server.port, [survivor]) == [8]
        wait_until(lambda: server.startups() > startups, 60, poll_s=0.05)
        wait_until(lambda: len(server.worker_pids()) == 2, 30)
        assert survivor in server.worker_pids() and victim not in server.worker_pids()
        wait_until(lambda: _listening(server) == 2, 30)  # listens once its app started
        _own_listeners(server)
        with answered_connections(server.port, FRESH):
            split = connections_per_worker(server.port, server.worker_pids())
        assert sum(split) == FRESH and min(split) >= 1, split


@_serves
def test_a_port_another_program_listens_on_stops_the_start_even_with_so_reuseport(
    fast_bundle: Path, tmp_path: Path
) -> None:
    """A second server on the same port must not join the first's sockets silently."""
    server = _two_workers(fast_bundle, tmp_path / "server.log")
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", server.port))
        other.listen()
        server.start(wait=False)
        try:
            assert server.process is not None
            assert server.process.wait(120) == 3, server.log()[-2000:]
        finally:
            server.stop()
    assert "address already in use" in server.log().lower(), server.log()[-2000:]
    assert server.startups() == 0


@_serves
def test_without_reuse_port_the_workers_share_one_socket_and_say_so(
    fast_bundle: Path, tmp_path: Path
) -> None:
    """``run(..., reuse_port=False)``: the old arrangement, and the fallback where
    SO_REUSEPORT does not balance (``loadtest.worker_balance --serve-shared`` runs it)."""
    with _two_workers(
        fast_bundle, tmp_path / "server.log",
        module="loadtest.worker_balance", args=("--serve-shared",),
    ) as server:  # fmt: skip
        assert server.process is not None
        pids = [server.process.pid, *server.worker_pids()]
        held = listeners_per_process(server.port, pids)
        assert len(held[0]) == 1 and held[0] == held[1] == held[2], held
        with answered_connections(server.port, 2):
            pass
    assert "share one listening socket" in server.log()


def test_a_worker_listener_holds_the_port_and_unpickles_into_a_workers_own_socket() -> None:
    """What uvicorn's supervisor holds and hands each worker: a socket bound with
    SO_REUSEPORT and TCP_NODELAY that never listens (it takes no connection, but the port
    stays taken for a program without SO_REUSEPORT), and that the process unpickling it
    (the worker) gets as a socket of its own, bound the same way, not listening yet
    (uvicorn listens once the app has started)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with WorkerListener(socket.AF_INET, "127.0.0.1", port) as held:
        with pickle.loads(pickle.dumps(held)) as sock, pickle.loads(pickle.dumps(held)) as twin:
            for s in (held, sock, twin):
                assert isinstance(s, socket.socket) and s.getsockname() == ("127.0.0.1", port)
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
            assert sock.fileno() != held.fileno() != twin.fileno()
        with socket.socket() as plain, pytest.raises(OSError) as refused:
            plain.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE


def test_a_worker_that_cannot_bind_exits_with_the_startup_failure_status() -> None:
    """Status 3 makes uvicorn's supervisor stop instead of replacing the worker forever."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(SystemExit) as exited:
            bind_worker_socket(socket.AF_INET, "127.0.0.1", other.getsockname()[1])
    assert exited.value.code == 3
