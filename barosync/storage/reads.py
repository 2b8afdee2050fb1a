"""Store reads from the event loop: inline for LMDB, in worker threads for PostgreSQL.

An LMDB read is a lookup in memory-mapped pages, a few microseconds: it runs inline,
where handing it to a thread would cost ten times the read. And an inline read never
yields to the scheduler, which session.py relies on: a subscriber's catch-up read and
its join of the room happen in one step, so no change can pass in between.

A PostgreSQL read is a network round trip, and PostgreSQL may be slow or away. Those
run in worker threads (at most ``store.read_threads`` at once, one pooled connection
each; pg_store.py), so one slow query never stalls every other connection. Since such
a read does yield, rooms are then kept in log order by sequencer.py.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import trio

T = TypeVar("T")

# Seconds a client is told to wait before it tries again what a read of an unreachable
# database could not do (the writer probes the database as often).
UNREACHABLE_RETRY_AFTER = 2


def find_event(store: Any, project_id: str, event_id: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the id is known in the project (live, or deleted within the history)
    and the event if live, as one read (one thread hop on PostgreSQL):
    ``await app.read(find_event, app.store, project_id, event_id)``."""
    event = store.get_event(project_id, event_id)
    return (event is not None or store.known(project_id, event_id)), event


class Reads:
    """``await app.read(store.method, *args)``: the store's read, off the event loop
    when the store's reads block."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.blocking: bool = bool(getattr(store, "reads_block", False))
        self._limiter = trio.CapacityLimiter(getattr(store, "read_threads", 1)) if self.blocking else None

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._limiter is None:
            return fn(*args, **kwargs)
        # Not abandoned on cancel: the query ends by itself within statement_timeout,
        # and its pooled connection must come back.
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)

    def unreachable(self, e: BaseException) -> str | None:
        """When a read failed because the database did not answer, what to tell the
        client (each transport adds what to do: a 503, or what its clients retry);
        else None (a bug)."""
        if not self.blocking or not isinstance(e, self.store.faults):
            return None
        text = str(e).strip()
        return f"PostgreSQL unreachable ({text.splitlines()[0] if text else type(e).__name__})"

    @contextlib.asynccontextmanager
    async def snapshot_pages(self, project_id: str, *, max_bytes: int) -> AsyncIterator[tuple[int, Iterator[list[bytes]]]]:
        """store.snapshot_pages, entered in a thread when reads block. (PgStore reads
        the whole snapshot on entry, so its pages come from memory; LMDB holds a read
        transaction and reads its pages lazily, inline.)"""
        manager = self.store.snapshot_pages(project_id, max_bytes=max_bytes)
        if self._limiter is None:
            with manager as found:
                yield found
            return
        found = await self(manager.__enter__)
        with contextlib.ExitStack() as stack:
            stack.push(manager)  # its __exit__, entered above
            yield found
