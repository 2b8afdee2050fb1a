"""The sending half of a WebSocket connection: the hot path of fan-out.

When a connection's outbox is empty a frame is written straight to its non-blocking
socket, with no task switch; what does not go out at once waits in a bounded outbox
that the connection's writer task (connection.py) drains in one write when the socket
is writable. A connection whose outbox passes its byte cap is closed with 4008: it
resumes with ``since`` and loses nothing. Cursors wait apart, newest per user, ahead
of the durable changes.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Iterable

from . import protocol
from .protocol import Outgoing

if TYPE_CHECKING:
    from .app import App
    from .models import Identity
    from .plugin_types import Codec

log = logging.getLogger(__name__)

# Unacked server messages remembered per connection; beyond it the oldest are
# forgotten (and counted), so a client that never acks cannot grow memory.
MAX_UNACKED = 1_000


class Outbox:
    """What a connection sends. State is set up by Connection.__init__; closing and
    aborting (``close``, ``_abort``) are the connection's."""

    __slots__ = ("app", "codec", "_batching", "_batch", "id", "identity", "_fd", "_outbox", "_outbox_bytes",
                 "_cursors", "_outbox_limit", "_replay_allowance", "_lot", "_closing", "_drained", "unacked")

    if TYPE_CHECKING:
        app: App
        codec: Codec
        identity: Identity

        def close(self, code: int, reason: str = "") -> None: ...

        def _abort(self) -> None: ...

    @property
    def outbox_bytes(self) -> int:
        return self._outbox_bytes

    def deliver(self, out: Outgoing, msg_id: str) -> None:
        """Send a fanned-out server message the client is expected to ack."""
        self._track((msg_id,))
        self.send_out(out)

    def deliver_many(self, items: list[tuple[Outgoing, str]]) -> None:
        """Several fanned-out messages in one write (a group commit's changes)."""
        self._track(msg_id for _, msg_id in items)
        self.send_many([out for out, _ in items])

    def _track(self, msg_ids: Iterable[str]) -> None:
        """Remember what the client should ack; the oldest are forgotten past
        MAX_UNACKED, so a client that never acks cannot grow memory."""
        unacked = self.unacked
        for msg_id in msg_ids:
            unacked[msg_id] = None
        while len(unacked) > MAX_UNACKED:
            del unacked[next(iter(unacked))]

    def settle_ack(self, item: dict[str, Any]) -> None:
        """A client's ack: by ``id`` (one message), or cumulative (``payload``
        ``{projectId, seq}``: every change of that project up to ``seq``). Raises
        ProtocolError for a malformed cumulative ack. Settling twice is harmless."""
        unacked = self.unacked
        payload = item.get("payload")
        if not payload:  # by id: the seed client's, one per message
            msg_id = item.get("id")
            if type(msg_id) is str:
                unacked.pop(msg_id, None)
            return
        project_id, seq = protocol.ack_up_to(payload)  # type: ignore[misc]
        # Changes are tracked as "project:seq"; a project's are few and in order.
        prefix = project_id + ":"
        cut = len(prefix)
        for msg_id in [m for m in unacked if m.startswith(prefix)]:
            tail = msg_id[cut:]
            if tail.isdigit() and int(tail) <= seq:
                del unacked[msg_id]

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
        elif self._closing:
            return
        elif not self._outbox and not self._batch:
            # Idle: all of them as batch frames, written at once.
            self._batch.extend(out.json for out in outs)
            self._flush_batch()
            frames = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
            self._outbox.clear()
            self._outbox_bytes = 0
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
        if self._closing:
            return
        if self._outbox or self._batch:
            # Something already waits: this joins the batch the writer sends next.
            self._batch.append(data)
            self._outbox_bytes += len(data)
            if self._outbox_bytes - (len(self._outbox[0]) if self._outbox else 0) > self._outbox_limit + self._replay_allowance:
                self._too_slow()
            else:
                self._lot.unpark()
            return
        self.send_frame(out.frame_for(self.codec) if out is not None else self.codec.frame(data))

    def _flush_batch(self) -> None:
        """Turn waiting messages into batch frames. A batch frame stays within the
        message size the server itself accepts, so clients with similar limits can
        read it; a single larger message (a big snapshot) still goes alone."""
        batch = self._batch
        if not batch:
            return
        limit = self.app.config.max_message_bytes
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
        self._outbox.append(frame)
        self._outbox_bytes += len(frame) - sum(len(m) for m in messages)

    def send_frame(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._outbox or self._batch:
            self._flush_batch()
            self._queue(frame)
            return
        try:
            sent = os.write(self._fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._abort()
            return
        if sent < len(frame):
            self._queue(memoryview(frame)[sent:])
            self._lot.unpark()

    def send_cursors(self, items: list[tuple[str, Outgoing]], blob: bytes | None = None) -> None:
        """Cursors of one tick (``blob``: their default-codec frames, joined once for
        everyone). An idle connection gets them in one write; a busy one keeps only
        the newest per user, ahead of queued changes."""
        if self._closing or not items:
            return
        if not self._outbox and not self._cursors and not self._batch:
            if not self._batching:
                self.send_frame(blob if blob is not None else b"".join(out.text for _, out in items))
            else:
                self.send_frame(self.codec.frames([out.json for _, out in items]))
            return
        for user_id, out in items:
            self._cursors[user_id] = out.text if not self._batching else out.frame_for(self.codec)
        self._lot.unpark()

    def _queue(self, data: bytes | memoryview) -> None:
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        # The frame at the head is the one being written; only what waits behind it
        # counts, so one large snapshot is not mistaken for a slow reader.
        if self._outbox_bytes - len(self._outbox[0]) > self._outbox_limit + self._replay_allowance:
            self._too_slow()

    def _too_slow(self) -> None:
        log.info("session=%s user=%s closed: too slow (outbox %d bytes)", self.id, self.identity.user_id, self._outbox_bytes)
        # Keep a frame that is already half on the wire, drop the rest: the client
        # gets what it missed from the changelog when it resumes with `since`.
        head = self._outbox[0] if self._outbox and isinstance(self._outbox[0], memoryview) else None
        self._outbox.clear()
        self._cursors.clear()
        self._batch.clear()
        self._outbox_bytes = 0
        if head is not None:
            self._outbox.append(head)
            self._outbox_bytes = len(head)
        self.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")
