"""Admission control: scoring slots for one event loop, first come, first served.

``await admission.enter(arrived)`` takes a slot or raises ``Overloaded`` (503 +
Retry-After). A request's ``queue_timeout`` runs from when the connection layer read its
head (``arrived``; from ``enter()`` when unknown), so the time it waited in the
loop's ready queue before its handler ran counts. With every slot taken it is refused:

- at once, when it is already older than ``queue_timeout`` (it would only be scored
  stale), or when the requests already queued would take longer than what is left of it
  at the rate the queue has been moving (the mean time between its last grants);
- otherwise, when no slot came before its ``queue_timeout`` ran out.

``refuses_now()`` says whether a request arriving now would be refused at once: the
connection layer (``app.http.protocol``) asks it before a ``/rank`` body is even parsed.

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
once scoring has the loop again or nobody waits. One turn scores ``slots`` requests
back to back, and every request read meanwhile waits for the turn to end, so the slots are
also bounded by the scoring time measured: at most ``TURN_SHARE * queue_timeout`` of
scoring per turn (8 slots of ~3 ms at the default 100 ms, not 64: 64 slots held the loop
for ~190 ms a turn, and 503s took up to 1.2 s).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from app.core.errors import Overloaded

WINDOW_S = 0.05  # the fair-share window
TARGET_SHARE = 0.5  # scoring's share of the loop below which slots are added
RELEASE_SHARE = 0.8  # ... and above which (or with nobody waiting) they are taken back
TURN_SHARE = 0.25  # the most scoring one turn may hold, as a fraction of queue_timeout
GRANTS_SEEN = 129  # grants the queue's pace is measured over


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
        # When queued requests got a slot, the last GRANTS_SEEN of them since the queue last
        # restarted (a gap of queue_timeout), and the mean time between them: slots are
        # granted in bursts of ``slots`` per turn, so a mean over many turns' grants.
        self._grants: deque[float] = deque(maxlen=GRANTS_SEEN)
        self._grant_s = 0.0
        self._window_start = clock()
        self._scored_s = 0.0  # scoring time in the current window
        self._scoring_s = 0.0  # moving average of one request's scoring time
        self.entered = 0  # calls to enter() so far (the connection layer compares)
        if on_slots is not None:
            on_slots(slots)

    async def enter(self, arrived: float | None = None) -> None:
        """Take a slot, or raise ``Overloaded``. ``arrived``: when the request's head was
        read, on this admission's clock (``perf_counter``); ``None``: unknown, the wait
        runs from now."""
        self.entered += 1
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # a free slot: no suspension
            return
        budget = self.queue_timeout_s - self.turn_s
        if arrived is not None:
            budget -= self._clock() - arrived
            if budget <= 0.0:
                raise self._refusal("the request waited before admission for longer than")
        if (self.waiting + 1) * self._grant_s >= budget:
            raise self._refusal("the requests queued ahead would take longer than")
        self.waiting += 1
        try:
            async with asyncio.timeout(budget):
                await self._semaphore.acquire()
        except TimeoutError:
            raise self._refusal("no scoring slot within") from None
        finally:
            self.waiting -= 1
        now = self._clock()
        grants = self._grants
        if grants and now - grants[-1] >= self.queue_timeout_s:  # the queue restarted
            grants.clear()
        grants.append(now)
        if len(grants) > 1:
            self._grant_s = (now - grants[0]) / (len(grants) - 1)

    def refuses_now(self, ahead: int = 0) -> bool:
        """Whether a request reaching ``enter()`` now, behind the queue and ``ahead``
        requests more (on their way to ``enter()``), would be refused at once: every slot
        taken and that queue longer than ``queue_timeout``."""
        return self._semaphore.locked() and (
            (self.waiting + ahead + 1) * self._grant_s >= self.queue_timeout_s - self.turn_s
        )

    @property
    def turn_s(self) -> float:
        """How long a request may have waited unread before its head was: one turn's
        scoring (``slots`` x the measured scoring time; fair share only, else 0). It is
        taken off ``queue_timeout``, so that what the client sees stays within it."""
        return self.slots * self._scoring_s

    @property
    def slot_bound(self) -> int:
        """The most slots fair share may grant now: ``max_slots``, and at most
        ``TURN_SHARE * queue_timeout`` of scoring per turn at the measured scoring time."""
        if self._scoring_s <= 0.0:
            return self.max_slots
        by_time = int(TURN_SHARE * self.queue_timeout_s / self._scoring_s + 1e-6)
        return max(self.min_slots, min(self.max_slots, by_time))

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
        self._scoring_s = (
            seconds if self._scoring_s == 0.0 else 0.9 * self._scoring_s + 0.1 * seconds
        )
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        share = self._scored_s / elapsed
        self._window_start, self._scored_s = now, 0.0
        bound = self.slot_bound
        if self.waiting and share < TARGET_SHARE and self.slots < bound:
            added = min(max(1, self.slots // 4), bound - self.slots)
            self.slots += added
            for _ in range(added):
                self._semaphore.release()
        elif (
            not self.waiting or share > RELEASE_SHARE or self.slots > bound
        ) and self.slots > self.min_slots:
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
