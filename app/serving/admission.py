"""Admission control: scoring slots for one event loop, first come, first served.

``await admission.enter()`` takes a slot or raises ``Overloaded`` (503 + Retry-After):

- at once, when the requests already queued would take ``queue_timeout`` or more at the
  rate the queue has been moving (a moving average of the time between grants);
- otherwise, after waiting ``queue_timeout`` for a slot.

``admission.leave(seconds)`` ends a scoring section and hands its slot on one event-loop
turn later (``call_soon``). Inline scoring never yields, so without that every request
parsed in one turn was scored back to back in the next. Requests arriving meanwhile then
sat unread in their sockets, where no timeout could see them (uvloop end-to-end p99
6.9 s under overload, docs/RELIABILITY.md). With the hand-off, at most ``slots``
requests are scored per turn and the loop reads new connections between turns.

Fair share (``adaptive=True``, inline scoring). Every refusal costs the loop its parse
and answer (~0.35 ms). Clients that retry the moment they are refused can therefore fill
every turn with refusals. With a fixed number of slots, goodput then collapsed to a few
percent of capacity (128 such clients: 26 req/s of ~450). So when requests are queued and
scoring had less than ``TARGET_SHARE`` of the loop's time over the last ``WINDOW_S``,
more slots are granted per turn, up to ``max_slots``. They are taken back one per window
once scoring has the loop again or nobody waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from app.core.errors import Overloaded

WINDOW_S = 0.05  # the fair-share window
TARGET_SHARE = 0.5  # scoring's share of the loop below which slots are added
RELEASE_SHARE = 0.8  # ... and above which (or with nobody waiting) they are taken back


class Admission:
    """Scoring slots of one event loop (see the module docstring)."""

    def __init__(
        self,
        slots: int,
        queue_timeout_s: float,
        *,
        adaptive: bool = False,
        max_slots: int | None = None,
        on_slots: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if slots < 1 or queue_timeout_s < 0:
            raise ValueError(
                f"slots must be >= 1 and queue_timeout_s >= 0, got {slots}, {queue_timeout_s}"
            )
        self.min_slots = slots
        self.max_slots = max(max_slots or 16 * slots, slots) if adaptive else slots
        self.queue_timeout_s = queue_timeout_s
        self.slots = slots  # slots now (fair share may add some)
        self._on_slots = on_slots  # told the slot count at start and on every change
        self._clock = clock  # seconds; measures grant intervals and fair-share windows
        self.waiting = 0  # requests queued for a slot now
        self._semaphore = asyncio.Semaphore(slots)
        self._debt = 0  # slots to take back: hand-offs to skip
        self._granted_at = 0.0  # when a queued request last got a slot
        self._grant_s = 0.0  # moving average of the time between grants to queued requests
        self._window_start = clock()
        self._scored_s = 0.0  # scoring time in the current window
        if on_slots is not None:
            on_slots(slots)

    async def enter(self) -> None:
        """Take a slot, or raise ``Overloaded``."""
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # a free slot: no suspension
            return
        if (self.waiting + 1) * self._grant_s >= self.queue_timeout_s:
            raise self._refusal("the requests queued ahead would take longer than")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await self._semaphore.acquire()
        except TimeoutError:
            raise self._refusal("no scoring slot within") from None
        finally:
            self.waiting -= 1
        now = self._clock()
        interval = now - self._granted_at
        self._granted_at = now
        if interval < self.queue_timeout_s:  # the queue was moving, not restarting
            self._grant_s = (
                interval if self._grant_s == 0.0 else 0.8 * self._grant_s + 0.2 * interval
            )

    def leave(self, seconds: float) -> None:
        """End a scoring section of ``seconds``; its slot is handed on next turn."""
        if self.max_slots > self.min_slots:
            self._share(seconds)
        asyncio.get_running_loop().call_soon(self._hand_on)

    def _hand_on(self) -> None:
        if self._debt:
            self._debt -= 1  # a slot taken back
        else:
            self._semaphore.release()

    def _share(self, seconds: float) -> None:
        """Fair share: add slots while scoring is crowded out, take them back after."""
        self._scored_s += seconds
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        share = self._scored_s / elapsed
        self._window_start, self._scored_s = now, 0.0
        if self.waiting and share < TARGET_SHARE and self.slots < self.max_slots:
            added = min(max(1, self.slots // 4), self.max_slots - self.slots)
            self.slots += added
            for _ in range(added):
                self._semaphore.release()
        elif (not self.waiting or share > RELEASE_SHARE) and self.slots > self.min_slots:
            self.slots -= 1
            self._debt += 1
        else:
            return
        if self._on_slots is not None:
            self._on_slots(self.slots)

    def _refusal(self, why: str) -> Overloaded:
        return Overloaded(
            f"{why} queue_timeout_ms={self.queue_timeout_s * 1000:g} "
            f"(max_in_flight={self.min_slots}); retry shortly",
            field=None,
        )
