"""Rooms in log order when the log's reads yield (PostgreSQL; with or without bus.py).

With LMDB a subscriber reads its catch-up and joins its room in one step of the event
loop (session.py), so no change can pass in between. PostgreSQL reads are network
round trips that run in worker threads (reads.py): while one runs, changes commit and
fan out. With several nodes, changes also reach a room from two sides: this node's
commits and the other nodes' (bus.py).

So each room gets one task here, its sequencer, which alone delivers the room's
durable changes and alone admits its members. It keeps ``room.last``, the last seq
every member has (read from the log's head when the room opens), and takes, in
arrival order:

- this node's commits: they go out when they follow ``last``; after a gap the missing
  seqs are read from the log first; a change the room already got from the log was
  answered to its sender then;
- a retry's answer (``replayed``) to a member: it names a seq that may not have
  reached the room yet (made through another node, or still in this inbox), so it
  waits for that seq and goes out in its place;
- other nodes' changes: ``last + 1`` goes out, ``<= last`` is dropped, a jump is read
  from the log;
- a newcomer that has everything up to ``at``: it is sent ``at+1 .. last`` from the
  log (or the room is first brought up to ``at``), then it is a member;
- checks: the log's head against ``last``, every ``CHECK_INTERVAL`` (one read for
  every room's head) and when the bus reconnected, so a lost message or a node that died between its commit and its
  publish costs a delay, never a gap.

The task may await a read anywhere: nothing else delivers to its room meanwhile, so
every member sees every seq once and in order.

Every delivery takes the answers that stand for its seqs (``room.answers``: acks of
this node's commits, registered when the writer hands them over, and retries'
answers): a member that sent a change gets its answer in the change's place, never
both. A read of the log can find this node's commit before the writer has handed it
over (the commit is durable before its worker thread returns), so a fill first waits
for every commit begun to be answered (``Writer.answered``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
import trio

from ..wire import protocol

if TYPE_CHECKING:
    from .hub import Answer, Hub, Room, Subscriber
    from ..storage.reads import Reads
    from ..storage.roles import LogStore

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between comparisons of every room with the log's head


class _Join:
    __slots__ = ("session", "at", "done", "abandoned")

    def __init__(self, session: "Subscriber", at: int) -> None:
        self.session, self.at = session, at
        self.done = trio.Event()
        self.abandoned = False  # its subscribe was cancelled while it waited


class Sequencer:
    def __init__(self, *, hub: "Hub", store: "LogStore", read: "Reads",
                 answered: Callable[[], Awaitable[None]] | None = None) -> None:
        self.hub = hub
        self.store = store
        self.read = read
        # Until this node's commits begun so far are answered (Writer.answered).
        self._answered = answered
        self.filled = 0  # changes read from the log to close a gap (the inspector's)
        self._nursery: trio.Nursery | None = None
        self._waiting: list["Room"] = []  # opened before run() started
        self._check_now = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for room in self._waiting:
                    nursery.start_soon(self._sequence, room)
                self._waiting.clear()
                nursery.start_soon(self._checker)
                task_status.started()
        finally:
            # Cancelled from outside (not an orderly stop), a session can still open a
            # room before its own cancellation reaches it: the room waits, unserved.
            self._nursery = None

    # -- the event loop's side (never awaits) ---------------------------------------------

    def opened(self, room: "Room") -> None:
        """A new room (hub.py): its task and its inbox."""
        room.inbox, room.receive = trio.open_memory_channel(math.inf)
        if self._nursery is None:
            self._waiting.append(room)
        else:
            self._nursery.start_soon(self._sequence, room)

    def closed(self, room: "Room") -> None:
        """The room is gone (its last member left): its task ends once its inbox is
        drained (commits in it still get their answers)."""
        room.inbox.close()

    def local(self, room: "Room", items: list[tuple[Any, str, "Answer"]]) -> None:
        """This node's commits to the project (one group commit's, in seq order):
        their answers wait in the room for their changes' delivery."""
        answers = room.answers
        for _, _, answer in items:
            answers.setdefault(answer[2].seq, []).append(answer)
        room.inbox.send_nowait(("local", [(out, answer[2].seq) for out, _, answer in items]))

    def answer(self, room: "Room", answer: "Answer") -> None:
        """A retry's original answer to a member: sent once the room has delivered
        every seq up to its own, in that seq's place."""
        seq = answer[2].seq
        room.answers.setdefault(seq, []).append(answer)
        room.inbox.send_nowait(("answer", seq))

    def remote(self, project_id: str, change: bytes) -> None:
        room = self.hub.rooms.get(project_id)
        if room is not None:
            room.inbox.send_nowait(("remote", change))

    def check_all(self) -> None:
        """Every room against the log's head now, not at the next check (the bus
        reconnected: what passed meanwhile is in the log)."""
        self._check_now.set()

    async def join(self, session: "Subscriber", project_id: str, at: int) -> None:
        """Make ``session``, which has every change up to ``at``, a member of the
        project's room, with nothing missed or repeated in between."""
        room = self.hub.room(project_id)
        request = _Join(session, at)
        room.joining += 1
        room.inbox.send_nowait(("join", request))
        try:
            await request.done.wait()
        except BaseException:
            # Cancelled (the connection closed, the server stops): not a member after all.
            if request.done.is_set():
                self.hub.leave(session, project_id)
            else:
                request.abandoned = True
            raise

    # -- a room's task ----------------------------------------------------------------

    async def _sequence(self, room: "Room") -> None:
        project_id = room.project_id
        try:
            room.last = await self.read(self.store.current_seq, project_id)
        except self.store.faults as e:  # PostgreSQL away: the first fill will tell
            log.warning("project %s: reading the log's head failed (%s); starting from the first change seen",
                        project_id, e)
        async for message in room.receive:
            try:
                await self._take(room, message)
            except self.store.faults as e:
                # The log is away: deliver nothing out of order; the next check
                # (or the next change) reads what is missing once it is back.
                log.warning("project %s: reading the log failed (%s); the next check retries", project_id, e)
                if message[0] == "local":
                    for _, seq in message[1]:
                        self._answer_now(room, seq)
                elif message[0] == "answer":
                    self._answer_now(room, message[1])
                elif message[0] == "join":
                    # What it missed cannot be read now: it resubscribes later.
                    message[1].session.close(protocol.CLOSE_TOO_SLOW, "the log is unreachable for now: resume with since")
                    self._admit(room, message[1], admit=False)

    async def _take(self, room: "Room", message: tuple) -> None:
        kind = message[0]
        if kind == "local":
            changes = message[1]
            first = changes[0][1]
            if room.last >= 0 and first > room.last + 1:
                await self._fill(room, first - 1)
            fresh = []
            for out, seq in changes:
                if seq <= room.last:
                    self._answer_now(room, seq)  # delivered from the log: answered then
                else:
                    fresh.append((out, seq))
            if fresh:
                room.last = fresh[-1][1]
                self._deliver(room, fresh)
        elif kind == "answer":
            seq = message[1]
            if room.last >= 0 and seq > room.last:
                await self._fill(room, seq)
            self._answer_now(room, seq)  # unless the fill delivered it
        elif kind == "remote":
            change = message[1]
            seq = orjson.loads(change)["seq"]
            if room.last < 0 or seq == room.last + 1:
                room.last = seq
                self._deliver(room, [(protocol.Outgoing(change, project_id=room.project_id, seq=seq), seq)])
            elif seq > room.last:
                await self._fill(room)  # a jump: the log has what is missing (and this one)
        elif kind == "join":
            request = message[1]
            session, at = request.session, request.at
            if request.abandoned:
                self._admit(room, request, admit=False)
                return
            if room.last < 0:
                room.last = at
            elif at > room.last:
                await self._fill(room, at)  # the others are behind what the newcomer read
            elif at < room.last:
                found = await self.read(self.store.replay, room.project_id, at)
                changes = found[0][: room.last - at] if found is not None else []
                if found is None:
                    session.close(protocol.CLOSE_TOO_SLOW, "fell behind the kept history: resubscribe")
                session.deliver_many([(protocol.Outgoing(raw, project_id=room.project_id, seq=at + 1 + i),
                                       f"{room.project_id}:{at + 1 + i}") for i, raw in enumerate(changes)])
            self._admit(room, request, admit=not request.abandoned)
        elif kind == "check":  # the head was past room.last when it was read (_check_heads)
            if room.last >= 0:
                await self._fill(room)

    def _admit(self, room: "Room", request: "_Join", *, admit: bool = True) -> None:
        room.joining -= 1
        if admit:
            self.hub.admit(room, request.session)
        else:
            self.hub.drop_if_empty(room)
        request.done.set()

    async def _fill(self, room: "Room", upto: int | None = None) -> None:
        """Deliver to every member what the log has after ``room.last`` (up to
        ``upto``, or its head), in order."""
        found = await self.read(self.store.replay, room.project_id, room.last)
        if self._answered is not None:
            # What the read found of this node's commits is answered (its acks are
            # in room.answers) before any of it is delivered.
            await self._answered()
        if found is None:
            # History pruned past what this room has: nothing to replay in order.
            # Its members are told to resubscribe (they resume with `since`).
            log.warning("project %s: the log no longer has seq %d; closing its subscribers so they resync",
                        room.project_id, room.last + 1)
            for session in list(room.subscribers):
                session.close(protocol.CLOSE_TOO_SLOW, "fell behind the kept history: resubscribe")
            room.last = await self.read(self.store.current_seq, room.project_id)
            return
        changes, _complete = found
        if upto is not None:
            changes = changes[: max(0, upto - room.last)]
        if changes:
            first = room.last + 1
            self.filled += len(changes)
            room.last += len(changes)
            self._deliver(room, [(protocol.Outgoing(raw, project_id=room.project_id, seq=first + i), first + i)
                                 for i, raw in enumerate(changes)])

    def _deliver(self, room: "Room", changes: list[tuple[protocol.Outgoing, int]]) -> None:
        """Changes in seq order to the room, each with the answers that stand for it."""
        answers, project_id = room.answers, room.project_id
        self.hub.fan_out_to(room, [(out, f"{project_id}:{seq}", answers.pop(seq, ())) for out, seq in changes])

    def _answer_now(self, room: "Room", seq: int) -> None:
        """The answers still waiting for ``seq`` (the room has it, or cannot get it)."""
        for answer in room.answers.pop(seq, ()):
            self.hub.reply(answer)

    async def _checker(self) -> None:
        while True:
            with trio.move_on_after(CHECK_INTERVAL):
                await self._check_now.wait()
            self._check_now = trio.Event()
            try:
                await self._check_heads()
            except self.store.faults as e:
                log.warning("reading the log's heads failed (%s); trying again in %g s", e, CHECK_INTERVAL)

    async def _check_heads(self) -> None:
        """Every room's head in one read; only the rooms behind it read what they miss."""
        rooms = list(self.hub.rooms.values())
        if not rooms:
            return
        heads = await self.read(self.store.heads, [room.project_id for room in rooms])
        for room in rooms:
            if 0 <= room.last < heads.get(room.project_id, 0) and self.hub.rooms.get(room.project_id) is room:
                room.inbox.send_nowait(("check",))
