"""The sending half of a WebSocket connection: the hot path of fan-out.

When a connection's outbox is empty a frame is written straight to its non-blocking
socket, with no task switch; what does not go out at once waits in a bounded queue
that the connection's writer task drains (``drain``) in one write when the socket is
writable. A connection whose queue passes its byte cap is closed with 4008: it
resumes with ``since`` and loses nothing. Cursors wait apart, newest per user, ahead
of the durable changes.

An ``Outbox`` is a part of a connection (connection.py): it owns what waits for the
socket and what the client has yet to ack, and tells its connection through two
callbacks when the client is too slow or the socket broke.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import trio

from ..wire import protocol
from .acks import Unacked
from ..wire.protocol import Outgoing

if TYPE_CHECKING:
    from ..hooks.plugin_types import Codec

log = logging.getLogger(__name__)



class Owner(Protocol):
    """The connection an outbox belongs to, as the outbox tells it things."""

    def outbox_too_slow(self) -> None:
        """The client reads too slowly: close with 4008 (it resumes with ``since``)."""

    def outbox_broken(self) -> None:
        """Writing to the socket failed: the connection ends now."""

    def outbox_label(self) -> str:
        """Who this is, for the log ("session=… user=…")."""

    def outbox_start_writer(self) -> bool:
        """Start the writer task (drain()); False when it cannot start yet (the
        connection does not run yet: it starts one when it does)."""


class Outbox:
    # Slots: ten thousand idle connections hold ten thousand of these.
    __slots__ = ("codec", "_batching", "_batch", "_fd", "_queue", "_bytes", "_cursors", "limit", "_allowance",
                 "_writing", "closing", "_drained", "unacked", "_max_message", "_owner")

    def __init__(self, fd: int, codec: "Codec", owner: Owner, *, limit: int, max_message_bytes: int) -> None:
        self.codec = codec
        self._batching = codec.batching
        # JSON envelopes waiting to be combined into one frame (batching codecs only).
        self._batch: list[bytes] = []
        # Writes are plain non-blocking syscalls on the socket's descriptor (trio has
        # made it non-blocking), so a delivery is one write() with no task switch.
        self._fd = fd
        self._queue: list[bytes | memoryview] = []  # written and cleared whole, never popped
        self._bytes = 0
        # Cursors waiting for the socket: at most one per user, the newest wins, and
        # they never wait behind the durable changes in the queue.
        self._cursors: dict[str, bytes] = {}
        self.limit = limit
        # A resume's replay is queued at once and may exceed the cap by itself; it is
        # allowed on top of the cap until the queue next drains, or a client that
        # fell behind could never catch up.
        self._allowance = 0
        # Whether the writer task runs: only while something waits for the socket or
        # the connection closes (an idle connection has no writer task: ~2.2 KB each).
        self._writing = False
        self.closing = False  # set by the connection: nothing more is queued
        self._drained: trio.Event | None = None  # made only while a catch-up waits
        self.unacked = Unacked()
        self._max_message = max_message_bytes
        self._owner: Owner | None = owner  # None once the connection is over

    @property
    def outbox_bytes(self) -> int:
        return self._bytes

    @property
    def cursors_waiting(self) -> int:
        """Cursors waiting for the socket (at most one per user)."""
        return len(self._cursors)

    @property
    def idle(self) -> bool:
        """Nothing waits for the socket."""
        return not self._queue and not self._batch and not self._cursors

    def release(self) -> None:
        """The connection is over: let go of it, so the two are freed by reference
        counting (a cycle would wait for the collector)."""
        self._owner = None

    def wake(self) -> None:
        """Something waits for the socket, or the connection closes: the writer task
        runs (the owner starts it) unless it runs already."""
        if self._writing or self._owner is None or not (self.closing or not self.idle):
            return
        self._writing = self._owner.outbox_start_writer()

    # -- what the client must ack ----------------------------------------------------

    def deliver(self, out: Outgoing, msg_id: str) -> None:
        """Send a fanned-out server message the client is expected to ack."""
        self.unacked.sent(out.project_id, out.seq, msg_id)
        self.send_out(out)

    def deliver_many(self, items: list[tuple[Outgoing, str]]) -> None:
        """Several fanned-out messages in one write (a group commit's changes)."""
        sent = self.unacked.sent
        for out, msg_id in items:
            sent(out.project_id, out.seq, msg_id)
        self.send_many([out for out, _ in items])

    def track(self, msg_ids: Iterable[str]) -> None:
        """Remember messages (not changes) the client should ack, by id."""
        for msg_id in msg_ids:
            self.unacked.message(msg_id)

    def track_changes(self, project_id: str, first: int, last: int) -> None:
        """Remember that changes ``first``..``last`` of a project went out (a catch-up)."""
        self.unacked.changes(project_id, first, last)

    def settle_ack(self, item: dict[str, Any]) -> None:
        """A client's ack: by ``id`` (one message), or cumulative (``payload``
        ``{projectId, seq}``: every change of that project up to ``seq``). Raises
        ProtocolError for a malformed cumulative ack. Settling twice is harmless."""
        payload = item.get("payload")
        if not payload:  # by id: the seed client's, one per message
            msg_id = item.get("id")
            if type(msg_id) is str:
                self.unacked.ack_id(msg_id)
            return
        project_id, seq = protocol.ack_up_to(payload)  # type: ignore[misc]
        self.unacked.ack_through(project_id, seq)

    # -- sending ---------------------------------------------------------------------

    def send_out(self, out: Outgoing) -> None:
        """Send one shared message (its frame for this codec is made once)."""
        if self._batching:
            self._send_batchable(out.json, out)
        else:
            self.send_frame(out.text)

    def send_many(self, outs: list[Outgoing]) -> None:
        """Send several shared messages in one write."""
        if not outs:
            return
        if not self._batching:
            self.send_frame(b"".join(out.text for out in outs))
        elif self.closing:
            return
        elif not self._queue and not self._batch:
            # Idle: all of them as batch frames, written at once.
            self._batch.extend(out.json for out in outs)
            self.flush_batch()
            frames = b"".join(self._queue) if len(self._queue) > 1 else self._queue[0]
            self._queue.clear()
            self._bytes = 0
            self.send_frame(frames)
        else:
            for out in outs:
                self._send_batchable(out.json, out)

    def send_json(self, data: bytes) -> None:
        """Send a message made for this connection alone (ack, error, pong, ...)."""
        if self._batching:
            self._send_batchable(data, None)
        else:
            self.send_frame(protocol.text_frame(data))

    def _send_batchable(self, data: bytes, out: Outgoing | None) -> None:
        if self.closing:
            return
        if self._queue or self._batch:
            # Something already waits: this joins the batch the writer sends next.
            self._batch.append(data)
            self._bytes += len(data)
            if self._bytes - (len(self._queue[0]) if self._queue else 0) > self.limit + self._allowance:
                self._over_cap()
            else:
                self.wake()
            return
        self.send_frame(out.frame_for(self.codec) if out is not None else self.codec.frame(data))

    def flush_batch(self) -> None:
        """Turn waiting messages into batch frames. A batch frame stays within the
        message size the server itself accepts, so clients with similar limits can
        read it; a single larger message (a big snapshot) still goes alone."""
        batch = self._batch
        if not batch:
            return
        limit = self._max_message
        chunk: list[bytes] = []
        chunk_bytes = 0
        for message in batch:
            if chunk and chunk_bytes + len(message) > limit:
                self._append_frames(chunk)
                chunk, chunk_bytes = [], 0
            chunk.append(message)
            chunk_bytes += len(message) + 1
        self._append_frames(chunk)
        batch.clear()

    def _append_frames(self, messages: list[bytes]) -> None:
        frame = self.codec.frames(messages)
        self._queue.append(frame)
        self._bytes += len(frame) - sum(len(m) for m in messages)

    def send_frame(self, frame: bytes) -> None:
        if self.closing:
            return
        self._write_or_queue(frame)

    def send_protocol(self, chunk: bytes) -> None:
        """What the WebSocket protocol says (pongs, the close frame): after what is
        queued, and even while closing."""
        self._write_or_queue(chunk)

    def _write_or_queue(self, frame: bytes) -> None:
        if self._queue or self._batch:
            self.flush_batch()
            self._enqueue(frame)
            self.wake()
            return
        try:
            sent = os.write(self._fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            if self._owner is not None:
                self._owner.outbox_broken()
            return
        if sent < len(frame):
            self._enqueue(memoryview(frame)[sent:])
            self.wake()

    def send_cursors(self, items: list[tuple[str, Outgoing]], blob: bytes | None = None) -> None:
        """Cursors of one tick (``blob``: their default-codec frames, joined once for
        everyone). An idle connection gets them in one write; a busy one keeps only
        the newest per user, ahead of queued changes."""
        if self.closing or not items:
            return
        if not self._queue and not self._cursors and not self._batch:
            if not self._batching:
                self.send_frame(blob if blob is not None else b"".join(out.text for _, out in items))
            else:
                self.send_frame(self.codec.frames([out.json for _, out in items]))
            return
        for user_id, out in items:
            self._cursors[user_id] = out.text if not self._batching else out.frame_for(self.codec)
        self.wake()

    def _enqueue(self, data: bytes | memoryview) -> None:
        self._queue.append(data)
        self._bytes += len(data)
        # The frame at the head is the one being written; only what waits behind it
        # counts, so one large snapshot is not mistaken for a slow reader.
        if self._bytes - len(self._queue[0]) > self.limit + self._allowance:
            self._over_cap()

    def _over_cap(self) -> None:
        owner = self._owner
        log.info("%s closed: too slow (outbox %d bytes)", owner.outbox_label() if owner else "session=(ended)", self._bytes)
        # Keep a frame that is already half on the wire, drop the rest: the client
        # gets what it missed from the changelog when it resumes with `since`.
        head = self._queue[0] if self._queue and isinstance(self._queue[0], memoryview) else None
        self._queue.clear()
        self._cursors.clear()
        self._batch.clear()
        self._bytes = 0
        if head is not None:
            self._queue.append(head)
            self._bytes = len(head)
        if owner is not None:
            owner.outbox_too_slow()

    # -- catching up (subscribe.py) --------------------------------------------------

    def send_catch_up(self, messages: list[bytes]) -> None:
        """A replay or snapshot is queued at once and may exceed the outbox cap by
        itself: it is allowed on top of the cap while it is queued, or a client that
        fell behind could never catch up. The allowance ends with the backlog. It is
        one catch-up's worth, never a sum: a client that re-subscribes without reading
        is a slow reader past the cap plus one catch-up, and is closed with 4008."""
        self._allowance = max(self._allowance, sum(len(m) for m in messages))
        for message in messages:
            self.send_json(message)
        if not self._queue and not self._batch:
            self._allowance = 0

    def backlogged(self) -> bool:
        """At the cap: wait for the socket before queuing more."""
        return self._bytes >= self.limit

    async def wait_drained(self) -> None:
        """Until everything queued reached the socket (or the connection closes)."""
        while (self._queue or self._batch) and not self.closing:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    # -- the writer task ---------------------------------------------------------------

    async def drain(self) -> bool:
        """The connection's writer task: whatever waits goes out in one write each
        time the socket is writable. Returns False once nothing waits (the task ends;
        wake() starts another when something does), True once closing with nothing
        left (the close frame is out) or when the socket failed."""
        while True:
            if not self._queue and not self._cursors and not self._batch:
                if self.closing:
                    return True
                self._writing = False
                return False
            await trio.lowlevel.wait_writable(self._fd)
            # Everything that piled up while we waited goes out in this one write.
            self.flush_batch()
            queue = self._queue
            if self._cursors:
                # Cursors go ahead of queued changes, after any half-sent frame.
                at = 1 if queue and isinstance(queue[0], memoryview) else 0
                for frame in self._cursors.values():
                    queue.insert(at, frame)
                    at += 1
                self._cursors.clear()
            data = queue[0] if len(queue) == 1 else b"".join(queue)
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                continue
            except OSError:
                return True
            queue.clear()
            if sent < len(data):
                rest = memoryview(data)[sent:]
                queue.append(rest)
                self._bytes = len(rest)
            else:
                self._bytes = 0
                self._allowance = 0
                if self._drained is not None:
                    self._drained.set()
