"""Project rooms: who is subscribed to what, and fan-out of committed changes.

Everything here runs on the event loop and never awaits while it delivers, so a
change reaches every subscriber of a room in one step and in seq order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

import orjson

from . import protocol
from .store import Mutation, Outcome

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("barosync.hub")


class Room:
    __slots__ = ("project_id", "subscribers")

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        # A dict used as an ordered set: fan-out order is join order.
        self.subscribers: dict["Session", None] = {}


class Hub:
    def __init__(self, hook: Any) -> None:
        self.rooms: dict[str, Room] = {}
        self._hook = hook
        self.deliveries = 0

    def join(self, session: "Session", project_id: str) -> Room:
        room = self.rooms.get(project_id)
        if room is None:
            room = self.rooms[project_id] = Room(project_id)
        room.subscribers[session] = None
        return room

    def leave(self, session: "Session", project_id: str) -> None:
        room = self.rooms.get(project_id)
        if room is None:
            return
        room.subscribers.pop(session, None)
        if not room.subscribers:
            del self.rooms[project_id]

    def leave_all(self, session: "Session", project_ids: Iterable[str]) -> None:
        for project_id in list(project_ids):
            self.leave(session, project_id)

    def subscribers(self, project_id: str) -> int:
        room = self.rooms.get(project_id)
        return len(room.subscribers) if room else 0

    def on_outcome(self, m: Mutation, outcome: Outcome) -> None:
        """Called by the writer for every mutation, in commit order."""
        if outcome.status == "applied":
            assert outcome.change is not None
            self.publish(outcome.project_id, outcome.seq, outcome.change, origin=m.origin)
        try:
            m.reply(m, outcome)
        except Exception:  # a reply must never take the writer down
            log.exception("reply failed for mutation %s", m.envelope_id)

    def publish(self, project_id: str, seq: int, change: bytes, *, origin: Any = None) -> None:
        room = self.rooms.get(project_id)
        if room is not None:
            # Encoded once: the same frame bytes go to every recipient.
            frame = protocol.text_frame(change.decode())
            msg_id = f"{project_id}:{seq}"
            n = 0
            for session in room.subscribers:
                if session is not origin:
                    session.deliver(frame, msg_id)
                    n += 1
            self.deliveries += n
        if self._hook.barosync_change_committed.get_hookimpls():
            try:
                self._hook.barosync_change_committed(project_id=project_id, seq=seq, change=orjson.loads(change))
            except Exception:
                log.exception("barosync_change_committed hook failed for %s seq %d", project_id, seq)
