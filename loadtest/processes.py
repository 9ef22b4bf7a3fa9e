"""Process plumbing shared by the load, fault and benchmark scripts (and the test fixtures):
a free loopback port, stopping a server's whole process group, and a throwaway
redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(
    process: subprocess.Popen[bytes], first_signal: signal.Signals = signal.SIGTERM
) -> None:
    """Send ``first_signal`` to the process group (uvicorn workers included), wait up to
    20 s, then SIGKILL the group and wait up to 10 s more."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first_signal)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence) that a caller can kill,
    restart, pause (SIGSTOP) and resume, or stall from inside with ``DEBUG SLEEP``.
    ``directory`` holds its files; without one a temp dir is made and removed by ``stop``."""

    def __init__(self, port: int | None = None, directory: Path | None = None) -> None:
        if not Path(REDIS).exists():
            raise RuntimeError(f"redis-server not found ({REDIS}); `make system-deps` installs it")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._own_dir = directory is None
        self.dir = str(directory) if directory else tempfile.mkdtemp(prefix="unicorn-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> RedisServer:
        """Start it and wait for PING (raises if it exits or stays silent for 10 s)."""
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no",
             "--enable-debug-command", "local", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.command("PING") != b"+PONG":
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 10 s")
            time.sleep(0.02)
        return self

    def command(self, *args: str, timeout_s: float = 2.0) -> bytes:
        """One RESP command over a fresh connection: the first reply line (b"" on error)."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
                sock.sendall(payload.encode())
                return sock.recv(65536).split(b"\r\n", 1)[0]
        except OSError:
            return b""

    def dbsize(self) -> int:
        return int(self.command("DBSIZE")[1:])

    def flush(self) -> None:
        self.command("FLUSHALL")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds it has used (psutil, which the load tools install)."""
        import psutil

        if self.process is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.process.pid).cpu_times()
            return float(times.user + times.system)
        return 0.0

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

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
        thread = threading.Thread(
            target=self.command,
            args=("DEBUG", "SLEEP", f"{seconds:g}"),
            kwargs={"timeout_s": seconds + 10},
            daemon=True,
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
