"""The local view of a project: confirmed + settled + queue, folded in that order
(plain functions over the replica's state), and the event fields a caller may send.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .model import CLIENT_FIELD_DEFAULTS, EDITABLE_FIELDS
from .state import ProjectState
from .store import QueueItem


def fold(st: ProjectState | None, project_id: str, queue: Iterable[QueueItem]) -> dict[str, dict[str, Any]]:
    """The project's events as this client sees them: the server's state, then this
    client's acked changes the confirmed state has not reached, then its queue."""
    view = dict(st.confirmed) if st else {}
    if st:
        for seq in sorted(st.settled):
            kind, event_id, event = st.settled[seq]
            if kind == "delete":
                view.pop(event_id, None)
            elif event is not None:
                view[event_id] = event
    for item in queue:
        if item.project_id != project_id:
            continue
        if item.kind == "create":
            view[item.event_id] = {**CLIENT_FIELD_DEFAULTS, **_normalized(item.fields), "id": item.event_id,
                                   "projectId": project_id, "version": 0, "createdAt": None, "updatedAt": None,
                                   "createdBy": None, "updatedBy": None}  # server-owned: known once acked
        elif item.kind == "update":
            current = view.get(item.event_id)
            if current is not None:
                view[item.event_id] = {**current, **_normalized(item.fields)}
        else:
            view.pop(item.event_id, None)
    return view


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
