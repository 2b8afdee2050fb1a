"""One WebSocket connection: a nursery with a reader, a writer and a heartbeat task.

Sending is the hot path of fan-out. When a connection's outbox is empty a frame is
written straight to a non-blocking duplicate of its socket, with no task switch;
what does not go out at once waits in a bounded outbox that the writer task drains
in one write when the socket is writable. A connection whose outbox passes its byte
cap is closed with 4008: it resumes with ``since`` and loses nothing.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

import trio
from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

from . import protocol
from .plugin_types import Codec
from .models import Identity, ValidationError
from .mutations import prepare_mutation
from .protocol import Envelope, Outgoing, ProtocolError
from .store import Mutation, Outcome, now_ms

if TYPE_CHECKING:
    from .app import App
    from .poller import ReadPoller

log = logging.getLogger("barosync.session")

RECEIVE_BYTES = 64 * 1024
# Messages the poller may queue for a connection before it stops reading from it.
INBOX_LIMIT = 256
# How long a closing connection waits for the peer's close frame / its last bytes.
CLOSE_TIMEOUT = 5.0
# Unacked server messages remembered per connection; beyond it the oldest are
# forgotten (and counted), so a client that never acks cannot grow memory.
MAX_UNACKED = 1_000
# A client refused more messages within this many seconds than the rate allows in
# them (plus the burst) is flooding and is closed (1008).
FLOOD_GRACE = 5.0
_UNLIMITED = frozenset({protocol.USER_CURSOR, protocol.PING})

ACTIONS = {protocol.EVENT_CREATE: "create", protocol.EVENT_UPDATE: "update", protocol.EVENT_DELETE: "delete"}


class Session:
    # Slots: ten thousand idle connections are mostly these objects.
    __slots__ = (
        "app", "_poller", "codec", "_batching", "_batch", "id", "identity", "_stream", "_ws", "_received", "_fd",
        "_outbox", "_outbox_bytes", "_cursors", "_outbox_limit", "_replay_allowance", "_lot", "_closing",
        "_flushed", "_peer_closed", "_close_deadline", "_nursery", "_parts", "_parts_text", "close_code",
        "subscriptions", "unacked", "last_recv", "_rate", "_burst", "_tokens", "_tick",
        "_refused", "_refused_window", "_inbox", "_inbox_lot", "_drained", "_eof", "_protocol_closing",
    )

    def __init__(self, app: "App", poller: "ReadPoller", stream: trio.SocketStream, received: bytes, identity: Identity,
                 codec: Codec) -> None:
        self.app = app
        self._poller = poller
        self.codec = codec
        self._batching = codec.batching
        # JSON envelopes waiting to be combined into one frame (batching codecs only).
        self._batch: list[bytes] = []
        self.id = protocol.next_id()
        self.identity = identity
        self._stream = stream
        # Incoming frames are parsed by websockets' sans-IO protocol: it measured 3.5x
        # faster than wsproto per frame (2.3 vs 7.9 us), and every delivery costs one
        # incoming ack frame. It also enforces the message size (1009), answers pings
        # and runs the close handshake; its output goes through our outbox.
        self._ws = Protocol(Side.SERVER, state=State.OPEN, max_size=app.config.max_message_bytes)
        self._received = received  # bytes that arrived with the handshake
        # Messages read by the poller for the reader task, in order.
        # A list, not a deque: an empty deque costs 600 bytes, times 10,000 idle
        # connections; the inbox is short-lived and short.
        self._inbox: list[tuple[bytes, bool, list[Any] | None]] = []
        self._inbox_lot = trio.lowlevel.ParkingLot()
        self._drained: trio.Event | None = None  # made only while a catch-up waits
        self._eof = False
        self._protocol_closing = False
        # Reads and writes are plain non-blocking syscalls on the socket's descriptor
        # (trio has made it non-blocking), so a delivery is one write() with no task
        # switch; trio is only asked to wait when the socket is full or empty. No
        # duplicate descriptor: at 10,000 connections the file limit counts.
        self._fd = stream.socket.fileno()
        self._outbox: list[bytes | memoryview] = []  # written and cleared whole, never popped
        self._outbox_bytes = 0
        # Cursors waiting for the socket: at most one per user, the newest wins, and
        # they never wait behind the durable changes in the outbox.
        self._cursors: dict[str, bytes] = {}
        self._outbox_limit = app.config.outbox_bytes
        # A resume's replay is queued at once and may exceed the cap by itself; it is
        # allowed on top of the cap until the outbox next drains, or a client that
        # fell behind could never catch up.
        self._replay_allowance = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._flushed = False  # the writer has written its last bytes
        self._peer_closed = False  # the peer's close frame arrived
        self._close_deadline = float("inf")
        self._nursery: trio.Nursery | None = None
        self._parts: list[bytes] = []
        self._parts_text = True
        self.close_code: int | None = None
        self.subscriptions: set[str] = set()
        self.unacked: dict[str, None] = {}
        self.last_recv = trio.current_time()
        # Token bucket for client messages; acks and cursors are not counted.
        self._rate = app.config.rate_limit
        self._burst = float(app.config.rate_burst)
        self._tokens = self._burst
        self._tick = self.last_recv
        self._refused = 0  # refusals in the current window of FLOOD_GRACE seconds
        self._refused_window = self.last_recv

    @property
    def outbox_bytes(self) -> int:
        return self._outbox_bytes

    # -- sending (hot path) ------------------------------------------------------------

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

    def close(self, code: int, reason: str = "") -> None:
        """Start a clean close: the close frame goes after what is queued, nothing
        after it. Idempotent; safe to call from anywhere on the event loop."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self._close_deadline = trio.current_time() + CLOSE_TIMEOUT
        if self._ws.state is State.OPEN:
            self._ws.send_close(code, reason[:120])
        self._flush_batch()
        self._send_protocol_output()
        self._lot.unpark()
        self._leave_soon()

    def _send_protocol_output(self) -> None:
        """Queue what the protocol has to say (pongs, close frames), after what is
        already queued; it goes out even while closing."""
        for chunk in self._ws.data_to_send():
            if not chunk:
                continue  # end of stream: ours comes when the writer is done
            if self._outbox or self._batch:
                self._flush_batch()
                self._outbox.append(chunk)
                self._outbox_bytes += len(chunk)
                self._lot.unpark()
            else:
                closing, self._closing = self._closing, False
                self.send_frame(chunk)
                self._closing = closing

    def _leave_soon(self) -> None:
        # A closing connection has left: others should not wait for its close
        # handshake to see `user:left`. Not done right here, because close() may be
        # called from inside a room's fan-out loop.
        if self._nursery is not None and self.subscriptions:
            self._nursery.start_soon(self._leave_rooms_later)

    async def _leave_rooms_later(self) -> None:
        self._leave_rooms()

    def _leave_rooms(self) -> None:
        self.app.hub.leave_all(self, self.subscriptions)
        self.subscriptions.clear()

    def fail(self) -> None:
        """Reading this connection failed unexpectedly (a bug): end it now rather
        than leave it open and unserved."""
        self._abort()

    def _abort(self) -> None:
        self._closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- the connection's tasks ----------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._heartbeat)
                # The reader is the connection's own task: one task fewer to keep.
                await self._reader()
        finally:
            self._closing = True
            self._leave_rooms()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def _writer(self) -> None:
        try:
            while True:
                if not self._outbox and not self._cursors and not self._batch:
                    if self._closing:
                        return
                    await self._lot.park()
                    continue
                await trio.lowlevel.wait_writable(self._fd)
                # Everything that piled up while we waited goes out in this one write.
                self._flush_batch()
                outbox = self._outbox
                if self._cursors:
                    # Cursors go ahead of queued changes, after any half-sent frame.
                    at = 1 if outbox and isinstance(outbox[0], memoryview) else 0
                    for frame in self._cursors.values():
                        outbox.insert(at, frame)
                        at += 1
                    self._cursors.clear()
                data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
                try:
                    sent = os.write(self._fd, data)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                outbox.clear()
                if sent < len(data):
                    rest = memoryview(data)[sent:]
                    outbox.append(rest)
                    self._outbox_bytes = len(rest)
                else:
                    self._outbox_bytes = 0
                    self._replay_allowance = 0
                    if self._drained is not None:
                        self._drained.set()
        finally:
            # The close frame is out (or the socket broke). The connection is over
            # once the peer has answered it too, or hung up. Until then we send
            # nothing more (a FIN after the close frame) and the reader keeps reading
            # and discarding, because closing a socket with unread input resets it,
            # and a reset can destroy our close frame before the peer reads it. The
            # heartbeat task enforces CLOSE_TIMEOUT.
            self._flushed = True
            if self._peer_closed or not self._closing:
                self._abort()
            else:
                self._half_close()

    async def _heartbeat(self) -> None:
        timeout = self.app.config.heartbeat_timeout
        while True:
            now = trio.current_time()
            if self._closing and now >= self._close_deadline:
                self._abort()
                return
            expires = self.identity.expires_at
            if expires is not None and not self._closing and time.time() >= expires:
                self.close(protocol.CLOSE_TOKEN_INVALID, "token expired: reconnect with a fresh token")
                continue
            if not self._closing and now >= self.last_recv + timeout:
                log.info("session=%s user=%s closed: heartbeat timeout", self.id, self.identity.user_id)
                self.close(protocol.CLOSE_HEARTBEAT, "heartbeat timeout")
                continue
            deadline = self.last_recv + timeout
            if expires is not None:
                deadline = min(deadline, now + max(0.0, expires - time.time()))
            if self._closing:
                deadline = min(deadline, self._close_deadline)
            await trio.sleep_until(deadline)

    # -- reading ---------------------------------------------------------------------
    #
    # The shared poller calls on_readable() when the socket has data: it reads,
    # parses frames, settles acks on the spot and queues everything else for the
    # reader task, which handles it in order (handlers may await).

    def on_readable(self) -> None:
        try:
            data = os.read(self._fd, RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof = True
            self._poller.unregister(self._fd)
            self._inbox_lot.unpark()
            return
        self.last_recv = trio.current_time()
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        ws = self._ws
        ws.receive_data(data)
        inbox = self._inbox
        for frame in ws.events_received():
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    message, text = frame.data, opcode is Opcode.TEXT
                else:
                    self._parts = [frame.data]
                    self._parts_text = opcode is Opcode.TEXT
                    continue
            elif opcode is Opcode.CONT:
                self._parts.append(frame.data)
                if not frame.fin:
                    continue
                message, text = b"".join(self._parts), self._parts_text
                self._parts = []
            else:
                continue  # control frames: the protocol object answers them
            if self._closing:
                continue
            try:
                items = self.codec.decode(message, text=text, max_bytes=self.app.config.max_message_bytes)
            except ProtocolError:
                items = None  # the reader task reports it
            if not inbox and items is not None and self._settle_acks(items):
                continue
            inbox.append((message, text, items))
        if ws.state is not State.OPEN:
            self._protocol_closing = True
        else:
            self._send_protocol_output()  # pongs
        if inbox or self._protocol_closing:
            self._inbox_lot.unpark()
            if len(inbox) >= INBOX_LIMIT:
                # Backpressure: stop reading until the reader task catches up.
                self._poller.unregister(self._fd)

    def _settle_acks(self, items: list[Any]) -> bool:
        """Handle a message here if it is nothing but acks (the common case)."""
        for item in items:
            if type(item) is not dict or item.get("type") != protocol.ACK:
                return False
        unacked = self.unacked
        for item in items:
            msg_id = item.get("id")
            if type(msg_id) is str:
                unacked.pop(msg_id, None)
        return True

    async def _reader(self) -> None:
        poller = self._poller
        if self._received:
            self._feed(self._received)
            self._received = b""
        poller.register(self._fd, self)
        inbox = self._inbox
        try:
            while True:
                while inbox:
                    message, text, items = inbox.pop(0)
                    if not self._closing:
                        await self._on_message(message, text, items)
                if self._protocol_closing:
                    self._on_protocol_closing()
                    if self._peer_closed:
                        return
                if self._eof:
                    break
                if self._fd not in poller:
                    poller.register(self._fd, self)  # caught up after backpressure
                await self._inbox_lot.park()
        finally:
            poller.unregister(self._fd)
        # End of stream without a close frame: nothing more can be said.
        self._abort()

    def _on_protocol_closing(self) -> None:
        """The peer sent a close frame, answered ours, or broke the protocol (the
        protocol then queued a close with 1002, 1007 or 1009)."""
        ws = self._ws
        if not self._closing:
            self._closing = True
            self._close_deadline = trio.current_time() + CLOSE_TIMEOUT
            received, sent = ws.close_rcvd, ws.close_sent
            self.close_code = received.code if received is not None else (sent.code if sent is not None else None)
            self._leave_soon()
        self._send_protocol_output()
        # Done once the peer's close frame is in (it closed, or answered ours). A
        # peer that broke the protocol may still be sending (the rest of a frame too
        # big to take): the reader discards that until it hangs up or time runs out.
        if ws.close_rcvd is not None:
            self._peer_closed = True
            if self._flushed:
                self._abort()
        self._lot.unpark()  # the writer ends the connection once its outbox is empty

    def _half_close(self) -> None:
        try:
            self._stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self._abort()  # already gone: nothing left to wait for

    # -- messages ------------------------------------------------------------------------

    async def _on_message(self, data: bytes, text: bool, items: list[Any] | None) -> None:
        try:
            if items is None:  # the poller could not decode it: say why
                items = self.codec.decode(data, text=text, max_bytes=self.app.config.max_message_bytes)
        except ProtocolError as e:
            if text and not _is_utf8(data):
                # RFC 6455: a text frame that is not UTF-8 fails the connection (1007).
                self.close(protocol.CLOSE_INVALID_DATA, "text frame is not valid UTF-8")
                return
            if not self._limited(None):  # garbage counts against the rate too
                self.send_json(protocol.error(e))
            return
        for item in items:
            kind = item.get("type") if type(item) is dict else None
            if type(kind) is not str:
                kind = None  # the envelope check below says what is wrong
            # Acks are as frequent as deliveries: settle them before anything else.
            if kind == protocol.ACK:
                msg_id = item.get("id")
                if type(msg_id) is str:
                    self.unacked.pop(msg_id, None)
                continue
            # Acks, pings and cursors are not rate limited: acks are bounded by what
            # the server sends, a ping costs one pong (and a refused ping would look
            # like a dead connection), cursor fan-out is throttled per user anyway.
            if kind not in _UNLIMITED and self._limited(item.get("id") if kind is not None else None):
                if self._closing:
                    return
                continue
            try:
                envelope = protocol.envelope_from_obj(item)
                await _HANDLERS[envelope.type](self, envelope)
            except ProtocolError as e:
                self.send_json(protocol.error(e))
            except ValidationError as e:
                self.send_json(protocol.error(ProtocolError(protocol.E_INVALID, f"`{e.field}` {e.message}", field=e.field)))
            except (trio.Cancelled, trio.ClosedResourceError, trio.BrokenResourceError):
                raise
            except Exception:
                # A bug must cost one message, never the connection or the server.
                log.exception("session=%s user=%s: internal error handling a message", self.id, self.identity.user_id)
                ref = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
                self.send_json(protocol.error(ProtocolError(protocol.E_INTERNAL, "internal server error; the message was not applied", ref=ref)))

    def _limited(self, ref: Any) -> bool:
        """Take a token for one client message; when there is none, answer
        `rate_limited` (or close with 1008 when it keeps on) and say so."""
        if self._take_token():
            return False
        now = trio.current_time()
        if now - self._refused_window > FLOOD_GRACE:
            self._refused_window = now
            self._refused = 0
        self._refused += 1
        # Closed only when refused more than a whole window's allowance: messages that
        # were in flight when the first `rate_limited` went out never add up to that
        # for a client that backs off, while a steady flood does.
        if self._refused > self._rate * FLOOD_GRACE + self._burst:
            log.info("session=%s user=%s closed: flooding", self.id, self.identity.user_id)
            self.close(protocol.CLOSE_POLICY, "rate limit exceeded again and again")
        else:
            self.send_json(protocol.error(ProtocolError(
                protocol.E_RATE_LIMITED, f"more than {self._rate:g} messages per second: slow down and resend",
                ref=ref if isinstance(ref, str) and len(ref) <= 128 else None)))
        return True

    def _take_token(self) -> bool:
        now = trio.current_time()
        tokens = self._tokens + (now - self._tick) * self._rate
        self._tick = now
        if tokens >= 1.0:
            self._tokens = min(tokens, self._burst) - 1.0
            return True
        self._tokens = tokens
        return False

    async def _on_ping(self, env: Envelope) -> None:
        self.send_json(protocol.encode("pong", {}, timestamp=env.timestamp if env.timestamp is not None else now_ms()))

    async def _authorize(self, action: str, project_id: str, ref: str | None) -> None:
        if not await self.app.authorize(self.identity, action, project_id):
            raise ProtocolError(protocol.E_FORBIDDEN, f"not allowed to {action} in project {project_id!r}", ref=ref)

    async def _on_subscribe(self, env: Envelope) -> None:
        sub = protocol.parse_subscribe(env.payload, env.id)
        await self._authorize("subscribe", sub.project_id, env.id)
        limit = self.app.config.max_subscriptions
        if sub.project_id not in self.subscriptions and len(self.subscriptions) >= limit:
            raise ProtocolError(protocol.E_LIMIT, f"at most {limit} subscriptions per connection: unsubscribe from one first", ref=env.id)
        app = self.app
        project_id, since = sub.project_id, sub.since
        acked = False
        while True:
            # A commit for this project may be durable but not yet fanned out; reading
            # the changelog now and joining the room later could deliver it twice.
            await app.writer.wait_idle(project_id)
            if self._closing:
                return
            # From here to join() nothing awaits: no change can slip between the
            # last read and the join, so the client sees every seq exactly once.
            # Long replays go in pieces of about the outbox cap, each once the
            # previous one is out, so catching up never needs more memory than that.
            found = app.store.replay(project_id, since, max_bytes=self._outbox_limit) if since is not None else None
            if found is None:
                self._send_snapshot(env.id, project_id, since, acked)
                break
            changes, complete = found
            if not acked:
                last = app.store.current_seq(project_id)
                self.send_json(protocol.ack(env.id, {"projectId": project_id, "seq": last, "mode": "changes",
                                                     "count": last - since}))  # type: ignore[operator]
                acked = True
            self._track(f"{project_id}:{since + n + 1}" for n in range(len(changes)))  # type: ignore[operator]
            self._send_catch_up(changes)
            since += len(changes)  # type: ignore[operator]
            if complete:
                break
            await self._wait_drained()
        app.hub.join(self, project_id)
        self.subscriptions.add(project_id)

    def _send_snapshot(self, ref: str | None, project_id: str, since: int | None, acked: bool) -> None:
        app = self.app
        seq, events = app.store.snapshot(project_id)
        if not acked:
            answer: dict[str, Any] = {"projectId": project_id, "seq": seq, "mode": "snapshot"}
            if since is not None:
                # Say why the client gets a snapshot instead of what it asked for.
                answer["reason"] = "since_ahead" if since > seq else "history_pruned"
            self.send_json(protocol.ack(ref, answer))
        snapshot_id = protocol.next_id()
        self._track((snapshot_id,))
        self._send_catch_up([protocol.encode("sync:snapshot", {
            "projectId": project_id, "seq": seq, "events": events, "since": since,
        }, id=snapshot_id)])

    async def _wait_drained(self) -> None:
        while (self._outbox or self._batch) and not self._closing:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    def _send_catch_up(self, messages: list[bytes]) -> None:
        """A replay or snapshot is queued at once and may exceed the outbox cap by
        itself: it is allowed on top of the cap while it is queued, or a client that
        fell behind could never catch up. The allowance ends with the backlog."""
        self._replay_allowance += sum(len(m) for m in messages)
        for message in messages:
            self.send_json(message)
        if not self._outbox and not self._batch:
            self._replay_allowance = 0

    async def _on_unsubscribe(self, env: Envelope) -> None:
        project_id = protocol.parse_project(env.payload, env.id)
        if project_id in self.subscriptions:
            self.subscriptions.discard(project_id)
            self.app.hub.leave(self, project_id)
        self.send_json(protocol.ack(env.id, {"projectId": project_id}))

    async def _on_mutation(self, env: Envelope) -> None:
        assert env.id is not None
        m = await prepare_mutation(
            self.app, self.identity, ACTIONS[env.type], env.id, env.payload,
            reply=self._answer, client_ms=int(env.timestamp) if env.timestamp is not None else None, origin=self,
        )
        await self.app.writer.submit(m)

    def _answer(self, m: Mutation, outcome: Outcome) -> None:
        if outcome.status in ("applied", "replayed"):
            self.send_json(protocol.ack(m.envelope_id, outcome.answer))
            if outcome.conflict is not None:
                self.send_json(protocol.encode("conflict:detected", outcome.conflict))
        elif outcome.status == "conflict":
            self.send_json(protocol.encode("conflict:detected", outcome.conflict))
        else:
            assert outcome.error is not None
            self.send_json(protocol.error(outcome.error))

    async def _on_cursor(self, env: Envelope) -> None:
        p = env.payload
        project_id = p.get("projectId")
        if project_id is not None:
            project_id = protocol.parse_project(p, env.id)
        if project_id is None:
            if len(self.subscriptions) != 1:
                raise ProtocolError(protocol.E_INVALID, "user:cursor needs `projectId` unless exactly one project is subscribed",
                                    ref=env.id, field="projectId")
            project_id = next(iter(self.subscriptions))
        elif project_id not in self.subscriptions:
            raise ProtocolError(protocol.E_NOT_SUBSCRIBED, "subscribe to the project before sending cursors", ref=env.id, field="projectId")
        x, y = p.get("x"), p.get("y")
        for name, value in (("x", x), ("y", y)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ProtocolError(protocol.E_INVALID, f"`{name}` must be a finite number", ref=env.id, field=name)
        element_id = p.get("elementId")
        if element_id is not None and (not isinstance(element_id, str) or len(element_id) > 256):
            raise ProtocolError(protocol.E_INVALID, "`elementId` must be a string of at most 256 characters", ref=env.id, field="elementId")
        self.app.hub.cursor(self, project_id, x, y, element_id)

    async def _on_auth_refresh(self, env: Envelope) -> None:
        token = env.payload.get("token")
        identity = await self.app.authenticate(token) if isinstance(token, str) and token else None
        if identity is None or identity.user_id != self.identity.user_id:
            self.send_json(protocol.error(ProtocolError(
                protocol.E_FORBIDDEN, "auth:refresh needs a valid token for the same user", ref=env.id)))
            self.close(protocol.CLOSE_TOKEN_INVALID, "token invalid")
            return
        self.identity = identity
        # A fresh token may allow fewer projects: leave those it no longer allows.
        for project_id in sorted(self.subscriptions):
            if not await self.app.authorize(identity, "subscribe", project_id):
                self.subscriptions.discard(project_id)
                self.app.hub.leave(self, project_id)
                self.send_json(protocol.error(ProtocolError(
                    protocol.E_FORBIDDEN, f"the new token does not allow project {project_id!r}: unsubscribed", field="projectId")))
        expires = identity.expires_at
        self.send_json(protocol.ack(env.id, {"expiresAt": int(expires * 1000) if expires is not None else None}))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


_HANDLERS: dict[str, Callable[[Session, Envelope], Awaitable[None]]] = {
    protocol.PING: Session._on_ping,
    protocol.SUBSCRIBE: Session._on_subscribe,
    protocol.UNSUBSCRIBE: Session._on_unsubscribe,
    protocol.EVENT_CREATE: Session._on_mutation,
    protocol.EVENT_UPDATE: Session._on_mutation,
    protocol.EVENT_DELETE: Session._on_mutation,
    protocol.USER_CURSOR: Session._on_cursor,
    protocol.AUTH_REFRESH: Session._on_auth_refresh,
}
