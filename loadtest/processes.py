"""Process plumbing shared by the load, fault and benchmark scripts (and the test fixtures):
a free loopback port, and stopping a server's whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


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
