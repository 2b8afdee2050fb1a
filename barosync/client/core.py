"""SyncClient: the barosync protocol client (trio + trio-websocket).

It holds three parts, each with its own job: the connection (connection.py's
`Link`: connect, run a session, back off and connect again), the replica (sync.py's
`Replica`: the local state and what server messages do to it) and the observers
(state.py: notifications and waiting). This module is the public API over them.

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
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping

import trio

from .model import (
    ClientClosed,
    Conflict,
    ConnectionState,
    CursorMoved,
    HeartbeatPolicy,
    QueueProgress,
    ReconnectPolicy,
)
from .store import ClientStore, QueueItem
from .state import (
    new_id,
    now_ms,
    ws_url,
    PendingMutation,
    QueuedMutation,
    NotificationStream,
    Observers,
    TokenSource,
    N,
)
from .connection import Link
from .sync import Replica
from .view import client_fields, copy_event

log = logging.getLogger(__name__)


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
        self._store_path = store
        self._store: ClientStore | None = None
        self._closed = False
        self._nursery_cm: Any = None
        self._observers = Observers()
        self._link = Link(self.url, token=token, observers=self._observers, reconnect=reconnect,
                          heartbeat=heartbeat, connect_timeout=connect_timeout, close_timeout=close_timeout,
                          refresh_before_expiry=refresh_token_before_expiry, max_message_size=max_message_size,
                          rng=rng)
        self._replica = Replica(self._observers, self._link, max_in_flight=max_in_flight)

    @property
    def reconnect_policy(self) -> ReconnectPolicy:
        return self._link.reconnect_policy

    @property
    def heartbeat_policy(self) -> HeartbeatPolicy:
        return self._link.heartbeat_policy

    @property
    def hello(self) -> dict[str, Any] | None:
        """The payload of the server's last hello (None before the first)."""
        return self._link.hello

    async def __aenter__(self) -> "SyncClient":
        if self._store is not None:
            raise RuntimeError("a SyncClient can be entered once")
        self._store = ClientStore(self._store_path)
        try:
            self._replica.open(self._store)
            self._nursery_cm = trio.open_nursery()
            nursery = await self._nursery_cm.__aenter__()
        except BaseException:
            self._store.close()
            raise
        self._link.start(nursery, self._replica)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        link = self._link
        link.closing = True
        if exc_type is None and link.in_session:
            # A clean close: acks and anything else already said go out first; then
            # the connection task closes with 1000 (it owns the WebSocket, whose
            # reader must live on to complete the close handshake) and stops.
            link.flush_acks()
            with trio.move_on_after(link.close_timeout):
                await self.wait_for(lambda: link.outbox_empty() or not link.connected)
            link.end_session()
            with trio.move_on_after(link.close_timeout + 0.5):
                await link.runner_done.wait()
        if exc_type is not None:
            link.aborting = True  # leaving on an error: close the socket, skip the handshake
        link.stop()
        try:
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]
        finally:
            self._finish_close()

    def _finish_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._link.closed()
        self._replica.close(ClientClosed("the client was closed; the mutation stays queued in the store"))
        self._observers.close()
        assert self._store is not None
        self._store.close()

    def _check_open(self) -> None:
        if self._store is None:
            raise RuntimeError("use the client inside `async with SyncClient(...) as client:`")
        if self._closed:
            raise ClientClosed("the client is closed")

    @property
    def state(self) -> ConnectionState:
        return self._link.state

    @property
    def user(self) -> dict[str, Any] | None:
        """The authenticated user from the server's hello (None before the first)."""
        return (self.hello or {}).get("user")

    @property
    def progress(self) -> QueueProgress:
        return self._replica.progress

    def reconnect(self) -> None:
        """Drop the current connection (if any) and connect again at once; after the
        client gave up (state ERROR), start trying again."""
        self._check_open()
        self._link.reconnect()

    def on(self, kind: type[N] | None, callback: Callable[[N], None]) -> Callable[[], None]:
        """Call ``callback(notification)`` for every notification of class ``kind``
        (None: all), synchronously, from the client's task. Returns a function that
        removes the callback."""
        entry = (kind, callback)
        self._observers.callbacks.append(entry)  # type: ignore[arg-type]

        def remove() -> None:
            if entry in self._observers.callbacks:
                self._observers.callbacks.remove(entry)  # type: ignore[arg-type]

        return remove

    def notifications(self, *kinds: type, buffer: int = 10_000) -> NotificationStream:
        """An async iterator of notifications (of the given classes; none given: all)."""
        stream = NotificationStream(self._observers, kinds, buffer)
        if self._closed:
            stream.close()
        else:
            self._observers.streams.add(stream)
        return stream

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true; re-checked after every server message,
        state change and queue change."""
        while not predicate():
            if self._closed:
                raise ClientClosed("the client is closed")
            await self._observers.wait_changed()

    async def wait_connected(self) -> None:
        await self.wait_for(lambda: self._link.state is ConnectionState.CONNECTED or self._link.gave_up is not None)
        if self._link.state is not ConnectionState.CONNECTED and self._link.gave_up is not None:
            raise self._link.gave_up

    async def wait_idle(self) -> None:
        """Wait until the offline queue is empty (every mutation answered)."""
        await self.wait_for(lambda: not self._replica.queue or self._link.gave_up is not None)
        if self._replica.queue and self._link.gave_up is not None:
            raise self._link.gave_up

    async def wait_synced(self) -> None:
        """Wait until the queue is empty and every subscribed project is live and
        caught up on the current connection."""
        await self.wait_for(lambda: self._link.gave_up is not None or (
            not self._replica.queue and self._link.connected
            and all(self._replica.project(p).phase == "live" for p in self._replica.desired)))
        if self._link.gave_up is not None and (self._replica.queue or not self._link.connected):
            raise self._link.gave_up

    def events(self, project_id: str) -> list[dict[str, Any]]:
        """The local view of a project: the server's state (as of ``last_seq``) with
        this client's acked and pending mutations applied, ordered by startDate, id.
        Copies: changing them changes nothing."""
        view = self._replica.view(project_id)
        return [copy_event(e) for e in sorted(view.values(), key=lambda e: (str(e.get("startDate") or ""), e["id"]))]

    def get(self, event_id: str, project_id: str | None = None) -> dict[str, Any] | None:
        """One event from the local view (searched in every known project unless given)."""
        found = self._locate(event_id, project_id)
        return copy_event(found[1]) if found else None

    def last_seq(self, project_id: str) -> int | None:
        st = self._replica.projects.get(project_id)
        return st.last_seq if st else None

    def is_pending(self, event_id: str) -> bool:
        """True while a mutation of this event waits for the server."""
        return any(item.event_id == event_id for item in self._replica.queue.values())

    @property
    def queue(self) -> list[QueuedMutation]:
        return [QueuedMutation(i.envelope_id, i.kind, i.project_id, i.event_id, dict(i.fields), i.version,
                               i.key in self._replica.inflight) for i in self._replica.queue.values()]

    def presence(self, project_id: str) -> list[dict[str, Any]]:
        """Other users present in a project (on the current connection)."""
        st = self._replica.projects.get(project_id)
        return [dict(u) for u in st.presence.values()] if st else []

    def cursors(self, project_id: str) -> list[CursorMoved]:
        st = self._replica.projects.get(project_id)
        return list(st.cursors.values()) if st else []

    def subscribed(self, project_id: str) -> bool:
        return project_id in self._replica.desired

    def writable(self, project_id: str) -> bool | None:
        """Whether this user may change the project (False: a viewer, whose changes
        the server refuses); None until the server answered a subscribe."""
        st = self._replica.projects.get(project_id)
        return st.writable if st else None

    def is_live(self, project_id: str) -> bool:
        st = self._replica.projects.get(project_id)
        return bool(st and st.phase == "live" and self._link.connected)

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
        st = self._replica.project(project_id)
        st.error = None
        if project_id not in self._replica.desired:
            self._replica.desired[project_id] = None
            if self._link.connected:
                self._replica.send_subscribe(project_id)
        if not wait:
            return
        await self.wait_for(lambda: st.error is not None or (st.phase == "live" and self._link.connected)
                            or self._link.gave_up is not None)
        if st.error is not None:
            raise st.error
        if st.phase != "live" and self._link.gave_up is not None:
            raise self._link.gave_up

    async def unsubscribe(self, project_id: str) -> None:
        """Stop following a project (its local copy and seq stay in the store)."""
        self._check_open()
        self._replica.desired.pop(project_id, None)
        st = self._replica.project(project_id)
        st.phase = "idle"
        st.presence.clear()
        st.cursors.clear()
        if self._link.connected:
            self._link.send({"type": "unsubscribe", "id": "unsub-" + new_id(), "payload": {"projectId": project_id}})

    def send_cursor(self, x: float, y: float, *, element_id: str | None = None, project_id: str | None = None) -> bool:
        """Share a pointer position (volatile: dropped when not connected). Returns
        whether it was sent."""
        if not self._link.connected:
            return False
        payload: dict[str, Any] = {"x": x, "y": y, "elementId": element_id}
        if project_id is not None:
            payload["projectId"] = project_id
        self._link.send({"type": "user:cursor", "payload": payload, "timestamp": now_ms()})
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

    # -- the targets of the calls above ------------------------------------------------

    def _locate(self, event_id: str, project_id: str | None = None) -> tuple[str, dict[str, Any]] | None:
        projects = [project_id] if project_id is not None else list(
            dict.fromkeys([*self._replica.projects, *(i.project_id for i in self._replica.queue.values())]))
        for p in projects:
            event = self._replica.view(p).get(event_id)
            if event is not None:
                return p, event
        return None

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
        return QueueItem(0, envelope_id or new_id(), kind, project_id, event_id, fields, version, now_ms(), remember)

    def _enqueue(self, items: list[QueueItem]) -> list[PendingMutation]:
        self._check_open()
        return self._replica.enqueue(items)
