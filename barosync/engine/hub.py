"""Project rooms: who is subscribed, who is present, and fan-out.

Everything here runs on the event loop and never awaits while it delivers, so a
change reaches every subscriber of a room in one step and in seq order, and presence
changes of a project are ordered with respect to each other.

Presence is per user, not per connection: a user's first subscribed connection
announces ``user:joined`` to the others, the last one to go announces ``user:left``.
Each present user's ``user:joined`` frame is encoded once and reused for every
newcomer, who gets all of them in one write.

Cursors are volatile: never stored, never acked, and fanned out at most
``cursor_rate`` times per second per user; what arrives in between replaces the
pending one, which goes out at the next tick, so the last position is never lost.
Ticks come at twice the per-user rate, and one tick's cursors reach a subscriber in
one write.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import orjson
import trio

from ..wire import protocol
from ..domain.ratelimit import TokenBucket
from ..storage.store import Mutation, Outcome, now_ms

if TYPE_CHECKING:
    from ..domain.models import Identity
    from ..storage.roles import Bus, SharedPresence
    from .writer import Answered, Sender

    # An answer on its way: who hears it, about which mutation, what it says.
    Answer = tuple[Sender, Mutation, Outcome]

log = logging.getLogger(__name__)

DEFAULT_CURSOR_RATE = 20.0
# Cursor ticks per per-user interval: more ticks, lower latency, more writes.
CURSOR_TICKS_PER_INTERVAL = 2
# Cursors a user may have sent at once after a pause (the bucket's depth).
CURSOR_BURST = 2.0
# A readable palette for users whose token does not choose a colour.
PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46a0a0",
    "#f032e6", "#7a9a01", "#9a6324", "#800000", "#008080", "#000075",
)


def user_color(user_id: str) -> str:
    """Stable per user: the same id gets the same colour on every server."""
    return PALETTE[zlib.crc32(user_id.encode()) % len(PALETTE)]


class Subscriber(Protocol):
    """What the hub needs of a connection to fan out to it (session.py's Session is
    one). Every method queues or writes without awaiting."""

    identity: "Identity"
    subscriptions: set[str]  # the projects it has subscribed to

    def deliver(self, out: protocol.Outgoing, msg_id: str) -> None:
        """A durable change the client is expected to ack."""

    def deliver_many(self, items: list[tuple[protocol.Outgoing, str]]) -> None:
        """Several durable changes in one write."""

    def send_out(self, out: protocol.Outgoing) -> None:
        """A shared volatile message (presence)."""

    def send_many(self, outs: list[protocol.Outgoing]) -> None:
        """Several shared volatile messages in one write."""

    def send_cursors(self, items: list[tuple[str, protocol.Outgoing]], blob: bytes | None = None) -> None:
        """One tick's cursors; ``blob`` is their default-codec frames joined once."""

    def close(self, code: int, reason: str = "") -> None:
        """Start a clean close with this code."""


class Presence:
    __slots__ = ("user_id", "connections", "joined", "info")

    def __init__(self, identity: "Identity", project_id: str) -> None:
        self.user_id = identity.user_id
        self.connections = 0
        self.info = {
            "id": identity.user_id,
            "name": identity.name,
            "avatar": identity.avatar,
            "color": identity.color or user_color(identity.user_id),
            "lastSeen": now_ms(),
            "projectId": project_id,
        }
        self.joined = protocol.Outgoing(protocol.encode("user:joined", self.info))


def _deliver(members: Iterable["Subscriber"], items: list[tuple[protocol.Outgoing, str]], skip: Any) -> int:
    """Changes to every member not in ``skip``: one write per member for them all,
    the same encoded frames for everyone. Returns the deliveries made."""
    delivered = 0
    if len(items) == 1:
        out, msg_id = items[0]
        for session in members:
            if session not in skip:
                session.deliver(out, msg_id)
                delivered += 1
    else:
        for session in members:
            if session not in skip:
                session.deliver_many(items)
                delivered += len(items)
    return delivered


def _joined(info: dict[str, Any]) -> protocol.Outgoing:
    return protocol.Outgoing(protocol.encode("user:joined", info))


def _left(user_id: str, project_id: str) -> protocol.Outgoing:
    return protocol.Outgoing(protocol.encode("user:left", {"id": user_id, "projectId": project_id}))


class Room:
    __slots__ = ("project_id", "subscribers", "users", "cursor_budget", "cursor_pending", "last", "remote",
                 "inbox", "receive", "joining", "answers")

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        # PostgreSQL (sequencer.py): the last seq delivered to every member, -1 until
        # known; the room's task's inbox; newcomers it has yet to admit. LMDB does not
        # need them.
        self.last = -1
        self.inbox: Any = None
        self.receive: Any = None
        self.joining = 0
        # seq -> the answers (acks) that stand for that change: sent in its place, to
        # their senders, when the sequencer delivers it (sequencer.py).
        self.answers: dict[int, list[Answer]] = {}
        # Several nodes: users present on other nodes only (user id -> presence info).
        self.remote: dict[str, dict[str, Any]] = {}
        # A dict used as an ordered set: fan-out order is join order.
        self.subscribers: dict["Subscriber", None] = {}
        self.users: dict[str, Presence] = {}
        self.cursor_budget: dict[str, TokenBucket] = {}  # user -> their cursors' bucket
        # user -> (x, y, elementId, timestamp, sending session): the newest position
        self.cursor_pending: dict[str, tuple[Any, Any, Any, int, "Subscriber"]] = {}

    def fan_out(self, out: protocol.Outgoing, *, skip: Any = None) -> None:
        for session in self.subscribers:
            if session is not skip:
                session.send_out(out)


class Hub:
    def __init__(self, hook: Any, *, cursor_rate: float = DEFAULT_CURSOR_RATE) -> None:
        self.rooms: dict[str, Room] = {}
        self._hook = hook
        self.deliveries = 0
        # Changes committed per project since start (the inspector's commits/s).
        self.committed: dict[str, int] = {}
        self.cursor_interval = 1.0 / cursor_rate
        self._cursor_rooms: set[str] = set()  # projects with cursors waiting
        self._cursor_wakeup = trio.lowlevel.ParkingLot()
        # Several nodes: presence and cursors from the others (bus.py); None alone.
        self.bus: Bus | None = None
        self.presence: SharedPresence | None = None  # who is present here, for the other nodes
        # PostgreSQL: each room's durable changes and newcomers, in log order
        # (sequencer.py); None with LMDB, where they need no task of their own.
        self.sequencer: Any = None  # a sequencer.Sequencer (which imports this module)

    # -- membership and presence ---------------------------------------------------

    def room(self, project_id: str) -> Room:
        """The project's room, opened if nobody is in it yet."""
        room = self.rooms.get(project_id)
        if room is None:
            room = self.rooms[project_id] = Room(project_id)
            if self.sequencer is not None:
                self.sequencer.opened(room)
            if self.presence is not None:
                self.presence.room_opened(project_id)
        return room

    def join(self, session: "Subscriber", project_id: str) -> None:
        """Add a subscriber that has every change up to the last one fanned out."""
        self.admit(self.room(project_id), session)

    def admit(self, room: Room, session: "Subscriber") -> None:
        """The newcomer learns who is present in one write and the others hear of the
        newcomer if this is the user's first connection here."""
        if session in room.subscribers:
            return  # subscribing again: it knows who is here already
        shared, project_id = self.presence, room.project_id
        user_id = session.identity.user_id
        present = [p.joined for p in room.users.values() if p.user_id != user_id]
        present += [_joined(info) for u, info in room.remote.items() if u != user_id and u not in room.users]
        session.send_many(present)
        room.subscribers[session] = None
        presence = room.users.get(user_id)
        if presence is None:
            presence = room.users[user_id] = Presence(session.identity, project_id)
            room.fan_out(presence.joined, skip=session)
            if shared is not None:
                shared.present(project_id, user_id, presence.info)
        presence.connections += 1

    def leave(self, session: "Subscriber", project_id: str) -> None:
        room = self.rooms.get(project_id)
        if room is None or session not in room.subscribers:
            return
        del room.subscribers[session]
        user_id = session.identity.user_id
        presence = room.users.get(user_id)
        if presence is not None:
            presence.connections -= 1
            if presence.connections <= 0:
                del room.users[user_id]
                room.cursor_pending.pop(user_id, None)
                room.cursor_budget.pop(user_id, None)
                if self.presence is not None:
                    self.presence.present(project_id, user_id, None)
                if user_id not in room.remote:  # still here through another node
                    room.fan_out(_left(user_id, project_id))
        self.drop_if_empty(room)

    def drop_if_empty(self, room: Room) -> None:
        """A room nobody is in (or about to be) goes."""
        if not room.subscribers and not room.joining and self.rooms.get(room.project_id) is room:
            del self.rooms[room.project_id]
            if self.sequencer is not None:
                self.sequencer.closed(room)

    def remote_presence(self, project_id: str, others: dict[str, dict[str, Any]]) -> None:
        """Several nodes: who is present on the other nodes now (bus.py); users who
        appear or disappear there, and are not here, join or leave for everyone."""
        room = self.rooms.get(project_id)
        if room is None:
            return
        before = room.remote
        room.remote = others
        for user_id, info in others.items():
            if user_id not in before and user_id not in room.users:
                room.fan_out(_joined(info))
        for user_id in before:
            if user_id not in others and user_id not in room.users:
                room.fan_out(_left(user_id, project_id))

    def remote_cursors(self, project_id: str, messages: list[dict[str, Any]]) -> None:
        """Several nodes: one tick of another node's cursors, to every subscriber here."""
        room = self.rooms.get(project_id)
        if room is None or not messages:
            return
        everyone = [(m["payload"]["userId"], protocol.Outgoing(orjson.dumps(m))) for m in messages]
        blob = b"".join(out.text for _, out in everyone)
        for session in room.subscribers:
            session.send_cursors(everyone, blob)

    def leave_all(self, session: "Subscriber", project_ids: Iterable[str]) -> None:
        for project_id in list(project_ids):
            self.leave(session, project_id)

    # -- cursors -----------------------------------------------------------------------

    def cursor(self, session: "Subscriber", project_id: str, x: float, y: float, element_id: str | None) -> None:
        room = self.rooms.get(project_id)
        if room is None:
            return
        # Nothing is encoded yet: a newer position may replace this one first.
        room.cursor_pending[session.identity.user_id] = (x, y, element_id, now_ms(), session)
        self._cursor_rooms.add(project_id)
        self._cursor_wakeup.unpark()

    async def run_cursors(self) -> None:
        """Send cursors in ticks of half the per-user interval. Each tick encodes
        every cursor due once and writes them all to a subscriber in one write, the
        same bytes for everyone but the movers themselves: with a hundred people
        moving, a viewer costs one write per tick, not one per cursor."""
        tick = self.cursor_interval / CURSOR_TICKS_PER_INTERVAL
        last = -math.inf
        while True:
            if not self._cursor_rooms:
                await self._cursor_wakeup.park()
                continue
            now = trio.current_time()
            if now < last + tick:
                await trio.sleep_until(last + tick)
                continue
            last = now
            for project_id in list(self._cursor_rooms):
                self._flush_cursors(project_id, now, tick)

    def _flush_cursors(self, project_id: str, now: float, tick: float) -> None:
        room = self.rooms.get(project_id)
        if room is None:
            self._cursor_rooms.discard(project_id)
            return
        pending, budget = room.cursor_pending, room.cursor_budget
        # At most cursor_rate per user per second, as a token bucket (burst
        # CURSOR_BURST): a pointer moving at exactly the rate is never held back a
        # whole interval by timing jitter, and a faster one is coalesced.
        rate = 1.0 / self.cursor_interval
        due = []
        for user in pending:
            bucket = budget.get(user)
            if bucket is None:
                bucket = budget[user] = TokenBucket(rate, CURSOR_BURST, now)
            if bucket.take(now):
                due.append(user)
        if not due:
            return
        items: list[tuple[str, protocol.Outgoing, Any]] = []
        for user in due:
            x, y, element_id, stamp, sender = pending.pop(user)
            items.append((user, protocol.Outgoing(orjson.dumps({
                "type": "user:cursor",
                "projectId": project_id,
                "payload": {"userId": user, "x": x, "y": y, "elementId": element_id,
                            "timestamp": stamp, "projectId": project_id},
            })), sender))
        if not pending:
            self._cursor_rooms.discard(project_id)
        everyone = [(user, out) for user, out, _ in items]
        blob = b"".join(out.text for _, out in everyone)
        if self.bus is not None:
            self.bus.cursors(project_id, [out.json for _, out in everyone])
        senders = {sender for _, _, sender in items}
        for session in room.subscribers:
            if session in senders:  # a mover does not get its own cursor back
                session.send_cursors([(u, o) for u, o, s in items if s is not session])
            else:
                session.send_cursors(everyone, blob)

    # -- durable changes ----------------------------------------------------------------

    def on_batch(self, batch: "Answered") -> None:
        """Called by the writer with every mutation of a group commit, in commit
        order, each with its sender: answer each sender, then fan the committed
        changes out."""
        changes: dict[str, list[tuple[protocol.Outgoing | None, str, Answer]]] = {}
        rooms = self.rooms
        sequencer, bus = self.sequencer, self.bus
        for m, sender, outcome in batch:
            if outcome.status == "applied":
                assert outcome.change is not None
                # Frames are made only for projects someone is watching.
                out = protocol.Outgoing(outcome.change, project_id=outcome.project_id, seq=outcome.seq) \
                    if outcome.project_id in rooms else None
                changes.setdefault(outcome.project_id, []).append(
                    (out, f"{outcome.project_id}:{outcome.seq}", (sender, m, outcome)))
            elif sequencer is not None and outcome.status == "replayed" and outcome.seq > 0:
                # The retry's answer names a seq the room may not have delivered yet
                # (a change made through another node, or still in the sequencer's
                # inbox): it goes out in that change's place, in order.
                room = rooms.get(outcome.project_id)
                if room is not None and sender in room.subscribers:
                    sequencer.answer(room, (sender, m, outcome))
                else:
                    self.reply((sender, m, outcome))
            else:
                self.reply((sender, m, outcome))
        committed = self.committed
        for project_id, items in changes.items():
            committed[project_id] = committed.get(project_id, 0) + len(items)
            room = rooms.get(project_id)
            if sequencer is None or room is None:
                self.fan_out_to(room, [(out, msg_id, (answer,)) for out, msg_id, answer in items])
            else:
                sequencer.local(room, items)  # in log order, after the other nodes' earlier ones
            if bus is not None:
                for _, _, (_, _, outcome) in items:
                    bus.publish(project_id, outcome.change)
            if self._hook.barosync_change_committed.get_hookimpls():
                for _, _, (_, _, outcome) in items:
                    try:
                        self._hook.barosync_change_committed(
                            project_id=project_id, seq=outcome.seq, change=orjson.loads(outcome.change))  # type: ignore[arg-type]
                    except Exception:
                        log.exception("barosync_change_committed hook failed for %s seq %d", project_id, outcome.seq)

    def fan_out_to(self, room: Room | None, items: list[tuple[Any, str, "tuple[Answer, ...] | list[Answer]"]]) -> None:
        """One project's changes, in seq order, each with the answers that stand for
        it: every answer goes to its sender, and a member that sent a change gets its
        answer in that change's place; the room's other members (if any) get the
        changes."""
        members = room.subscribers if room is not None else {}
        # Senders first: the one who made a change hears "done" without waiting
        # behind a thousand deliveries. A sender subscribed to the project gets its
        # own changes as acks, in seq order with everyone else's changes.
        senders: dict[Any, None] = {}
        for _, _, answers in items:
            for answer in answers:
                if answer[0] in members:
                    senders[answer[0]] = None
                else:
                    self.reply(answer)
        delivered = 0
        for member in senders:
            for out, msg_id, answers in items:
                mine = [answer for answer in answers if answer[0] is member]
                if mine:
                    for answer in mine:
                        self.reply(answer)
                else:
                    member.deliver(out, msg_id)
                    delivered += 1
        if room is not None:
            delivered += _deliver(members, [(out, msg_id) for out, msg_id, _ in items], senders)
        self.deliveries += delivered

    @staticmethod
    def reply(answer: "Answer") -> None:
        sender, m, outcome = answer
        try:
            sender.answer(m, outcome)
        except Exception:  # a reply must never take the writer down
            log.exception("reply failed for mutation %s", m.envelope_id)
