"""Reads off the event loop on PostgreSQL, and rooms kept in log order meanwhile
(reads.py, sequencer.py). In-process servers on a real PostgreSQL (tests/pg_helpers.py),
real WebSocket clients; a read is held up with a real table lock or a slowed read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from barosync.transports.server import serve
from conftest import event_payload, http_exchange, make_config, open_client, token
from pg_helpers import Postgres, bindir

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (as root: apt-get install postgresql)")]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.close()


@pytest.fixture
async def pg_app(nursery: trio.Nursery, tmp_path: Path, postgres: Postgres) -> Any:
    app = await nursery.start(serve, make_config(tmp_path / "data", cluster_postgres=postgres.new_database()))
    yield app
    app.stop()


class Gate:
    """Holds a store read in its worker thread until the test lets it go, so what
    happens meanwhile is ordered by the test, not by how long a sleep lasts."""

    def __init__(self) -> None:
        self.reached = trio.Event()
        self._go = threading.Event()
        self._token = trio.lowlevel.current_trio_token()

    def hold(self) -> None:
        """In the worker thread: say it got here, then wait."""
        trio.from_thread.run_sync(self.reached.set, trio_token=self._token)
        self._go.wait(timeout=30)

    def release(self) -> None:
        self._go.set()


async def wait_for(condition: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.02)


async def test_a_read_held_up_in_postgres_does_not_stall_other_connections(pg_app: Any, nursery: trio.Nursery) -> None:
    import psycopg

    alice = await open_client(nursery, pg_app, token("alice"))
    await alice.subscribe("p1")
    await alice.create("p1")
    listing: dict[str, Any] = {}

    async def list_events() -> None:
        listing["answer"] = await http_exchange(pg_app.port, "GET", "/api/projects/p1/events", tok=token("bob"))

    with psycopg.connect(pg_app.config.cluster_postgres, autocommit=False) as lock:
        lock.execute("LOCK TABLE barosync_events IN ACCESS EXCLUSIVE MODE")
        nursery.start_soon(list_events)

        async def read_waits() -> bool:
            def query() -> bool:
                with psycopg.connect(pg_app.config.cluster_postgres, autocommit=True) as c:
                    return bool(c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                          "AND query LIKE '%barosync_events%'").fetchone()[0])
            return await trio.to_thread.run_sync(query)

        await wait_for(read_waits)
        # The listing's read waits for the lock in PostgreSQL; the server still answers.
        ping = await alice.send("ping")
        pong = await alice.recv_type("pong")
        assert pong["type"] == "pong" and ping
        assert "answer" not in listing
        lock.rollback()
    await wait_for(lambda: _done(listing))
    status, _, body = listing["answer"]
    assert status == 200 and [e["title"] for e in body["events"]] == ["Standup"]


async def _done(listing: dict[str, Any]) -> bool:
    return "answer" in listing


async def test_changes_committed_during_a_subscribers_read_reach_it_once_and_in_order(pg_app: Any, nursery: trio.Nursery) -> None:
    """The subscriber's catch-up read is slow: five changes commit and fan out while it
    runs. The room's sequencer sends it what its read missed before it joins."""
    writer = await open_client(nursery, pg_app, token("alice"))
    watcher = await open_client(nursery, pg_app, token("carol"))
    await watcher.subscribe("p1")
    for _ in range(2):
        await writer.create("p1")
    store = pg_app.store
    original = store.replay
    gate = Gate()
    slowed = []

    def slow_replay(*args: Any, **kwargs: Any) -> Any:
        found = original(*args, **kwargs)
        if not slowed:
            slowed.append(args)
            gate.hold()  # the writer commits meanwhile
        return found

    store.replay = slow_replay
    late = await open_client(nursery, pg_app, token("bob"))
    subscribed: dict[str, Any] = {}

    async def subscribe() -> None:
        subscribed["ack"] = await late.subscribe("p1", since=0)

    nursery.start_soon(subscribe)
    await gate.reached.wait()
    try:
        for _ in range(5):
            await writer.create("p1")
        assert "ack" not in subscribed  # its read was taken before these five
    finally:
        gate.release()
    with trio.fail_after(10):
        while "ack" not in subscribed:
            await trio.sleep(0.01)
    assert subscribed["ack"]["payload"]["mode"] == "changes"
    await writer.create("p1")  # the eighth, live
    seqs = []
    with trio.fail_after(10):
        while len(seqs) < 8:
            msg = await late.recv_type("event:created")
            seqs.append(msg["seq"])
    assert seqs == list(range(1, 9))
    watched = [(await watcher.recv_type("event:created"))["seq"] for _ in range(8)]
    assert watched == list(range(1, 9))


async def test_writes_refused_while_postgres_is_away_do_not_stall_the_loop(pg_app: Any, nursery: trio.Nursery) -> None:
    """Refusing a write looks up an earlier answer (a retry stored before). With the
    database gone that read waits for its connect timeout: in a thread, while other
    connections are answered."""
    alice = await open_client(nursery, pg_app, token("alice"))
    await alice.create("p1")
    import psycopg

    store = pg_app.store

    def still_away(nbytes: int) -> None:
        raise psycopg.OperationalError("still away (test)")

    store.probe_space = still_away  # the writer's probe keeps it degraded
    pg_app.writer.degraded = "PostgreSQL unreachable (test)"
    original = store.previous_answer
    gate = Gate()

    def slow_previous_answer(*args: Any) -> Any:
        gate.hold()
        return original(*args)

    store.previous_answer = slow_previous_answer
    msg_id = await alice.send("event:create", event_payload())
    await gate.reached.wait()
    try:
        bob = await open_client(nursery, pg_app, token("bob"))
        await bob.send("ping")
        assert (await bob.recv_type("pong"))["type"] == "pong"  # answered while the lookup is held
    finally:
        gate.release()
    refused = await alice.recv_type("error", timeout=10)
    assert refused["payload"]["ref"] == msg_id and refused["payload"]["code"] == "storage_full"


async def test_a_retry_refused_while_postgres_is_away_is_not_told_it_was_never_stored(
        pg_app: Any, nursery: trio.Nursery) -> None:
    """With writes refused and the idempotency table unreadable, the server cannot
    tell a retry of a stored change from a new one: it says to send it again (which
    is right either way), not that it was never stored."""
    import psycopg

    alice = await open_client(nursery, pg_app, token("alice"))
    first = await alice.request("event:create", event_payload(), id="stored-1")
    assert first["type"] == "ack"
    store = pg_app.store

    def away(*args: Any) -> Any:
        raise psycopg.OperationalError("still away (test)")

    store.probe_space = away
    store.previous_answer = away
    pg_app.writer.degraded = "PostgreSQL unreachable (test)"
    refused = await alice.request("event:create", event_payload(), id="stored-1")
    assert refused["type"] == "error" and refused["payload"]["code"] == "storage_full"
    message = refused["payload"]["message"]
    assert "not stored" not in message and "if an earlier send was, resending gets its answer" in message
    assert refused["payload"]["retryAfter"] > 0


async def test_a_join_the_log_cannot_complete_closes_the_subscriber_to_resume(pg_app: Any, nursery: trio.Nursery) -> None:
    """The newcomer's read missed changes and the log is unreachable when the room's
    sequencer reads them: the subscriber is closed with 4008 (resume with since), not
    admitted with a gap. Once the log answers, the resume gets everything once."""
    import psycopg
    from trio_websocket import ConnectionClosed

    writer = await open_client(nursery, pg_app, token("alice"))
    watcher = await open_client(nursery, pg_app, token("carol"))
    await watcher.subscribe("p1")  # the room exists, so its task knows the head
    await writer.create("p1")
    store = pg_app.store
    original = store.replay
    calls = []
    gate = Gate()

    def failing_replay(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:  # the subscriber's own read, held while two commit
            found = original(*args, **kwargs)
            gate.hold()
            return found
        if len(calls) == 2:  # the sequencer's read of what it missed
            raise psycopg.OperationalError("connection refused (test)")
        return original(*args, **kwargs)

    store.replay = failing_replay
    late = await open_client(nursery, pg_app, token("bob"))
    acked: dict[str, Any] = {}

    async def subscribe() -> None:
        acked["ack"] = await late.subscribe("p1", since=0)

    nursery.start_soon(subscribe)
    await gate.reached.wait()
    try:
        for _ in range(2):
            await writer.create("p1")
    finally:
        gate.release()
    with trio.fail_after(10):
        while "ack" not in acked:  # the ack goes out before the join
            await trio.sleep(0.01)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await late.ws.get_message()
    assert closed.value.reason.code == 4008 and "resume with since" in closed.value.reason.reason
    again = await open_client(nursery, pg_app, token("bob"))
    await again.subscribe("p1", since=0)
    seqs = [(await again.recv_type("event:created"))["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]


async def test_reads_of_an_unreachable_log_get_what_clients_retry(pg_app: Any, nursery: trio.Nursery) -> None:
    """A subscribe whose read fails is closed with 4008 (resume with since); an edit
    whose lookup fails is refused like a write while PostgreSQL is away; a REST read
    gets 503 with Retry-After."""
    import psycopg
    from trio_websocket import ConnectionClosed

    alice = await open_client(nursery, pg_app, token("alice"))
    made = await alice.create("p1")
    store = pg_app.store
    replay, projects_of = store.replay, store.projects_of

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("connection refused (test)")

    store.projects_of = unreachable
    msg_id = await alice.send("event:update", {"id": made["payload"]["event"]["id"], "version": 1, "title": "later"})
    refused = await alice.recv_type("error")
    assert refused["payload"]["ref"] == msg_id and refused["payload"]["code"] == "storage_full"
    assert refused["payload"]["retryAfter"] > 0 and "PostgreSQL unreachable" in refused["payload"]["message"]
    store.projects_of = projects_of
    store.replay = unreachable
    bob = await open_client(nursery, pg_app, token("bob"))
    await bob.send("subscribe", {"projectId": "p1", "since": 0})
    with trio.fail_after(10):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await bob.ws.get_message()
    assert closed.value.reason.code == 4008
    store.snapshot = unreachable
    status, headers, body = await http_exchange(pg_app.port, "GET", "/api/projects/p1/events", tok=token("bob"))
    assert status == 503 and headers["retry-after"] == "2" and "PostgreSQL" in body["message"]
    del store.snapshot
    store.replay = replay
    again = await open_client(nursery, pg_app, token("bob"))
    assert (await again.subscribe("p1", since=0))["payload"]["seq"] == 1


async def test_a_writer_gets_its_ack_in_place_of_its_change_when_a_newcomers_read_finds_it_first(
        pg_app: Any, nursery: trio.Nursery) -> None:
    """A commit is durable before its worker thread returns. A newcomer's read finds it
    in that moment, and the room's sequencer brings the room up to what the newcomer
    read: the writer gets its ack in the change's place, never `event:created` too."""
    writer = await open_client(nursery, pg_app, token("alice"))
    await writer.subscribe("p1")
    await writer.create("p1")
    store = pg_app.store
    replay, commit_batch = store.replay, store.commit_batch
    read_gate, commit_gate = Gate(), Gate()
    held: list[str] = []

    def held_replay(*args: Any, **kwargs: Any) -> Any:
        if not held:
            held.append("read")
            read_gate.hold()  # the writer's commit lands before this read
        return replay(*args, **kwargs)

    def held_commit(batch: Any) -> Any:
        outcomes = commit_batch(batch)
        commit_gate.hold()  # durable, not yet answered
        return outcomes

    store.replay = held_replay
    late = await open_client(nursery, pg_app, token("bob"))
    subscribed: dict[str, Any] = {}

    async def subscribe() -> None:
        subscribed["ack"] = await late.subscribe("p1", since=1)

    nursery.start_soon(subscribe)
    await read_gate.reached.wait()
    store.commit_batch = held_commit
    msg_id = await writer.send("event:create", event_payload())
    await commit_gate.reached.wait()
    store.commit_batch = commit_batch
    try:
        read_gate.release()
        with trio.fail_after(10):
            while "ack" not in subscribed:
                await trio.sleep(0.01)
        assert subscribed["ack"]["payload"]["seq"] == 2  # the read found the writer's commit
        assert (await late.recv_type("event:created"))["seq"] == 2
        with trio.move_on_after(0.5):  # the room is brought up to seq 2 now, or waits
            early = await writer.recv_type("event:created", "ack")
            pytest.fail(f"the writer got {early} before its commit was answered")
    finally:
        commit_gate.release()
    answer = await writer.recv_type("event:created", "ack", timeout=10)
    assert answer["type"] == "ack" and answer["id"] == msg_id and answer["payload"]["seq"] == 2
    await late.create("p1")
    assert (await writer.recv_type("event:created", "ack"))["seq"] == 3  # seq 2 never came as a change


async def test_a_retry_through_another_node_is_answered_in_its_place_in_the_stream(
        nursery: trio.Nursery, tmp_path: Path, postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create went through node A and its answer was lost; the client, subscribed on
    node B, sends the same envelope again. Its answer names a seq node B's room has
    not delivered yet: it comes after every earlier seq, in that seq's place (a client
    that tracks seqs sees no gap and no duplicate)."""
    from barosync.engine import sequencer

    monkeypatch.setattr(sequencer, "CHECK_INTERVAL", 600.0)  # B hears of A's commits only through the retry
    dsn = postgres.new_database()
    node_a = await nursery.start(serve, make_config(tmp_path / "a", cluster_postgres=dsn))
    node_b = await nursery.start(serve, make_config(tmp_path / "b", cluster_postgres=dsn))
    try:
        alice_b = await open_client(nursery, node_b, token("alice"))
        await alice_b.subscribe("p1")
        # The subscribe's ack comes before its join: wait until B's room has read the
        # log's head and admitted her, or a head read that runs after the creates
        # below would send her seq 2 from the log before her retry.
        with trio.fail_after(10):
            while (room := node_b.hub.rooms.get("p1")) is None or room.last < 0 or room.joining:
                await trio.sleep(0.01)
        bob_a = await open_client(nursery, node_a, token("bob"))
        alice_a = await open_client(nursery, node_a, token("alice"))
        await bob_a.create("p1")  # seq 1
        first = await alice_a.request("event:create", event_payload(title="lost answer"), id="offline-1")
        assert first["payload"]["seq"] == 2
        await alice_b.send("event:create", event_payload(title="lost answer"), id="offline-1")
        got = []
        with trio.fail_after(10):
            while not (got and got[-1]["type"] == "ack"):
                got.append(await alice_b.recv_type("event:created", "ack", timeout=10))
        assert [(m["type"], m["seq"] if m["type"] != "ack" else m["payload"]["seq"]) for m in got] == [
            ("event:created", 1), ("ack", 2)]
        assert got[-1]["id"] == "offline-1" and got[-1]["payload"] == first["payload"]
        bob_b = await open_client(nursery, node_b, token("bob"))
        await bob_b.create("p1")
        assert (await alice_b.recv_type("event:created", "ack"))["seq"] == 3  # seq 2 never came as a change
    finally:
        node_a.stop()
        node_b.stop()
