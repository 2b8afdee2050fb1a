"""One WebSocket connection: a nursery whose task reads, and a writer task while one is needed.

Framing (websockets' sans-IO protocol), the shared read poller, the writer task that
drains the outbox (outbox.py), the heartbeat, and the close handshake with its close
codes live here. What each client message means is its handler's (the `Handler`
interface below; session.py's `Session` fills it and holds the connection as its
`Transport`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol as Interface

import trio
from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

from ..wire import protocol
from .deadlines import Deadlines
from .outbox import Outbox
from ..wire.protocol import ProtocolError

if TYPE_CHECKING:
    from ..hooks.plugin_types import Codec
    from .poller import ReadPoller

log = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024
# Messages, and bytes of them, the poller may queue for a connection before it stops
# reading from it: a connection whose reader waits (a snapshot drain) holds at most
# about this much, not 256 messages of max_message_bytes each.
INBOX_LIMIT = 256
INBOX_BYTES = 1024 * 1024
# How long a closing connection waits for the peer's close frame / its last bytes.
CLOSE_TIMEOUT = 5.0


class Handler(Interface):
    """What a connection's messages and its end mean: the protocol layer above it."""

    async def on_message(self, data: bytes, text: bool, items: list[Any] | None) -> None:
        """One client message, in order; ``items`` are its decoded envelopes, or None
        when the codec could not decode it."""

    def on_closing(self) -> None:
        """The connection started closing (once, from a task of the connection's)."""

    def on_ended(self) -> None:
        """The connection is over."""

    def describe(self) -> str:
        """Who is connected, for log lines (made when a line is written: a string
        per connection would cost memory ten thousand times)."""


class Connection:
    # Slots: ten thousand idle connections are mostly these objects.
    __slots__ = (
        "_expires_at", "out", "_fd", "_poller", "_stream", "_ws", "_received", "_flushed", "_peer_closed",
        "_close_deadline", "_nursery", "_parts", "_parts_text", "close_code", "last_recv", "_inbox", "_waiter",
        "_eof", "_protocol_closing", "_inbox_bytes", "_handler", "_heartbeat_timeout", "_max_message_bytes",
        "_deadlines", "due", "__weakref__",
    )

    def __init__(self, poller: "ReadPoller", deadlines: Deadlines, stream: trio.SocketStream, received: bytes,
                 codec: Codec, *, max_message_bytes: int, outbox_limit: int, heartbeat_timeout: float,
                 expires_at: float | None) -> None:
        self._poller = poller
        # The heartbeat, the credentials' expiry and the close handshake's timeout are
        # checked by one task for all connections (deadlines.py), not a task each.
        self._deadlines = deadlines
        self.due = math.inf  # when the deadlines' task next asks (its bookkeeping)
        # When the credentials it was opened with expire (time.time()); it is then
        # closed with 4001. The handler moves it on auth:refresh.
        self._expires_at = expires_at
        self._heartbeat_timeout = heartbeat_timeout
        self._max_message_bytes = max_message_bytes
        self._handler: Handler | None = None  # while it runs
        self._stream = stream
        # Incoming frames are parsed by websockets' sans-IO protocol: it measured 3.5x
        # faster than wsproto per frame (2.3 vs 7.9 us), and every delivery costs one
        # incoming ack frame. It also enforces the message size (1009), answers pings
        # and runs the close handshake; its output goes through our outbox.
        self._ws = Protocol(Side.SERVER, state=State.OPEN, max_size=max_message_bytes)
        self._received = received  # bytes that arrived with the handshake
        # Messages read by the poller for the connection's task, in order.
        # A list, not a deque: an empty deque costs 600 bytes, times 10,000 idle
        # connections; the inbox is short-lived and short.
        self._inbox: list[tuple[bytes, bool, list[Any] | None]] = []
        # The connection's task while it waits for the inbox (a ParkingLot and its
        # dict cost ~0.7 KB per idle connection; one waiter needs one reference).
        self._waiter: trio.lowlevel.Task | None = None
        self._inbox_bytes = 0
        self._eof = False
        self._protocol_closing = False
        # Reads and writes are plain non-blocking syscalls on the socket's descriptor
        # (trio has made it non-blocking); trio is only asked to wait when the socket
        # is full or empty. No duplicate descriptor: at 10,000 connections the file
        # limit counts. What is sent, and what waits for the socket, is the outbox's.
        self._fd = stream.socket.fileno()
        self.out = Outbox(self._fd, codec, self, limit=outbox_limit, max_message_bytes=max_message_bytes)
        self._flushed = False  # the writer has written its last bytes
        self._peer_closed = False  # the peer's close frame arrived
        self._close_deadline = float("inf")
        self._nursery: trio.Nursery | None = None
        self._parts: list[bytes] = []
        self._parts_text = True
        self.close_code: int | None = None
        self.last_recv = trio.current_time()

    @property
    def expires_at(self) -> float | None:
        return self._expires_at

    @expires_at.setter
    def expires_at(self, when: float | None) -> None:
        self._expires_at = when
        if when is not None and self._handler is not None:
            self._deadlines.at(trio.current_time() + max(0.0, when - time.time()), self)

    @property
    def closing(self) -> bool:
        """Closing (or closed): nothing more is sent but the close handshake."""
        return self.out.closing

    # -- what the outbox tells its connection (outbox.Owner) --------------------------

    def outbox_label(self) -> str:
        return self._handler.describe() if self._handler is not None else "a connection"

    def outbox_too_slow(self) -> None:
        self.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")

    def outbox_broken(self) -> None:
        self._abort()

    def outbox_start_writer(self) -> bool:
        if self._nursery is None:
            return False
        self._nursery.start_soon(self._writer)
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Start a clean close: the close frame goes after what is queued, nothing
        after it. Idempotent; safe to call from anywhere on the event loop."""
        if self.out.closing:
            return
        self.out.closing = True
        self.close_code = code
        self._close_deadline = trio.current_time() + CLOSE_TIMEOUT
        self._deadlines.at(self._close_deadline, self)
        if self._ws.state is State.OPEN:
            self._ws.send_close(code, reason[:120])
        self.out.flush_batch()
        self._send_protocol_output()
        self.out.wake()
        self._tell_closing()

    def _send_protocol_output(self) -> None:
        """Queue what the protocol has to say (pongs, close frames), after what is
        already queued; it goes out even while closing."""
        for chunk in self._ws.data_to_send():
            if not chunk:
                continue  # end of stream: ours comes when the writer is done
            self.out.send_protocol(chunk)

    def _tell_closing(self) -> None:
        # From a task of the connection's own: close() may be called from inside a
        # room's fan-out loop, which the handler's leaving would change under it.
        if self._handler is not None and self._nursery is not None:
            self._nursery.start_soon(self._closing_told, self._handler)

    @staticmethod
    async def _closing_told(handler: Handler) -> None:
        handler.on_closing()

    def fail(self) -> None:
        """Reading this connection failed unexpectedly (a bug): end it now rather
        than leave it open and unserved."""
        self._abort()

    def _abort(self) -> None:
        self.out.closing = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, handler: Handler) -> None:
        """Serve the connection until it is over, telling ``handler`` what arrives:
        the connection's task reads its inbox itself (a reader task of its own, and
        its frame, would cost every idle connection)."""
        self._handler = handler
        poller = self._poller
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # The writer runs only while something waits for the socket (outbox.py).
                self.out.wake()
                self._deadlines.at(trio.current_time(), self)  # it works out when it is next due
                if self._received:
                    self._feed(self._received)
                    self._received = b""
                poller.register(self._fd, self)
                inbox = self._inbox
                try:
                    while True:
                        while inbox:
                            item = inbox.pop(0)
                            self._inbox_bytes -= len(item[0])
                            if not self.out.closing:
                                await handler.on_message(*item)
                        # Not kept while idle: the last message and its envelopes.
                        item = None
                        if self._protocol_closing:
                            self._on_protocol_closing()
                            if self._peer_closed:
                                return
                        if self._eof:
                            break
                        if self._fd not in poller:
                            poller.register(self._fd, self)  # caught up after backpressure
                        self._waiter = trio.lowlevel.current_task()
                        await trio.lowlevel.wait_task_rescheduled(self._stop_waiting)
                finally:
                    poller.unregister(self._fd)
                # End of stream without a close frame: nothing more can be said.
                self._abort()
        finally:
            self.out.closing = True
            self.out.release()
            handler.on_ended()
            self._handler = None
            # websockets' parser is a generator that holds its protocol object: a
            # reference cycle only a full collection frees, and those grow rarer as
            # the heap grows (the soak's slow heap growth). Closing it frees the
            # connection's protocol state now.
            self._ws.parser.close()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    def _wake(self) -> None:
        """Something for the connection's task: new messages, the end of the stream
        or a close frame."""
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _stop_waiting(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self._waiter = None  # cancelled while waiting
        return trio.lowlevel.Abort.SUCCEEDED

    async def _writer(self) -> None:
        idle = False  # nothing waits for the socket: the task ends, the connection goes on
        try:
            idle = not await self.out.drain()
        finally:
            if not idle:
                self._written_out()

    def _written_out(self) -> None:
        """The writer's last write is done (the close frame is out) or failed."""
        # The close frame is out (or the socket broke). The connection is over
        # once the peer has answered it too, or hung up. Until then we send
        # nothing more (a FIN after the close frame) and the reader keeps reading
        # and discarding, because closing a socket with unread input resets it,
        # and a reset can destroy our close frame before the peer reads it. The
        # deadlines' task enforces CLOSE_TIMEOUT (check_deadlines).
        self._flushed = True
        if self._peer_closed or not self.out.closing:
            self._abort()
        else:
            self._half_close()

    def check_deadlines(self, now: float) -> float | None:
        """(deadlines.Watched) Close a connection whose close handshake ran out of
        time, whose credentials expired (4001) or that went quiet past the heartbeat
        timeout; when to look again (None: it is over)."""
        if self._handler is None:
            return None
        timeout = self._heartbeat_timeout
        while True:
            if self.out.closing and now >= self._close_deadline:
                self._abort()
                return None
            expires = self._expires_at
            if expires is not None and not self.out.closing and time.time() >= expires:
                self.close(protocol.CLOSE_TOKEN_INVALID, "token expired: reconnect with a fresh token")
                continue
            if not self.out.closing and now >= self.last_recv + timeout:
                log.info("%s closed: heartbeat timeout", self.outbox_label())
                self.close(protocol.CLOSE_HEARTBEAT, "heartbeat timeout")
                continue
            deadline = self.last_recv + timeout
            if expires is not None:
                deadline = min(deadline, now + max(0.0, expires - time.time()))
            if self.out.closing:
                deadline = min(deadline, self._close_deadline)
            return deadline

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
            self._wake()
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
            if self.out.closing:
                continue
            try:
                items = self.out.codec.decode(message, text=text, max_bytes=self._max_message_bytes)
            except ProtocolError:
                items = None  # the connection's task reports it
            if not inbox and items is not None and self._settle_acks(items):
                continue
            inbox.append((message, text, items))
            self._inbox_bytes += len(message)
        if ws.state is not State.OPEN:
            self._protocol_closing = True
        else:
            self._send_protocol_output()  # pongs
        if inbox or self._protocol_closing:
            self._wake()
            if len(inbox) >= INBOX_LIMIT or self._inbox_bytes >= INBOX_BYTES:
                # Backpressure: stop reading until the connection's task catches up.
                self._poller.unregister(self._fd)

    def _settle_acks(self, items: list[Any]) -> bool:
        """Handle a message here if it is nothing but well-formed acks (the common
        case); anything else goes to the connection's task, which settles the acks again
        (harmless) and answers the malformed one."""
        for item in items:
            if type(item) is not dict or item.get("type") != protocol.ACK:
                return False
        try:
            for item in items:
                self.out.settle_ack(item)
        except ProtocolError:
            return False
        return True

    def _on_protocol_closing(self) -> None:
        """The peer sent a close frame, answered ours, or broke the protocol (the
        protocol then queued a close with 1002, 1007 or 1009)."""
        ws = self._ws
        if not self.out.closing:
            self.out.closing = True
            self._close_deadline = trio.current_time() + CLOSE_TIMEOUT
            received, sent = ws.close_rcvd, ws.close_sent
            self.close_code = received.code if received is not None else (sent.code if sent is not None else None)
            self._tell_closing()
        self._send_protocol_output()
        # Done once the peer's close frame is in (it closed, or answered ours). A
        # peer that broke the protocol may still be sending (the rest of a frame too
        # big to take): the reader discards that until it hangs up or time runs out.
        if ws.close_rcvd is not None:
            self._peer_closed = True
            if self._flushed:
                self._abort()
        self.out.wake()  # the writer ends the connection once its outbox is empty

    def _half_close(self) -> None:
        try:
            self._stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self._abort()  # already gone: nothing left to wait for
