"""Feedback-loop events: what the service showed (impressions) and what users did with it
(engagements), carried from the request path to files the training side reads.

The pieces, each replaceable (docs/OPERATIONS.md, "Event sinks"):

- ``EventQueue``: what the request path talks to. ``put(kind, event)`` is O(1), never
  blocks and never raises; a bounded deque per kind drops the OLDEST event when full
  (counted: ``dropped``, ``on_drop``). A background asyncio task hands batches to a sink
  through ``asyncio.to_thread``, so the event loop never waits on a disk or a socket; a
  sink that fails has its batch counted as dropped, and the queue goes on.
- ``EventSink``: ``write(kind, events)`` (blocking, called off the event loop) and
  ``close()``. ``write`` may be called with no events: a heartbeat (the queue sends one
  every ``flush_interval_s`` while idle) so that a buffering sink can act on time.
- ``FileSink``: append-only Parquet files, one per kind per roll, written atomically
  (``.tmp`` in the same directory, fsync, ``os.replace``, fsync of the directory): a
  reader only ever sees complete files and ignores ``*.tmp``.
- ``RedisStreamSink``: ``XADD`` to ``{prefix}{kind}`` (one field ``e``: the event as JSON),
  approximate ``MAXLEN`` trimming, one pipeline per batch. Several replicas write the same
  streams; ONE collector (``drain_streams``, or ``python -m app.serving.events collect``)
  reads them with a consumer group into a ``FileSink`` and acknowledges only what is on
  disk (at least once: a reader deduplicates by ``request_id`` / ``event_id``).

Kafka plugs in behind the same protocol, no adapter ships (none can be tested here without
a broker). A ``KafkaSink`` holds a confluent-kafka ``Producer`` (``acks=all``,
``enable.idempotence=true``, ``linger.ms`` a few ms); ``write(kind, events)`` calls
``producer.produce(topic_for(kind), orjson.dumps(event), key=event["request_id"])`` for
each event, then ``producer.flush(timeout)`` and raises if messages remain undelivered
(the ``on_delivery`` callback saw an error, or ``flush`` returned a non-zero count), so
that ``EventQueue`` counts the batch as dropped; ``close()`` flushes and returns. Kafka
Connect's S3/HDFS sink (or a consumer writing a ``FileSink``) then makes the files.

Events are plain dicts of JSON-able values, the contract below (``FIELDS``); a ``FileSink``
drops, and counts, an event that lacks a field, has ``None`` in one, or has a value its
column cannot hold. Impression: ``request_id``, ``ts`` (epoch seconds), ``task``, ``user``
("" when logged out; a salted hash unless raw ids are configured), ``user_hashed``,
``query``, ``country``, ``source_entity_id`` ("" when none), ``personalization``,
``variant`` (the serving variant's name), ``model_version``, ``cache``
(hit|miss|bypass|...), ``entity_ids`` (in the order shown), ``scores`` (same length).
Engagement: ``event_id``, ``request_id``, ``entity_id``, ``type``
(play|click|add_to_list|...), ``ts`` (the client's), ``received_ts``.

pyarrow (about 50 MiB of memory) is imported by the first ``FileSink`` only: a replica
that writes to Redis never loads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger("unicorn.events")

IMPRESSION = "impression"
ENGAGEMENT = "engagement"
KINDS = (IMPRESSION, ENGAGEMENT)
UNKNOWN_KIND = "unknown"  # the counter key for a put() of a kind not in KINDS

# The contract: field -> type ("str", "float", "bool", "list[str]", "list[float]"). The
# Parquet columns are exactly these, in this order; the reader depends on it.
FIELDS: dict[str, dict[str, str]] = {
    IMPRESSION: {
        "request_id": "str",
        "ts": "float",
        "task": "str",
        "user": "str",
        "user_hashed": "bool",
        "query": "str",
        "country": "str",
        "source_entity_id": "str",
        "personalization": "str",
        "variant": "str",
        "model_version": "str",
        "cache": "str",
        "entity_ids": "list[str]",
        "scores": "list[float]",
    },
    ENGAGEMENT: {
        "event_id": "str",
        "request_id": "str",
        "entity_id": "str",
        "type": "str",
        "ts": "float",
        "received_ts": "float",
    },
}

_LIST_FIELDS = {k: [n for n, t in f.items() if t.startswith("list")] for k, f in FIELDS.items()}

STREAM_PREFIX = "unicorn:events:"
STREAM_FIELD = b"e"  # the one field of a stream entry: the event as JSON (orjson)
TMP_SUFFIX = ".tmp"
PARQUET_SUFFIX = ".parquet"

DropCallback = Callable[[str, int], None]  # (kind, events)
WrittenCallback = Callable[[str, int], None]  # (kind, events)

_file_seq = itertools.count(1)  # one sequence per process: two FileSinks never share a name


class EventSink(Protocol):
    """Where batches of events go. ``write`` blocks (it is called in a worker thread, never
    on the event loop) and raises when the batch was not stored; it may be called with an
    empty list (a heartbeat). ``close`` stores what the sink still buffers."""

    def write(self, kind: str, events: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class FlushableSink(Protocol):
    """A sink that buffers: ``flush()`` returns once everything written so far is durable
    and raises if some of it could not be (``drain_streams`` acknowledges only then)."""

    def flush(self) -> None: ...


class EventsNotWritten(Exception):
    """``FileSink.flush``: events written since the last flush were dropped."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} events could not be written since the last flush")
        self.count = count


def _check_kind(kind: str) -> None:
    if kind not in FIELDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {KINDS}")


def _call(callback: Callable[[str, int], None] | None, kind: str, n: int) -> None:
    """A metrics hook: its failure is logged, never raised into the machinery."""
    if callback is None:
        return
    try:
        callback(kind, n)
    except Exception:
        logger.exception("event counter callback %r failed", callback)


class _LogLimiter:
    """At most one log line per ``interval_s`` per key, carrying the count since the last
    line (a failing sink under load would otherwise write a line per batch)."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def warn(self, key: str, n: int, message: str, *args: object, unit: str = "events") -> bool:
        """Log ``message % args`` with the ``n`` counted under ``key`` since the last line
        (this call's included); returns whether a line was written."""
        now = self._clock()
        self._pending[key] = self._pending.get(key, 0) + n
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[key] = now
        total = self._pending.pop(key)
        logger.warning(message + " (%d %s since the last such line)", *args, total, unit)
        return True


# --- files ----------------------------------------------------------------------------------
def _arrow_types(pa: Any) -> dict[str, Any]:
    return {
        "str": pa.string(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "list[str]": pa.list_(pa.string()),
        "list[float]": pa.list_(pa.float64()),
    }


def arrow_schema(kind: str) -> Any:
    """The ``pyarrow.Schema`` of ``kind``'s files: the contract fields, none nullable."""
    import pyarrow as pa

    _check_kind(kind)
    types = _arrow_types(pa)
    return pa.schema([pa.field(n, types[t], nullable=False) for n, t in FIELDS[kind].items()])


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    """Append-only Parquet files in ``directory``, one per kind per roll, named
    ``{kind}-{UTC yyyymmddTHHMMSS}-{pid}-{seq:06d}.parquet``.

    Events are buffered per kind (as Arrow record batches, validated on ``write``) and a
    file is written when the buffer reaches ``max_rows`` (a file never holds more), when
    its oldest event is ``max_age_s`` old (checked on every ``write``, heartbeats
    included), on ``flush()`` and on ``close()``. A file is written to ``<name>.tmp``,
    fsynced, renamed (``os.replace``) and the directory fsynced: readers see complete
    files or nothing. A write that fails (disk full, any ``OSError``) drops that file's
    events: counted (``dropped``, ``on_drop``), logged (rate-limited), the ``.tmp``
    removed, never raised from ``write``; ``flush()`` raises ``EventsNotWritten`` when
    events were dropped since the last flush. ``.tmp`` files older than ``stale_tmp_s``
    (left by a killed process) are removed at start.

    One directory per writing process: names are unique within a process and never
    overwrite an existing file, but two containers that both run as pid 1 and roll in the
    same second into one shared directory could pick the same name.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_rows: int = 100_000,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        *,
        on_drop: DropCallback | None = None,
        on_written: WrittenCallback | None = None,
        compression: str = "zstd",
        stale_tmp_s: float | None = 3600.0,
        log_interval_s: float = 60.0,
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if max_rows < 1 or max_age_s <= 0:
            raise ValueError(
                f"max_rows must be >= 1 and max_age_s > 0, got {max_rows}, {max_age_s}"
            )
        self._pa, self._pq = pa, pq
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.compression = compression
        self._clock = clock  # epoch seconds: file names and buffer ages
        self._on_drop = on_drop
        self._on_written = on_written
        self._schemas = {kind: arrow_schema(kind) for kind in KINDS}
        self._buffers: dict[str, list[Any]] = {kind: [] for kind in KINDS}  # RecordBatches
        self._rows: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._since: dict[str, float] = {}  # kind -> when its buffer's oldest row came
        self._lock = threading.Lock()
        self._closed = False
        self._dropped_since_flush = 0
        self._log = _LogLimiter(log_interval_s, time.monotonic)
        self.dropped: dict[str, int] = dict.fromkeys(KINDS, 0)  # events
        self.written: dict[str, int] = dict.fromkeys(KINDS, 0)  # events in complete files
        self.files_written = 0
        if stale_tmp_s is not None:
            self._remove_stale_tmp(stale_tmp_s)

    # the EventSink protocol
    def write(self, kind: str, events: list[dict[str, Any]]) -> None:
        _check_kind(kind)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"FileSink({self.directory}) is closed")
            if events:
                batch = self._to_batch(kind, events)
                if batch.num_rows:
                    self._append(kind, batch)
            now = self._clock()
            for k, since in list(self._since.items()):
                if now - since >= self.max_age_s:
                    self._roll(k)

    def flush(self) -> None:
        """Write every buffer to a file now; raise ``EventsNotWritten`` if any events were
        dropped since the last flush (this one's files included)."""
        with self._lock:
            for kind in KINDS:
                self._roll(kind)
            dropped, self._dropped_since_flush = self._dropped_since_flush, 0
        if dropped:
            raise EventsNotWritten(dropped)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for kind in KINDS:
                self._roll(kind)
            self._closed = True

    def buffered(self, kind: str) -> int:
        """Events of ``kind`` waiting in memory for the next file."""
        return self._rows[kind]

    # internals
    def _to_batch(self, kind: str, events: list[dict[str, Any]]) -> Any:
        """The valid events as one RecordBatch; the others are dropped and counted."""
        pa, schema, names = self._pa, self._schemas[kind], FIELDS[kind]
        lists = _LIST_FIELDS[kind]  # Arrow would read a str as a list of its characters
        complete = [
            e
            for e in events
            if isinstance(e, dict)
            and all(e.get(n) is not None for n in names)
            and all(isinstance(e[n], list | tuple) for n in lists)
        ]
        try:
            batch = pa.RecordBatch.from_pylist(complete, schema=schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            good = []  # find the culprits one by one (rare: the service builds the events)
            for event in complete:
                with contextlib.suppress(pa.ArrowException, TypeError, ValueError, OverflowError):
                    pa.RecordBatch.from_pylist([event], schema=schema)
                    good.append(event)
            batch = pa.RecordBatch.from_pylist(good, schema=schema)
        invalid = len(events) - batch.num_rows
        if invalid:
            self._drop(kind, invalid, "invalid", "invalid %s events dropped", kind)
        return batch

    def _append(self, kind: str, batch: Any) -> None:
        while batch.num_rows:
            if not self._rows[kind]:
                self._since[kind] = self._clock()
            take = min(batch.num_rows, self.max_rows - self._rows[kind])
            self._buffers[kind].append(batch.slice(0, take))
            self._rows[kind] += take
            batch = batch.slice(take)
            if self._rows[kind] >= self.max_rows:
                self._roll(kind)

    def _next_paths(self, kind: str) -> tuple[Path, Path]:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._clock()))
        while True:
            name = f"{kind}-{stamp}-{os.getpid()}-{next(_file_seq):06d}{PARQUET_SUFFIX}"
            final = self.directory / name
            tmp = final.with_name(name + TMP_SUFFIX)
            if not final.exists() and not tmp.exists():
                return final, tmp

    def _roll(self, kind: str) -> bool:
        """Write ``kind``'s buffer to one file (atomically); False when it was dropped."""
        rows, batches = self._rows[kind], self._buffers[kind]
        self._buffers[kind], self._rows[kind] = [], 0
        self._since.pop(kind, None)
        if not rows:
            return True
        tmp: Path | None = None
        try:
            table = self._pa.Table.from_batches(batches, schema=self._schemas[kind])
            final, tmp = self._next_paths(kind)
            with open(tmp, "xb") as f:
                self._pq.write_table(table, f, compression=self.compression)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except Exception as exc:  # disk full, EIO, read-only, a quota: drop, never raise
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._drop(
                kind, rows, "write", "event file write failed in %s: %r", self.directory, exc
            )
            return False
        try:
            _fsync_directory(self.directory)
        except OSError as exc:  # the file is complete and visible; its name may not be durable
            logger.warning("fsync of %s after writing %s failed: %r", self.directory, final, exc)
        self.written[kind] += rows
        self.files_written += 1
        _call(self._on_written, kind, rows)
        return True

    def _drop(self, kind: str, n: int, key: str, message: str, *args: object) -> None:
        self.dropped[kind] += n
        self._dropped_since_flush += n
        _call(self._on_drop, kind, n)
        self._log.warn(key, n, message, *args)

    def _remove_stale_tmp(self, older_than_s: float) -> None:
        now = time.time()  # file times are wall-clock, whatever clock the sink was given
        for path in self.directory.glob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime >= older_than_s:
                    path.unlink()
                    logger.info("removed %s, left by an interrupted writer", path)


def complete_files(directory: str | os.PathLike[str], kind: str | None = None) -> list[Path]:
    """The complete event files in ``directory`` (of ``kind``), oldest name first: what a
    reader reads. ``*.tmp`` files are never among them."""
    pattern = f"{kind}-*{PARQUET_SUFFIX}" if kind else f"*{PARQUET_SUFFIX}"
    return sorted(Path(directory).glob(pattern))


# --- Redis Streams --------------------------------------------------------------------------
def _redis_client(redis_url: str, timeout_s: float) -> redis.Redis:
    # A stale pooled connection (Redis restarted) fails at once: reconnect and retry once.
    # Never on a timeout: a stalled Redis would cost twice the timeout.
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry
    )


class RedisStreamSink:
    """Each event ``XADD``ed to ``{stream_prefix}{kind}`` as one field ``e`` (orjson bytes),
    ``MAXLEN ~ maxlen``, one pipeline per batch (synchronous client: the queue calls it in
    a worker thread). ``write`` raises when Redis cannot be reached; a batch cut by a
    failure may be partly stored (at least once). An event orjson cannot encode is dropped
    and counted (``dropped``, ``on_drop``)."""

    def __init__(
        self,
        redis_url: str,
        stream_prefix: str = STREAM_PREFIX,
        maxlen: int = 1_000_000,
        *,
        timeout_s: float = 2.0,
        on_drop: DropCallback | None = None,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.stream_prefix = stream_prefix
        self.maxlen = maxlen
        self._on_drop = on_drop
        self._redis = _redis_client(redis_url, timeout_s)
        self.dropped: dict[str, int] = dict.fromkeys(KINDS, 0)

    def stream(self, kind: str) -> str:
        return f"{self.stream_prefix}{kind}"

    def write(self, kind: str, events: list[dict[str, Any]]) -> None:
        _check_kind(kind)
        if not events:
            return
        stream, pipe, unencodable = self.stream(kind), self._redis.pipeline(False), 0
        for event in events:
            try:
                payload = orjson.dumps(event)
            except TypeError:
                unencodable += 1
                continue
            pipe.xadd(stream, {STREAM_FIELD: payload}, maxlen=self.maxlen, approximate=True)
        if unencodable:
            self.dropped[kind] += unencodable
            _call(self._on_drop, kind, unencodable)
            logger.warning("%d %s events orjson cannot encode dropped", unencodable, kind)
        if len(pipe):
            pipe.execute()

    def close(self) -> None:
        self._redis.close()


def _ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    """The consumer group, created at the stream's start (``0``: what replicas wrote before
    the collector first ran is collected too), with the stream if missing."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class _Batch:
    """Entries read and not yet acknowledged: per stream, the ids and the decoded events."""

    def __init__(self, streams: Mapping[str, str]) -> None:
        self.streams = streams  # stream name -> kind
        self.ids: dict[str, list[bytes]] = {s: [] for s in streams}
        self.events: dict[str, list[dict[str, Any]]] = {s: [] for s in streams}
        self.size = 0
        self.last_id: dict[str, bytes] = {}

    def add(self, response: Iterable[Any]) -> int:
        """Add an XREADGROUP response; returns the number of entries in it."""
        added = 0
        for name, entries in response or ():
            stream = name.decode() if isinstance(name, bytes) else name
            for entry_id, fields in entries:
                added += 1
                self.ids[stream].append(entry_id)
                self.last_id[stream] = entry_id
                event = self._decode(stream, entry_id, fields)
                if event is not None:
                    self.events[stream].append(event)
        self.size += added
        return added

    @staticmethod
    def _decode(stream: str, entry_id: bytes, fields: Any) -> dict[str, Any] | None:
        # A pending entry trimmed by MAXLEN comes back without fields; a foreign writer may
        # have put anything there. Either is acknowledged and skipped, not retried forever.
        try:
            event = orjson.loads(fields[STREAM_FIELD])
            if isinstance(event, dict):
                return event
        except (KeyError, TypeError, orjson.JSONDecodeError):
            pass
        logger.warning("skipping unreadable entry %r of %s", entry_id, stream)
        return None

    def commit(self, r: redis.Redis, group: str, sink: EventSink) -> int:
        """Write the events to ``sink``, make them durable (``flush``), THEN acknowledge."""
        written = 0
        for stream, events in self.events.items():
            if events:
                sink.write(self.streams[stream], events)
                written += len(events)
        if isinstance(sink, FlushableSink):
            sink.flush()
        for stream, ids in self.ids.items():
            if ids:
                r.xack(stream, group, *ids)
        return written


def drain_streams(
    redis_url: str,
    group: str,
    consumer: str,
    sink: EventSink,
    count: int = 1000,
    block_ms: int = 1000,
    *,
    kinds: Sequence[str] = KINDS,
    stream_prefix: str = STREAM_PREFIX,
    stop: threading.Event | None = None,
    until_idle: bool = False,
    max_wait_s: float = 10.0,
    claim_idle_ms: int | None = None,
    retry_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Move events from the Redis streams into ``sink`` with consumer group ``group`` as
    ``consumer``, at least once; returns the events committed (written to ``sink``, then
    acknowledged).

    On start (and after any failure) it creates the group where missing (``XGROUP CREATE
    ... 0 MKSTREAM``), takes over entries idle for ``claim_idle_ms`` in other consumers'
    pending lists if asked (``XAUTOCLAIM``: a consumer that died under another name), and
    re-reads its OWN pending entries (id ``0``: read before a crash, never acknowledged).
    Then it reads new entries (``>``), up to ``count`` per commit or until ``max_wait_s``
    after the first, or a read idle for ``block_ms``. A commit writes each kind to
    ``sink``, calls ``sink.flush()`` when it has one, and only then ``XACK``s. A Redis or
    sink error is logged; after ``retry_s`` it starts over from its pending entries (what
    was written but not acknowledged is written again: readers deduplicate). It runs until
    ``stop`` is set or, with ``until_idle``, until a read finds nothing new.
    """
    if count < 1 or block_ms < 1:
        raise ValueError(f"count and block_ms must be >= 1, got {count}, {block_ms}")
    for kind in kinds:
        _check_kind(kind)
    streams = {f"{stream_prefix}{kind}": kind for kind in kinds}
    r = _redis_client(redis_url, block_ms / 1000 + 5.0)  # a blocked read is no timeout
    stop = stop or threading.Event()
    log = _LogLimiter(60.0, time.monotonic)
    total, recovering = 0, True
    try:
        while not stop.is_set():
            try:
                if recovering:
                    total += _recover(r, streams, group, consumer, sink, count, claim_idle_ms)
                    recovering = False
                batch, first = _Batch(streams), None
                while batch.size < count and not stop.is_set():
                    wait_ms = block_ms
                    if first is not None:
                        left_s = max_wait_s - (clock() - first)
                        if left_s <= 0:
                            break
                        wait_ms = max(1, min(block_ms, int(left_s * 1000)))
                    response = r.xreadgroup(
                        group, consumer, dict.fromkeys(streams, ">"), count=count - batch.size,
                        block=wait_ms,
                    )  # fmt: skip
                    if not batch.add(response):
                        break  # idle: commit what there is
                    if first is None:
                        first = clock()
                total += batch.commit(r, group, sink)
                if until_idle and batch.size == 0:
                    return total
            except Exception as exc:  # Redis down, the sink failed: start over from pending
                log.warn("drain", 1, "event collector failed, retrying: %r", exc, unit="failures")
                recovering = True
                if stop.wait(retry_s):
                    break
    finally:
        r.close()
    return total


def _recover(
    r: redis.Redis, streams: Mapping[str, str], group: str, consumer: str, sink: EventSink,
    count: int, claim_idle_ms: int | None,
) -> int:  # fmt: skip
    """Create missing groups, claim other consumers' stale entries, and commit this
    consumer's pending entries (id ``0``), ``count`` at a time."""
    total = 0
    for stream in streams:
        _ensure_group(r, stream, group)
        if claim_idle_ms is not None:
            start: Any = "0-0"
            while True:  # XAUTOCLAIM pages through the pending list; "0-0" when done
                start, *_ = r.xautoclaim(stream, group, consumer, claim_idle_ms, start, count)
                if start in (b"0-0", "0-0"):
                    break
        cursor: Any = "0"
        while True:
            batch = _Batch(streams)
            if not batch.add(r.xreadgroup(group, consumer, {stream: cursor}, count=count)):
                break
            cursor = batch.last_id[stream]
            total += batch.commit(r, group, sink)
    return total


# --- the queue ------------------------------------------------------------------------------
class EventQueue:
    """Bounded, non-blocking hand-off from the request path to an ``EventSink``.

    ``put(kind, event)`` (on the event loop's thread) appends to the kind's
    ``deque(maxlen=capacity)``: O(1), never blocks, never raises. When it is full the
    OLDEST event is dropped and counted (``dropped[kind]``, ``on_drop(kind, 1)``). After
    ``start()`` (inside a running loop) a task writes batches of up to ``batch_size``:
    at once when a kind has a full batch, every ``flush_interval_s`` whatever there is,
    each through ``asyncio.to_thread(sink.write, ...)``, one at a time. A write that raises
    counts its batch as dropped (logged at most once per ``log_interval_s``, with the
    count), and the queue goes on; one that returns counts it written (``written[kind]``,
    ``on_written``). Memory holds at most ``capacity`` events per kind plus the one batch
    being written, however slow the sink. While idle, the sink gets an empty ``write`` per
    kind each ``flush_interval_s`` (a heartbeat: a ``FileSink`` rolls aged buffers).

    ``await close()`` stops accepting (a later put is dropped and counted), writes what is
    left and closes the sink, within ``timeout_s`` (default ``close_timeout_s``); what a
    hung sink did not take by then is counted as dropped. Every event put is eventually
    in exactly one of ``written``, ``dropped`` or ``pending()``.
    """

    def __init__(
        self,
        sink: EventSink,
        capacity: int = 10_000,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        on_drop: DropCallback | None = None,
        on_written: WrittenCallback | None = None,
        *,
        close_timeout_s: float = 5.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or batch_size < 1 or flush_interval_s <= 0:
            raise ValueError(
                f"capacity and batch_size must be >= 1 and flush_interval_s > 0, got "
                f"{capacity}, {batch_size}, {flush_interval_s}"
            )
        self.sink = sink
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.close_timeout_s = close_timeout_s
        self._on_drop = on_drop
        self._on_written = on_written
        self._clock = clock
        self._log = _LogLimiter(log_interval_s, clock)
        self._queues: dict[str, deque[dict[str, Any]]] = {
            kind: deque(maxlen=capacity) for kind in KINDS
        }
        self.dropped: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.written: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: tuple[str, int] | None = None
        self._accepting = True
        self._closing = False
        self._next_kind = 0

    def put(self, kind: str, event: dict[str, Any]) -> None:
        """Queue ``event`` (not to be mutated afterwards). O(1); never blocks or raises."""
        try:
            queue = self._queues.get(kind)
            if queue is None:
                self._drop(UNKNOWN_KIND, 1, "unknown", "events of an unknown kind dropped")
                return
            if not self._accepting:
                self._drop(kind, 1, "closed", "%s events put after close dropped", kind)
                return
            if len(queue) >= self.capacity:  # the append below pushes the oldest out
                self._drop(kind, 1, "full", "%s event queue full: oldest dropped", kind)
            queue.append(event)
            if len(queue) >= self.batch_size:
                self._wake.set()
        except Exception:  # never into the request path
            with contextlib.suppress(Exception):
                logger.exception("EventQueue.put failed")

    def pending(self, kind: str | None = None) -> int:
        """Events queued and not yet handed to the sink."""
        if kind is not None:
            return len(self._queues[kind])
        return sum(len(q) for q in self._queues.values())

    @property
    def in_flight(self) -> int:
        """Events of the batch the sink is writing now."""
        return self._in_flight[1] if self._in_flight else 0

    def start(self) -> None:
        """Start the writer task on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-queue")

    async def close(self, timeout_s: float | None = None, *, close_sink: bool = True) -> None:
        """Write what is left and close the sink, within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.close_timeout_s if timeout_s is None else timeout_s)
        self._accepting = False
        self._closing = True
        self._wake.set()
        self.start()  # never started: the task writes what was put, then ends
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(0.0, deadline - loop.time()))
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            stuck = self._in_flight
            if stuck is not None:  # the sink never confirmed it: not counted as written
                self._in_flight = None
                self._drop(stuck[0], stuck[1], "write", "%s batch unconfirmed at close", stuck[0])
            for kind, queue in self._queues.items():
                if queue:
                    n = len(queue)
                    queue.clear()
                    self._drop(kind, n, "close", "%s events left at the close deadline", kind)
        if close_sink:
            try:
                left = max(0.1, deadline - loop.time())
                await asyncio.wait_for(asyncio.to_thread(self.sink.close), left)
            except Exception as exc:
                logger.warning("event sink close failed: %r", exc)

    # the writer task
    async def _run(self) -> None:
        last_flush = self._clock()
        while True:
            try:
                closing = self._closing
                due = closing or self._clock() - last_flush >= self.flush_interval_s
                wrote = await self._write_batches(partial=due)
                if closing:
                    if not self.pending():
                        return
                    continue
                if due:
                    last_flush = self._clock()
                    if not wrote:
                        await self._heartbeat()
                if any(len(q) >= self.batch_size for q in self._queues.values()):
                    continue
                self._wake.clear()
                if self._closing:
                    continue
                wait_s = self.flush_interval_s - (self._clock() - last_flush)
                if wait_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the writer for good
                logger.exception("event queue writer failed; continuing")
                await asyncio.sleep(self.flush_interval_s)

    async def _write_batches(self, partial: bool) -> bool:
        """Write full batches (and, when ``partial``, whatever is left) kind by kind, in
        turn, until none qualifies; returns whether anything was written."""
        wrote = False
        while True:
            for offset in range(len(KINDS)):
                kind = KINDS[(self._next_kind + offset) % len(KINDS)]
                queue = self._queues[kind]
                if len(queue) >= self.batch_size or (partial and queue):
                    break
            else:
                return wrote
            self._next_kind = (KINDS.index(kind) + 1) % len(KINDS)
            n = min(self.batch_size, len(queue))
            batch = [queue.popleft() for _ in range(n)]
            await self._write(kind, batch)
            wrote = True

    async def _write(self, kind: str, batch: list[dict[str, Any]]) -> None:
        self._in_flight = (kind, len(batch))
        try:
            await asyncio.to_thread(self.sink.write, kind, batch)
        except asyncio.CancelledError:
            raise  # close() counts the batch in flight
        except Exception as exc:
            self._in_flight = None
            self._drop(kind, len(batch), "write", "event sink write of %s failed: %r", kind, exc)
        else:
            self._in_flight = None
            self.written[kind] += len(batch)
            _call(self._on_written, kind, len(batch))

    async def _heartbeat(self) -> None:
        def beat() -> None:
            for kind in KINDS:
                self.sink.write(kind, [])

        try:
            await asyncio.to_thread(beat)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.warn("heartbeat", 1, "event sink heartbeat failed: %r", exc, unit="failures")

    def _drop(self, kind: str, n: int, key: str, message: str, *args: object) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + n
        _call(self._on_drop, kind, n)
        self._log.warn(key, n, message, *args)


# --- the collector --------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.serving.events collect --redis-url URL --dir DIR``: the one collector
    that drains the replicas' streams into Parquet files (until SIGTERM / SIGINT)."""
    parser = argparse.ArgumentParser(prog="python -m app.serving.events")
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect", help="drain the Redis streams into Parquet files")
    collect.add_argument("--redis-url", required=True)
    collect.add_argument("--dir", required=True, type=Path)
    collect.add_argument("--group", default="unicorn-collector")
    collect.add_argument("--consumer", default=f"collector-{os.uname().nodename}")
    collect.add_argument("--stream-prefix", default=STREAM_PREFIX)
    collect.add_argument("--count", type=int, default=5000, help="events per file at most")
    collect.add_argument("--max-wait-s", type=float, default=30.0, help="a file's age at most")
    collect.add_argument("--block-ms", type=int, default=1000)
    collect.add_argument("--claim-idle-ms", type=int, default=None)
    collect.add_argument("--until-idle", action="store_true", help="stop when caught up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sink = FileSink(args.dir, max_rows=args.count, max_age_s=args.max_wait_s)
    try:
        total = drain_streams(
            args.redis_url, args.group, args.consumer, sink, args.count, args.block_ms,
            stream_prefix=args.stream_prefix, stop=stop, until_idle=args.until_idle,
            max_wait_s=args.max_wait_s, claim_idle_ms=args.claim_idle_ms,
        )  # fmt: skip
    finally:
        sink.close()
    logger.info("collected %d events into %s", total, args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
