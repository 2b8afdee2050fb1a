"""The Python client's replica without a connection (barosync/client/sync.py): what
it sends through its Wire and what server messages do to its state. The wire here
records; the replica's store is a real ClientStore (LMDB in a temporary directory)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import orjson
import pytest
import trio

from barosync.client import ConflictDetected, MutationRefused, RemoteChange
from barosync.client.state import Observers
from barosync.client.store import ClientStore, QueueItem
from barosync.client.sync import Replica


class Wire:
    def __init__(self) -> None:
        self.connected = False
        self.max_message_bytes: int | None = None
        self.sent: list[dict[str, Any]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def send(self, obj: dict[str, Any]) -> None:
        if self.connected:
            self.sent.append(obj)

    def send_text(self, text: str) -> None:
        self.send(orjson.loads(text))

    def at(self, deadline: float, fn: Callable[[], None]) -> None:
        self.later.append((deadline, fn))

    def take(self) -> list[tuple[str, Any]]:
        out = [(m["type"], m.get("payload", {}).get("projectId") if m["type"] == "subscribe" else m.get("id"))
               for m in self.sent]
        self.sent.clear()
        return out


@pytest.fixture
def parts() -> Iterator[tuple[Replica, Wire, list[Any]]]:
    observers = Observers()
    notes: list[Any] = []
    observers.callbacks.append((None, notes.append))
    wire = Wire()
    replica = Replica(observers, wire, max_in_flight=2)
    store = ClientStore(None)
    replica.open(store)
    try:
        yield replica, wire, notes
    finally:
        store.close()


def create(replica: Replica, event_id: str, envelope_id: str) -> None:
    replica.enqueue([QueueItem(0, envelope_id, "create", "p", event_id, {"title": event_id}, None, 0, False)])


async def test_nothing_goes_out_offline_and_on_connect_subscriptions_then_the_queue_in_order(parts) -> None:
    replica, wire, _ = parts
    replica.desired["p"] = None
    create(replica, "a", "m1")
    create(replica, "b", "m2")
    create(replica, "c", "m3")
    assert wire.take() == []
    wire.connected = True
    replica.on_connected()
    # The window is 2: the third waits for an answer.
    assert wire.take() == [("subscribe", "p"), ("event:create", "m1"), ("event:create", "m2")]
    replica.receive({"type": "ack", "id": "m1", "payload": {"projectId": "p", "seq": 1, "version": 1}})
    assert wire.take() == [("event:create", "m3")]
    assert [i.envelope_id for i in replica.queue.values()] == ["m2", "m3"]


async def test_a_later_edit_of_an_event_waits_for_the_earlier_ones_answer(parts) -> None:
    replica, wire, _ = parts
    wire.connected = True
    create(replica, "a", "m1")
    replica.enqueue([QueueItem(0, "m2", "update", "p", "a", {"title": "A"}, 0, 0, False)])
    assert wire.take() == [("event:create", "m1")]
    replica.receive({"type": "ack", "id": "m1", "payload": {"projectId": "p", "seq": 1, "version": 1}})
    [update] = wire.sent
    assert update["id"] == "m2" and update["payload"]["version"] == 1  # builds on what the create made


async def test_a_gap_in_the_seqs_resubscribes_from_the_last_applied(parts) -> None:
    replica, wire, notes = parts
    wire.connected = True
    replica.desired["p"] = None
    replica.on_connected()
    [sub] = wire.sent
    wire.sent.clear()
    replica.receive({"type": "ack", "id": sub["id"], "payload": {"projectId": "p", "seq": 0, "mode": "changes"}})
    change = {"type": "event:created", "projectId": "p", "seq": 1, "payload": {"id": "x", "projectId": "p"}}
    replica.receive(change)
    assert [n.seq for n in notes if isinstance(n, RemoteChange)] == [1]
    replica.receive({**change, "seq": 3})
    [again] = wire.sent
    assert again["type"] == "subscribe" and again["payload"]["since"] == 1


async def test_rate_limited_pauses_and_resends_when_the_pause_is_over(parts) -> None:
    replica, wire, _ = parts
    wire.connected = True
    create(replica, "a", "m1")
    assert wire.take() == [("event:create", "m1")]
    replica.receive({"type": "error", "payload": {"code": "rate_limited", "ref": "m1", "message": "slow down"}})
    assert wire.take() == [] and len(replica.queue) == 1
    [(deadline, resume)] = wire.later
    resume()  # too early: still paused
    assert wire.take() == []
    with trio.fail_after(10):
        await trio.sleep_until(deadline)
    resume()
    assert wire.take() == [("event:create", "m1")]


async def test_a_conflict_and_a_refusal_leave_the_queue_and_say_why(parts) -> None:
    replica, wire, notes = parts
    wire.connected = True
    create(replica, "a", "m1")
    create(replica, "b", "m2")
    replica.receive({"type": "conflict:detected", "payload": {"ref": "m1", "projectId": "p", "eventId": "a",
                                                              "operation": "create", "remote": None}})
    replica.receive({"type": "error", "payload": {"code": "invalid", "ref": "m2", "message": "bad", "field": "title"}})
    assert replica.queue == {} and replica.failed == 2
    assert any(isinstance(n, ConflictDetected) and n.conflict.ref == "m1" for n in notes)
    [refused] = [n.error for n in notes if getattr(n, "error", None) is not None and isinstance(n.error, MutationRefused)]
    assert refused.code == "invalid" and refused.field == "title"


async def test_what_a_disconnect_forgets_and_what_it_keeps(parts) -> None:
    replica, wire, _ = parts
    wire.connected = True
    replica.desired["p"] = None
    create(replica, "a", "m1")
    replica.on_connected()
    replica.on_disconnected()
    wire.connected = False
    assert replica.inflight == set() and replica.project("p").phase == "idle"
    assert list(replica.desired) == ["p"] and len(replica.queue) == 1
