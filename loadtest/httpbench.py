"""HTTP parts of the benchmark: a real server process and ``wrk`` (redis-server:
``loadtest.processes.RedisServer``).

- ``BenchServer``: ``python -m loadtest.serve`` (the service + the Floor B route) on a free
  port with the given ``UNICORN_*`` settings; waits until every worker has loaded the
  model; reads its ``/metrics``, CPU time and RSS per worker.
- ``run_wrk``: one closed-loop load run (``wrk -t1 -cC``) with ``loadtest/rank.lua``;
  returns the latency percentiles, throughput, errors and wrk's own CPU use (from
  ``wait4`` rusage), so a run shows whether the load generator was the bottleneck.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtest.processes import free_port, stop_process_group

LUA_SCRIPT = Path(__file__).with_name("rank.lua")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
READY_TIMEOUT_S = 180.0
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every process, every core)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class BenchServer:
    """The service as a separate process tree, configured by ``settings``: by default the
    benchmark server (``loadtest.serve``, with Floor B); ``module="app.http.server"`` runs
    ``unicorn serve`` itself."""

    def __init__(
        self,
        settings: dict[str, Any],
        workers: int = 1,
        http: str = "httptools",
        log_dir: Path | None = None,
        module: str = "loadtest.serve",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="unicorn-bench-metrics-"))
        extra_env = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNICORN_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # The server runs with the environment a deployment gives it, not the benchmark's
        # own (loadtest.bench limits its BLAS threads): only what ``env`` adds.
        for name in BLAS_ENV:
            env.pop(name, None)
        env.update({f"UNICORN_{k.upper()}": str(v) for k, v in settings.items()})
        env.update(extra_env)
        env.update(
            UNICORN_PORT=str(self.port),
            UNICORN_WORKERS=str(workers),
            UNICORN_METRICS_DIR=str(self.metrics_dir),
        )
        log_dir = log_dir or Path(tempfile.gettempdir())
        self.log_path = log_dir / f"unicorn-bench-{self.port}.log"
        self._log = self.log_path.open("wb")
        args = ["--http", http] if module == "loadtest.serve" else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {READY_TIMEOUT_S:.0f}s: {self.tail()}")
            with contextlib.suppress(OSError, ValueError):
                if http_json(self.url + "/readyz", timeout=2)["status"] == "ready" and (
                    self.workers == 1 or self._loaded_workers() >= self.workers
                ):
                    return
            time.sleep(0.1)

    def _loaded_workers(self) -> int:
        # Each worker writes its model_info gauge once its model is loaded; the files are
        # named after the worker pid (prometheus_client multiprocess mode).
        return len({p.stem.rsplit("_", 1)[-1] for p in self.metrics_dir.glob("gauge_livemax_*.db")})

    def tail(self, n: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def worker_processes(self) -> list[psutil.Process]:
        """The processes that serve requests (the one process, or uvicorn's workers)."""
        root = psutil.Process(self.process.pid)
        if self.workers == 1:
            return [root]
        # uvicorn's supervisor spawns the workers with multiprocessing (next to them runs
        # multiprocessing's resource tracker, which holds no model).
        return [
            p
            for p in root.children(recursive=False)
            if any("spawn_main" in part for part in p.cmdline())
        ]

    def rss_mib(self) -> list[float]:
        return [p.memory_info().rss / 2**20 for p in self.worker_processes()]

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.processes())

    def worker_cpu_seconds(self) -> list[float]:
        return [_cpu_seconds([p]) for p in self.worker_processes()]

    def metrics(self) -> dict[str, float]:
        """Flat ``{name{labels}: value}`` of the service's /metrics (all workers)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        flat: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                flat[f"{s.name}{{{labels}}}"] = s.value
        return flat

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGINT)
        self._log.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: int  # connect + read + write + timeout + HTTP status >= 400
    status_errors: int
    wrk_cpu: float  # wrk's CPU seconds / wall seconds (1.0 = one core busy)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def run_wrk(
    url: str,
    bodies_file: Path,
    connections: int,
    seconds: int,
    offset: int = 0,
    threads: int = 1,
    timeout_s: float = 5.0,
) -> WrkResult:
    """``wrk -t{threads} -c{connections}`` for ``seconds`` (whole seconds: wrk's unit)
    POSTing the bodies of the file."""
    if seconds < 1 or int(seconds) != seconds:
        raise ValueError(f"seconds must be a whole number >= 1 (wrk's unit), got {seconds}")
    cmd = [
        WRK, f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", f"--timeout={timeout_s:g}s",
        "-s", str(LUA_SCRIPT), url, "--", str(bodies_file), str(offset), str(threads),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    line = next((ln for ln in out.decode().splitlines() if ln.startswith('{"requests"')), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out.decode()[-500:]}")
    s = json.loads(line)
    errors = s["connect"] + s["read"] + s["write"] + s["timeout"] + s["status"]
    return WrkResult(
        requests=int(s["requests"]),
        seconds=s["duration_us"] / 1e6,
        p50_ms=s["p50_us"] / 1000.0,
        p90_ms=s["p90_us"] / 1000.0,
        p99_ms=s["p99_us"] / 1000.0,
        p999_ms=s["p999_us"] / 1000.0,
        max_ms=s["max_us"] / 1000.0,
        errors=int(errors),
        status_errors=int(s["status"]),
        wrk_cpu=(usage.ru_utime + usage.ru_stime) / wall,
    )


def write_bodies(path: Path, bodies: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(b, separators=(",", ":")) + "\n" for b in bodies))
    return path
