"""Feedback-loop events (``app.serving.events``), all against real parts: Parquet files in a
real directory read back with pyarrow, a process SIGKILLed while writing, a real
redis-server (consumer groups, a crashed consumer, Redis down), the queue on a real event
loop with a sink that blocks until released. Ages and log intervals come from injected
clocks; no test asserts a wall-clock time."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from app.serving.events import (
    ENGAGEMENT,
    FIELDS,
    IMPRESSION,
    KINDS,
    EventQueue,
    EventsNotWritten,
    FileSink,
    RedisStreamSink,
    complete_files,
    drain_streams,
)
from loadtest.processes import RedisServer, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(impression|engagement)-\d{8}T\d{6}-\d+-\d{6}\.parquet$")

async_test = pytest.mark.anyio


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def impression(i: int | str, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "request_id": f"req-{i}",
        "ts": 1_700_000_000.123456 + float(str(i).split("-")[-1] or 0),
        "task": "search",
        "user": "9f86d081884c7d65",
        "user_hashed": True,
        "query": "stränger thïngs 🦄",
        "country": "US",
        "source_entity_id": "",
        "personalization": "full",
        "variant": "default",
        "model_version": "mv-0123abcd",
        "cache": "miss",
        "entity_ids": [f"e{i}-a", f"e{i}-b", "e-c"],
        "scores": [0.9375, 0.1 + 1e-12, 1 / 3],
    }
    event.update(overrides)
    return event


def engagement(i: int | str, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"ev-{i}",
        "request_id": f"req-{i}",
        "entity_id": f"e{i}-a",
        "type": "play",
        "ts": 1_700_000_001.5,
        "received_ts": 1_700_000_002.25,
    }
    event.update(overrides)
    return event


def read_rows(directory: Path, kind: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in complete_files(directory, kind):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def tmp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.tmp"))


# --- FileSink -------------------------------------------------------------------------------
def test_rows_round_trip_through_parquet_exactly_with_list_columns(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    shown = [
        impression(0),
        impression(1, user="", user_hashed=False, entity_ids=[], scores=[], cache="bypass"),
        impression(2, source_entity_id="tt0111161", task="more_like_this", query=""),
    ]
    clicked = [engagement(0), engagement(1, type="add_to_list")]
    sink.write(IMPRESSION, [dict(e, extra="not a column") for e in shown])
    sink.write(ENGAGEMENT, clicked)
    sink.close()

    assert read_rows(tmp_path, IMPRESSION) == shown
    assert read_rows(tmp_path, ENGAGEMENT) == clicked
    for kind in KINDS:
        (path,) = complete_files(tmp_path, kind)
        assert NAME.match(path.name), path.name
        schema = pq.read_schema(path)
        assert schema.names == list(FIELDS[kind])  # exactly the contract, in its order
    schema = pq.read_schema(complete_files(tmp_path, IMPRESSION)[0])
    assert schema.field("entity_ids").type == pa.list_(pa.string())
    assert schema.field("scores").type == pa.list_(pa.float64())
    assert schema.field("user_hashed").type == pa.bool_()
    assert schema.field("ts").type == pa.float64()
    assert tmp_files(tmp_path) == []
    assert sink.written == {IMPRESSION: 3, ENGAGEMENT: 2} and sink.files_written == 2


def test_files_roll_at_max_rows_and_keep_the_order(tmp_path: Path) -> None:
    written: list[tuple[str, int]] = []
    sink = FileSink(tmp_path, max_rows=3, on_written=lambda kind, n: written.append((kind, n)))
    sink.write(IMPRESSION, [impression(0), impression(1)])
    assert complete_files(tmp_path) == [] and sink.buffered(IMPRESSION) == 2
    sink.write(IMPRESSION, [impression(i) for i in range(2, 10)])  # split across 3 files
    assert [pq.read_metadata(p).num_rows for p in complete_files(tmp_path)] == [3, 3, 3]
    assert sink.buffered(IMPRESSION) == 1
    sink.close()
    files = complete_files(tmp_path)
    assert [pq.read_metadata(p).num_rows for p in files] == [3, 3, 3, 1]
    seqs = [int(p.stem.rsplit("-", 1)[1]) for p in files]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert [r["request_id"] for r in read_rows(tmp_path)] == [f"req-{i}" for i in range(10)]
    assert written == [(IMPRESSION, 3)] * 3 + [(IMPRESSION, 1)]
    assert tmp_files(tmp_path) == []


def test_files_roll_at_max_age_by_the_injected_clock_kind_by_kind(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)  # 2023-11-14T22:13:20Z
    sink = FileSink(tmp_path, max_rows=1000, max_age_s=10, clock=clock)
    sink.write(IMPRESSION, [impression(0), impression(1)])
    clock.now += 5
    sink.write(IMPRESSION, [impression(2)])
    sink.write(ENGAGEMENT, [engagement(0)])  # its buffer's age starts now (t = 5)
    clock.now += 4.999
    sink.write(IMPRESSION, [])  # a heartbeat: nothing is 10 s old yet
    assert complete_files(tmp_path) == []
    clock.now += 0.001  # t = 10: the impressions' oldest is 10 s old
    sink.write(IMPRESSION, [])
    (first,) = complete_files(tmp_path)
    assert first.name.startswith("impression-20231114T221330-")
    assert pq.read_metadata(first).num_rows == 3
    assert sink.buffered(IMPRESSION) == 0 and sink.buffered(ENGAGEMENT) == 1
    clock.now += 5  # t = 15: the engagement is 10 s old, any write rolls it
    sink.write(IMPRESSION, [impression(3)])
    assert [r["event_id"] for r in read_rows(tmp_path, ENGAGEMENT)] == ["ev-0"]
    assert sink.buffered(IMPRESSION) == 1
    sink.close()
    assert len(complete_files(tmp_path, IMPRESSION)) == 2 and tmp_files(tmp_path) == []


def test_invalid_events_are_dropped_and_counted_the_rest_written(tmp_path: Path) -> None:
    drops: list[tuple[str, int]] = []
    sink = FileSink(tmp_path, on_drop=lambda kind, n: drops.append((kind, n)))
    missing = impression(1)
    del missing["scores"]
    events = [
        impression(0),
        missing,
        impression(2, country=None),
        impression(3, ts="yesterday"),
        impression(4, entity_ids="e1,e2"),
        impression(5),
    ]
    sink.write(IMPRESSION, events)
    sink.close()
    assert [r["request_id"] for r in read_rows(tmp_path)] == ["req-0", "req-5"]
    assert sink.dropped[IMPRESSION] == 4 and drops == [(IMPRESSION, 4)]
    with pytest.raises(ValueError, match="unknown event kind"):
        FileSink(tmp_path / "other").write("purchase", [impression(0)])


def test_a_write_error_drops_the_file_counts_it_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full in the middle of a file: half of it reached the .tmp, then ENOSPC."""
    drops: list[tuple[str, int]] = []
    sink = FileSink(tmp_path, max_rows=2, on_drop=lambda kind, n: drops.append((kind, n)))
    real_write_table = pq.write_table

    def disk_full(table: pa.Table, where: Any, **kwargs: Any) -> None:
        out = pa.BufferOutputStream()
        real_write_table(table, out, **kwargs)
        data = out.getvalue().to_pybytes()
        where.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    sink.write(IMPRESSION, [impression(0), impression(1), impression(2)])  # rolls 2: fails
    assert list(tmp_path.iterdir()) == []  # no .parquet, no .tmp
    assert sink.dropped[IMPRESSION] == 2 and drops == [(IMPRESSION, 2)]
    with pytest.raises(EventsNotWritten) as failed:  # the drain must not acknowledge
        sink.flush()  # ... and this flush's file (the 3rd event) fails too
    assert failed.value.count == 3 and sink.dropped[IMPRESSION] == 3
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(pq, "write_table", real_write_table)  # space again: it goes on
    sink.write(IMPRESSION, [impression(3), impression(4)])
    sink.flush()  # nothing dropped since the last flush: no error
    sink.close()
    assert [r["request_id"] for r in read_rows(tmp_path)] == ["req-3", "req-4"]
    assert sink.written[IMPRESSION] == 2 and tmp_files(tmp_path) == []


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import json, random, resource, signal, string, sys
    from app.serving.events import FileSink
    template = json.loads(sys.argv[2])
    impression = lambda i, **kw: dict(template, request_id=f"req-{i}", **kw)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
    drops = []
    sink = FileSink(sys.argv[1], max_rows=10_000, on_drop=lambda k, n: drops.append(n))
    rng = random.Random(0)
    noise = lambda: "".join(rng.choices(string.ascii_letters, k=40))
    big = [impression(i, entity_ids=[noise() for _ in range(50)]) for i in range(400)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    sink.write("impression", big)
    error = None
    try:
        sink.flush()  # the file of the 400: past the limit
    except Exception as exc:
        error = type(exc).__name__
    sink.write("impression", [impression(i) for i in range(3)])
    sink.close()
    print(json.dumps({"drops": drops, "error": error, "written": sink.written["impression"]}))
    """
)


def test_a_real_file_size_limit_from_the_os_is_survived(tmp_path: Path) -> None:
    """Not a mock: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk
    refuses it with ENOSPC."""
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path), json.dumps(impression(0))],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"drops": [400], "error": "EventsNotWritten", "written": 3}
    assert "File too large" in result.stderr  # logged
    assert [r["request_id"] for r in read_rows(tmp_path)] == ["req-0", "req-1", "req-2"]
    assert tmp_files(tmp_path) == []


KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from app.serving.events import EventQueue, FileSink
    directory, mode, shown, clicked = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
    impression = lambda i: dict(shown, request_id=f"req-{i}")
    engagement = lambda i: dict(clicked, request_id=f"req-{i}", event_id=f"ev-{i}")
    if mode == "mid-write":  # the 3rd file: half of it reaches the .tmp, then SIGKILL
        real, rolls = pq.write_table, []
        def write_table(table, where, **kwargs):
            rolls.append(1)
            if len(rolls) < 3:
                return real(table, where, **kwargs)
            out = pa.BufferOutputStream()
            real(table, out, **kwargs)
            data = out.getvalue().to_pybytes()
            where.write(data[: len(data) // 2])
            where.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        pq.write_table = write_table
    async def main():
        queue = EventQueue(FileSink(directory, max_rows=200, max_age_s=3600), capacity=10**6,
                           batch_size=50, flush_interval_s=0.01)
        queue.start()
        i = 0
        while True:
            for _ in range(20):
                queue.put("impression", impression(i))
                if i % 4 == 0:
                    queue.put("engagement", engagement(i))
                i += 1
            await asyncio.sleep(0.002)
    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["kill-from-outside", "mid-write"])
def test_a_writer_killed_with_sigkill_leaves_only_complete_files(tmp_path: Path, mode: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), mode,
         json.dumps(impression(0)), json.dumps(engagement(0))], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if mode == "kill-from-outside":  # at whatever point it is, after a few files
            wait_until(lambda: len(complete_files(tmp_path, IMPRESSION)) >= 4, 60)
            process.send_signal(signal.SIGKILL)
        assert process.wait(60) == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    files = complete_files(tmp_path)
    assert files and all(NAME.match(p.name) for p in files)
    for kind, every in ((IMPRESSION, 1), (ENGAGEMENT, 4)):
        ids = [int(r["request_id"].removeprefix("req-")) for r in read_rows(tmp_path, kind)]
        # every file reads completely; what is lost is the unflushed tail only: the ids
        # present are exactly the first ones put, in order, each once
        assert ids == list(range(0, every * len(ids), every)), kind
    for path in files:
        assert pq.read_table(path).num_rows == pq.read_metadata(path).num_rows <= 200
    leftovers = tmp_files(tmp_path)
    if mode == "mid-write":
        assert len(complete_files(tmp_path, IMPRESSION)) == 2  # the 3rd never appeared
        (partial,) = leftovers
        with pytest.raises(pa.ArrowInvalid):  # a half file: why readers must ignore *.tmp
            pq.read_table(partial)
    assert not set(leftovers) & set(files)
    FileSink(tmp_path, stale_tmp_s=0).close()  # the next writer clears what was left
    assert tmp_files(tmp_path) == [] and complete_files(tmp_path) == files


# --- Redis Streams --------------------------------------------------------------------------
def pending_count(server: RedisServer, stream: str, group: str) -> int:
    with server.client() as r:
        return int(r.xpending(stream, group)["pending"])


@pytest.mark.integration
def test_two_replicas_streams_are_drained_to_files_exactly_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    replicas = [RedisStreamSink(redis_server.url) for _ in range(2)]
    for name, sink in zip("ab", replicas, strict=True):
        for start in range(0, 60, 20):  # several pipelined batches each
            sink.write(IMPRESSION, [impression(f"{name}-{i}") for i in range(start, start + 20)])
        sink.write(ENGAGEMENT, [engagement(f"{name}-{i}") for i in range(15)])
    for sink in replicas:
        sink.close()

    files = FileSink(tmp_path, max_rows=1000)
    drained = drain_streams(
        redis_server.url, "collector", "c1", files, count=50, block_ms=20, until_idle=True
    )
    assert drained == 150
    shown = sorted(r["request_id"] for r in read_rows(tmp_path, IMPRESSION))
    assert shown == sorted(f"req-{n}-{i}" for n in "ab" for i in range(60))  # each once
    assert sorted(r["event_id"] for r in read_rows(tmp_path, ENGAGEMENT)) == sorted(
        f"ev-{n}-{i}" for n in "ab" for i in range(15)
    )
    assert read_rows(tmp_path, IMPRESSION)[0] == impression("a-0")  # field for field
    for kind in KINDS:
        assert pending_count(redis_server, f"unicorn:events:{kind}", "collector") == 0
    # A second run, and another consumer of the same group, find nothing left to collect
    for consumer in ("c1", "c2"):
        again = drain_streams(
            redis_server.url, "collector", consumer, files, block_ms=20, until_idle=True
        )
        assert again == 0
    files.close()
    assert len(read_rows(tmp_path)) == 150 and tmp_files(tmp_path) == []


class Crash(BaseException):
    """The collector process dying (not an error it could catch and retry)."""


class CrashingSink:
    def write(self, kind: str, events: list[dict[str, Any]]) -> None:
        if events:
            raise Crash

    def close(self) -> None:
        pass


@pytest.mark.integration
def test_entries_read_but_never_acknowledged_are_redelivered_on_restart(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    producer = RedisStreamSink(redis_server.url)
    producer.write(IMPRESSION, [impression(i) for i in range(30)])
    producer.write(ENGAGEMENT, [engagement(i) for i in range(5)])
    stream = "unicorn:events:impression"
    # crash 1: the collector read a batch and died before writing it
    with pytest.raises(Crash):
        drain_streams(redis_server.url, "g", "c1", CrashingSink(), count=10, block_ms=20)
    assert pending_count(redis_server, stream, "g") > 0
    # crash 2: read by hand with XREADGROUP, as a consumer that died right after its read
    with redis_server.client() as r:
        r.xreadgroup("g", "c1", {stream: ">"}, count=25)
    assert pending_count(redis_server, stream, "g") == 30

    files = FileSink(tmp_path)  # the restarted collector, same consumer name
    assert drain_streams(redis_server.url, "g", "c1", files, block_ms=20, until_idle=True) == 35
    files.close()
    assert sorted(r["request_id"] for r in read_rows(tmp_path, IMPRESSION)) == sorted(
        f"req-{i}" for i in range(30)
    )
    assert len(read_rows(tmp_path, ENGAGEMENT)) == 5
    assert pending_count(redis_server, stream, "g") == 0

    # a consumer that died under a name never used again: its entries are claimed
    producer.write(IMPRESSION, [impression(i) for i in range(30, 40)])
    with redis_server.client() as r:
        r.xreadgroup("g", "dead-pod", {stream: ">"}, count=100)
    other = tmp_path / "claimed"
    sink = FileSink(other)
    drained = drain_streams(
        redis_server.url, "g", "c2", sink, block_ms=20, until_idle=True, claim_idle_ms=0
    )
    sink.close()
    assert drained == 10 and len(read_rows(other)) == 10
    assert pending_count(redis_server, stream, "g") == 0
    producer.close()


@pytest.mark.integration
def test_a_sink_failure_in_the_collector_is_retried_without_acknowledging(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the collector: its flush raises, nothing is acknowledged, the
    entries are re-read from its pending list once the disk has room again."""
    producer = RedisStreamSink(redis_server.url)
    producer.write(IMPRESSION, [impression(i) for i in range(12)])
    producer.close()
    real_write_table, failures = pq.write_table, list[int]()

    def full_twice(table: pa.Table, where: Any, **kwargs: Any) -> None:
        if len(failures) < 2:
            failures.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_table(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_twice)
    files = FileSink(tmp_path)
    drained = drain_streams(
        redis_server.url, "g", "c1", files, count=5, block_ms=20, until_idle=True, retry_s=0.01
    )
    files.close()
    assert failures == [1, 1] and drained == 12
    assert sorted(r["request_id"] for r in read_rows(tmp_path)) == sorted(
        f"req-{i}" for i in range(12)
    )
    assert pending_count(redis_server, "unicorn:events:impression", "g") == 0


@pytest.mark.integration
def test_unreadable_entries_are_acknowledged_and_skipped_not_retried_forever(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    drops: list[tuple[str, int]] = []
    sink = RedisStreamSink(redis_server.url, on_drop=lambda kind, n: drops.append((kind, n)))
    sink.write(ENGAGEMENT, [engagement(0), engagement(1, type={"a set"}), engagement(2)])
    sink.close()
    assert sink.dropped[ENGAGEMENT] == 1 and drops == [(ENGAGEMENT, 1)]  # not JSON-able
    stream = "unicorn:events:engagement"
    with redis_server.client() as r:  # a foreign writer's entries
        r.xadd(stream, {"x": "no e field"})
        r.xadd(stream, {"e": "not json {"})
    files = FileSink(tmp_path)
    drained = drain_streams(redis_server.url, "g", "c1", files, block_ms=20, until_idle=True)
    files.close()
    assert drained == 2
    assert [r["event_id"] for r in read_rows(tmp_path)] == ["ev-0", "ev-2"]
    assert pending_count(redis_server, stream, "g") == 0


@pytest.mark.integration
def test_streams_are_trimmed_to_about_maxlen(redis_server: RedisServer) -> None:
    sink = RedisStreamSink(redis_server.url, stream_prefix="t:", maxlen=100)
    for start in range(0, 2000, 200):
        sink.write(ENGAGEMENT, [engagement(i) for i in range(start, start + 200)])
    sink.close()
    with redis_server.client() as r:
        length = int(r.xlen("t:engagement"))
        (_, fields), *_ = r.xrevrange("t:engagement", count=1)
    assert 100 <= length < 2000  # approximate: whole macro nodes are trimmed
    assert json.loads(fields[b"e"]) == engagement(1999)


@pytest.mark.integration
@async_test
async def test_redis_down_the_write_raises_and_the_queue_counts_the_batch_dropped(
    redis_server: RedisServer,
) -> None:
    sink = RedisStreamSink(redis_server.url, timeout_s=1.0)
    drops: list[tuple[str, int]] = []
    queue = EventQueue(
        sink, batch_size=5, flush_interval_s=0.01, on_drop=lambda k, n: drops.append((k, n))
    )
    queue.start()
    for i in range(5):
        queue.put(IMPRESSION, impression(i))
    await until(lambda: queue.written[IMPRESSION] == 5)

    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        sink.write(IMPRESSION, [impression(99)])  # the sink raises ...
    for i in range(5, 15):
        queue.put(IMPRESSION, impression(i))  # ... the queue does not
    await until(lambda: queue.dropped[IMPRESSION] == 10)
    assert sum(n for _, n in drops) == 10 and {k for k, _ in drops} == {IMPRESSION}

    redis_server.start()  # back (empty: no persistence): the queue goes on by itself
    for i in range(15, 20):
        queue.put(IMPRESSION, impression(i))
    await queue.close()
    assert queue.written[IMPRESSION] == 10 and queue.dropped[IMPRESSION] == 10
    with redis_server.client() as r:
        assert int(r.xlen("unicorn:events:impression")) == 5


@pytest.mark.integration
def test_the_collector_command_drains_the_streams_into_files(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    producer = RedisStreamSink(redis_server.url)
    producer.write(IMPRESSION, [impression(i) for i in range(7)])
    producer.write(ENGAGEMENT, [engagement(i) for i in range(3)])
    producer.close()
    result = subprocess.run(
        [sys.executable, "-m", "app.serving.events", "collect", "--redis-url", redis_server.url,
         "--dir", str(tmp_path), "--until-idle", "--block-ms", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "collected 10 events" in result.stderr
    assert len(read_rows(tmp_path, IMPRESSION)) == 7 and len(read_rows(tmp_path, ENGAGEMENT)) == 3


def test_an_unreachable_redis_raises_from_the_sink() -> None:
    sink = RedisStreamSink(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(redis.ConnectionError):
        sink.write(ENGAGEMENT, [engagement(0)])
    sink.write(ENGAGEMENT, [])  # a heartbeat never touches Redis
    sink.close()


# --- EventQueue -----------------------------------------------------------------------------
async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait (yielding to the loop) until ``condition()`` holds; fails after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.005)


class GatedSink:
    """Records batches; each write blocks until ``gate`` is set (``entered`` says one has
    started). ``fail_kinds``: writes of those kinds raise."""

    def __init__(self, gated: bool = True, fail_kinds: tuple[str, ...] = ()) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.batches: list[tuple[str, list[dict[str, Any]]]] = []
        self.heartbeats = 0
        self.fail_kinds = fail_kinds
        self.closed = False

    def write(self, kind: str, events: list[dict[str, Any]]) -> None:
        if not events:
            self.heartbeats += 1
            return
        self.entered.set()
        self.gate.wait(60)
        if kind in self.fail_kinds:
            raise OSError(errno.EIO, "the sink is broken")
        self.batches.append((kind, events))

    def close(self) -> None:
        self.closed = True

    def ids(self, kind: str = IMPRESSION) -> list[str]:
        return [e["request_id"] for k, batch in self.batches if k == kind for e in batch]


@async_test
async def test_put_never_blocks_a_blocked_sink_bounds_memory_and_the_oldest_are_dropped() -> None:
    sink = GatedSink()
    drops: list[tuple[str, int]] = []
    queue = EventQueue(
        sink, capacity=10, batch_size=4, flush_interval_s=0.01,
        on_drop=lambda kind, n: drops.append((kind, n)),
    )  # fmt: skip
    queue.start()
    try:
        for i in range(4):
            queue.put(IMPRESSION, impression(i))
        await asyncio.to_thread(sink.entered.wait, 20)  # the sink holds batch 0-3 and blocks
        assert queue.in_flight == 4 and queue.pending() == 0
        for i in range(4, 104):  # all of them return: the loop never waits for the sink
            queue.put(IMPRESSION, impression(i))
            assert queue.pending() <= 10  # capacity + the one batch in flight, at most
        assert queue.pending(IMPRESSION) == 10
        assert queue.dropped == {IMPRESSION: 90, ENGAGEMENT: 0}
        assert drops == [(IMPRESSION, 1)] * 90
    finally:
        sink.gate.set()
    await queue.close()
    # the oldest were dropped, the newest kept
    assert sink.ids() == [f"req-{i}" for i in (*range(4), *range(94, 104))]
    assert queue.written == {IMPRESSION: 14, ENGAGEMENT: 0}
    assert queue.written[IMPRESSION] + queue.dropped[IMPRESSION] == 104 and queue.pending() == 0
    assert sink.closed


@async_test
async def test_close_flushes_what_is_left_and_later_puts_are_counted_dropped() -> None:
    sink = GatedSink(gated=False)
    written: list[tuple[str, int]] = []
    queue = EventQueue(
        sink, batch_size=100, flush_interval_s=3600,  # neither a full batch nor a flush is due
        on_written=lambda kind, n: written.append((kind, n)),
    )  # fmt: skip
    queue.start()
    for i in range(7):
        queue.put(IMPRESSION, impression(i))
    queue.put(ENGAGEMENT, engagement(0))
    await asyncio.sleep(0.05)
    assert sink.batches == [] and queue.pending() == 8
    await queue.close()
    assert sink.ids() == [f"req-{i}" for i in range(7)] and sink.closed
    assert sorted(written) == [(ENGAGEMENT, 1), (IMPRESSION, 7)]
    queue.put(IMPRESSION, impression(7))
    queue.put("purchase", {"what": "an unknown kind"})
    assert queue.dropped == {IMPRESSION: 1, ENGAGEMENT: 0, "unknown": 1}


@async_test
async def test_close_without_start_still_writes_everything() -> None:
    sink = GatedSink(gated=False)
    queue = EventQueue(sink, batch_size=3)
    for i in range(5):
        queue.put(IMPRESSION, impression(i))
    await queue.close()
    assert sink.ids() == [f"req-{i}" for i in range(5)] and queue.written[IMPRESSION] == 5


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = (r.getMessage() for r in caplog.records)
    return [line for line in lines if "write of engagement failed" in line]


@async_test
async def test_sink_errors_are_counted_logged_once_per_interval_and_the_queue_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = GatedSink(gated=False, fail_kinds=(ENGAGEMENT,))
    clock = FakeClock(0.0)  # the log interval's clock (and the flush timer's: frozen)
    drops: list[tuple[str, int]] = []
    queue = EventQueue(
        sink, batch_size=5, flush_interval_s=0.01, log_interval_s=60, clock=clock,
        on_drop=lambda kind, n: drops.append((kind, n)),
    )  # fmt: skip
    queue.start()
    caplog.set_level(logging.WARNING, logger="unicorn.events")
    for i in range(20):  # 4 failing batches, 4 good ones
        queue.put(ENGAGEMENT, engagement(i))
        queue.put(IMPRESSION, impression(i))
    await until(lambda: queue.dropped[ENGAGEMENT] == 20 and queue.written[IMPRESSION] == 20)
    assert drops == [(ENGAGEMENT, 5)] * 4
    lines = failure_lines(caplog)
    assert len(lines) == 1 and "the sink is broken" in lines[0]

    clock.now += 60  # the next failure writes a line counting what was not logged
    for i in range(20, 25):
        queue.put(ENGAGEMENT, engagement(i))
    await until(lambda: queue.dropped[ENGAGEMENT] == 25)
    lines = failure_lines(caplog)
    assert len(lines) == 2 and "(20 events since the last such line)" in lines[1]
    await queue.close()
    assert queue.written == {IMPRESSION: 20, ENGAGEMENT: 0}


@async_test
async def test_a_hung_sink_cannot_hold_close_past_its_deadline() -> None:
    sink = GatedSink()
    queue = EventQueue(sink, capacity=100, batch_size=4, flush_interval_s=0.01)
    queue.start()
    try:
        for i in range(10):
            queue.put(IMPRESSION, impression(i))
        await asyncio.to_thread(sink.entered.wait, 20)
        await queue.close(timeout_s=0.2)  # returns although the sink never does
        # the batch in the sink and what it never took: dropped, not written
        assert queue.dropped[IMPRESSION] == 10 and queue.written[IMPRESSION] == 0
        assert queue.pending() == 0 and queue.in_flight == 0
    finally:
        sink.gate.set()


@async_test
async def test_put_never_raises_even_when_the_drop_callback_does() -> None:
    def broken(kind: str, n: int) -> None:
        raise RuntimeError("metrics are broken")

    queue = EventQueue(GatedSink(gated=False), capacity=1, on_drop=broken)
    queue.put(IMPRESSION, impression(0))
    queue.put(IMPRESSION, impression(1))  # full: drops the oldest, the callback raises
    queue.put("nonsense", {})
    assert queue.dropped == {IMPRESSION: 1, ENGAGEMENT: 0, "unknown": 1}
    await queue.close()
    assert queue.written[IMPRESSION] == 1


@async_test
async def test_an_idle_queue_heartbeats_so_a_file_sink_rolls_aged_buffers(tmp_path: Path) -> None:
    clock = FakeClock()
    files = FileSink(tmp_path, max_rows=1000, max_age_s=30, clock=clock)
    queue = EventQueue(files, batch_size=100, flush_interval_s=0.01)
    queue.start()
    queue.put(IMPRESSION, impression(0))
    await until(lambda: queue.written[IMPRESSION] == 1)  # handed over: buffered in the sink
    assert files.buffered(IMPRESSION) == 1 and complete_files(tmp_path) == []
    clock.now += 30  # no more traffic; the heartbeat alone rolls the file
    await until(lambda: len(complete_files(tmp_path)) == 1)
    await queue.close()
    assert [r["request_id"] for r in read_rows(tmp_path)] == ["req-0"]
