"""The one task that writes, and what a failing disk does to it.

Group commit: the writer takes whatever mutations are waiting, commits them as one
LMDB transaction with fsync in a worker thread, then hands each outcome on in order
(``on_batch``: the hub answers the senders and fans the changes out). A mutation
comes with its ``Sender``, the transport's side that hears the answer; the store sees
only the mutation.

Storage faults come in two kinds (docs/operations.md, "When the disk fills"):

- **Out of space** (ENOSPC, EDQUOT, LMDB's short write on a full file system, the map
  at its ``max_map_size`` ceiling). The failed commit stored nothing and nothing that
  is already durable is in doubt. The server is *degraded*: every write is refused at
  once with a retryable ``storage_full``, while reads, subscriptions, presence and
  cursors go on. A probe transaction every SPACE_PROBE_INTERVAL seconds ends it by
  itself when space is back.
- **Anything else** (EIO, a failed fsync or msync, a panicked environment): durability
  is in doubt. After a failed fsync the kernel may have dropped the dirty pages, so a
  retried fsync can report success for data that never reached the disk (the 2018
  "fsyncgate" discussion). Every waiting write is refused with ``storage_failed`` and
  the server stops (fail-stop), closing every connection with 1011 first.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import lmdb
import trio

from ..wire import protocol
from ..wire.protocol import ProtocolError
from ..storage.reads import Reads
from ..storage.store import Mutation, Outcome, Store, now_ms


class Sender(Protocol):
    """Who hears a mutation's answer (session.py's Session, REST's and CalDAV's
    waiting request: mutations.py), on the event loop, after its commit."""

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        """The outcome: applied (an ack), replayed, a conflict, or an error."""


# One group commit's mutations with their senders and outcomes, in commit order.
Answered = list[tuple[Mutation, Sender, Outcome]]

log = logging.getLogger(__name__)
# How often a map resize that waits for snapshot readers looks again (seconds).
READER_POLL = 0.01

# Most mutations one group commit takes; bounds the latency of the batch behind it.
MAX_BATCH = 2048
# Scheduler yields the writer makes to gather a batch before committing it.
GATHER_ROUNDS = 3
# Mutations that may wait for the writer before submitters are made to wait.
QUEUE_DEPTH = 8192
# While degraded: seconds between space probes, which is also the `retryAfter` that
# refused writes carry.
SPACE_PROBE_INTERVAL = 2.0
# What a probe writes (and takes back): about one large group commit.
SPACE_PROBE_BYTES = 256 * 1024
# While degraded, one log line per this many seconds, not one per refused write.
DEGRADED_LOG_INTERVAL = 60.0
# LMDB reports a short write (a file system that filled mid-write) as EIO; with less
# than this free after it, the EIO is taken for what LMDB's own comment calls it.
NEARLY_FULL_BYTES = 1024 * 1024
# `retryAfter` of writes refused because storage failed: the server is stopping and a
# supervisor restarts it.
FAILED_RETRY_AFTER = 30.0


class StorageError(Exception):
    """The data directory failed under the server; it stops, with this message."""


def out_of_space(exc: BaseException, path: Path) -> str | None:
    """Why ``exc`` means "no room to write" (the server degrades), or None when it
    puts durability in doubt (the server stops)."""
    if isinstance(exc, lmdb.MapFullError):
        return "the LMDB map is at its ceiling ([storage] max_map_size)"
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc)
    if isinstance(exc, lmdb.DiskError) or code == errno.ENOSPC or os.strerror(errno.ENOSPC) in text:
        return "no space left on device"
    if code == errno.EDQUOT or os.strerror(errno.EDQUOT) in text:
        return "disk quota exceeded"
    if os.strerror(errno.EIO) in text and free_bytes(path) < NEARLY_FULL_BYTES:
        return "no space left on device (short write)"
    return None


def free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class Writer:
    """The one task that writes: takes whatever mutations are waiting, commits them
    as one transaction off the event loop, then hands each outcome on in order."""

    def __init__(self, store: Store, on_batch: Callable[[Answered], None], *,
                 on_failure: Callable[[str], None] | None = None, read: Reads | None = None) -> None:
        self.store = store
        self._read = read if read is not None else Reads(store)
        self._on_batch = on_batch
        self._on_failure = on_failure
        self._send, self._receive = trio.open_memory_channel[tuple[Mutation, Sender]](QUEUE_DEPTH)
        # Projects with a commit in flight: their LMDB state may be ahead of what was
        # fanned out, so a subscriber must wait for the batch before reading.
        self.busy_projects: set[str] = set()
        self._batch_done = trio.Event()
        self.closed = trio.Event()
        # One write transaction at a time, and no map resize during one.
        self._write_lock = trio.Lock()
        self.batches = 0
        self.committed = 0
        # Commits begun and answered (handed to on_batch, or refused). A change read
        # from the log may be this node's, committed but not yet answered: the room's
        # sequencer waits for ``answered()`` before delivering it (sequencer.py).
        self._begun = 0
        self._ended = 0
        # Why writes are refused with storage_full right now (None: they are not).
        self.degraded: str | None = None
        self.degraded_since = 0.0  # trio clock
        # Set once storage failed: the server is stopping.
        self.failure: str | None = None
        self.refused = 0  # writes refused for storage, in all
        self._refused_since_log = 0
        self._last_log = -math.inf

    async def submit(self, m: Mutation, sender: Sender) -> None:
        """Queue ``m`` for the next group commit; ``sender`` hears its answer."""
        if self.degraded is not None or self.failure is not None:
            await self._refuse([(m, sender)])
            return
        try:
            self._send.send_nowait((m, sender))
        except trio.WouldBlock:
            await self._send.send((m, sender))

    async def _refuse(self, batch: list[tuple[Mutation, Sender]]) -> None:
        """Answer every mutation of ``batch`` that it was not stored (or, for a retry
        of one stored before, with its original answer)."""
        answers: list[dict[str, Any] | None] = [None] * len(batch)
        known = True  # whether a missing answer means "never stored"
        if self.failure is None:
            # A retry of a change stored before the disk filled still gets its answer.
            try:
                answers = await self._read(self._previous_answers, [m for m, _ in batch])
            except self.store.faults:
                known = False  # the database is what is unreachable
        self._on_batch([(m, sender, self._refusal(m, answer, known=known))
                        for (m, sender), answer in zip(batch, answers)])

    def _previous_answers(self, batch: list[Mutation]) -> list[dict[str, Any] | None]:
        return [self.store.previous_answer(m.user_id, m.envelope_id) for m in batch]

    def _refusal(self, m: Mutation, answer: dict[str, Any] | None, *, known: bool = True) -> Outcome:
        if self.failure is None:
            if answer is not None:
                return Outcome("replayed", answer.get("projectId", m.project_id), answer=answer, seq=answer.get("seq", 0))
        self.refused += 1
        self._refused_since_log += 1
        if self.failure is not None:
            error = ProtocolError(
                protocol.E_STORAGE_FAILED,
                "the server's storage failed and the server is stopping; this change was not stored: send it again once it is back",
                ref=m.envelope_id, retry_after=FAILED_RETRY_AFTER)
        else:
            what = "unavailable" if self.store.kind == "postgresql" else "full"
            # Without the idempotency table this may be a retry of a stored change:
            # resending it is still right (it is applied once), "not stored" is not.
            stored = ("this was not applied now (if an earlier send was, resending gets its answer)" if not known
                      else "this change was not stored")
            error = ProtocolError(
                protocol.E_STORAGE_FULL,
                f"server storage {what} ({self.degraded}); {stored}: keep it and send it again "
                f"after {SPACE_PROBE_INTERVAL:g} s",
                ref=m.envelope_id, retry_after=SPACE_PROBE_INTERVAL)
        return Outcome("error", m.project_id, error=error)

    async def wait_idle(self, project_id: str) -> None:
        while project_id in self.busy_projects:
            await self._batch_done.wait()

    def close(self) -> None:
        """No more mutations; run() returns once the queue is drained."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe_space)
                task_status.started()
                await self._run()
                nursery.cancel_scope.cancel()
        finally:
            self.closed.set()

    async def _run(self) -> None:
        async with self._receive:
            while self.failure is None:
                try:
                    batch = [await self._receive.receive()]
                except trio.EndOfChannel:
                    return
                # Let the connections that are already runnable hand in their
                # mutations before committing: a yield to the scheduler, no timer. While
                # each yield brings more, yield again (a few times at most).
                for _ in range(GATHER_ROUNDS):
                    before = len(batch)
                    self._drain_into(batch)
                    if len(batch) >= MAX_BATCH:
                        break
                    await trio.lowlevel.checkpoint()
                    self._drain_into(batch)
                    if len(batch) == before:
                        break
                await self._commit(batch)

    def _drain_into(self, batch: list[tuple[Mutation, Sender]]) -> None:
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def _refuse_waiting(self) -> None:
        """Refuse what already waits for the writer: it would only fail too."""
        while True:
            waiting: list[tuple[Mutation, Sender]] = []
            self._drain_into(waiting)
            if not waiting:
                return
            await self._refuse(waiting)

    async def prune(self) -> int:
        """Enforce the history retention now (the server calls this periodically)."""
        if self.failure is not None:
            return 0
        async with self._write_lock:
            try:
                return await trio.to_thread.run_sync(lambda: self.store.prune(now_ms=now_ms()))
            except self.store.faults as e:
                self._fault(e)
                return 0

    async def answered(self) -> None:
        """Until every commit begun so far has been answered: what a read of the log
        finds of this node's commits has then reached ``on_batch``."""
        begun = self._begun
        while self._ended < begun:
            await self._batch_done.wait()

    async def _commit(self, batch: list[tuple[Mutation, Sender]]) -> None:
        self.busy_projects = {m.project_id for m, _ in batch}
        self._begun += 1
        try:
            async with self._write_lock:
                await self._commit_locked(batch)
        finally:
            self._ended += 1
            self.busy_projects = set()
            self._batch_done.set()
            self._batch_done = trio.Event()

    async def _commit_locked(self, batch: list[tuple[Mutation, Sender]]) -> None:
        if self.degraded is not None or self.failure is not None:
            await self._refuse(batch)
            return
        while True:
            # Not abandoned on cancel: a commit that started finishes, so an ack is
            # never lost for a change that became durable.
            try:
                self.store.grow_if_needed()
                outcomes = await trio.to_thread.run_sync(self.store.commit_batch, [m for m, _ in batch])
                if outcomes is None:  # the map filled up: nothing was committed
                    await self._wait_for_readers()
                    self.store.grow_if_needed(force=True)
                    continue
            except self.store.faults as e:
                # Nothing of this batch is stored: each sender hears so, with its ref.
                self._fault(e)
                await self._refuse(batch)
                await self._refuse_waiting()
                return
            break
        self.batches += 1
        self.committed += len(batch)
        self._on_batch([(m, sender, outcome) for (m, sender), outcome in zip(batch, outcomes)])

    async def _wait_for_readers(self) -> None:
        """Until no streamed snapshot holds a read transaction (LMDB's map may not be
        resized under one); snapshots that start meanwhile read their pages at once
        instead of holding one. Each open one ends within the session's stall limit."""
        readers = getattr(self.store, "readers_open", 0)
        if not readers:
            return
        log.info("the map is full: waiting for %d snapshot reader(s) to finish before it grows", readers)
        self.store.resize_waiting = True
        try:
            while self.store.readers_open:
                await trio.sleep(READER_POLL)
        finally:
            self.store.resize_waiting = False

    def _fault(self, e: BaseException) -> None:
        reason = (self.store.degraded_reason(e) if self.store.kind == "postgresql"
                  else out_of_space(e, self.store.path))
        if reason is None:
            self._fail(f"storage failed in {self.store.path}: {e}")
        elif self.degraded is None and self.store.kind == "postgresql":
            self.degraded = reason
            self.degraded_since = trio.current_time()
            self._last_log = self.degraded_since
            self._refused_since_log = 0
            log.warning("%s: writes are refused with storage_full (never acked) until it answers again; "
                        "reads of this node's own state, presence and cursors go on", reason)
        elif self.degraded is None:
            self.degraded = reason
            self.degraded_since = trio.current_time()
            self._last_log = self.degraded_since
            self._refused_since_log = 0
            log.warning("storage full in %s (%s): writes are refused with storage_full until space is back; "
                        "reads, subscriptions, presence and cursors go on. Free space, or raise "
                        "[storage] max_map_size, and writes resume by themselves", self.store.path, reason)

    def _fail(self, message: str) -> None:
        if self.failure is not None:
            return
        self.failure = message
        log.critical("%s: stopping; nothing unacknowledged was stored as acknowledged", message)
        if self._on_failure is not None:
            self._on_failure(message)

    async def _probe_space(self) -> None:
        """While degraded, try a small synced write every SPACE_PROBE_INTERVAL and
        leave degraded mode when it goes through."""
        while True:
            await trio.sleep(SPACE_PROBE_INTERVAL)
            if self.degraded is None or self.failure is not None:
                continue
            async with self._write_lock:
                try:
                    self.store.grow_if_needed()
                    await trio.to_thread.run_sync(self.store.probe_space, SPACE_PROBE_BYTES)
                except self.store.faults as e:
                    self._fault(e)
                    self._log_still_degraded()
                    continue
            log.warning("storage writable again in %s after %.0f s: writes accepted (%d were refused meanwhile)",
                        self.store.path, trio.current_time() - self.degraded_since, self._refused_since_log)
            self.degraded = None

    def _log_still_degraded(self) -> None:
        now = trio.current_time()
        if self.degraded is None or now - self._last_log < DEGRADED_LOG_INTERVAL:
            return
        log.warning("storage still full in %s (%s) for %.0f s: %d writes refused in the last %.0f s",
                    self.store.path, self.degraded, now - self.degraded_since, self._refused_since_log,
                    now - self._last_log)
        self._last_log = now
        self._refused_since_log = 0
