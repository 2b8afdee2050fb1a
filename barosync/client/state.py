"""Bookkeeping the client keeps per request, per project and per observer: waiters,
pending mutations, notification streams, and the small helpers they share.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio

from .model import ClientError, CursorMoved, MutationKind, Notification
from .store import QueueItem

log = logging.getLogger(__name__)


TokenSource = Union[str, Callable[[], Union[str, None, Awaitable[Union[str, None]]]]]
N = TypeVar("N")

# Close codes (and handshake statuses) after which the token must be replaced.
AUTH_CLOSE_CODES = frozenset({4001, 4003})
AUTH_HTTP_STATUSES = frozenset({401, 403})
# Errors that refuse a change for the server's storage: it stays queued and is sent
# again after the error's `retryAfter`.
RETRYABLE_STORAGE = frozenset({"storage_full", "storage_failed"})
CHANGE_KINDS = {"event:created": "created", "event:updated": "updated", "event:deleted": "deleted"}


def new_id() -> str:
    """A fresh random id (32 hex characters) for events and envelopes."""
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


def ws_url(url: str) -> str:
    """``ws://host:port`` (or ``http://``) -> ``ws://host:port/ws``; a URL with a path is kept."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url!r} (expected ws://HOST:PORT/ws)")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


# -- small helpers ---------------------------------------------------------------------


class Waiter:
    """The answer to one queued mutation, for whoever awaits it."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def set(self, value: dict[str, Any]) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> dict[str, Any]:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class PendingMutation:
    """A mutation in the offline queue. ``await pending.result()`` returns the
    server's answer (the stored event; for a delete the ack payload) or raises
    :class:`MutationRefused` / :class:`ConflictError`. Cancelling that wait does not
    cancel the mutation: it stays queued (and persisted) until the server answers."""

    def __init__(self, item: QueueItem, waiter: Waiter) -> None:
        self.envelope_id = item.envelope_id
        self.event_id = item.event_id
        self.project_id = item.project_id
        self.kind: MutationKind = item.kind  # type: ignore[assignment]
        self._waiter = waiter

    @property
    def done(self) -> bool:
        return self._waiter.event.is_set()

    async def result(self) -> dict[str, Any]:
        return await self._waiter.wait()

    def __repr__(self) -> str:
        return f"<PendingMutation {self.kind} {self.event_id} env={self.envelope_id} done={self.done}>"


@attrs.frozen
class QueuedMutation:
    """A read-only view of one queue entry."""

    envelope_id: str
    kind: str
    project_id: str
    event_id: str
    fields: dict[str, Any]
    version: int | None
    in_flight: bool


@attrs.define
class ProjectState:
    project_id: str
    last_seq: int | None = None  # None: never synced (subscribe without since)
    confirmed: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # idle: not subscribed on this connection; syncing: subscribe sent; snapshot: ack
    # said a snapshot follows; replaying: missed changes follow up to target_seq; live.
    phase: str = "idle"
    target_seq: int = 0
    sub_id: str | None = None
    error: ClientError | None = None
    settled: dict[int, tuple[str, str, dict[str, Any] | None]] = attrs.field(factory=dict)
    presence: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    cursors: dict[str, CursorMoved] = attrs.field(factory=dict)
    # Whether this user may change the project (False: a viewer); None until the
    # server answered a subscribe.
    writable: bool | None = None
    # Events of a snapshot that comes in parts, gathered until its last part.
    snapshot_events: list[dict[str, Any]] = attrs.field(factory=list)


@attrs.define
class End:
    """How one connection attempt ended."""

    kind: str  # closed | rejected | failed | heartbeat | client
    code: int | None = None
    reason: str | None = None
    connected: bool = False
    auth: bool = False


class WatchedNursery:
    """Hands tasks to a nursery and calls ``on_exit`` when any of them ends."""

    def __init__(self, nursery: trio.Nursery, on_exit: Callable[[], None]) -> None:
        self._nursery = nursery
        self._on_exit = on_exit

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None:
        async def run() -> None:
            try:
                await fn(*args)
            finally:
                self._on_exit()

        self._nursery.start_soon(run, name=name or fn)


class NotificationStream:
    """Notifications as an async iterator. Made by :meth:`SyncClient.notifications`;
    registered at once, so nothing published after the call is missed. If the
    consumer falls more than ``buffer`` behind, further notifications are dropped
    (counted in ``dropped``) rather than stalling the client. Ends when the client
    closes or the stream is closed."""

    def __init__(self, observers: "Observers", kinds: tuple[type, ...], buffer: int) -> None:
        self._observers = observers
        self._kinds = kinds
        self._send, self._recv = trio.open_memory_channel[Notification](buffer)
        self.dropped = 0

    def push(self, note: Notification) -> None:
        if self._kinds and not isinstance(note, self._kinds):
            return
        try:
            self._send.send_nowait(note)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def receive(self) -> Notification:
        return await self._recv.receive()

    def __aiter__(self) -> "NotificationStream":
        return self

    async def __anext__(self) -> Notification:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._observers.streams.discard(self)
        self._send.close()

    def __enter__(self) -> "NotificationStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




class Observers:
    """Who hears what the client does: notification callbacks and streams, and the
    tasks waiting for a condition (re-checked on every ``changed()``). The client's
    connection (connection.py) and its replica (sync.py) both report here."""

    def __init__(self) -> None:
        self.callbacks: list[tuple[type | None, Callable[[Any], None]]] = []
        self.streams: set[NotificationStream] = set()
        self._changed = trio.lowlevel.ParkingLot()

    def notify(self, note: Notification) -> None:
        for kind, callback in list(self.callbacks):
            if kind is None or isinstance(note, kind):
                try:
                    callback(note)
                except Exception:
                    log.exception("notification callback %r failed", callback)
        for stream in list(self.streams):
            stream.push(note)

    def changed(self) -> None:
        """Something a waiting condition may depend on changed."""
        self._changed.unpark_all()

    async def wait_changed(self) -> None:
        await self._changed.park()

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()
        self._changed.unpark_all()


def leaves(group: BaseException) -> list[BaseException]:
    """The exceptions in a (nested) exception group, or the one exception."""
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in leaves(inner)]
    return [group]
