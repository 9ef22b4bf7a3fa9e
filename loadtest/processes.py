"""The processes the load tools and the integration tests start, and what they read from
them: a throwaway redis-server, the service as its own process tree (``ServiceProcess``),
closed-loop ``wrk`` runs (``run_wrk``), and the service's ``/metrics`` (``metric``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> float:
    """Seconds until ``condition()`` held (polled; an exception counts as not yet, but a
    ``RuntimeError`` is raised); raises ``TimeoutError`` after ``timeout_s``."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except RuntimeError:
            raise
        except Exception:  # not yet: refused, timed out, not parsable yet
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s:g} s")
        time.sleep(poll_s)


def metric_samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of the samples called ``name`` with ``labels`` in exposition
    ``text`` (prometheus_client's parser)."""
    families = text_string_to_metric_families(text)
    match = (s for f in families for s in f.samples if s.name == name)
    return [(s.labels, s.value) for s in match if labels.items() <= s.labels.items()]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` with ``labels`` in exposition ``text``."""
    return float(sum(value for _, value in metric_samples(text, name, **labels)))


def cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    """User + system CPU seconds the processes have used (those still running)."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every process, every core)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence) that a caller can kill,
    restart (``start``), pause (SIGSTOP) and resume, or stall from inside with ``DEBUG
    SLEEP``. ``directory`` holds its files; without one a temp dir, removed by ``stop``."""

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        if not Path(REDIS).exists():
            raise RuntimeError(f"redis-server not found ({REDIS}); `make system-deps` installs it")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._own_dir = directory is None
        self.dir = str(directory) if directory else tempfile.mkdtemp(prefix="unicorn-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_timeout=timeout_s)

    def start(self) -> RedisServer:
        """Start it and wait for PING (raises if it exits or stays silent for 10 s)."""
        self.process = process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             "--enable-debug-command", "local", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            with self.client() as r:
                return bool(r.ping())

        wait_until(answers, 10)
        return self

    def dbsize(self) -> int:
        with self.client() as r:
            return int(r.dbsize())

    def flush(self) -> None:
        with self.client() as r:
            r.flushall()

    def cpu_seconds(self) -> float:
        with contextlib.suppress(psutil.Error, AttributeError):
            return cpu_seconds([psutil.Process(self.process.pid)])  # type: ignore[union-attr]
        return 0.0

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def debug_sleep(self, seconds: float) -> threading.Thread:
        """Stall the server from inside (``DEBUG SLEEP``); returns the thread that waits
        for the reply, which arrives when the stall ends."""

        def call() -> None:
            with self.client(timeout_s=seconds + 10) as r:
                r.execute_command("DEBUG", "SLEEP", f"{seconds:g}")

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class ServiceProcess:
    """``python -m <module>`` (``app.http.server``, what ``unicorn serve`` runs, or the
    benchmark's ``loadtest.floor_b``) as its own process tree on a free port, configured by
    ``UNICORN_*`` ``settings`` (``workers`` among them); its output goes to ``log_path``.
    It gets this process's environment without ``UNICORN_*``, ``PROMETHEUS_MULTIPROC_DIR``
    and the BLAS thread variables (what a deployment gives it, not what the benchmark set
    for itself), plus ``env``."""

    def __init__(
        self, settings: dict[str, Any], *, log_path: Path | None = None,
        module: str = "app.http.server", args: tuple[str, ...] = (),
        env: dict[str, str] | None = None, ready_timeout_s: float = 180.0,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = int(settings.get("workers", 1))
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="unicorn-metrics-"))
        dropped = ("PROMETHEUS_MULTIPROC_DIR", *BLAS_ENV)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UNICORN_")}
        self.env = {k: v for k, v in self.env.items() if k not in dropped} | (env or {})
        self.env.update({f"UNICORN_{k.upper()}": str(v) for k, v in settings.items()})
        self.env.update(UNICORN_PORT=str(self.port), UNICORN_METRICS_DIR=str(self.metrics_dir))
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"unicorn-{self.port}.log"
        self.command = [sys.executable, "-m", module, *args]
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> ServiceProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            if wait:
                wait_until(self._ready, self.ready_timeout_s, poll_s=0.1)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def _ready(self) -> bool:
        """``/readyz`` answers 200 and every worker has started (an exit raises)."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"server exited; log:\n{self.log()[-3000:]}")
        if self.workers > 1 and self.startups() < self.workers:
            return False
        return self.get("/readyz").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def startups(self) -> int:
        """Workers that completed startup so far (replacements included)."""
        return self.log().count("Application startup complete")

    def processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error, AttributeError):
            root = psutil.Process(self.process.pid)  # type: ignore[union-attr]
            return [root, *root.children(recursive=True)]
        return []

    def worker_processes(self) -> list[psutil.Process]:
        """The processes that serve requests: the one process, or uvicorn's workers (which
        multiprocessing spawned; its resource tracker, also a child, holds no model)."""
        tree = self.processes()
        if self.workers == 1 or not tree:
            return tree[:1]
        with contextlib.suppress(psutil.Error):
            return [p for p in tree[0].children() if any("spawn_main" in a for a in p.cmdline())]
        return []

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.worker_processes()]

    def rss_bytes(self) -> int:
        """Resident memory of the whole process tree (supervisor and workers)."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def rss_mib(self) -> list[float]:
        return [p.memory_info().rss / 2**20 for p in self.worker_processes()]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.processes())

    def worker_cpu_seconds(self) -> list[float]:
        return [cpu_seconds([p]) for p in self.worker_processes()]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def stop(self) -> int | None:
        """SIGTERM to the process group (uvicorn workers included); SIGKILL after 20 s."""
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.process is not None and self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(wait_s)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return None if self.process is None else self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # connect + read + write + timeout + HTTP status >= 400
    status_errors: int  # HTTP status >= 400 (a 503 from admission control among them)
    wrk_cpu: float  # wrk's CPU seconds / wall seconds (1.0 = one core busy)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return self.errors - self.status_errors


def write_bodies(path: Path, bodies: Iterable[dict[str, Any]]) -> Path:
    """One compact JSON body per line: what ``run_wrk`` POSTs."""
    path.write_text("".join(json.dumps(b, separators=(",", ":")) + "\n" for b in bodies))
    return path


def run_wrk(
    url: str, bodies: Path, connections: int, seconds: int, offset: int = 0,
    timeout_s: float = 5.0, script: Path | None = None,
) -> WrkResult:  # fmt: skip
    """``wrk -t1 -c{connections}`` for ``seconds`` (whole seconds: wrk's unit) POSTing the
    bodies of the file round robin from line ``offset`` (``loadtest/rank.lua``, or
    ``script``: a script that takes the same two arguments and prints the same summary,
    such as loadtest/peer.py's); wrk's own CPU use comes from its ``wait4`` rusage, so a
    run shows whether it was the bottleneck."""
    if not Path(WRK).exists():
        raise RuntimeError(f"wrk not found ({WRK}); `make bench` installs it")
    if seconds < 1 or int(seconds) != seconds:
        raise ValueError(f"seconds must be a whole number >= 1 (wrk's unit), got {seconds}")
    lua = script or Path(__file__).with_name("rank.lua")
    cmd = [WRK, "-t1", f"-c{connections}", f"-d{int(seconds)}s", f"--timeout={timeout_s:g}s",
           "-s", str(lua), url, "--", str(bodies), str(offset)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # wrk writes little
    _, status, usage = os.wait4(proc.pid, 0)
    wall, proc.returncode = time.perf_counter() - started, os.waitstatus_to_exitcode(status)
    line = next((ln for ln in out.splitlines() if ln.startswith('{"requests"')), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err[-500:]} {out[-500:]}")
    s = json.loads(line)
    return WrkResult(
        int(s["requests"]), s["duration_us"] / 1e6, s["p50_us"] / 1000.0, s["p99_us"] / 1000.0,
        int(s["connect"] + s["read"] + s["write"] + s["timeout"] + s["status"]), int(s["status"]),
        (usage.ru_utime + usage.ru_stime) / wall,
    )  # fmt: skip
