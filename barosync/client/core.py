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

import logging
import random
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping

import trio
from trio_websocket import WebSocketConnection

from .model import (
    ClientClosed,
    ClientGaveUp,
    Conflict,
    ConnectionState,
    CursorMoved,
    HeartbeatPolicy,
    Notification,
    QueueProgress,
    ReconnectPolicy,
    StateChanged,
)
from .store import Batch, ClientStore, QueueItem
from .state import (
    new_id,
    now_ms,
    ws_url,
    Waiter,
    PendingMutation,
    QueuedMutation,
    ProjectState,
    NotificationStream,
    TokenSource,
    N,
)
from .connection import ClientConnection
from .sync import ClientSync, client_fields, copy_event

log = logging.getLogger(__name__)


# -- the client -------------------------------------------------------------------------


class SyncClient(ClientConnection, ClientSync, AbstractAsyncContextManager["SyncClient"]):
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
        # Changes applied but not acked yet, newest seq per project: sent as one
        # cumulative ack per project every ACK_INTERVAL (when the server offers it).
        self._ack_up_to: dict[str, int] = {}
        self._ack_lot = trio.lowlevel.ParkingLot()
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
        self._waiters: dict[str, Waiter] = {}
        self._projects: dict[str, ProjectState] = {}
        self._desired: dict[str, None] = {}
        self._sub_refs: dict[str, str] = {}
        self._views: dict[str, dict[str, dict[str, Any]]] = {}
        self._completed = 0
        self._failed = 0

        # observers
        self._callbacks: list[tuple[type | None, Callable[[Any], None]]] = []
        self._streams: set[NotificationStream] = set()
        self._changed = trio.lowlevel.ParkingLot()

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
            self._flush_acks()
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
            self._projects[project_id] = ProjectState(project_id, last_seq=seq, confirmed=events)
        for item in self._store.load_queue():
            self._queue[item.key] = item
            self._by_env[item.envelope_id] = item
        self._next_key = self._store.next_key()

    def _project(self, project_id: str) -> ProjectState:
        st = self._projects.get(project_id)
        if st is None:
            st = self._projects[project_id] = ProjectState(project_id)
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

    def events(self, project_id: str) -> list[dict[str, Any]]:
        """The local view of a project: the server's state (as of ``last_seq``) with
        this client's acked and pending mutations applied, ordered by startDate, id.
        Copies: changing them changes nothing."""
        view = self._view(project_id)
        return [copy_event(e) for e in sorted(view.values(), key=lambda e: (str(e.get("startDate") or ""), e["id"]))]

    def get(self, event_id: str, project_id: str | None = None) -> dict[str, Any] | None:
        """One event from the local view (searched in every known project unless given)."""
        found = self._locate(event_id, project_id)
        return copy_event(found[1]) if found else None

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
        self._send({"type": "user:cursor", "payload": payload, "timestamp": now_ms()})
        return True

    def submit_create(self, project_id: str, event: Mapping[str, Any] | None = None, /, *, id: str | None = None,
                      envelope_id: str | None = None, remember: bool = False, **fields: Any) -> PendingMutation:
        """Queue a create and show it in the local view at once; returns without
        waiting. ``id`` (event id) and ``envelope_id`` default to fresh random ids."""
        body = {**(event or {}), **fields}
        event_id = id or body.pop("id", None) or new_id()
        body.pop("id", None)
        body.pop("projectId", None)
        return self._enqueue([self._item("create", project_id, event_id, client_fields(body), None,
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
            items.append(self._item("create", project_id, event_id, client_fields(body), None,
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
        return self._enqueue([self._item("update", project_id, event_id, client_fields(body), version,
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
