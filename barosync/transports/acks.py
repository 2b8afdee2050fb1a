"""What a client has yet to ack, at O(1) per delivery and per cumulative ack.

A project's changes reach a connection in seq order, so what is sent and what is
acked of them are two numbers per project: acked through, sent through. Everything
else a client acks (a snapshot, a catch-up's marker) is remembered by id, at most
MAX_UNACKED of them. The seed client acks each change by its id ("project:seq"),
usually in order: that moves "acked through" by one; an ack ahead of a gap is held
until the gap closes (at most MAX_AHEAD per project). An idle connection holds one
empty dict here: the others are made when first needed.
"""

from __future__ import annotations

from typing import Iterator

# Ids of messages other than changes remembered per connection; beyond it the oldest
# are forgotten, so a client that never acks cannot grow memory.
MAX_UNACKED = 1000
# Per-id acks of changes ahead of an unacked one, held per project.
MAX_AHEAD = 1000


class Unacked:
    __slots__ = ("_projects", "_ahead", "_ids")

    def __init__(self) -> None:
        self._projects: dict[str, list[int]] = {}  # project -> [acked through, sent through]
        self._ahead: dict[str, set[int]] | None = None
        self._ids: dict[str, None] | None = None

    def sent(self, project_id: str, seq: int, msg_id: str = "") -> None:
        """A delivery the client should ack: change ``seq`` (> 0) of ``project_id``
        (a project's come in seq order), or else the message ``msg_id``."""
        if not seq:
            self.message(msg_id)
            return
        marks = self._projects.get(project_id)
        if marks is None:
            self._projects[project_id] = [seq - 1, seq]
        elif seq > marks[1]:
            marks[1] = seq

    def changes(self, project_id: str, first: int, last: int) -> None:
        """Changes ``first``..``last`` sent (a catch-up)."""
        if last >= first:
            self.sent(project_id, first)
            self.sent(project_id, last)

    def message(self, msg_id: str) -> None:
        """Anything else the client should ack, by its id."""
        ids = self._ids
        if ids is None:
            ids = self._ids = {}
        ids[msg_id] = None
        if len(ids) > MAX_UNACKED:
            del ids[next(iter(ids))]

    def ack_through(self, project_id: str, seq: int) -> None:
        """A cumulative ack: every change of the project up to ``seq``."""
        marks = self._projects.get(project_id)
        if marks is None:
            return
        acked = min(seq, marks[1])
        if acked > marks[0]:
            marks[0] = acked
            ahead = self._ahead.get(project_id) if self._ahead else None
            if ahead:
                ahead.difference_update([s for s in ahead if s <= acked])

    def ack_id(self, msg_id: str) -> None:
        """A per-id ack: a message's, or one change's ("project:seq")."""
        if self._ids and self._ids.pop(msg_id, 0) is None:
            return
        project_id, _, tail = msg_id.rpartition(":")
        marks = self._projects.get(project_id)
        if marks is None or not tail.isdigit():
            return
        seq = int(tail)
        if seq == marks[0] + 1:
            ahead = self._ahead.get(project_id) if self._ahead else None
            while ahead and seq + 1 in ahead:
                seq += 1
                ahead.discard(seq)
            marks[0] = min(seq, marks[1])
        elif marks[0] + 1 < seq <= marks[1]:
            if self._ahead is None:
                self._ahead = {}
            ahead = self._ahead.setdefault(project_id, set())
            if len(ahead) < MAX_AHEAD:
                ahead.add(seq)

    def oldest(self, project_id: str) -> int | None:
        """The first change of the project not acked yet (None: all are)."""
        marks = self._projects.get(project_id)
        if marks is None or marks[0] >= marks[1]:
            return None
        return marks[0] + 1

    def _held(self, project_id: str) -> set[int]:
        return self._ahead.get(project_id, set()) if self._ahead else set()

    def __contains__(self, msg_id: object) -> bool:
        if self._ids and msg_id in self._ids:
            return True
        if not isinstance(msg_id, str):
            return False
        project_id, _, tail = msg_id.rpartition(":")
        marks = self._projects.get(project_id)
        if marks is None or not tail.isdigit():
            return False
        seq = int(tail)
        return marks[0] < seq <= marks[1] and seq not in self._held(project_id)

    def __len__(self) -> int:
        changes = sum(sent - acked - len(self._held(p)) for p, (acked, sent) in self._projects.items())
        return max(0, changes) + len(self._ids or ())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[str]:
        """The unacked ids (changes as "project:seq"), for logs and the inspector."""
        for project_id, (acked, sent) in self._projects.items():
            held = self._held(project_id)
            for seq in range(max(acked + 1, sent - MAX_UNACKED + 1), sent + 1):
                if seq not in held:
                    yield f"{project_id}:{seq}"
        yield from self._ids or ()
