"""The connection layer against hostile clients, on a real ``python -m app.http.server``
with raw sockets (``app.http.protocol``): a header flood is refused and the server's
memory stays bounded; an over-long request target or head is refused; a head or a body
that never finishes is closed after its (short, configured) read deadline; a client that
goes away mid-body is a 499, never a 500 or a traceback; what uvicorn refuses itself
answers the service's JSON error shape; connections past the cap are refused with 503.

Waits are for the server to close a connection, with generous timeouts; nothing here
asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.http.access_log import RateLimitFilter
from loadtest.processes import ServiceProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 16 * 1024
MAX_URL_BYTES = 4 * 1024
CLOSE_WAIT_S = 30.0  # how long a test waits for the server to close a connection
MIB = 2**20
RANK_HEAD = b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    settings = {
        "bundle": tiny_bundle,
        "log_user_salt": "limits",
        "header_timeout_s": HEADER_TIMEOUT_S,
        "body_timeout_s": BODY_TIMEOUT_S,
        "max_header_bytes": MAX_HEADER_BYTES,
        "max_url_bytes": MAX_URL_BYTES,
    }
    log = tmp_path_factory.mktemp("http-limits") / "server.log"
    process = ServiceProcess(settings, log_path=log).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def no_tracebacks(server: ServiceProcess) -> Iterator[None]:
    """The test leaves no traceback and no 'unhandled error' in the server's log."""
    before = len(server.log())
    yield
    new = server.log()[before:]
    assert "Traceback" not in new and "unhandled error" not in new, new[-3000:]


def _connect(server: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_WAIT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a
    close); fails if it is still open after ``CLOSE_WAIT_S``."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {CLOSE_WAIT_S} s")
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def _json_error(raw: bytes, status: int) -> dict[str, Any]:
    """The error of a raw response: ``status``, JSON, the service's error shape, and the
    connection closed."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), raw[:300]
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/json", headers
    assert headers["connection"] == "close", headers
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "field"} and error["message"], error
    return dict(error)


def _responses(server: ServiceProcess, route: str, status: int) -> float:
    from loadtest.processes import metric

    return metric(server.metrics(), "unicorn_responses_total", route=route, status=str(status))


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- head size ------------------------------------------------------------------------------
def test_a_header_flood_is_refused_and_memory_stays_bounded(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    """Four connections each try to send a 50 MiB header (200 MiB in all): each is refused
    (431) or closed after a read past the limit, and the server's RSS barely moves (it
    grew by hundreds of MiB before, and answered 200)."""
    assert server.process is not None
    pid = server.process.pid
    before = _vm_rss_mib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, AssertionError):
                peak[0] = max(peak[0], _vm_rss_mib(pid))
            time.sleep(0.02)

    outcomes: list[tuple[int, bytes]] = []

    def flood() -> None:
        sock = _connect(server)
        sent = 0
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(50):
                sock.sendall(b"a" * MIB)
                sent += 1
            sock.sendall(b"\r\n\r\n")
        except OSError:  # the server closed the connection (reset or broken pipe)
            pass
        outcomes.append((sent, _read_until_closed(sock)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(4)]
    for thread in floods:
        thread.start()
    for thread in floods:
        thread.join(120)
    done.set()
    sampler.join(5)
    peak[0] = max(peak[0], _vm_rss_mib(pid))
    assert len(outcomes) == 4
    for sent_mib, answer in outcomes:
        assert sent_mib < 50, "the server read a 50 MiB header"
        if answer:
            assert _json_error(answer, 431)["field"] == "headers"
    assert peak[0] - before < 64, (before, peak[0])
    assert server.get("/healthz").status_code == 200


def test_a_head_over_the_limit_gets_431_in_the_json_shape(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    refused = _responses(server, "unmatched", 431)
    sock = _connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1))
    error = _json_error(_read_until_closed(sock), 431)
    assert error["code"] == "headers_too_large" and str(MAX_HEADER_BYTES) in error["message"]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))  # small, but 150 header lines
    sock = _connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert _json_error(_read_until_closed(sock), 431)["code"] == "headers_too_large"
    assert _responses(server, "unmatched", 431) == refused + 2


def test_an_overlong_request_line_is_refused(server: ServiceProcess, no_tracebacks: None) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /" + b"a" * (MAX_URL_BYTES + 100))  # the line never even ends
    error = _json_error(_read_until_closed(sock), 414)
    assert error["code"] == "url_too_long" and error["field"] == "url"
    # Just under the limit is an ordinary request (here: an unknown route).
    sock = _connect(server)
    sock.sendall(b"GET /" + b"a" * (MAX_URL_BYTES - 200) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
    sock.close()


@pytest.mark.parametrize("n_candidates", [0, 900])
def test_a_request_with_headers_of_ordinary_size_is_served(
    server: ServiceProcess, n_candidates: int
) -> None:
    """The limits leave room for what real clients send (8 KB of cookies), and a body
    that arrives with its head (here ~90 KB, several times the head limit) is not
    counted as head."""
    candidates = [f"c{i:04d}-" + "x" * 94 for i in range(n_candidates)] or None
    body = json.dumps({"task": "prequery", "k": 3, "candidates": candidates}).encode()
    cookie = b"Cookie: " + b"c" * 8000 + b"\r\n"
    head = RANK_HEAD + cookie + b"Content-Length: %d\r\n\r\n" % len(body)
    sock = _connect(server)
    sock.sendall(head + body)
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_pipelined_requests_are_answered_but_a_pipeline_flood_is_cut_off(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    """A few pipelined requests are answered in order; 256 KiB of them on each of 10
    connections (7,000 queued requests each, which once took the process up by ~19 MiB
    per connection) are cut off and memory stays bounded."""
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = _connect(server)
    sock.sendall(get * 5 + get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert _read_until_closed(sock).count(b"HTTP/1.1 200 OK\r\n") == 6
    assert server.process is not None
    before = _vm_rss_mib(server.process.pid)
    floods = [_connect(server) for _ in range(10)]
    for sock in floods:
        with contextlib.suppress(OSError):
            sock.sendall(get * (256 * 1024 // len(get)))
    for sock in floods:
        _read_until_closed(sock)  # closed, not left to queue them all
    assert _vm_rss_mib(server.process.pid) - before < 64


# --- read deadlines ---------------------------------------------------------------------------
def test_a_head_that_never_ends_is_closed_after_the_header_deadline(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    """Slowloris: a header line every 0.1 s, never the blank line that ends the head."""
    timeouts = _responses(server, "unmatched", 408)
    sock = _connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.1):
                sock.send(b"X-Slow: a\r\n")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        answer = _read_until_closed(sock)
    finally:
        stop.set()
        thread.join(5)
    if answer:  # a trickled line can reach the closed socket first, and reset it
        assert _json_error(answer, 408)["code"] == "request_timeout"
    assert _responses(server, "unmatched", 408) == timeouts + 1


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    server: ServiceProcess,
) -> None:
    assert _read_until_closed(_connect(server)) == b""


def test_a_body_that_never_ends_is_closed_after_the_body_deadline(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    timeouts, errors = _responses(server, "/rank", 408), _responses(server, "/rank", 500)
    sock = _connect(server)
    sock.sendall(RANK_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"task": "pre')
    error = _json_error(_read_until_closed(sock), 408)
    assert error["code"] == "request_timeout" and error["field"] == "body"
    wait_until(lambda: _responses(server, "/rank", 408) == timeouts + 1, CLOSE_WAIT_S)
    assert _responses(server, "/rank", 500) == errors


# --- disconnects and malformed bodies ----------------------------------------------------------
def test_a_client_gone_mid_body_is_a_499_not_a_500(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    gone, errors = _responses(server, "/rank", 499), _responses(server, "/rank", 500)
    for _ in range(3):
        sock = _connect(server)
        sock.sendall(RANK_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"task": "pre')
        time.sleep(0.05)  # let the route start reading the body
        sock.close()
    wait_until(lambda: _responses(server, "/rank", 499) == gone + 3, CLOSE_WAIT_S)
    assert _responses(server, "/rank", 500) == errors
    lines = [json.loads(line) for line in server.log().splitlines() if '"status":499' in line]
    assert lines and lines[-1]["route"] == "/rank" and lines[-1]["logger"] == "unicorn.access"


def test_a_broken_chunked_body_gets_400_and_is_no_server_error(
    server: ServiceProcess, no_tracebacks: None
) -> None:
    """``zz`` is no chunk size: the client gets a 400 in the JSON shape, and the metrics
    count what it got (a 400 of ``/rank``), not a 500 (every such client used to add a
    500 to the page that alerts on server errors, and two tracebacks to the log)."""
    malformed, errors = _responses(server, "/rank", 400), _responses(server, "/rank", 500)
    sock = _connect(server)
    sock.sendall(RANK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    error = _json_error(_read_until_closed(sock), 400)
    assert error["code"] == "malformed_request" and "chunk" in error["message"]
    wait_until(lambda: _responses(server, "/rank", 400) == malformed + 1, CLOSE_WAIT_S)
    assert _responses(server, "/rank", 500) == errors


# --- what uvicorn refuses: the JSON shape --------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", id="bad method token"),
        pytest.param(b"GET /heal\x00thz HTTP/1.1\r\nHost: x\r\n\r\n", id="NUL in the path"),
        pytest.param(RANK_HEAD + b"Content-Length: 2x\r\n\r\n{}", id="Content-Length not a number"),
        pytest.param(
            RANK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            id="two Content-Lengths",
        ),
        pytest.param(
            RANK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="Content-Length and chunked",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\x01\r\n\r\n", id="control char in a header"
        ),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="TLS on the plain port"),
    ],
)
def test_requests_uvicorn_refuses_get_the_json_error_shape(
    server: ServiceProcess, raw: bytes, no_tracebacks: None
) -> None:
    sock = _connect(server)
    sock.sendall(raw)
    error = _json_error(_read_until_closed(sock), 400)
    assert error["code"] == "malformed_request" and error["message"].startswith("invalid HTTP")


def test_the_server_still_serves_after_all_this(server: ServiceProcess) -> None:
    assert server.get("/healthz").status_code == 200
    response = server.post("/rank", json={"task": "prequery", "k": 3})
    assert response.status_code == 200 and len(response.json()["items"]) == 3


# --- connection cap -------------------------------------------------------------------------
def test_connections_past_the_cap_are_refused_with_503(tiny_bundle: Path, tmp_path: Path) -> None:
    cap = 4
    settings = {"bundle": tiny_bundle, "max_connections": cap, "header_timeout_s": 120}
    with ServiceProcess(settings, log_path=tmp_path / "server.log") as capped:
        held = [_connect(capped) for _ in range(cap)]  # idle: held by the long deadline
        over = _connect(capped)
        over.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_until_closed(over)
        assert b"\r\nretry-after: 1\r\n" in answer.lower()
        error = _json_error(answer, 503)
        assert error["code"] == "overloaded" and str(cap) in error["message"]
        for sock in held:
            sock.close()

        def served() -> bool:
            return capped.get("/healthz").status_code == 200

        wait_until(served, CLOSE_WAIT_S)  # the slots are free again
        refused = _responses(capped, "unmatched", 503)
        assert refused >= 1
        assert "Traceback" not in capped.log()


# --- settings -------------------------------------------------------------------------------
def test_the_limits_are_settings_and_serve_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from pydantic import ValidationError

    from app.http.protocol import ConnectionLimits
    from app.http.server import add_serve_arguments, settings_from_args
    from app.serving.config import Settings

    assert ConnectionLimits.from_settings(Settings()) == ConnectionLimits()
    monkeypatch.setenv("UNICORN_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("UNICORN_MAX_CONNECTIONS", "64")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = ["--max-header-bytes", "20000", "--body-timeout-s", "7", "--max-url-bytes", "2048"]
    limits = ConnectionLimits.from_settings(settings_from_args(parser.parse_args(args)))
    assert limits == ConnectionLimits(20000, 2048, 2.5, 7.0, 64)
    with pytest.raises(
        ValidationError, match=r"max_url_bytes \(8192\) must be <= max_header_bytes"
    ):
        Settings(max_header_bytes=4096, max_url_bytes=8192)
    with pytest.raises(ValidationError, match="greater than 0"):
        Settings(header_timeout_s=0)


# --- logs clients can flood -------------------------------------------------------------------
def test_floodable_log_lines_are_rate_limited() -> None:
    """asyncio logs one error per failed accept() at the descriptor limit (the issue saw
    165,887 lines in 30 s); the filter keeps one per message per interval and says how
    many it dropped."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_http_limits.flood")
    logger.propagate = False
    logger.addHandler(Keep())
    now = [50.0]
    logger.addFilter(RateLimitFilter(interval_s=0.2, clock=lambda: now[0]))
    try:
        for _ in range(10_000):
            logger.error("socket.accept() out of system resource\nsocket: <fd=7>")
            now[0] += 1e-6  # 10,000 lines in 10 ms, well within the interval
        logger.error("another message")
        now[0] += 0.3
        logger.error("socket.accept() out of system resource\nsocket: <fd=7>")
    finally:
        logger.handlers.clear()
        logger.filters.clear()
    messages = [r.getMessage() for r in records]
    assert len(messages) == 3, messages
    assert messages[1] == "another message"
    assert "9999 more like it" in messages[2]
    prefixed = RateLimitFilter(("Invalid HTTP request",))
    other = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "Started", None, None)
    assert all(prefixed.filter(other) for _ in range(3))  # only those messages are limited
    flood = logging.LogRecord(
        "uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.", None, None
    )
    assert [prefixed.filter(flood) for _ in range(3)] == [True, False, False]


# --- admission at the door ------------------------------------------------------------------
class _RefusingAdmission:
    """Stands in for a saturated ``Admission``: it would refuse every request at once."""

    queue_timeout_s = 0.1
    min_slots = 4
    entered = 0

    def refuses_now(self, ahead: int = 0) -> bool:
        return True


def test_a_rank_call_admission_would_refuse_is_answered_503_before_its_route_runs(
    settings_for: Any,
) -> None:
    """While admission refuses at once and every /rank call scores, the connection layer
    answers ``POST /rank`` 503 + Retry-After in the JSON shape, keeps the connection
    alive, and counts it (shed and /rank 503); other routes still answer."""
    import uvicorn
    from conftest import LiveServer

    from app.http.main import create_app
    from app.http.protocol import DOOR_KEY, AdmissionDoor, ServiceHttpToolsProtocol
    from loadtest.processes import metric

    live = LiveServer(create_app(settings_for(cache_enabled=False)))
    config = uvicorn.Config(
        live.app, loop="asyncio", http=ServiceHttpToolsProtocol, lifespan="on",
        log_config=None, access_log=False, timeout_graceful_shutdown=5,
    )  # fmt: skip
    live.server = uvicorn.Server(config)
    live.thread = threading.Thread(
        target=live.server.run, kwargs={"sockets": [live.sock]}, daemon=True
    )
    live.start()
    try:
        door = live.server.lifespan.state[DOOR_KEY]
        assert isinstance(door, AdmissionDoor) and door.admission is not None
        with live.client() as client:
            assert client.post("/rank", json={"task": "prequery"}).status_code == 200
            before = client.get("/metrics").text
        door.admission = _RefusingAdmission()  # type: ignore[assignment]
        door._scoring = True  # as after DOOR_SAMPLE calls that all reached admission
        body = b'{"task": "prequery"}'
        request = RANK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=CLOSE_WAIT_S)
        try:
            for _ in range(2):  # the same connection answers both
                sock.sendall(request)
                raw = b""
                while b"\r\n\r\n" not in raw or not raw.endswith(b"}}"):
                    chunk = sock.recv(65536)
                    assert chunk, raw
                    raw += chunk
                head, _, payload = raw.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                assert lines[0] == "HTTP/1.1 503 Service Unavailable", raw
                headers = dict(line.lower().split(": ", 1) for line in lines[1:])
                assert headers["retry-after"] == "1" and "connection" not in headers
                assert headers["content-type"] == "application/json"
                assert int(headers["content-length"]) == len(payload)
                error = json.loads(payload)["error"]
                assert error["code"] == "overloaded" and error["field"] is None
                assert "queue_timeout_ms=100" in error["message"]
        finally:
            sock.close()
        with live.client() as client:
            assert client.get("/healthz").status_code == 200
            after = client.get("/metrics").text
        for name, labels in (
            ("unicorn_shed_requests_total", {}),
            ("unicorn_responses_total", {"route": "/rank", "status": "503"}),
        ):
            assert metric(after, name, **labels) - metric(before, name, **labels) == 2, name
    finally:
        live.stop()


def test_door_refusals_are_logged_one_line_then_one_summary_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of door refusals writes the window's first refusal in full and the rest as
    one summary line with their count, at the window's end (a loop timer), then a new
    window starts with a full line: nothing refused goes unlogged, and a 10x flood does not
    pay a log line per refusal."""
    from app.http.protocol import DOOR_LOG_WINDOW_S, AdmissionDoor
    from app.serving.metrics import ServiceMetrics

    now = [100.0]
    door = AdmissionDoor(ServiceMetrics(), clock=lambda: now[0])

    def lines() -> list[dict[str, Any]]:
        return [r.access for r in caplog.records if hasattr(r, "access")]

    async def flood() -> None:
        for i in range(5):
            door.log("POST", "/rank", now[0] - 0.002, f"r{i}")
            now[0] += DOOR_LOG_WINDOW_S / 10
        assert [line["request_id"] for line in lines()] == ["r0"]  # the rest wait
        assert lines()[0]["latency_ms"] == pytest.approx(2.0)
        await asyncio.sleep(DOOR_LOG_WINDOW_S * 1.2)  # the window's timer writes the summary
        now[0] += DOOR_LOG_WINDOW_S
        door.log("POST", "/rank", now[0], "r5")  # a new window: a full line again

    with caplog.at_level(logging.INFO, logger="unicorn.access"):
        asyncio.run(flood())
    logged = lines()
    assert [line.get("request_id") for line in logged] == ["r0", None, "r5"], logged
    summary = logged[1]
    assert summary["refused"] == 4 and summary["status"] == 503 and summary["route"] == "/rank"
    door.log_summary()  # nothing pending: no line
    assert len(lines()) == 3
