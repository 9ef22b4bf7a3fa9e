"""The feedback loop as the service writes it: an impression event per ``/rank`` answer
(what was shown, in order, with the context the model saw) and the engagements frontends
send to ``POST /events``, through the bounded ``EventQueue`` of ``app.serving.events`` to
the configured sink (Parquet files, or Redis Streams for several replicas).

Nothing here waits: ``impression`` and ``engagements`` only build dicts and put them on the
queue, which drops its oldest events when the sink falls behind (counted in
``unicorn_events_total``). Engagement ids seen recently (``DEDUPE_WINDOW`` per process)
are answered as duplicates and not written again; duplicates across replicas or restarts
are removed when the logs are read (``model_export.event_source``).

Users: events carry the keyed hash of the access log (``hash_user``) unless
``events_raw_user_ids`` is set; a logged-out request has ``user`` "".
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app.core.context import UNKNOWN_USER
from app.serving.config import Settings
from app.serving.events import (
    ENGAGEMENT,
    IMPRESSION,
    EventQueue,
    EventSink,
    FileSink,
    RedisStreamSink,
)
from app.serving.metrics import ServiceMetrics
from app.serving.pipeline import RankOutcome

# What a frontend may report; model_export.event_source reads play, click and add_to_list
# as positives by default and counts the rest.
ENGAGEMENT_TYPES = ("play", "click", "add_to_list", "like", "dislike", "dismiss")
DEDUPE_WINDOW = 100_000  # engagement event ids remembered per process


def hash_user(user_id: str | None, key: bytes) -> str | None:
    """A keyed 64-bit blake2b of the user id: joinable across lines and events, not
    reversible by enumerating likely ids without the key. ``None`` for no user."""
    if not user_id:
        return None
    return hashlib.blake2b(user_id.encode("utf-8", "replace"), key=key, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Engagement:
    """One validated engagement of ``POST /events`` (``app.http.schemas.EngagementIn``)."""

    event_id: str
    request_id: str
    entity_id: str
    type: str
    ts: float | None


class Feedback:
    """The service's side of the feedback loop (one per process; ``start`` in the running
    loop, ``await close()`` at shutdown flushes what is queued)."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        user_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.raw_user_ids = settings.events_raw_user_ids
        self.user_key = user_key
        self.clock = clock
        self._events = metrics.events
        sink: EventSink
        if settings.events_dir is not None:
            sink = FileSink(settings.events_dir, on_drop=self._dropped, on_written=self._written)
            on_written = None  # a file sink says when events are in a complete file
        elif settings.events_redis_url:
            sink = RedisStreamSink(settings.events_redis_url, on_drop=self._dropped)
            on_written = self._written  # in the stream once the queue's write returned
        else:
            raise ValueError("events need events_dir or events_redis_url")
        self.queue = EventQueue(
            sink,
            capacity=settings.events_queue_capacity,
            on_drop=self._dropped,
            on_written=on_written,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: ServiceMetrics, user_key: bytes
    ) -> Feedback | None:
        """The feedback loop the settings ask for, or ``None`` (events off)."""
        if settings.events_dir is None and not settings.events_redis_url:
            return None
        return cls(settings, metrics, user_key)

    def start(self) -> None:
        self.queue.start()

    async def close(self) -> None:
        await self.queue.close()

    def _dropped(self, kind: str, n: int) -> None:
        self._events.labels(kind, "dropped").inc(n)

    def _written(self, kind: str, n: int) -> None:
        self._events.labels(kind, "written").inc(n)

    def _put(self, kind: str, event: dict[str, Any]) -> None:
        self.queue.put(kind, event)
        self._events.labels(kind, "queued").inc()

    def _user(self, user_id: str) -> str:
        if user_id == UNKNOWN_USER or not user_id:
            return ""
        if self.raw_user_ids:
            return user_id
        return hash_user(user_id, self.user_key) or ""

    def impression(self, request_id: str, outcome: RankOutcome) -> None:
        """What one answer showed, with the context the model saw (after imputation)."""
        ctx = outcome.context
        self._put(
            IMPRESSION,
            {
                "request_id": request_id,
                "ts": self.clock(),
                "task": ctx.task.value,
                "user": self._user(ctx.user_id),
                "user_hashed": not self.raw_user_ids,
                "query": ctx.query,
                "country": ctx.country,
                "source_entity_id": ctx.source_entity_id,
                "personalization": outcome.personalization.value,
                "variant": outcome.variant,
                "model_version": outcome.model_version,
                "cache": outcome.cache,
                "entity_ids": [str(item["entity_id"]) for item in outcome.items],
                "scores": [float(item["score"]) for item in outcome.items],
            },
        )

    def engagements(self, events: Iterable[Engagement]) -> tuple[int, int]:
        """Queue each engagement not seen recently; returns (accepted, duplicates)."""
        now = self.clock()
        accepted = duplicates = 0
        for e in events:
            if e.event_id in self._seen:
                self._seen.move_to_end(e.event_id)
                duplicates += 1
                continue
            self._seen[e.event_id] = None
            if len(self._seen) > DEDUPE_WINDOW:
                self._seen.popitem(last=False)
            self._put(
                ENGAGEMENT,
                {
                    "event_id": e.event_id,
                    "request_id": e.request_id,
                    "entity_id": e.entity_id,
                    "type": e.type,
                    "ts": now if e.ts is None else e.ts,
                    "received_ts": now,
                },
            )
            accepted += 1
        if duplicates:
            self._events.labels(ENGAGEMENT, "duplicate").inc(duplicates)
        return accepted, duplicates
