"""transports/deadlines.py without sockets: one task asks each connection when it is
due, the earliest request wins, and a connection that ended is neither asked nor kept."""

from __future__ import annotations

import gc
import math
import weakref

import trio

from barosync.transports.deadlines import Deadlines


class Conn:
    def __init__(self, answers: list[float | None]) -> None:
        self.due = math.inf
        self.answers = answers
        self.asked: list[float] = []

    def check_deadlines(self, now: float) -> float | None:
        self.asked.append(now)
        return self.answers.pop(0) if self.answers else None


async def test_each_connection_is_asked_when_due_and_again_when_it_says(autojump_clock) -> None:
    deadlines = Deadlines()
    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.run)
        start = trio.current_time()
        a, b = Conn([start + 5, None]), Conn([])
        deadlines.at(start + 3, a)
        deadlines.at(start + 10, b)
        deadlines.at(start + 1, b)  # sooner: replaces the later request
        await trio.sleep(20)
        assert [round(t - start) for t in a.asked] == [3, 5]  # asked again when it said, then never
        assert [round(t - start) for t in b.asked] == [1]  # once: the later entry was stale
        assert len(deadlines) == 0
        nursery.cancel_scope.cancel()


async def test_a_connection_that_ended_is_freed_and_skipped(autojump_clock) -> None:
    deadlines = Deadlines()
    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.run)
        gone = Conn([])
        ref = weakref.ref(gone)
        deadlines.at(trio.current_time() + 5, gone)
        del gone
        gc.collect()
        assert ref() is None  # the heap holds it weakly
        await trio.sleep(10)
        assert len(deadlines) == 0
        nursery.cancel_scope.cancel()
