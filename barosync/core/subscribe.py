"""Subscribe, the use case: catch a connection up on a project (the changes after its
``since``, or a snapshot, whole or in parts) and make it a member of the project's
room, with every seq sent once and in order. The core's algorithm; a transport only
offers the ``Follower`` interface below (session.py's Session is one), so a second
transport would call ``subscribe`` rather than copy it.

The order problem it solves: a change may commit while the catch-up is read. With
LMDB the reads run inline (reads.py) and nothing yields between the last read and the
join, so nothing can slip between them; with PostgreSQL the reads yield, and the
room's sequencer (sequencer.py) sends the newcomer what it missed when it admits it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Protocol

import trio

from ..wire import protocol
from ..storage.store import WHOLE

if TYPE_CHECKING:
    from .app import App
    from ..engine.hub import Subscriber

log = logging.getLogger(__name__)

# A snapshot in parts holds a read transaction (and so LMDB's old pages) while it waits
# for the client's socket; a client that reads none of it for this long is closed
# (4008) rather than keeping the data file from reusing space.
SNAPSHOT_STALL = 30.0


class Follower(Protocol):
    """What a connection offers the subscribe use case, besides being a hub
    ``Subscriber`` once it joined."""

    @property
    def closing(self) -> bool:
        """The connection is closing: stop sending it anything."""

    @property
    def outbox_limit(self) -> int:
        """About how many bytes may wait for its socket (a replay's page size)."""

    def send_json(self, data: bytes) -> None:
        """One message (an ack)."""

    def track(self, msg_ids: Iterable[str]) -> None:
        """Messages about to be sent that the client must ack."""

    def track_changes(self, project_id: str, first: int, last: int) -> None:
        """Changes ``first``..``last`` of a project about to be sent (the client acks them)."""

    def send_catch_up(self, messages: list[bytes]) -> None:
        """A replay page or a snapshot part, queued at once even past the outbox cap."""

    def backlogged(self) -> bool:
        """Its outbox is at the cap: wait for it before queuing more."""

    async def wait_drained(self) -> None:
        """Until everything queued reached the socket (or the connection closes)."""

    def close(self, code: int, reason: str = "") -> None:
        """Start a clean close with this code."""


class _Both(Follower, Protocol):  # what subscribe() is given: a Follower that can join
    identity: Any


async def subscribe(app: "App", conn: "_Both", *, ref: str | None, project_id: str, since: int | None,
                    snapshot_parts: bool) -> bool:
    """Catch ``conn`` up on ``project_id`` and join it to the room; the subscribe's
    ``ack`` (with ``ref``) goes first. Returns False when the connection closed on the
    way (it is then not a member)."""
    acked = False
    # Whether this identity may change the project: a viewer's app shows it read-only.
    access = {"writable": await app.authorize(conn.identity, "create", project_id)}
    while True:
        # A commit for this project may be durable but not yet fanned out; reading
        # the changelog now and joining the room later could deliver it twice.
        await app.writer.wait_idle(project_id)
        if conn.closing:
            return False
        # Long replays go in pieces of about the outbox cap, each once the previous
        # one is out, so catching up never needs more memory than that.
        found = (await app.read(app.store.replay, project_id, since, max_bytes=conn.outbox_limit)
                 if since is not None else None)
        if conn.closing:
            return False
        if found is None:
            if not snapshot_parts:
                since = await _send_snapshot(app, conn, ref, project_id, since, acked, access)
                break
            # In parts, with waits for the socket in between: changes committed
            # meanwhile are replayed after the snapshot's seq, then we join.
            since = await _stream_snapshot(app, conn, ref, project_id, since, acked, access)
            acked = True
            continue
        assert since is not None
        changes, complete = found
        if not acked:
            last = since + len(changes) if complete else await app.read(app.store.current_seq, project_id)
            conn.send_json(protocol.ack(ref, {"projectId": project_id, "seq": last, "mode": "changes",
                                              "count": last - since, **access}))
            acked = True
        conn.track_changes(project_id, since + 1, since + len(changes))
        conn.send_catch_up(changes)
        since += len(changes)
        if complete:
            break
        await conn.wait_drained()
    subscriber: "Subscriber" = conn  # type: ignore[assignment]
    if app.hub.sequencer is None:
        app.hub.join(subscriber, project_id)
    else:
        await app.hub.sequencer.join(subscriber, project_id, at=since)
    return True


def _snapshot_ack(conn: Follower, ref: str | None, project_id: str, seq: int, since: int | None,
                  access: dict[str, Any]) -> None:
    answer: dict[str, Any] = {"projectId": project_id, "seq": seq, "mode": "snapshot", **access}
    if since is not None:
        # Say why the client gets a snapshot instead of what it asked for.
        answer["reason"] = "since_ahead" if since > seq else "history_pruned"
    conn.send_json(protocol.ack(ref, answer))


async def _send_snapshot(app: "App", conn: Follower, ref: str | None, project_id: str, since: int | None,
                         acked: bool, access: dict[str, Any]) -> int:
    """The whole snapshot as one message (clients that did not ask for parts);
    returns its seq."""
    async with app.read.snapshot_pages(project_id, max_bytes=WHOLE) as (seq, pages):
        if not acked:
            _snapshot_ack(conn, ref, project_id, seq, since, access)
        snapshot_id = protocol.next_id()
        conn.track((snapshot_id,))
        conn.send_catch_up([protocol.snapshot_message(snapshot_id, project_id, seq, next(pages), since)])
    return seq


async def _stream_snapshot(app: "App", conn: "_Both", ref: str | None, project_id: str, since: int | None,
                           acked: bool, access: dict[str, Any]) -> int:
    """The snapshot in parts of at most max_message_bytes from one consistent read,
    never more than about the outbox cap queued at once; returns its seq."""
    part_bytes = max(1024, app.config.max_message_bytes - 512)
    async with app.read.snapshot_pages(project_id, max_bytes=part_bytes) as (seq, pages):
        if not acked:
            _snapshot_ack(conn, ref, project_id, seq, since, access)
        page = next(pages)
        part = 0
        while True:
            following = next(pages, None)
            snapshot_id = protocol.next_id()
            conn.track((snapshot_id,))
            conn.send_catch_up([protocol.snapshot_message(
                snapshot_id, project_id, seq, page, since, part=part, more=following is not None)])
            if following is None or conn.closing:
                return seq
            page, part = following, part + 1
            if conn.backlogged():
                with trio.move_on_after(SNAPSHOT_STALL) as waited:
                    await conn.wait_drained()
                if waited.cancelled_caught:
                    log.info("user=%s closed: read no snapshot part for %g s", conn.identity.user_id, SNAPSHOT_STALL)
                    conn.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")
                    return seq
            else:
                await trio.lowlevel.checkpoint()  # a big snapshot does not hold up the others
