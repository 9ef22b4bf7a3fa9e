"""Admission control on a real event loop (``app.serving.admission``): first come first served,
slots handed on at the next turn, refusals, and the fair share of the loop. Times the
admission measures come from an injected clock that the tests move, never the wall clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from app.core.errors import Overloaded
from app.serving.admission import TURN_SHARE, WINDOW_S, Admission

pytestmark = pytest.mark.anyio

FinishWithoutWaiting = Callable[[Coroutine[Any, Any, Any]], Any]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_slots_are_granted_first_come_first_served() -> None:
    admission = Admission(1, 5.0)
    await admission.enter()
    order: list[int] = []

    async def queued(i: int) -> None:
        await admission.enter()
        order.append(i)
        admission.leave(0.0)

    tasks = [asyncio.create_task(queued(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert admission.waiting == 5 and order == []
    admission.leave(0.0)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_slot_is_handed_on_at_the_next_turn_not_within_the_same_one() -> None:
    """Two requests reaching admission in one turn are not both scored in it: the second
    waits for the slot the first hands on after a turn of the loop."""
    admission = Admission(1, 5.0)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    await admission.enter()
    second = asyncio.create_task(admission.enter())
    await asyncio.sleep(0)
    assert not second.done()  # the slot is held
    before = turns
    admission.leave(0.0)
    assert not second.done()  # not granted within this turn
    await second
    assert turns > before  # the loop turned in between
    counter.cancel()


async def test_a_request_waits_for_the_queue_timeout_then_is_refused() -> None:
    admission = Admission(1, 0.05)
    await admission.enter()  # held and never left
    loop = asyncio.get_running_loop()
    started = loop.time()
    queued = asyncio.create_task(admission.enter())
    await asyncio.sleep(0)
    assert admission.waiting == 1 and not queued.done()  # it waits, it is not refused at once
    with pytest.raises(Overloaded) as info:
        await queued
    assert loop.time() - started >= 0.049  # not before the timeout (a busy box: only later)
    assert "no scoring slot within queue_timeout_ms=50" in info.value.message
    assert "max_in_flight=1" in info.value.message
    assert admission.waiting == 0


async def test_a_queue_longer_than_the_timeout_is_refused_at_once(
    finish_without_waiting: FinishWithoutWaiting,
) -> None:
    """Once grants have been seen to take 30 ms each, a request with three ahead of it
    (120 ms > the 100 ms timeout) is refused without waiting."""
    clock = FakeClock()
    admission = Admission(1, 0.1, clock=clock)
    await admission.enter()

    async def one() -> None:
        await admission.enter()
        clock.now += 0.03  # holds the slot 30 ms
        admission.leave(0.03)

    first = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0)
    admission.leave(0.0)
    await asyncio.gather(*first)  # the queue moved every 30 ms
    await admission.enter()  # hold the slot again
    held = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0)
    assert admission.waiting == 3
    with pytest.raises(Overloaded) as info:
        finish_without_waiting(admission.enter())
    assert "the requests queued ahead would take longer than" in info.value.message
    # with two ahead (90 ms) it queues instead
    held.pop().cancel()
    await asyncio.sleep(0)
    assert admission.waiting == 2
    queued = asyncio.create_task(admission.enter())
    await asyncio.sleep(0)
    assert admission.waiting == 3 and not queued.done()
    held.append(queued)
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


async def test_fair_share_adds_slots_while_other_work_crowds_scoring_out_then_takes_them_back() -> (
    None
):
    """Other work (think: refusing a flood) takes the loop 8 ms every turn while queued
    requests score 1 ms each: scoring gets far less than half of the loop, so slots are
    added; once the other work stops and nobody waits, they are taken back. (The clock
    is the admission's: the work advances it instead of blocking the loop.)"""
    reported: list[int] = []
    clock = FakeClock()
    admission = Admission(
        2, 5.0, adaptive=True, max_slots=32, on_slots=reported.append, clock=clock
    )
    stop = asyncio.Event()

    async def other_work() -> None:
        while not stop.is_set():
            clock.now += 0.008
            await asyncio.sleep(0)

    async def requester() -> None:
        while not stop.is_set():
            await admission.enter()
            clock.now += 0.001
            admission.leave(0.001)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(other_work())]
    tasks += [asyncio.create_task(requester()) for _ in range(40)]
    started = clock.now
    while clock.now - started < 1.0:  # a second of the loop's time
        await asyncio.sleep(0)
    grown = admission.slots
    stop.set()
    await asyncio.gather(*tasks)
    assert 2 < grown <= 32
    for _ in range(int(2 * grown * 5)):  # one request at a time: nobody waits
        await admission.enter()
        admission.leave(0.001)
        clock.now += WINDOW_S / 5
        await asyncio.sleep(0)
        if admission.slots == 2:
            break
    assert admission.slots == 2
    assert reported[0] == 2 and max(reported) == grown and reported[-1] == 2  # the gauge


async def test_without_fair_share_the_slots_stay_fixed() -> None:
    admission = Admission(2, 5.0)
    assert admission.max_slots == 2
    await admission.enter()
    admission.leave(0.001)
    assert admission.slots == 2


async def test_a_request_older_than_the_queue_timeout_is_refused_at_once(
    finish_without_waiting: FinishWithoutWaiting,
) -> None:
    """Its head was read 150 ms ago (it waited in the loop's ready queue since): with
    every slot taken it is refused without waiting; one read 40 ms ago queues, for what
    is left of its 100 ms."""
    clock = FakeClock()
    admission = Admission(1, 0.1, clock=clock)
    await admission.enter()  # every slot taken
    with pytest.raises(Overloaded) as info:
        finish_without_waiting(admission.enter(arrived=clock.now - 0.15))
    assert "waited before admission for longer than queue_timeout_ms=100" in (info.value.message)
    queued = asyncio.create_task(admission.enter(arrived=clock.now - 0.04))
    await asyncio.sleep(0)
    assert admission.waiting == 1 and not queued.done()
    admission.leave(0.0)
    await queued  # granted, not refused


async def test_a_stale_request_still_takes_a_free_slot() -> None:
    """Staleness only decides who is refused when every slot is taken."""
    clock = FakeClock()
    admission = Admission(1, 0.1, clock=clock)
    await admission.enter(arrived=clock.now - 10.0)
    assert admission.entered == 1


async def test_refuses_now_counts_the_requests_on_their_way() -> None:
    clock = FakeClock()
    admission = Admission(1, 0.1, clock=clock)
    assert not admission.refuses_now(1000)  # a free slot
    await admission.enter()

    async def one() -> None:
        await admission.enter()
        clock.now += 0.03
        admission.leave(0.03)

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0)
    admission.leave(0.0)
    await asyncio.gather(*tasks)  # grants 30 ms apart
    await admission.enter()  # every slot taken, nobody queued
    assert not admission.refuses_now()  # 30 ms ahead
    assert not admission.refuses_now(2)  # 90 ms
    assert admission.refuses_now(3)  # 120 ms >= 100 ms


async def test_fair_share_never_grants_more_scoring_per_turn_than_a_share_of_the_timeout() -> None:
    """The same crowding out as above, but each request scores 5 ms: one turn may hold
    at most TURN_SHARE x 100 ms of scoring, so 5 slots, however long scoring stays
    crowded out (16x would be 32 slots, a 160 ms turn)."""
    clock = FakeClock()
    admission = Admission(2, 0.1, adaptive=True, clock=clock)
    assert admission.max_slots == 32
    stop = asyncio.Event()
    seen: list[int] = []

    async def other_work() -> None:
        while not stop.is_set():
            clock.now += 0.05
            await asyncio.sleep(0)

    async def requester() -> None:
        while not stop.is_set():
            with contextlib.suppress(Overloaded):
                await admission.enter()
                clock.now += 0.005
                admission.leave(0.005)
                seen.append(admission.slots)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(other_work())]
    tasks += [asyncio.create_task(requester()) for _ in range(40)]
    started = clock.now
    while clock.now - started < 5.0:
        await asyncio.sleep(0)
    stop.set()
    await asyncio.gather(*tasks)
    bound = int(TURN_SHARE * 0.1 / 0.005 + 1e-6)
    assert admission.slot_bound == bound == 5
    assert max(seen) == bound  # it grew, up to the bound and no further
