"""SyncClient: the barosync protocol client (trio + trio-websocket).

One background task owns the connection: connect, run a session (reader, writer,
heartbeat, token refresh), and when it ends for any reason other than the
application closing the client, back off (full jitter) and connect again.

State lives in three layers, all keyed by what the server says:

- ``confirmed``: each subscribed project as the server has it, as of ``last_seq``
  (persisted together in the client store; changes are applied strictly in seq
  order, once);
- ``settled``: own mutations the server acked whose seq the confirmed state has not
  reached yet (in memory; dropped when it does);
- the queue: own mutations not acked yet (persisted), replayed in order with their
  original envelope ids after every reconnect and restart.

The local view of a project is confirmed + settled + queue, folded in that order.
Refusals simply leave the queue, so the view reverts by construction.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
import uuid
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from .model import (
    CLIENT_FIELD_DEFAULTS,
    EDITABLE_FIELDS,
    ClientClosed,
    ClientError,
    ClientGaveUp,
    Conflict,
    ConflictDetected,
    ConflictError,
    ConnectionState,
    CursorMoved,
    HeartbeatPolicy,
    MutationFailed,
    MutationKind,
    MutationRefused,
    MutationSettled,
    Notification,
    PresenceChanged,
    QueueProgress,
    ReconnectPolicy,
    RemoteChange,
    ServerError,
    SnapshotApplied,
    StateChanged,
    SubscriptionRefused,
    backoff_delay,
)
from .store import Batch, ClientStore, QueueItem

log = logging.getLogger("barosync.client")

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


def _now_ms() -> int:
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


class _Waiter:
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

    def __init__(self, item: QueueItem, waiter: _Waiter) -> None:
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
class _Project:
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


@attrs.define
class _End:
    """How one connection attempt ended."""

    kind: str  # closed | rejected | failed | heartbeat | client
    code: int | None = None
    reason: str | None = None
    connected: bool = False
    auth: bool = False


class _WatchedNursery:
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

    def __init__(self, client: "SyncClient", kinds: tuple[type, ...], buffer: int) -> None:
        self._client = client
        self._kinds = kinds
        self._send, self._recv = trio.open_memory_channel[Notification](buffer)
        self.dropped = 0

    def _push(self, note: Notification) -> None:
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
        self._client._streams.discard(self)
        self._send.close()

    def __enter__(self) -> "NotificationStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the client -------------------------------------------------------------------------


class SyncClient(AbstractAsyncContextManager["SyncClient"]):
    """A barosync client with an offline queue and an optimistic local view.

    ``async with SyncClient(url, token=..., store=PATH) as client:`` opens the store,
    starts connecting in the background and returns at once (the client works
    offline). Leaving the block closes the connection (1000) and the store; queued
    mutations stay in the store for the next client on it.

    ``token`` is a string or a callable (sync or async) returning one; a callable is
    asked again when the server refuses the token (HTTP 401/403, close 4001/4003) and
    before it expires (``auth:refresh``). If it returns nothing new the client gives
    up (state ERROR) instead of retrying forever.
    """

    def __init__(
        self,
        url: str,
        *,
        token: TokenSource,
        store: str | Any | None = None,
        reconnect: ReconnectPolicy = ReconnectPolicy(),
        heartbeat: HeartbeatPolicy = HeartbeatPolicy(),
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_in_flight: int = 64,
        refresh_token_before_expiry: bool = True,
        max_message_size: int = 64 * 1024 * 1024,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = ws_url(url)
        self._token_source = token
        self._store_path = store
        self.reconnect_policy = reconnect
        self.heartbeat_policy = heartbeat
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._max_in_flight = max(1, max_in_flight)
        self._refresh_before_expiry = refresh_token_before_expiry
        self._max_message_size = max_message_size
        self._rng = rng

        self._store: ClientStore | None = None
        self._state = ConnectionState.DISCONNECTED
        self._token: str | None = None
        self._closing = False
        self._aborting = False
        self._closed = False
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None
        self._run_scope: trio.CancelScope | None = None
        self._runner_done = trio.Event()
        self._session_scope: trio.CancelScope | None = None
        self._skip_backoff = False
        self._backoff_scope = trio.CancelScope()
        self._gave_up: ClientGaveUp | None = None

        # connection
        self._ws: WebSocketConnection | None = None
        self._outbox: deque[str] | None = None
        self._outbox_lot = trio.lowlevel.ParkingLot()
        self._connected = False
        self.hello: dict[str, Any] | None = None
        self._pong = trio.Event()
        self._refresh: tuple[str, str, trio.Event, list[Any]] | None = None

        # data
        self._queue: dict[int, QueueItem] = {}
        self._by_env: dict[str, QueueItem] = {}
        self._inflight: set[int] = set()
        # Answered `rate_limited`: send fewer at a time (halved, +1 per ack) and
        # pause sending for a while (doubling while it goes on).
        self._window = self._max_in_flight
        self._paused_until = 0.0
        self._rate_delay = 0.0
        self._session_nursery: trio.Nursery | None = None
        self._next_key = 1
        self._waiters: dict[str, _Waiter] = {}
        self._projects: dict[str, _Project] = {}
        self._desired: dict[str, None] = {}
        self._sub_refs: dict[str, str] = {}
        self._views: dict[str, dict[str, dict[str, Any]]] = {}
        self._completed = 0
        self._failed = 0

        # observers
        self._callbacks: list[tuple[type | None, Callable[[Any], None]]] = []
        self._streams: set[NotificationStream] = set()
        self._changed = trio.lowlevel.ParkingLot()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> "SyncClient":
        if self._store is not None:
            raise RuntimeError("a SyncClient can be entered once")
        self._store = ClientStore(self._store_path)
        try:
            self._load()
            self._nursery_cm = trio.open_nursery()
            self._nursery = await self._nursery_cm.__aenter__()
        except BaseException:
            self._store.close()
            raise
        self._start_runner()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._closing = True
        if exc_type is None and self._session_scope is not None:
            # A clean close: acks and anything else already said go out first; then
            # the connection task closes with 1000 (it owns the WebSocket, whose
            # reader must live on to complete the close handshake) and stops.
            with trio.move_on_after(self._close_timeout):
                await self.wait_for(lambda: not self._outbox or not self._connected)
            if self._session_scope is not None:
                self._session_scope.cancel()
            with trio.move_on_after(self._close_timeout + 0.5):
                await self._runner_done.wait()
        if exc_type is not None:
            self._aborting = True  # leaving on an error: close the socket, skip the handshake
        if self._run_scope is not None:
            self._run_scope.cancel()
        try:
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]
        finally:
            self._finish_close()

    def _finish_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._set_state(ConnectionState.DISCONNECTED, reason="client closed")
        error = ClientClosed("the client was closed; the mutation stays queued in the store")
        for waiter in self._waiters.values():
            waiter.fail(error)
        for st in self._projects.values():
            if st.error is None and st.phase != "live":
                st.error = error
        self._changed.unpark_all()
        for stream in list(self._streams):
            stream.close()
        assert self._store is not None
        self._store.close()

    def _load(self) -> None:
        assert self._store is not None
        for project_id, (seq, events) in self._store.load_projects().items():
            self._projects[project_id] = _Project(project_id, last_seq=seq, confirmed=events)
        for item in self._store.load_queue():
            self._queue[item.key] = item
            self._by_env[item.envelope_id] = item
        self._next_key = self._store.next_key()

    def _start_runner(self) -> None:
        assert self._nursery is not None
        self._gave_up = None
        self._run_scope = trio.CancelScope()
        self._runner_done = trio.Event()
        self._nursery.start_soon(self._run, self._run_scope)

    def reconnect(self) -> None:
        """Drop the current connection (if any) and connect again at once; after the
        client gave up (state ERROR), start trying again."""
        self._check_open()
        if self._runner_done.is_set():
            self._start_runner()
        elif self._session_scope is not None:
            self._skip_backoff = True
            self._session_scope.cancel()
        else:
            self._backoff_scope.cancel()  # waiting out a backoff delay: try now

    # -- the connection loop ---------------------------------------------------------

    async def _run(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._connect_forever()
        finally:
            self._runner_done.set()

    async def _connect_forever(self) -> None:
        policy = self.reconnect_policy
        attempt = 0
        fresh_token = False
        failed_token: str | None = None
        while not self._closing:
            token = await self._token_for(fresh_token)
            if token is None or (fresh_token and token == failed_token):
                self._give_up("the server refused the token and no fresh token came" if fresh_token
                              else "no token to connect with")
                return
            self._token = token
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            end = await self._connect_once(token)
            if self._closing:
                return
            if end.connected:
                attempt = 0
            fresh_token = end.auth
            failed_token = token if end.auth else None
            self._set_state(ConnectionState.DISCONNECTED, close_code=end.code, reason=end.reason)
            if self._skip_backoff:
                self._skip_backoff = False
                continue
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                self._give_up(f"gave up after {attempt} reconnect attempts (last: {end.reason or end.code})")
                return
            delay = backoff_delay(attempt, policy, self._rng)
            attempt += 1
            self._set_state(ConnectionState.RECONNECTING, attempt=attempt, delay=delay, close_code=end.code, reason=end.reason)
            with trio.CancelScope() as self._backoff_scope:
                await trio.sleep(delay)

    def _give_up(self, reason: str) -> None:
        self._gave_up = ClientGaveUp(reason)
        self._set_state(ConnectionState.ERROR, reason=reason)
        for waiter in self._waiters.values():
            waiter.fail(self._gave_up)
        self._waiters.clear()

    async def _token_for(self, fresh: bool) -> str | None:
        source = self._token_source
        if isinstance(source, str):
            return None if fresh else source
        if not fresh and self._token is not None:
            return self._token
        try:
            value = source()
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            log.exception("the token callable failed")
            return None
        return value if isinstance(value, str) and value else None

    async def _connect_once(self, token: str) -> _End:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    return await self._connect_and_run(nursery, token)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # trio-websocket's own reader task can raise a handshake failure (an HTTP
            # rejection) into the nursery as well as into connect().
            failures, rest = group.split((HandshakeError, ConnectionClosed, OSError))
            if rest is not None or failures is None:
                raise
            rejected = [e for e in _leaves(failures) if isinstance(e, ConnectionRejected)]
            if rejected:
                status = rejected[0].status_code
                return _End("rejected", code=status, reason=f"HTTP {status}", auth=status in AUTH_HTTP_STATUSES)
            return _End("failed", reason=f"{_leaves(failures)[0]!r}")

    async def _connect_and_run(self, nursery: trio.Nursery, token: str) -> _End:
        ws: WebSocketConnection | None = None
        end: _End | None = None
        # trio-websocket (0.12) waits for the opening handshake without noticing that
        # its reader task ended (connection reset or closed before the 101): without
        # this watch, such an attempt would cost the whole connect_timeout.
        handshake = trio.CancelScope()
        watched = _WatchedNursery(nursery, handshake.cancel)
        try:
            try:
                with trio.fail_after(self._connect_timeout), handshake:
                    ws = await connect_websocket_url(
                        watched, self.url,  # type: ignore[arg-type]
                        extra_headers=[(b"authorization", b"Bearer " + token.encode())],
                        message_queue_size=256,
                        max_message_size=self._max_message_size,
                        receive_buffer_size=64 * 1024,
                    )
                    hello = self._decode(await ws.get_message())
                if handshake.cancelled_caught:
                    end = _End("failed", reason="the connection closed during the handshake")
                    return end
            except ConnectionRejected as e:
                body = (e.body or b"")[:200].decode("utf-8", "replace")
                end = _End("rejected", code=e.status_code, reason=f"HTTP {e.status_code} {body}".strip(),
                           auth=e.status_code in AUTH_HTTP_STATUSES)
                return end
            except trio.TooSlowError:
                end = _End("failed", reason="connect timeout")
                return end
            except ConnectionClosed as e:
                code = int(e.reason.code) if e.reason is not None else None
                end = _End("failed", code=code, reason=e.reason.reason if e.reason else "closed", auth=code in AUTH_CLOSE_CODES)
                return end
            except (HandshakeError, OSError) as e:
                end = _End("failed", reason=f"{type(e).__name__}: {e.__cause__ or e}")
                return end
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                end = _End("failed", reason="the server did not start with hello")
                return end
            end = await self._session(ws, hello)
            return end
        finally:
            if ws is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self._close_timeout) as cs:
                        if self._aborting or (end is not None and end.kind == "heartbeat"):
                            cs.cancel()  # the peer is gone: close the socket, skip the handshake
                        await ws.aclose(1000, "client closing" if self._closing else "reconnecting")

    async def _session(self, ws: WebSocketConnection, hello: dict[str, Any]) -> _End:
        self._ws = ws
        self._outbox = deque()
        self.hello = hello.get("payload") or {}
        self._pong = trio.Event()
        self._connected = True
        self._send_ack(hello)
        self._set_state(ConnectionState.CONNECTED)
        for project_id in list(self._desired):
            self._send_subscribe(project_id)
        self._fill_window()
        end: _End | None = None
        try:
            async with trio.open_nursery() as n:
                self._session_scope = n.cancel_scope
                self._session_nursery = n

                async def read() -> None:
                    nonlocal end
                    end = await self._reader(ws)
                    n.cancel_scope.cancel()

                async def beat() -> None:
                    nonlocal end
                    await self._heartbeat(self.hello or {})
                    end = _End("heartbeat", reason="heartbeat: no pong within timeout", connected=True)
                    log.info("heartbeat timeout: treating the connection as dead")
                    n.cancel_scope.cancel()

                n.start_soon(read)
                n.start_soon(beat)
                n.start_soon(self._writer, ws, self._outbox)
                n.start_soon(self._refresh_loop, self.hello or {})
        finally:
            self._session_scope = None
            self._ws = None
            self._outbox = None
            self._connected = False
            self._inflight.clear()
            self._sub_refs.clear()
            self._session_nursery = None
            self._window = self._max_in_flight
            self._paused_until = 0.0
            self._rate_delay = 0.0
            self._refresh = None
            for st in self._projects.values():
                st.phase = "idle"
                st.presence.clear()
                st.cursors.clear()
            self._changed.unpark_all()
        return end or _End("client", reason="reconnect requested", connected=True)

    async def _reader(self, ws: WebSocketConnection) -> _End:
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as e:
                code = int(e.reason.code) if e.reason is not None else None
                return _End("closed", code=code, reason=(e.reason.reason if e.reason else None) or str(code),
                            connected=True, auth=code in AUTH_CLOSE_CODES)
            data = self._decode(raw)
            for msg in data if isinstance(data, list) else [data]:
                if isinstance(msg, dict):
                    try:
                        self._on_message(msg)
                    except ClientError:
                        raise
                    except (KeyError, TypeError, ValueError, AttributeError):
                        log.exception("could not handle a server message: %.200r", msg)
            self._changed.unpark_all()

    async def _writer(self, ws: WebSocketConnection, outbox: deque[str]) -> None:
        while True:
            while not outbox:
                await self._outbox_lot.park()
            text = outbox.popleft()
            try:
                await ws.send_message(text)
            except ConnectionClosed:
                return
            if not outbox:
                self._changed.unpark_all()

    async def _heartbeat(self, hello: dict[str, Any]) -> None:
        """Returns when a ping went unanswered for ``timeout`` seconds."""
        interval = self.heartbeat_policy.interval
        if interval is None:
            hb = hello.get("heartbeat") or {}
            interval = min(hb.get("interval", 30000) / 1000, hb.get("timeout", 60000) / 2000)
        timeout = self.heartbeat_policy.timeout
        while True:
            await trio.sleep(interval)
            self._pong = trio.Event()
            self._send({"type": "ping", "timestamp": _now_ms()})
            with trio.move_on_after(timeout):
                await self._pong.wait()
                continue
            return

    async def _refresh_loop(self, hello: dict[str, Any]) -> None:
        """Before the token expires, ask the token callable for a new one and send
        ``auth:refresh``. Without a new token the server closes with 4001 at expiry
        and the reconnect path asks again (and gives up if nothing comes)."""
        if not self._refresh_before_expiry or isinstance(self._token_source, str):
            return
        expires_ms = hello.get("tokenExpiresAt")
        while isinstance(expires_ms, (int, float)):
            remaining = expires_ms / 1000 - time.time()
            # A minute before expiry; a short-lived token at half its remaining life.
            await trio.sleep(max(0.0, remaining - min(60.0, max(0.0, remaining) / 2)))
            token = await self._token_for(fresh=True)
            if not token or token == self._token:
                return
            ref = "auth-" + new_id()
            answer: list[Any] = []
            done = trio.Event()
            self._refresh = (ref, token, done, answer)
            self._send({"type": "auth:refresh", "id": ref, "payload": {"token": token}, "timestamp": _now_ms()})
            await done.wait()
            if not answer or not isinstance(answer[0], dict):
                return
            self._token = token
            expires_ms = answer[0].get("expiresAt")
            if isinstance(expires_ms, (int, float)) and expires_ms < 1e11:
                expires_ms *= 1000  # seconds (as an earlier docs/protocol.md said), not ms

    # -- sending ---------------------------------------------------------------------

    def _send(self, obj: dict[str, Any]) -> None:
        if self._outbox is None:
            return
        self._outbox.append(orjson.dumps(obj).decode())
        self._outbox_lot.unpark_all()

    def _send_ack(self, msg: dict[str, Any]) -> None:
        msg_id = msg.get("id")
        if isinstance(msg_id, str) and msg.get("type") not in ("ack", "pong"):
            self._send({"type": "ack", "id": msg_id})

    def _send_subscribe(self, project_id: str) -> None:
        st = self._project(project_id)
        ref = "sub-" + new_id()
        st.sub_id = ref
        st.phase = "syncing"
        st.error = None
        self._sub_refs[ref] = project_id
        payload: dict[str, Any] = {"projectId": project_id}
        if st.last_seq is not None:
            payload["since"] = st.last_seq
        self._send({"type": "subscribe", "id": ref, "payload": payload, "timestamp": _now_ms()})

    def _fill_window(self) -> None:
        """Send queued mutations strictly in queue order, at most ``max_in_flight``
        unanswered, and never two of one event at once: a mutation of an event whose
        earlier mutation is unanswered waits for that answer (its base version comes
        from it), and everything behind it waits too."""
        if not self._connected or self._outbox is None or trio.current_time() < self._paused_until:
            return
        limit = (self.hello or {}).get("maxMessageBytes")
        blocked: set[str] = set()
        too_big: list[QueueItem] = []
        for item in self._queue.values():
            if len(self._inflight) >= self._window:
                break
            if item.key in self._inflight:
                blocked.add(item.event_id)
                continue
            if item.event_id in blocked:
                break  # replay strictly in queue order: nothing overtakes a waiting mutation
            blocked.add(item.event_id)
            text = orjson.dumps({
                "type": "event:" + item.kind, "id": item.envelope_id,
                "timestamp": item.timestamp, "payload": item.payload(),
            }).decode()
            if isinstance(limit, int) and len(text.encode()) > limit:
                too_big.append(item)
                continue
            self._inflight.add(item.key)
            self._outbox.append(text)
        self._outbox_lot.unpark_all()
        for item in too_big:
            self._fail_item(item, MutationRefused(
                "too_big", f"the mutation is larger than the server's limit of {limit} bytes",
                envelope_id=item.envelope_id))

    # -- receiving -------------------------------------------------------------------

    @staticmethod
    def _decode(raw: str | bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("server sent a frame that is not JSON: %.100r", raw)
            return None

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        payload = msg.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        if kind == "pong":
            self._pong.set()
        elif kind == "ack":
            self._on_ack(msg, payload)
        elif kind in CHANGE_KINDS:
            self._on_change(msg, payload)
        elif kind == "sync:snapshot":
            self._on_snapshot(payload)
        elif kind == "conflict:detected":
            self._on_conflict(payload)
        elif kind == "error":
            self._on_error(payload)
        elif kind == "user:joined":
            self._on_joined(payload)
        elif kind == "user:left":
            self._on_left(payload)
        elif kind == "user:cursor":
            self._on_cursor(msg, payload)
        elif kind == "hello":
            self.hello = payload
        self._send_ack(msg)

    def _on_ack(self, msg: dict[str, Any], p: dict[str, Any]) -> None:
        ref = msg.get("id")
        if not isinstance(ref, str):
            return
        if ref in self._sub_refs:
            self._on_subscribe_ack(self._sub_refs.pop(ref), ref, p)
        elif ref in self._by_env:
            self._on_mutation_ack(self._by_env[ref], p)
        elif self._refresh is not None and self._refresh[0] == ref:
            self._refresh[3].append(p)
            self._refresh[2].set()

    def _on_subscribe_ack(self, project_id: str, ref: str, p: dict[str, Any]) -> None:
        st = self._project(project_id)
        if st.sub_id != ref:
            return
        if p.get("mode") == "snapshot":
            st.phase = "snapshot"
        else:
            st.phase = "replaying"
            st.target_seq = int(p.get("seq") or 0)
            self._maybe_live(st)

    def _maybe_live(self, st: _Project) -> None:
        if st.phase == "replaying" and (st.last_seq or 0) >= st.target_seq:
            st.phase = "live"
        last = st.last_seq or 0
        for seq in [s for s in st.settled if s <= last]:
            del st.settled[seq]

    def _on_snapshot(self, p: dict[str, Any]) -> None:
        st = self._projects.get(str(p.get("projectId")))
        if st is None or st.phase != "snapshot":
            return
        seq = int(p.get("seq") or 0)
        events = [e for e in p.get("events") or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
        batch = Batch()
        batch.clear_project(st.project_id)
        for event in events:
            batch.put_event(st.project_id, event)
        batch.set_seq(st.project_id, seq)
        self._commit(batch)
        st.confirmed = {e["id"]: e for e in events}
        st.last_seq = seq
        st.phase = "live"
        self._maybe_live(st)
        self._views.pop(st.project_id, None)
        self._notify(SnapshotApplied(st.project_id, seq, len(events)))

    def _on_change(self, msg: dict[str, Any], p: dict[str, Any]) -> None:
        st = self._projects.get(str(msg.get("projectId")))
        seq = msg.get("seq")
        if st is None or st.phase not in ("replaying", "live") or not isinstance(seq, int):
            return
        last = st.last_seq or 0
        if seq <= last:
            return  # already applied: exactly once, by seq
        if seq != last + 1:
            log.warning("project %s: gap after seq %d (got %d): resubscribing", st.project_id, last, seq)
            self._send_subscribe(st.project_id)
            return
        kind = CHANGE_KINDS[str(msg.get("type"))]
        event_id = str(p.get("id"))
        batch = Batch()
        if kind == "deleted":
            st.confirmed.pop(event_id, None)
            batch.del_event(st.project_id, event_id)
            event = None
        else:
            event = p
            st.confirmed[event_id] = p
            batch.put_event(st.project_id, p)
        batch.set_seq(st.project_id, seq)
        self._commit(batch)
        st.last_seq = seq
        self._maybe_live(st)
        self._views.pop(st.project_id, None)
        version = msg.get("version")
        self._notify(RemoteChange(
            st.project_id, seq, kind, event_id, event,  # type: ignore[arg-type]
            int(version) if isinstance(version, int) else int(p.get("version") or 0),
            msg.get("userId"),
        ))

    def _on_mutation_ack(self, item: QueueItem, p: dict[str, Any]) -> None:
        seq = p.get("seq")
        project_id = str(p.get("projectId") or item.project_id)
        event = p.get("event") if isinstance(p.get("event"), dict) else None
        new_version = event.get("version") if event is not None else p.get("version")
        batch = Batch()
        self._remove_item(item, batch)
        # Later queued edits of this event were based on this one: they now build on
        # the version it produced, so one's own queued edits never conflict.
        base = item.version if item.kind != "create" else 0
        if isinstance(new_version, int) and item.kind != "delete":
            for later in self._queue.values():
                if later.event_id == item.event_id and later.kind != "create" and later.version == base:
                    later.version = new_version
                    batch.put_item(later)
        if item.remember:
            batch.mark_done(item.envelope_id, seq if isinstance(seq, int) else None)
        st = self._projects.get(project_id)
        if st is not None and isinstance(seq, int):
            last = st.last_seq or 0
            if st.phase in ("replaying", "live") and seq == last + 1:
                if item.kind == "delete":
                    st.confirmed.pop(item.event_id, None)
                    batch.del_event(project_id, item.event_id)
                elif event is not None:
                    st.confirmed[item.event_id] = event
                    batch.put_event(project_id, event)
                batch.set_seq(project_id, seq)
                st.last_seq = seq
                self._maybe_live(st)
            elif seq > last and st.phase != "idle":
                st.settled[seq] = (item.kind, item.event_id, event)
                if st.phase == "live":
                    log.warning("project %s: ack seq %d after %d: resubscribing", project_id, seq, last)
                    self._send_subscribe(project_id)
            self._views.pop(project_id, None)
        self._commit(batch)
        self._completed += 1
        self._window = min(self._max_in_flight, self._window + 1)
        self._rate_delay = 0.0
        result = event if event is not None else p
        waiter = self._waiters.pop(item.envelope_id, None)
        if waiter is not None:
            waiter.set(result)
        self._notify(MutationSettled(item.envelope_id, item.kind, project_id, item.event_id, p))  # type: ignore[arg-type]
        self._notify_progress()
        self._fill_window()

    def _fail_item(self, item: QueueItem, error: ClientError) -> None:
        batch = Batch()
        self._remove_item(item, batch)
        self._commit(batch)
        self._completed += 1
        self._failed += 1
        waiter = self._waiters.pop(item.envelope_id, None)
        if waiter is not None:
            waiter.fail(error)
        self._notify(MutationFailed(item.envelope_id, item.kind, item.project_id, item.event_id, error))  # type: ignore[arg-type]
        self._notify_progress()
        self._fill_window()

    def _remove_item(self, item: QueueItem, batch: Batch) -> None:
        self._queue.pop(item.key, None)
        self._by_env.pop(item.envelope_id, None)
        self._inflight.discard(item.key)
        batch.del_item(item)
        self._views.pop(item.project_id, None)

    def _on_conflict(self, p: dict[str, Any]) -> None:
        conflict = Conflict.from_payload(p)
        item = self._by_env.get(conflict.ref)
        if item is not None:
            # Nothing was stored for this mutation: it leaves the queue.
            self._fail_item(item, ConflictError(conflict))
        self._notify(ConflictDetected(conflict))

    def _on_error(self, p: dict[str, Any]) -> None:
        ref = p.get("ref")
        code = str(p.get("code"))
        message = str(p.get("message"))
        field = p.get("field")
        if code == "rate_limited":
            self._slow_down(ref if isinstance(ref, str) else None)
            return
        if code in RETRYABLE_STORAGE and isinstance(ref, str) and ref in self._by_env:
            # Nothing was stored: the change stays queued and goes again later.
            retry_after = p.get("retryAfter")
            delay = float(retry_after) if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool) else 5.0
            self._pause(ref, min(60.0, max(0.05, delay)), halve=False)
            self._notify(ServerError(code, message, ref, field))
            return
        if isinstance(ref, str) and ref in self._by_env:
            self._fail_item(self._by_env[ref], MutationRefused(code, message, envelope_id=ref, field=field))
            return
        if isinstance(ref, str) and ref in self._sub_refs:
            project_id = self._sub_refs.pop(ref)
            st = self._project(project_id)
            st.phase = "idle"
            st.error = SubscriptionRefused(project_id, code, message)
            self._desired.pop(project_id, None)
        self._notify(ServerError(code, message, ref if isinstance(ref, str) else None, field))

    def _slow_down(self, ref: str | None) -> None:
        """The server refused a message for its rate: it was not applied. Resend it
        after a pause, with fewer messages in flight."""
        self._pause(ref, None, halve=True)

    def _pause(self, ref: str | None, delay: float | None, *, halve: bool) -> None:
        """Stop sending for a while and resend what was refused then: ``delay``
        seconds, or (rate limits) a pause that doubles while refusals go on."""
        now = trio.current_time()
        episode = now >= self._paused_until  # refusals of messages already in flight count once
        if episode:
            if halve:
                self._window = max(1, self._window // 2)
            if delay is None:
                self._rate_delay = delay = min(5.0, max(0.05, self._rate_delay * 2))
            self._paused_until = now + delay
        resubscribe = None
        if ref is not None and ref in self._by_env:
            self._inflight.discard(self._by_env[ref].key)
        elif ref is not None and ref in self._sub_refs:
            resubscribe = self._sub_refs.pop(ref)
        if episode:
            log.info("refused by the server for now: pausing %.2f s, window %d", self._paused_until - now, self._window)

        async def resume(connection: object) -> None:
            await trio.sleep_until(self._paused_until)
            if self._ws is connection:
                if resubscribe is not None and resubscribe in self._desired:
                    self._send_subscribe(resubscribe)
                self._fill_window()

        if self._session_nursery is not None and (episode or resubscribe is not None):
            self._session_nursery.start_soon(resume, self._ws)

    def _on_joined(self, p: dict[str, Any]) -> None:
        st = self._projects.get(str(p.get("projectId")))
        user_id = p.get("id")
        if st is None or not isinstance(user_id, str):
            return
        known = user_id in st.presence
        st.presence[user_id] = p
        if not known:
            self._notify(PresenceChanged(st.project_id, p, True))

    def _on_left(self, p: dict[str, Any]) -> None:
        st = self._projects.get(str(p.get("projectId")))
        user_id = p.get("id")
        if st is None or not isinstance(user_id, str):
            return
        user = st.presence.pop(user_id, None)
        st.cursors.pop(user_id, None)
        if user is not None:
            self._notify(PresenceChanged(st.project_id, user, False))

    def _on_cursor(self, msg: dict[str, Any], p: dict[str, Any]) -> None:
        st = self._projects.get(str(msg.get("projectId") or p.get("projectId")))
        if st is None or not isinstance(p.get("userId"), str):
            return
        cursor = CursorMoved(st.project_id, p["userId"], p.get("x", 0), p.get("y", 0), p.get("elementId"))
        st.cursors[cursor.user_id] = cursor
        self._notify(cursor)

    # -- state, store and observers ----------------------------------------------------

    def _project(self, project_id: str) -> _Project:
        st = self._projects.get(project_id)
        if st is None:
            st = self._projects[project_id] = _Project(project_id)
        return st

    def _commit(self, batch: Batch) -> None:
        assert self._store is not None
        self._store.commit(batch)

    def _set_state(self, state: ConnectionState, *, attempt: int = 0, delay: float | None = None,
                   close_code: int | None = None, reason: str | None = None) -> None:
        previous = self._state
        if previous is state and state is not ConnectionState.RECONNECTING:
            return
        self._state = state
        self._notify(StateChanged(state, previous, attempt, delay, close_code, reason))
        self._changed.unpark_all()

    def _notify(self, note: Notification) -> None:
        for kind, callback in list(self._callbacks):
            if kind is None or isinstance(note, kind):
                try:
                    callback(note)
                except Exception:
                    log.exception("notification callback %r failed", callback)
        for stream in list(self._streams):
            stream._push(note)

    def _notify_progress(self) -> None:
        self._notify(self.progress)
        self._changed.unpark_all()

    def _check_open(self) -> None:
        if self._store is None:
            raise RuntimeError("use the client inside `async with SyncClient(...) as client:`")
        if self._closed:
            raise ClientClosed("the client is closed")

    # -- public: observing -----------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def user(self) -> dict[str, Any] | None:
        """The authenticated user from the server's hello (None before the first)."""
        return (self.hello or {}).get("user")

    @property
    def progress(self) -> QueueProgress:
        pending = len(self._queue)
        return QueueProgress(pending, self._completed, self._failed, pending + self._completed)

    def on(self, kind: type[N] | None, callback: Callable[[N], None]) -> Callable[[], None]:
        """Call ``callback(notification)`` for every notification of class ``kind``
        (None: all), synchronously, from the client's task. Returns a function that
        removes the callback."""
        entry = (kind, callback)
        self._callbacks.append(entry)  # type: ignore[arg-type]

        def remove() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)  # type: ignore[arg-type]

        return remove

    def notifications(self, *kinds: type, buffer: int = 10_000) -> NotificationStream:
        """An async iterator of notifications (of the given classes; none given: all)."""
        stream = NotificationStream(self, kinds, buffer)
        if self._closed:
            stream.close()
        else:
            self._streams.add(stream)
        return stream

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true; re-checked after every server message,
        state change and queue change."""
        while not predicate():
            if self._closed:
                raise ClientClosed("the client is closed")
            await self._changed.park()

    async def wait_connected(self) -> None:
        await self.wait_for(lambda: self._state is ConnectionState.CONNECTED or self._gave_up is not None)
        if self._state is not ConnectionState.CONNECTED and self._gave_up is not None:
            raise self._gave_up

    async def wait_idle(self) -> None:
        """Wait until the offline queue is empty (every mutation answered)."""
        await self.wait_for(lambda: not self._queue or self._gave_up is not None)
        if self._queue and self._gave_up is not None:
            raise self._gave_up

    async def wait_synced(self) -> None:
        """Wait until the queue is empty and every subscribed project is live and
        caught up on the current connection."""
        await self.wait_for(lambda: self._gave_up is not None or (
            not self._queue and self._connected
            and all(self._project(p).phase == "live" for p in self._desired)))
        if self._gave_up is not None and (self._queue or not self._connected):
            raise self._gave_up

    # -- public: the local view -------------------------------------------------------

    def events(self, project_id: str) -> list[dict[str, Any]]:
        """The local view of a project: the server's state (as of ``last_seq``) with
        this client's acked and pending mutations applied, ordered by startDate, id.
        Copies: changing them changes nothing."""
        view = self._view(project_id)
        return [_copy(e) for e in sorted(view.values(), key=lambda e: (str(e.get("startDate") or ""), e["id"]))]

    def get(self, event_id: str, project_id: str | None = None) -> dict[str, Any] | None:
        """One event from the local view (searched in every known project unless given)."""
        found = self._locate(event_id, project_id)
        return _copy(found[1]) if found else None

    def last_seq(self, project_id: str) -> int | None:
        st = self._projects.get(project_id)
        return st.last_seq if st else None

    def is_pending(self, event_id: str) -> bool:
        """True while a mutation of this event waits for the server."""
        return any(item.event_id == event_id for item in self._queue.values())

    @property
    def queue(self) -> list[QueuedMutation]:
        return [QueuedMutation(i.envelope_id, i.kind, i.project_id, i.event_id, dict(i.fields), i.version,
                               i.key in self._inflight) for i in self._queue.values()]

    def presence(self, project_id: str) -> list[dict[str, Any]]:
        """Other users present in a project (on the current connection)."""
        st = self._projects.get(project_id)
        return [dict(u) for u in st.presence.values()] if st else []

    def cursors(self, project_id: str) -> list[CursorMoved]:
        st = self._projects.get(project_id)
        return list(st.cursors.values()) if st else []

    def subscribed(self, project_id: str) -> bool:
        return project_id in self._desired

    def is_live(self, project_id: str) -> bool:
        st = self._projects.get(project_id)
        return bool(st and st.phase == "live" and self._connected)

    def remembered(self, envelope_ids: Iterable[str]) -> set[str]:
        """Which of these envelope ids (queued with ``remember=True``) the server acked."""
        self._check_open()
        assert self._store is not None
        return self._store.done_ids(list(envelope_ids))

    def _view(self, project_id: str) -> dict[str, dict[str, Any]]:
        view = self._views.get(project_id)
        if view is not None:
            return view
        st = self._projects.get(project_id)
        view = dict(st.confirmed) if st else {}
        if st:
            for seq in sorted(st.settled):
                kind, event_id, event = st.settled[seq]
                if kind == "delete":
                    view.pop(event_id, None)
                elif event is not None:
                    view[event_id] = event
        for item in self._queue.values():
            if item.project_id != project_id:
                continue
            if item.kind == "create":
                event = {**CLIENT_FIELD_DEFAULTS, **_normalized(item.fields), "id": item.event_id,
                         "projectId": project_id, "version": 0, "createdAt": None, "updatedAt": None,
                         "createdBy": None, "updatedBy": None}  # server-owned: known once acked
                view[item.event_id] = event
            elif item.kind == "update":
                current = view.get(item.event_id)
                if current is not None:
                    view[item.event_id] = {**current, **_normalized(item.fields)}
            else:
                view.pop(item.event_id, None)
        self._views[project_id] = view
        return view

    def _locate(self, event_id: str, project_id: str | None = None) -> tuple[str, dict[str, Any]] | None:
        projects = [project_id] if project_id is not None else list(
            dict.fromkeys([*self._projects, *(i.project_id for i in self._queue.values())]))
        for p in projects:
            event = self._view(p).get(event_id)
            if event is not None:
                return p, event
        return None

    # -- public: subscriptions -----------------------------------------------------------

    async def subscribe(self, project_id: str, *, wait: bool = True) -> None:
        """Follow a project: its changes, presence and cursors. Kept across reconnects
        (resubscribing with ``since`` = the last applied seq, persisted). With
        ``wait`` (default) returns once the project is live and caught up, which
        needs a connection; raises :class:`SubscriptionRefused` if the server says no."""
        self._check_open()
        st = self._project(project_id)
        st.error = None
        if project_id not in self._desired:
            self._desired[project_id] = None
            if self._connected:
                self._send_subscribe(project_id)
        if not wait:
            return
        await self.wait_for(lambda: st.error is not None or (st.phase == "live" and self._connected)
                            or self._gave_up is not None)
        if st.error is not None:
            raise st.error
        if st.phase != "live" and self._gave_up is not None:
            raise self._gave_up

    async def unsubscribe(self, project_id: str) -> None:
        """Stop following a project (its local copy and seq stay in the store)."""
        self._check_open()
        self._desired.pop(project_id, None)
        st = self._project(project_id)
        st.phase = "idle"
        st.presence.clear()
        st.cursors.clear()
        if self._connected:
            self._send({"type": "unsubscribe", "id": "unsub-" + new_id(), "payload": {"projectId": project_id}})

    def send_cursor(self, x: float, y: float, *, element_id: str | None = None, project_id: str | None = None) -> bool:
        """Share a pointer position (volatile: dropped when not connected). Returns
        whether it was sent."""
        if not self._connected:
            return False
        payload: dict[str, Any] = {"x": x, "y": y, "elementId": element_id}
        if project_id is not None:
            payload["projectId"] = project_id
        self._send({"type": "user:cursor", "payload": payload, "timestamp": _now_ms()})
        return True

    # -- public: mutations ---------------------------------------------------------------

    def submit_create(self, project_id: str, event: Mapping[str, Any] | None = None, /, *, id: str | None = None,
                      envelope_id: str | None = None, remember: bool = False, **fields: Any) -> PendingMutation:
        """Queue a create and show it in the local view at once; returns without
        waiting. ``id`` (event id) and ``envelope_id`` default to fresh random ids."""
        body = {**(event or {}), **fields}
        event_id = id or body.pop("id", None) or new_id()
        body.pop("id", None)
        body.pop("projectId", None)
        return self._enqueue([self._item("create", project_id, event_id, _client_fields(body), None,
                                         envelope_id, remember)])[0]

    def submit_creates(self, project_id: str, events: Iterable[Mapping[str, Any]], *,
                       envelope_ids: Iterable[str] | None = None, remember: bool = False) -> list[PendingMutation]:
        """Queue many creates in one store transaction (imports). An envelope id that
        is already queued is not queued again: its existing entry is returned."""
        items = []
        ids = iter(envelope_ids) if envelope_ids is not None else None
        for event in events:
            body = dict(event)
            event_id = body.pop("id", None) or new_id()
            body.pop("projectId", None)
            items.append(self._item("create", project_id, event_id, _client_fields(body), None,
                                    next(ids) if ids is not None else None, remember))
        return self._enqueue(items)

    def submit_update(self, event_id: str, changes: Mapping[str, Any] | None = None, /, *, version: int | None = None,
                      project_id: str | None = None, envelope_id: str | None = None, **fields: Any) -> PendingMutation:
        """Queue an update of some fields. ``version`` (the version the edit is based
        on) defaults to the version in the local view."""
        body = {**(changes or {}), **fields}
        for key in ("id", "projectId", "version"):
            body.pop(key, None)
        project_id, version = self._target(event_id, project_id, version, required=True)
        return self._enqueue([self._item("update", project_id, event_id, _client_fields(body), version,
                                         envelope_id, False)])[0]

    def submit_delete(self, event_id: str, *, version: int | None = None, force: bool = False,
                      project_id: str | None = None, envelope_id: str | None = None) -> PendingMutation:
        """Queue a delete. Unless ``force``, it is conditional on ``version`` (default:
        the version in the local view), so a newer edit makes it a conflict."""
        project_id, version = self._target(event_id, project_id, version, required=False)
        return self._enqueue([self._item("delete", project_id, event_id, {}, None if force else version,
                                         envelope_id, False)])[0]

    async def create(self, project_id: str, event: Mapping[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        """Create an event (optimistically visible at once); returns the stored event
        once the server acked it, or raises :class:`MutationRefused` (the view is
        reverted). Takes the arguments of :meth:`submit_create`."""
        return await self.submit_create(project_id, event, **kw).result()

    async def update(self, event_id: str, changes: Mapping[str, Any] | None = None, /, **kw: Any) -> dict[str, Any]:
        """Update fields; returns the stored event once acked, or raises
        :class:`MutationRefused` / :class:`ConflictError` (the view is reverted)."""
        return await self.submit_update(event_id, changes, **kw).result()

    async def delete(self, event_id: str, **kw: Any) -> dict[str, Any]:
        """Delete; returns the ack ``{id, projectId, version, seq}``."""
        return await self.submit_delete(event_id, **kw).result()

    async def resolve(self, conflict: Conflict, resolution: str | Mapping[str, Any] = "local") -> dict[str, Any] | None:
        """Settle a conflict in one call and return the outcome.

        - ``"local"``: resubmit this client's change on top of the stored version
          (an update's changed fields, or the delete);
        - ``"remote"``: keep the server's version (nothing is sent; returns it);
        - a mapping of fields: store these fields (an application's merge) on top of
          the stored version.
        Resubmissions use a new envelope id and ``version = remote.version``."""
        remote = conflict.remote
        if resolution == "remote":
            return remote
        if remote is None:
            raise ValueError(f"event {conflict.event_id!r} was deleted on the server: there is nothing to resubmit onto")
        version = int(remote["version"])
        if conflict.operation == "delete" and resolution == "local":
            return await self.delete(conflict.event_id, version=version, project_id=conflict.project_id)
        changes = conflict.local_changes() if resolution == "local" else dict(resolution)  # type: ignore[arg-type]
        return await self.update(conflict.event_id, changes, version=version, project_id=conflict.project_id)

    # -- mutation internals ----------------------------------------------------------

    def _target(self, event_id: str, project_id: str | None, version: int | None, *, required: bool) -> tuple[str, int | None]:
        found = self._locate(event_id, project_id)
        if project_id is None:
            if found is None:
                raise ValueError(f"event {event_id!r} is not in the local view: pass project_id= (and version=)")
            project_id = found[0]
        if version is None and found is not None:
            version = int(found[1].get("version") or 0)
        if version is None and required:
            raise ValueError(f"event {event_id!r} is not in the local view: pass version= (the version the edit is based on)")
        return project_id, version

    def _item(self, kind: str, project_id: str, event_id: str, fields: dict[str, Any], version: int | None,
              envelope_id: str | None, remember: bool) -> QueueItem:
        if not isinstance(project_id, str) or not project_id:
            raise ValueError("project_id must be a non-empty string")
        return QueueItem(0, envelope_id or new_id(), kind, project_id, event_id, fields, version, _now_ms(), remember)

    def _enqueue(self, items: list[QueueItem]) -> list[PendingMutation]:
        self._check_open()
        batch = Batch()
        out: list[PendingMutation] = []
        fresh: list[QueueItem] = []
        for item in items:
            existing = self._by_env.get(item.envelope_id)
            if existing is None and any(f.envelope_id == item.envelope_id for f in fresh):
                existing = next(f for f in fresh if f.envelope_id == item.envelope_id)
            if existing is not None:
                item = existing
            else:
                item.key = self._next_key
                self._next_key += 1
                batch.put_item(item, new=True)
                fresh.append(item)
            waiter = self._waiters.get(item.envelope_id)
            if waiter is None:
                waiter = self._waiters[item.envelope_id] = _Waiter()
            out.append(PendingMutation(item, waiter))
        self._commit(batch)
        for item in fresh:
            self._queue[item.key] = item
            self._by_env[item.envelope_id] = item
            self._views.pop(item.project_id, None)
        self._notify_progress()
        self._fill_window()
        return out


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [group]


def _client_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in body if k not in EDITABLE_FIELDS and k not in ("version", "createdAt", "updatedAt", "createdBy", "updatedBy")]
    if unknown:
        raise ValueError(f"unknown event field(s) {', '.join(map(repr, unknown))}; the fields are {', '.join(EDITABLE_FIELDS)}")
    return {k: v for k, v in body.items() if k in EDITABLE_FIELDS}


def _normalized(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fields as the server will store them (as far as the client can tell)."""
    out = dict(fields)
    if "attendees" in out:
        out["attendees"] = list(dict.fromkeys(out["attendees"] or []))
    if "allDay" in out and out["allDay"] is None:
        out["allDay"] = False
    return out


def _copy(event: dict[str, Any]) -> dict[str, Any]:
    out = dict(event)
    if isinstance(out.get("attendees"), list):
        out["attendees"] = list(out["attendees"])
    return out

