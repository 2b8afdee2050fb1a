"""The protocol layer of a WebSocket connection: what each client message does.

Subscribe (the use case is subscribe.py's: a session is its Follower), unsubscribe,
the three mutations (through the one write path, mutations.py, then the writer),
cursors, auth:refresh, pings, and the per-connection rate limit.

A session holds its connection through the `Transport` interface and sends through
the connection's `Outlet`; it is the connection's handler (connection.Handler) and
the hub's subscriber (hub.Subscriber). connection.py fills Transport, outbox.py
Outlet; tests/test_session.py drives a session through fakes of both.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Protocol as Interface

import trio

from ..wire import protocol
from ..buglog import BugLog
from ..domain.models import Identity, ValidationError
from .mutations import prepare_mutation
from ..wire.protocol import Envelope, Outgoing, ProtocolError
from ..domain.ratelimit import TokenBucket
from ..storage.reads import UNREACHABLE_RETRY_AFTER
from ..storage.store import Mutation, Outcome, now_ms
from .subscribe import subscribe

if TYPE_CHECKING:
    from .app import App
    from ..hooks.plugin_types import Codec

log = logging.getLogger(__name__)
_bugs = BugLog(log)

# A client refused more messages within this many seconds than the rate allows in
# them (plus the burst) is flooding and is closed (1008).
FLOOD_GRACE = 5.0
_UNLIMITED = frozenset({protocol.USER_CURSOR, protocol.PING})

ACTIONS = {protocol.EVENT_CREATE: "create", protocol.EVENT_UPDATE: "update", protocol.EVENT_DELETE: "delete"}


class Pending(Interface):
    """What a client has yet to ack (transports/acks.py keeps it)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def oldest(self, project_id: str) -> int | None:
        """The first change of the project not acked yet (None: all are)."""


class Outlet(Interface):
    """What a session sends through (a connection's outbox, outbox.py)."""

    codec: Codec
    limit: int  # bytes a session may have queued before it is too slow
    unacked: Pending  # deliveries sent and not acked yet
    closing: bool

    @property
    def outbox_bytes(self) -> int: ...
    def deliver(self, out: Outgoing, msg_id: str) -> None: ...
    def deliver_many(self, items: list[tuple[Outgoing, str]]) -> None: ...
    def send_out(self, out: Outgoing) -> None: ...
    def send_many(self, outs: list[Outgoing]) -> None: ...
    def send_cursors(self, items: list[tuple[str, Outgoing]], blob: bytes | None = None) -> None: ...
    def send_json(self, data: bytes) -> None: ...
    def send_frame(self, frame: bytes) -> None: ...
    def settle_ack(self, item: dict[str, Any]) -> None: ...
    def track(self, msg_ids: Iterable[str]) -> None: ...
    def track_changes(self, project_id: str, first: int, last: int) -> None: ...
    def backlogged(self) -> bool: ...
    async def wait_drained(self) -> None: ...
    def send_catch_up(self, messages: list[bytes]) -> None: ...


class Transport(Interface):
    """The connection a session holds (connection.py's `Connection`)."""

    out: Outlet
    close_code: int | None
    last_recv: float  # trio time the client last sent anything
    expires_at: float | None  # when the connection's credentials expire (time.time())

    def close(self, code: int, reason: str = "") -> None:
        """Start a clean close; idempotent."""

    async def run(self, handler: Any) -> None:
        """Serve the connection, telling ``handler`` (this session) what arrives."""


class Session:
    __slots__ = ("app", "id", "identity", "transport", "out", "subscriptions", "_rate", "_burst", "_bucket",
                 "_refused", "_refused_window", "origin", "connected_at")

    def __init__(self, app: "App", transport: Transport, identity: Identity, *, session_id: str) -> None:
        self.app = app
        self.id = session_id
        self.identity = identity
        self.transport = transport
        self.out = transport.out  # held too: one lookup less on every delivery
        self.subscriptions: set[str] = set()
        self.origin: str | None = None  # the browser's Origin header, for the inspector
        self.connected_at = time.time()
        # Client messages per connection; acks and cursors are not counted.
        self._rate = app.config.rate_limit
        self._burst = float(app.config.rate_burst)
        self._bucket = TokenBucket(self._rate, self._burst, transport.last_recv)
        self._refused = 0  # refusals in the current window of FLOOD_GRACE seconds
        self._refused_window = transport.last_recv

    def run(self) -> Awaitable[None]:
        # The connection's own coroutine, not one awaiting it: a frame less to keep
        # for each of ten thousand idle connections.
        return self.transport.run(self)

    def close(self, code: int, reason: str = "") -> None:
        self.transport.close(code, reason)

    @property
    def close_code(self) -> int | None:
        return self.transport.close_code

    @property
    def last_recv(self) -> float:
        return self.transport.last_recv

    # -- what the hub sends through (hub.Subscriber) ------------------------------------

    @property
    def codec(self) -> Codec:
        return self.out.codec

    @property
    def unacked(self) -> Pending:
        return self.out.unacked

    @property
    def outbox_bytes(self) -> int:
        return self.out.outbox_bytes

    @property
    def closing(self) -> bool:
        """Closing (or closed): nothing more is sent but the close handshake."""
        return self.out.closing

    def deliver(self, out: Outgoing, msg_id: str) -> None:
        self.out.deliver(out, msg_id)

    def deliver_many(self, items: list[tuple[Outgoing, str]]) -> None:
        self.out.deliver_many(items)

    def send_out(self, out: Outgoing) -> None:
        self.out.send_out(out)

    def send_many(self, outs: list[Outgoing]) -> None:
        self.out.send_many(outs)

    def send_cursors(self, items: list[tuple[str, Outgoing]], blob: bytes | None = None) -> None:
        self.out.send_cursors(items, blob)

    def send_json(self, data: bytes) -> None:
        self.out.send_json(data)

    def send_frame(self, frame: bytes) -> None:
        self.out.send_frame(frame)

    # -- what the connection tells its handler (connection.Handler) --------------------

    def on_closing(self) -> None:
        # A closing connection has left: others should not wait for its close
        # handshake to see `user:left`.
        self.on_ended()

    def describe(self) -> str:
        return f"session={self.id} user={self.identity.user_id}"

    def on_ended(self) -> None:
        self.app.hub.leave_all(self, self.subscriptions)
        self.subscriptions.clear()

    async def on_message(self, data: bytes, text: bool, items: list[Any] | None) -> None:
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
                try:
                    self.out.settle_ack(item)
                except ProtocolError as e:
                    e.ref = protocol.ref_for(item.get("id"))
                    self.send_json(protocol.error(e))
                continue
            # Acks, pings and cursors are not rate limited: acks are bounded by what
            # the server sends, a ping costs one pong (and a refused ping would look
            # like a dead connection), cursor fan-out is throttled per user anyway.
            if kind not in _UNLIMITED and self._limited(item.get("id") if kind is not None else None):
                if self.closing:
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
            except Exception as e:
                why = self.app.read.unreachable(e)
                if why is not None:
                    self._answer_unreachable(kind, item, why)
                    if self.closing:
                        return
                    continue
                # A bug must cost one message, never the connection or the server.
                _bugs.report(f"session={self.id} user={self.identity.user_id!r}: a {kind!r} message", e)
                ref = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
                self.send_json(protocol.error(ProtocolError(protocol.E_INTERNAL, "internal server error; the message was not applied", ref=ref)))

    def _answer_unreachable(self, kind: str | None, item: Any, why: str) -> None:
        """PostgreSQL did not answer a read this message needs: what our clients
        already retry. A subscribe is closed with 4008 (they resume with ``since``);
        a change is refused like a write while the log is away (they keep it and
        send it again after ``retryAfter``)."""
        log.warning("session=%s user=%s: %s", self.id, self.identity.user_id, why)
        if kind == "subscribe":
            self.close(protocol.CLOSE_TOO_SLOW, "the log is unreachable for now: resume with since")
            return
        ref = item.get("id") if isinstance(item.get("id"), str) else None
        self.send_json(protocol.error(ProtocolError(
            protocol.E_STORAGE_FULL, f"{why}: this was not applied now (if an earlier send was, resending gets "
                                     f"its answer); keep it and send it again after "
                                     f"{UNREACHABLE_RETRY_AFTER} s",
            ref=ref, retry_after=UNREACHABLE_RETRY_AFTER)))

    def _limited(self, ref: Any) -> bool:
        """Take a token for one client message; when there is none, answer
        `rate_limited` (or close with 1008 when it keeps on) and say so."""
        if self._bucket.take(trio.current_time()):
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
                ref=protocol.ref_for(ref))))
        return True

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
        if await subscribe(self.app, self, ref=env.id, project_id=sub.project_id, since=sub.since,
                           snapshot_parts=sub.snapshot_parts):
            self.subscriptions.add(sub.project_id)

    # -- what the subscribe use case needs of a connection (subscribe.Follower) --------
    # (``closing`` and ``send_json`` are the connection's)

    @property
    def outbox_limit(self) -> int:
        return self.out.limit

    def track(self, msg_ids: Iterable[str]) -> None:
        self.out.track(msg_ids)

    def track_changes(self, project_id: str, first: int, last: int) -> None:
        self.out.track_changes(project_id, first, last)

    def backlogged(self) -> bool:
        return self.out.backlogged()

    async def wait_drained(self) -> None:
        await self.out.wait_drained()

    def send_catch_up(self, messages: list[bytes]) -> None:
        self.out.send_catch_up(messages)

    async def _on_unsubscribe(self, env: Envelope) -> None:
        project_id = protocol.parse_project(env.payload, env.id)
        if project_id in self.subscriptions:
            self.subscriptions.discard(project_id)
            self.app.hub.leave(self, project_id)
        self.send_json(protocol.ack(env.id, {"projectId": project_id}))

    async def _on_mutation(self, env: Envelope) -> None:
        assert env.id is not None
        expires = self.identity.expires_at
        if expires is not None and time.time() >= expires:
            # The heartbeat closes an expired connection too, but it may be asleep
            # until a longer token's expiry (auth:refresh can shorten it).
            self.send_json(protocol.error(ProtocolError(
                protocol.E_FORBIDDEN, "token expired: the change was not applied; reconnect with a fresh token",
                ref=env.id)))
            self.close(protocol.CLOSE_TOKEN_INVALID, "token expired: reconnect with a fresh token")
            return
        m = await prepare_mutation(
            self.app, self.identity, ACTIONS[env.type], env.id, env.payload,
            client_ms=int(env.timestamp) if env.timestamp is not None else None,
        )
        await self.app.writer.submit(m, self)

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        """Its mutation's answer (writer.Sender): an ack, a conflict or an error."""
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
        self.transport.expires_at = identity.expires_at
        # A fresh token may allow fewer projects: leave those it no longer allows.
        for project_id in sorted(self.subscriptions):
            if not await self.app.authorize(identity, "subscribe", project_id):
                self.subscriptions.discard(project_id)
                self.app.hub.leave(self, project_id)
                self.send_json(protocol.error(ProtocolError(
                    protocol.E_FORBIDDEN, f"the new token does not allow project {project_id!r}: unsubscribed", field="projectId")))
        self.send_json(protocol.ack(env.id, {"expiresAt": identity.expires_ms}))


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
