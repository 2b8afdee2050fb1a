"""One task for every connection's timeouts, instead of a task per connection.

A connection has three: the heartbeat (nothing heard for ``heartbeat_timeout``), its
credentials' expiry, and the close handshake's CLOSE_TIMEOUT. A trio task costs
~2.2 KB, so ten thousand idle connections each sleeping in a heartbeat task of their
own held 22 MB doing nothing. Here one task keeps a heap of when each connection
next needs looking at, and asks it then (``Watched.check_deadlines``). A connection
heard from since is simply asked again later: messages never touch the heap. The
heap holds connections weakly: one that ended is freed at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import weakref
from typing import Protocol

import trio


class Watched(Protocol):
    # When this connection is next due in the heap (inf: not in it); the Deadlines
    # keeps it, so an earlier request replaces a later one and stale entries are known.
    due: float

    def check_deadlines(self, now: float) -> float | None:
        """Act on whatever is due at ``now``; when to be asked next (None: never,
        the connection is over)."""


class Deadlines:
    def __init__(self) -> None:
        # Weak: a connection that ended is freed at once, not when its entry comes up.
        self._heap: list[tuple[float, int, weakref.ref[Watched]]] = []
        self._order = itertools.count()
        self._next = math.inf
        self._wake = trio.Event()

    def at(self, when: float, conn: Watched) -> None:
        """Ask ``conn`` at ``when`` (or sooner, if it is due sooner already)."""
        if when >= conn.due:
            return
        conn.due = when
        heapq.heappush(self._heap, (when, next(self._order), weakref.ref(conn)))
        if when < self._next:
            self._wake.set()

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                when, _, ref = heapq.heappop(heap)
                self._ask(ref, when, now)
            self._next = heap[0][0] if heap else math.inf
            self._wake = trio.Event()
            with trio.move_on_at(self._next):
                await self._wake.wait()

    def _ask(self, ref: weakref.ref[Watched], when: float, now: float) -> None:
        # A method of its own: no local of run() keeps the last connection alive.
        conn = ref()
        if conn is None or when != conn.due:
            return  # gone, or replaced by an earlier entry
        conn.due = math.inf
        following = conn.check_deadlines(now)
        if following is not None:
            self.at(max(following, now + 0.001), conn)
