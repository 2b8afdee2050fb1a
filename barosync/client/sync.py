"""The client's replica: the local state (confirmed projects, settled acks, the
queue) and what each server message does to it (acks, snapshots, changes in seq
order, conflicts, errors, presence, cursors); which queued mutations go out and
when. It sends through the `Wire` interface, which the client's connection
(connection.py's `Link`) fills, and the connection hands it what arrives through
the replica's side of that contract (connection.Receiver).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import orjson
import trio

from .model import (
    ClientError,
    ClientGaveUp,
    Conflict,
    ConflictDetected,
    ConflictError,
    CursorMoved,
    MutationFailed,
    MutationRefused,
    MutationSettled,
    PresenceChanged,
    QueueProgress,
    RemoteChange,
    ServerError,
    SnapshotApplied,
    SubscriptionRefused,
)
from .store import Batch, ClientStore, QueueItem
from .state import new_id, now_ms, Observers, Waiter, PendingMutation, ProjectState, RETRYABLE_STORAGE, CHANGE_KINDS
from .view import fold

log = logging.getLogger(__name__)


class Wire(Protocol):
    """What the replica sends through: the client's connection."""

    @property
    def connected(self) -> bool:
        """A session with the server is up (what is sent now goes out on it)."""

    @property
    def max_message_bytes(self) -> int | None:
        """The server's message size limit (from its hello), if it said one."""

    def send(self, obj: dict[str, Any]) -> None:
        """Queue a message on the current session (dropped when there is none)."""

    def send_text(self, text: str) -> None:
        """Queue an encoded message on the current session."""

    def at(self, deadline: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` at trio time ``deadline`` if the current session is still up."""


class Replica:
    """The client's local state and the rules that keep it in step with the server."""

    def __init__(self, observers: Observers, wire: Wire, *, max_in_flight: int) -> None:
        self._observers = observers
        self._wire = wire
        self._store: ClientStore | None = None
        self._max_in_flight = max(1, max_in_flight)
        self.queue: dict[int, QueueItem] = {}  # not acked yet, in order
        self._by_env: dict[str, QueueItem] = {}
        self.inflight: set[int] = set()  # queue keys sent on this session, unanswered
        # Answered `rate_limited`: send fewer at a time (halved, +1 per ack) and
        # pause sending for a while (doubling while it goes on).
        self._window = self._max_in_flight
        self._paused_until = 0.0
        self._rate_delay = 0.0
        self._next_key = 1
        self.waiters: dict[str, Waiter] = {}
        self.projects: dict[str, ProjectState] = {}
        self.desired: dict[str, None] = {}  # projects followed, across reconnects
        self._sub_refs: dict[str, str] = {}
        self._views: dict[str, dict[str, dict[str, Any]]] = {}
        self.completed = 0
        self.failed = 0

    def open(self, store: ClientStore) -> None:
        """Take up what the store kept: each project's state and the queue."""
        self._store = store
        for project_id, (seq, events) in store.load_projects().items():
            self.projects[project_id] = ProjectState(project_id, last_seq=seq, confirmed=events)
        for item in store.load_queue():
            self.queue[item.key] = item
            self._by_env[item.envelope_id] = item
        self._next_key = store.next_key()

    def project(self, project_id: str) -> ProjectState:
        st = self.projects.get(project_id)
        if st is None:
            st = self.projects[project_id] = ProjectState(project_id)
        return st

    def _commit(self, batch: Batch) -> None:
        assert self._store is not None
        self._store.commit(batch)

    def _notify(self, note: Any) -> None:
        self._observers.notify(note)

    @property
    def progress(self) -> QueueProgress:
        pending = len(self.queue)
        return QueueProgress(pending, self.completed, self.failed, pending + self.completed)

    def _notify_progress(self) -> None:
        self._notify(self.progress)
        self._observers.changed()

    # -- what the connection tells the replica (connection.Receiver) --------------------

    def on_connected(self) -> None:
        for project_id in list(self.desired):
            self.send_subscribe(project_id)
        self.fill_window()

    def on_disconnected(self) -> None:
        self.inflight.clear()
        self._sub_refs.clear()
        self._window = self._max_in_flight
        self._paused_until = 0.0
        self._rate_delay = 0.0
        for st in self.projects.values():
            st.phase = "idle"
            st.presence.clear()
            st.cursors.clear()

    def give_up(self, error: ClientGaveUp) -> None:
        for waiter in self.waiters.values():
            waiter.fail(error)
        self.waiters.clear()

    def close(self, error: ClientError) -> None:
        """The client closed: whoever waits hears ``error``; the store stays as it is."""
        for waiter in self.waiters.values():
            waiter.fail(error)
        for st in self.projects.values():
            if st.error is None and st.phase != "live":
                st.error = error

    def receive(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        payload = msg.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        if kind == "ack":
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

    def _on_ack(self, msg: dict[str, Any], p: dict[str, Any]) -> None:
        ref = msg.get("id")
        if not isinstance(ref, str):
            return
        if ref in self._sub_refs:
            self._on_subscribe_ack(self._sub_refs.pop(ref), ref, p)
        elif ref in self._by_env:
            self._on_mutation_ack(self._by_env[ref], p)

    def _on_subscribe_ack(self, project_id: str, ref: str, p: dict[str, Any]) -> None:
        st = self.project(project_id)
        if st.sub_id != ref:
            return
        st.writable = p.get("writable") is not False  # a server before roles: everyone could
        if p.get("mode") == "snapshot":
            st.phase = "snapshot"
            st.snapshot_events = []
        else:
            st.phase = "replaying"
            st.target_seq = int(p.get("seq") or 0)
            self._maybe_live(st)

    def _maybe_live(self, st: ProjectState) -> None:
        if st.phase == "replaying" and (st.last_seq or 0) >= st.target_seq:
            st.phase = "live"
        last = st.last_seq or 0
        for seq in [s for s in st.settled if s <= last]:
            del st.settled[seq]

    def _on_snapshot(self, p: dict[str, Any]) -> None:
        st = self.projects.get(str(p.get("projectId")))
        if st is None or st.phase != "snapshot":
            return
        seq = int(p.get("seq") or 0)
        events = [e for e in p.get("events") or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
        if p.get("more") is True:  # a part: the state changes once the last one is in
            st.snapshot_events.extend(events)
            return
        if st.snapshot_events:
            events, st.snapshot_events = st.snapshot_events + events, []
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
        st = self.projects.get(str(msg.get("projectId")))
        seq = msg.get("seq")
        if st is None or st.phase not in ("replaying", "live") or not isinstance(seq, int):
            return
        last = st.last_seq or 0
        if seq <= last:
            return  # already applied: exactly once, by seq
        if seq != last + 1:
            log.warning("project %s: gap after seq %d (got %d): resubscribing", st.project_id, last, seq)
            self.send_subscribe(st.project_id)
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
            for later in self.queue.values():
                if later.event_id == item.event_id and later.kind != "create" and later.version == base:
                    later.version = new_version
                    batch.put_item(later)
        if item.remember:
            batch.mark_done(item.envelope_id, seq if isinstance(seq, int) else None)
        st = self.projects.get(project_id)
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
                    self.send_subscribe(project_id)
            self._views.pop(project_id, None)
        self._commit(batch)
        self.completed += 1
        self._window = min(self._max_in_flight, self._window + 1)
        self._rate_delay = 0.0
        result = event if event is not None else p
        waiter = self.waiters.pop(item.envelope_id, None)
        if waiter is not None:
            waiter.set(result)
        self._notify(MutationSettled(item.envelope_id, item.kind, project_id, item.event_id, p))  # type: ignore[arg-type]
        self._notify_progress()
        self.fill_window()

    def _fail_item(self, item: QueueItem, error: ClientError) -> None:
        batch = Batch()
        self._remove_item(item, batch)
        self._commit(batch)
        self.completed += 1
        self.failed += 1
        waiter = self.waiters.pop(item.envelope_id, None)
        if waiter is not None:
            waiter.fail(error)
        self._notify(MutationFailed(item.envelope_id, item.kind, item.project_id, item.event_id, error))  # type: ignore[arg-type]
        self._notify_progress()
        self.fill_window()

    def _remove_item(self, item: QueueItem, batch: Batch) -> None:
        self.queue.pop(item.key, None)
        self._by_env.pop(item.envelope_id, None)
        self.inflight.discard(item.key)
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
            # Refused for its rate, not applied: resend it after a pause, with fewer
            # messages in flight.
            self._pause(ref if isinstance(ref, str) else None, None, halve=True)
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
            st = self.project(project_id)
            st.phase = "idle"
            st.error = SubscriptionRefused(project_id, code, message)
            self.desired.pop(project_id, None)
        self._notify(ServerError(code, message, ref if isinstance(ref, str) else None, field))

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
            self.inflight.discard(self._by_env[ref].key)
        elif ref is not None and ref in self._sub_refs:
            resubscribe = self._sub_refs.pop(ref)
        if episode:
            log.info("refused by the server for now: pausing %.2f s, window %d", self._paused_until - now, self._window)

        def resume() -> None:
            if resubscribe is not None and resubscribe in self.desired:
                self.send_subscribe(resubscribe)
            self.fill_window()

        if episode or resubscribe is not None:
            self._wire.at(self._paused_until, resume)

    def _on_joined(self, p: dict[str, Any]) -> None:
        st = self.projects.get(str(p.get("projectId")))
        user_id = p.get("id")
        if st is None or not isinstance(user_id, str):
            return
        known = user_id in st.presence
        st.presence[user_id] = p
        if not known:
            self._notify(PresenceChanged(st.project_id, p, True))

    def _on_left(self, p: dict[str, Any]) -> None:
        st = self.projects.get(str(p.get("projectId")))
        user_id = p.get("id")
        if st is None or not isinstance(user_id, str):
            return
        user = st.presence.pop(user_id, None)
        st.cursors.pop(user_id, None)
        if user is not None:
            self._notify(PresenceChanged(st.project_id, user, False))

    def _on_cursor(self, msg: dict[str, Any], p: dict[str, Any]) -> None:
        st = self.projects.get(str(msg.get("projectId") or p.get("projectId")))
        if st is None or not isinstance(p.get("userId"), str):
            return
        cursor = CursorMoved(st.project_id, p["userId"], p.get("x", 0), p.get("y", 0), p.get("elementId"))
        st.cursors[cursor.user_id] = cursor
        self._notify(cursor)

    def view(self, project_id: str) -> dict[str, dict[str, Any]]:
        view = self._views.get(project_id)
        if view is None:
            view = self._views[project_id] = fold(self.projects.get(project_id), project_id, self.queue.values())
        return view

    def enqueue(self, items: list[QueueItem]) -> list[PendingMutation]:
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
            waiter = self.waiters.get(item.envelope_id)
            if waiter is None:
                waiter = self.waiters[item.envelope_id] = Waiter()
            out.append(PendingMutation(item, waiter))
        self._commit(batch)
        for item in fresh:
            self.queue[item.key] = item
            self._by_env[item.envelope_id] = item
            self._views.pop(item.project_id, None)
        self._notify_progress()
        self.fill_window()
        return out


    def send_subscribe(self, project_id: str) -> None:
        st = self.project(project_id)
        ref = "sub-" + new_id()
        st.sub_id = ref
        st.phase = "syncing"
        st.error = None
        self._sub_refs[ref] = project_id
        # A big snapshot comes in parts of at most the server's message size.
        payload: dict[str, Any] = {"projectId": project_id, "snapshotParts": True}
        if st.last_seq is not None:
            payload["since"] = st.last_seq
        self._wire.send({"type": "subscribe", "id": ref, "payload": payload, "timestamp": now_ms()})

    def fill_window(self) -> None:
        """Send queued mutations strictly in queue order, at most ``max_in_flight``
        unanswered, and never two of one event at once: a mutation of an event whose
        earlier mutation is unanswered waits for that answer (its base version comes
        from it), and everything behind it waits too."""
        if not self._wire.connected or trio.current_time() < self._paused_until:
            return
        limit = self._wire.max_message_bytes
        blocked: set[str] = set()
        too_big: list[QueueItem] = []
        for item in self.queue.values():
            if len(self.inflight) >= self._window:
                break
            if item.key in self.inflight:
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
            self.inflight.add(item.key)
            self._wire.send_text(text)
        for item in too_big:
            self._fail_item(item, MutationRefused(
                "too_big", f"the mutation is larger than the server's limit of {limit} bytes",
                envelope_id=item.envelope_id))
