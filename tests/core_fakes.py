"""Stand-ins for the core's unit tests (tests/test_hub.py, tests/test_sequencer_unit.py):
a subscriber that records what it is sent, and a change log in a dict. They fill the
interfaces the core uses (hub.Subscriber, the LogStore reads the sequencer makes), so
the hub and the sequencer run as in the server, without sockets or a database."""

from __future__ import annotations

from typing import Any

import orjson
import trio

from barosync.domain.models import Identity
from barosync.storage.commit import change_message
from barosync.storage.store import Mutation, Outcome


class FakeSubscriber:
    """A connection as the hub sees it (a Subscriber, and the writer.Sender of its
    own mutations): every call is recorded, in order."""

    def __init__(self, user: str) -> None:
        self.identity = Identity(user_id=user, name=user, projects="*")
        self.got: list[tuple[str, Any]] = []  # ("change", seq) | ("ack", seq) | ("presence", type, user) | ...
        self.writes = 0  # deliveries that went out in one write each
        self.closed: tuple[int, str] | None = None
        self.subscriptions: set[str] = set()

    def __repr__(self) -> str:
        return f"<{self.identity.user_id}>"

    def deliver(self, out: Any, msg_id: str) -> None:
        self.writes += 1
        self.got.append(("change", orjson.loads(out.json)["seq"]))

    def deliver_many(self, items: list[tuple[Any, str]]) -> None:
        self.writes += 1
        self.got.extend(("change", orjson.loads(out.json)["seq"]) for out, _ in items)

    def send_out(self, out: Any) -> None:
        msg = orjson.loads(out.json)
        self.got.append(("presence", msg["type"], msg["payload"]["id"]))

    def send_many(self, outs: list[Any]) -> None:
        for out in outs:
            self.send_out(out)

    def send_cursors(self, items: list[tuple[str, Any]], blob: bytes | None = None) -> None:
        self.got.append(("cursors", [user for user, _ in items]))

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        self.got.append(("ack", outcome.seq))

    def seqs(self) -> list[tuple[str, int]]:
        """Changes and acks only, in the order they were sent."""
        return [(kind, what) for kind, what, *_ in self.got if kind in ("change", "ack")]


def change(project: str, seq: int, user: str = "alice") -> bytes:
    """The change message a store records for a create, as commit.py makes it."""
    m = Mutation("create", user_id=user, envelope_id=f"env-{seq}", project_id=project, event_id=f"e{seq}",
                 received_ms=seq)
    return change_message(m, "create", seq, 1, {"id": f"e{seq}", "projectId": project})


class RestRequest:
    """A sender that is no subscriber (a REST or CalDAV request): it keeps its answer."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        self.outcome = outcome


def mutation(sender: FakeSubscriber | None, project: str, envelope: str) -> Mutation:
    return Mutation("create", user_id=sender.identity.user_id if sender else "rest", envelope_id=envelope,
                    project_id=project, event_id=envelope)


def sent(sender: FakeSubscriber | None, m: Mutation, outcome: Outcome) -> tuple[Mutation, Any, Outcome]:
    """One entry of a group commit as the writer hands it to the hub."""
    return (m, sender if sender is not None else RestRequest(), outcome)


def applied(m: Mutation, seq: int) -> Outcome:
    return Outcome("applied", m.project_id, answer={"projectId": m.project_id, "seq": seq}, seq=seq,
                   change=change(m.project_id, seq, m.user_id))


def replayed(m: Mutation, seq: int) -> Outcome:
    return Outcome("replayed", m.project_id, answer={"projectId": m.project_id, "seq": seq}, seq=seq)


class FakeLog:
    """The change log the sequencer reads: project -> its changes, seq 1 first."""

    faults = (OSError,)

    def __init__(self) -> None:
        self.changes: dict[str, list[bytes]] = {}
        self.reads = 0

    def append(self, project: str, user: str = "bob") -> int:
        log = self.changes.setdefault(project, [])
        log.append(change(project, len(log) + 1, user))
        return len(log)

    def current_seq(self, project: str) -> int:
        return len(self.changes.get(project, []))

    def replay(self, project: str, since: int, *, max_bytes: int | None = None) -> tuple[list[bytes], bool] | None:
        log = self.changes.get(project, [])
        return (list(log[since:]), True) if since <= len(log) else None

    def heads(self, projects: list[str]) -> dict[str, int]:
        return {p: self.current_seq(p) for p in projects}


async def read(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """As reads.py runs a PostgreSQL read: the caller yields meanwhile."""
    await trio.lowlevel.checkpoint()
    return fn(*args, **kwargs)
