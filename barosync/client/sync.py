"""The client's sync layer: what each server message does to the local state (acks,
snapshots, changes in seq order, conflicts, errors, presence, cursors), and the
local view = confirmed + settled + queue, folded in that order.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import orjson
import trio

from .model import (
    CLIENT_FIELD_DEFAULTS,
    EDITABLE_FIELDS,
    ClientError,
    Conflict,
    ConflictDetected,
    ConflictError,
    CursorMoved,
    MutationFailed,
    MutationRefused,
    MutationSettled,
    PresenceChanged,
    RemoteChange,
    ServerError,
    SnapshotApplied,
    SubscriptionRefused,
)
from .store import Batch, QueueItem
from .state import new_id, now_ms, Waiter, PendingMutation, ProjectState, RETRYABLE_STORAGE, CHANGE_KINDS

log = logging.getLogger(__name__)


class ClientSync:
    """SyncClient's sync half (a mixin; the state it uses is SyncClient's)."""

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
        st = self._projects.get(str(p.get("projectId")))
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
                waiter = self._waiters[item.envelope_id] = Waiter()
            out.append(PendingMutation(item, waiter))
        self._commit(batch)
        for item in fresh:
            self._queue[item.key] = item
            self._by_env[item.envelope_id] = item
            self._views.pop(item.project_id, None)
        self._notify_progress()
        self._fill_window()
        return out


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in leaves(inner)]
    return [group]


def client_fields(body: Mapping[str, Any]) -> dict[str, Any]:
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


def copy_event(event: dict[str, Any]) -> dict[str, Any]:
    out = dict(event)
    if isinstance(out.get("attendees"), list):
        out["attendees"] = list(out["attendees"])
    return out

