"""The Python client (barosync.client) against a real server, through a fault-injecting
TCP proxy (tests/faultproxy.py): real sockets, real LMDB on both sides, no mocks.

Every test runs under a generous ``trio.fail_after``; none asserts how long anything
took (the one clock-based test uses trio's virtual clock)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from barosync.hooks.auth import create_token
from barosync.client import (
    ClientGaveUp,
    ConflictDetected,
    ConflictError,
    ConnectionState,
    CursorMoved,
    HeartbeatPolicy,
    MutationRefused,
    MutationSettled,
    PresenceChanged,
    QueueProgress,
    ReconnectPolicy,
    RemoteChange,
    StateChanged,
    StoreLocked,
    SubscriptionRefused,
    SyncClient,
    backoff_ceiling,
    backoff_delay,
)
from barosync.core.app import App
from barosync.transports.server import serve
from barosync.cli.watch import import_events, plan_import

from conftest import SECRET, make_config, token
from faultproxy import FaultProxy, transcript

FAST = ReconnectPolicy(initial=0.02, factor=1.5, max_delay=0.2)
T0, T1 = "2026-01-05T09:00:00Z", "2026-01-05T09:30:00Z"
GUARD = 20  # seconds: generous, only there so a hang fails instead of blocking the suite


def ev(**fields: Any) -> dict[str, Any]:
    return {"title": "Standup", "startDate": T0, "endDate": T1, **fields}


class Harness:
    """A real server (restartable, same data directory) and fault proxies in front of it."""

    def __init__(self, nursery: trio.Nursery, tmp: Path, config: dict[str, Any]) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.config = make_config(tmp / "data", **config)
        self.app: App | None = None
        self.proxies: list[FaultProxy] = []
        self._server_done = trio.Event()
        self._n = 0

    async def start_server(self) -> App:
        done = trio.Event()

        async def run(*, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve(self.config, task_status=task_status)
            finally:
                done.set()

        self.app = await self.nursery.start(run)
        self._server_done = done
        for proxy in self.proxies:
            proxy.upstream_port = self.app.port
        return self.app

    async def stop_server(self) -> None:
        assert self.app is not None
        self.app.stop()
        await self._server_done.wait()

    async def proxy(self, record: bool = False) -> FaultProxy:
        assert self.app is not None
        proxy = await self.nursery.start(partial(FaultProxy.run, record=record), self.app.port)
        self.proxies.append(proxy)
        return proxy

    def client(self, proxy: FaultProxy, user: str = "alice", *, store: Path | None = None,
               projects: Any = ("p1",), **kw: Any) -> SyncClient:
        self._n += 1
        kw.setdefault("reconnect", FAST)
        kw.setdefault("connect_timeout", 2.0)
        tok = kw.pop("token", None) or token(user, projects)
        return SyncClient(f"ws://127.0.0.1:{proxy.port}/ws", token=tok,
                          store=store or self.tmp / f"store-{user}-{self._n}", **kw)

    @property
    def store(self) -> Any:
        assert self.app is not None
        return self.app.store


@asynccontextmanager
async def harness(tmp: Path, **config: Any) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, tmp, config)
        await h.start_server()
        try:
            with trio.fail_after(GUARD):
                yield h
        finally:
            nursery.cancel_scope.cancel()


def server_view(h: Harness, project: str = "p1") -> list[dict[str, Any]]:
    _, events = h.store.snapshot(project)
    return sorted(events, key=lambda e: (e["startDate"], e["id"]))


def sent(proxy: FaultProxy, type_: str) -> list[dict[str, Any]]:
    return [m for conn in proxy.connections for m in transcript(conn)[0] if m.get("type") == type_]


async def poll(predicate: Any) -> None:
    """For conditions only the server can see (the client has wait_for)."""
    while not predicate():
        await trio.sleep(0.005)


# -- backoff -------------------------------------------------------------------------


@given(attempt=st.integers(0, 5000), r=st.floats(0, 1, exclude_max=True))
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, r: float) -> None:
    policy = ReconnectPolicy()  # the defaults: 1 s, x1.5, 30 s cap
    ceiling = min(30.0, 1.5**attempt) if attempt < 100 else 30.0
    assert backoff_ceiling(attempt, policy) == pytest.approx(ceiling)
    delay = backoff_delay(attempt, policy, rng=lambda: r)
    assert 0 <= delay <= ceiling
    assert delay == pytest.approx(ceiling * r)


def test_backoff_defaults_and_cap() -> None:
    policy = ReconnectPolicy()
    assert (policy.initial, policy.factor, policy.max_delay, policy.max_attempts) == (1.0, 1.5, 30.0, None)
    assert [round(backoff_ceiling(n), 4) for n in range(4)] == [1.0, 1.5, 2.25, 3.375]
    assert backoff_ceiling(9) == 30.0 and backoff_ceiling(10**6) == 30.0
    assert backoff_delay(3, rng=lambda: 0.0) == 0.0
    with pytest.raises(ValueError):
        ReconnectPolicy(factor=0.5)


async def test_reconnect_waits_out_backoff_then_gives_up(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    # Nothing listens on this port: every attempt fails at once. Virtual time lets
    # the test see exactly how long the client waited before each attempt.
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = ReconnectPolicy(initial=1.0, factor=2.0, max_delay=5.0, max_attempts=4)
    attempts: list[tuple[float, StateChanged]] = []
    client = SyncClient(f"ws://127.0.0.1:{port}/ws", token="t", store=tmp_path / "s", reconnect=policy, rng=lambda: 0.5)
    client.on(StateChanged, lambda n: attempts.append((trio.current_time(), n)))
    async with client:
        with trio.fail_after(60):
            await client.wait_for(lambda: client.state is ConnectionState.ERROR)
    waits = [n.delay for _, n in attempts if n.state is ConnectionState.RECONNECTING]
    assert waits == [0.5, 1.0, 2.0, 2.5]  # half of min(5, 1 * 2**n): full jitter with rng=0.5
    # Each wait is the time from announcing the retry to starting it.
    gaps = [b[0] - a[0] for a, b in zip(attempts, attempts[1:])
            if a[1].state is ConnectionState.RECONNECTING and b[1].state is ConnectionState.CONNECTING]
    assert gaps == pytest.approx(waits)
    gave_up, closed = attempts[-2][1], attempts[-1][1]
    assert gave_up.state is ConnectionState.ERROR and "4 reconnect attempts" in (gave_up.reason or "")
    assert closed.state is ConnectionState.DISCONNECTED and closed.reason == "client closed"


# -- optimistic updates, acks and refusals ---------------------------------------------


async def test_optimistic_create_is_visible_at_once_then_acked(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy) as a:
            await a.subscribe("p1")
            proxy.stall()  # nothing gets through until heal(): the ack cannot come early
            pending = a.submit_create("p1", ev(title="Planning", attendees=["bob", "bob"]), id="ev-1")
            [shown] = a.events("p1")
            assert shown["id"] == "ev-1" and shown["title"] == "Planning" and shown["version"] == 0
            assert shown["attendees"] == ["bob"]
            assert a.is_pending("ev-1") and a.progress == QueueProgress(pending=1, completed=0, failed=0, total=1)
            proxy.heal()
            stored = await pending.result()
            assert stored["version"] == 1 and stored["createdBy"] == "alice" and stored["id"] == "ev-1"
            # One event, the server's copy, no temporary id left behind.
            assert a.events("p1") == [stored] == server_view(h)
            assert not a.is_pending("ev-1") and a.last_seq("p1") == 1
            assert a.progress == QueueProgress(pending=0, completed=1, failed=0, total=1)
            updated = await a.update("ev-1", location="Room 2")
            assert updated["version"] == 2 and a.get("ev-1") == updated
            gone = await a.delete("ev-1")
            assert gone == {"id": "ev-1", "projectId": "p1", "version": 3, "seq": 3}
            assert a.events("p1") == [] and a.last_seq("p1") == 3


async def test_refusals_raise_and_revert_the_local_view(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy) as a:
            await a.subscribe("p1")
            keep = await a.create("p1", ev(title="Keep"), id="keep")
            bad = a.submit_create("p1", ev(startDate=T1, endDate=T0), id="bad")
            assert {e["id"] for e in a.events("p1")} == {"keep", "bad"}
            with pytest.raises(MutationRefused) as info:
                await bad.result()
            assert (info.value.code, info.value.field) == ("invalid", "endDate")
            assert a.events("p1") == [keep]

            blank = a.submit_update("keep", title="   ")
            assert a.get("keep")["title"] == "   "
            with pytest.raises(MutationRefused):
                await blank.result()
            assert a.get("keep") == keep

            with pytest.raises(MutationRefused) as info:
                await a.create("p2", ev())  # the token does not allow p2
            assert info.value.code == "forbidden" and a.events("p2") == []
            with pytest.raises(SubscriptionRefused):
                await a.subscribe("p2")
            with pytest.raises(ValueError):
                a.submit_create("p1", ev(start_date=T0))  # not a field: caught before queueing
            assert a.progress == QueueProgress(pending=0, completed=4, failed=3, total=4)
            assert server_view(h) == [keep]


async def test_manual_conflict_surfaces_and_resolves_in_one_call(tmp_path: Path) -> None:
    async with harness(tmp_path, conflict_projects={"p1": "manual"}) as h:
        proxy = await h.proxy()
        async with h.client(proxy, "alice") as a, h.client(proxy, "bob") as b:
            await a.subscribe("p1")
            await b.subscribe("p1")
            await a.create("p1", ev(title="Base"), id="c1")
            await a.update("c1", title="Alice's")
            conflicts = b.notifications(ConflictDetected)
            with pytest.raises(ConflictError) as info:
                await b.update("c1", title="Bob's", version=1)  # an edit based on the old version
            c = info.value.conflict
            assert c.manual and c.strategy == "manual" and c.fields == ("title",) and c.operation == "update"
            assert (c.base["title"], c.local["title"], c.remote["title"]) == ("Base", "Bob's", "Alice's")
            assert (await conflicts.receive()).conflict == c
            await b.wait_for(lambda: b.get("c1")["title"] == "Alice's")  # reverted to the server's

            resolved = await b.resolve(c, {"title": "Alice's + Bob's"})
            assert resolved["version"] == 3 and resolved["updatedBy"] == "bob"
            await a.wait_for(lambda: (a.get("c1") or {}).get("version") == 3)
            assert a.events("p1") == b.events("p1") == server_view(h)
            assert await b.resolve(c, "remote") == c.remote  # keeping theirs sends nothing


async def test_server_merged_conflict_is_reported_with_the_stored_result(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:  # default strategy: merge
        proxy = await h.proxy()
        async with h.client(proxy, "alice") as a, h.client(proxy, "bob") as b:
            await a.subscribe("p1")
            await b.subscribe("p1")
            await a.create("p1", ev(title="Base"), id="m1")
            await a.update("m1", title="Alice's")
            conflicts = b.notifications(ConflictDetected)
            merged = await b.update("m1", location="Room 2", version=1)
            assert (merged["title"], merged["location"], merged["version"]) == ("Alice's", "Room 2", 3)
            note = (await conflicts.receive()).conflict
            assert not note.manual and note.strategy == "merge" and note.resolved == merged
            await a.wait_for(lambda: (a.get("m1") or {}).get("version") == 3)
            assert a.events("p1") == b.events("p1") == server_view(h)


# -- the offline queue -------------------------------------------------------------------


async def test_offline_edits_survive_a_restart_and_replay_exactly_once(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        pa, pb = await h.proxy(record=True), await h.proxy()
        store = tmp_path / "alice-store"
        async with h.client(pb, "bob") as b:
            seen_by_bob: list[RemoteChange] = []
            b.on(RemoteChange, seen_by_bob.append)
            await b.subscribe("p1")
            async with h.client(pa, "alice", store=store) as a:
                await a.subscribe("p1")
                await a.create("p1", ev(title="Online"), id="on")
                pa.down()  # refuse new connections and reset the current one
                await a.wait_for(lambda: a.state is not ConnectionState.CONNECTED)
                a.submit_create("p1", ev(title="Offline 1", startDate="2026-01-06T09:00:00Z",
                                         endDate="2026-01-06T10:00:00Z"), id="off-1")
                a.submit_update("on", title="Online, edited offline")
                a.submit_update("off-1", location="Room 7")  # an edit of a create still queued
                a.submit_create("p1", ev(title="Doomed"), id="off-2")
                a.submit_delete("off-2")
                queued = [m.envelope_id for m in a.queue]
                view = a.events("p1")
                assert [e["title"] for e in view] == ["Online, edited offline", "Offline 1"]
                assert a.get("off-1")["location"] == "Room 7"
                assert a.progress.pending == 5
            # The process is gone; a new client opens the same store, still offline.
            async with h.client(pa, "alice", store=store) as a:
                assert a.events("p1") == view and [m.envelope_id for m in a.queue] == queued
                assert a.progress == QueueProgress(pending=5, completed=0, failed=0, total=5)
                await a.subscribe("p1", wait=False)
                pa.heal()
                await a.wait_synced()
                assert a.progress == QueueProgress(pending=0, completed=5, failed=0, total=5)
                await b.wait_for(lambda: b.last_seq("p1") == 6)
                assert a.events("p1") == b.events("p1") == server_view(h)
        assert h.store.current_seq("p1") == 6  # 1 online + 5 replayed: each applied once
        assert [(n.seq, n.kind, n.event_id) for n in seen_by_bob] == [
            (1, "created", "on"), (2, "created", "off-1"), (3, "updated", "on"),
            (4, "updated", "off-1"), (5, "created", "off-2"), (6, "deleted", "off-2")]
        # Replayed in order, with the envelope ids they were queued with.
        mutations = [m for m in (sent(pa, "event:create") + sent(pa, "event:update") + sent(pa, "event:delete"))
                     if m["id"] in queued]
        assert sorted(m["id"] for m in mutations) == sorted(queued)
        replay = [m["id"] for conn in pa.connections for m in transcript(conn)[0] if m.get("id") in queued]
        assert replay == queued


async def test_a_lost_ack_is_retried_with_the_same_envelope_id_and_applied_once(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy(record=True)
        async with h.client(proxy) as a:
            await a.subscribe("p1")
            proxy.stall("down")  # requests reach the server, answers do not come back
            pending = a.submit_create("p1", ev(), id="lost")
            await poll(lambda: h.store.get_event("p1", "lost") is not None)
            proxy.drop_all()
            proxy.heal()
            stored = await pending.result()
            await a.wait_synced()
        assert stored["id"] == "lost" and h.store.current_seq("p1") == 1
        assert [m["id"] for m in sent(proxy, "event:create")] == [pending.envelope_id] * 2
        assert a.last_seq("p1") == 1


async def test_rate_limited_mutations_are_resent_after_a_pause(tmp_path: Path) -> None:
    # The server closes a connection after more than rate_burst refusals in a row:
    # a window below the burst lets the client slow down before that.
    async with harness(tmp_path, rate_limit=100.0, rate_burst=10) as h:
        proxy = await h.proxy(record=True)
        async with h.client(proxy, max_in_flight=8) as a:
            await a.subscribe("p1")
            pending = a.submit_creates("p1", [ev(title=f"Many {i}") for i in range(60)])
            results = [await p.result() for p in pending]
            await a.wait_synced()
            assert [r["title"] for r in results] == [f"Many {i}" for i in range(60)]
            assert h.store.current_seq("p1") == 60 and a.events("p1") == server_view(h)
        refused = [m for conn in proxy.connections for m in transcript(conn)[1]
                   if m.get("type") == "error" and m["payload"]["code"] == "rate_limited"]
        assert refused  # the server did push back, and nothing was lost or doubled
        assert proxy.accepted == 1  # ... without being closed for flooding


# -- heartbeat, resume, tokens --------------------------------------------------------------


async def test_heartbeat_detects_a_proxy_that_silently_stops_forwarding(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy, heartbeat=HeartbeatPolicy(interval=0.1, timeout=0.3), connect_timeout=1.0) as a:
            await a.subscribe("p1")
            states = a.notifications(StateChanged)
            proxy.stall()  # no RST, no FIN: only the missing pong tells
            async for note in states:
                if note.state is ConnectionState.DISCONNECTED:
                    assert "heartbeat" in (note.reason or "")
                    break
            proxy.heal()
            await a.wait_synced()
            assert a.is_live("p1") and proxy.accepted >= 2
            assert (await a.create("p1", ev()))["version"] == 1


async def test_resume_with_since_after_the_server_restarts(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        pa, pb = await h.proxy(record=True), await h.proxy()
        async with h.client(pa, "alice") as a, h.client(pb, "bob") as b:
            await a.subscribe("p1")
            for i in range(3):
                await b.create("p1", ev(title=f"before {i}"))
            await a.wait_for(lambda: a.last_seq("p1") == 3)
            states = a.notifications(StateChanged)
            pa.refuse()  # keep alice away until bob has written more
            await h.stop_server()  # closes every connection with 1001
            async for note in states:
                if note.state is ConnectionState.DISCONNECTED:
                    assert note.close_code == 1001
                    break
            await h.start_server()  # same data directory, new port: the proxies follow
            await b.wait_connected()
            await b.create("p1", ev(title="after 0"))
            await b.create("p1", ev(title="after 1"))
            pa.heal()
            await a.wait_for(lambda: a.last_seq("p1") == 5 and a.is_live("p1"))
            assert a.events("p1") == server_view(h) and len(server_view(h)) == 5
        subscribes = sent(pa, "subscribe")
        assert subscribes[0]["payload"] == {"projectId": "p1", "snapshotParts": True}
        assert subscribes[-1]["payload"] == {"projectId": "p1", "snapshotParts": True, "since": 3}
        answer = next(m for m in transcript(pa.connections[-1])[1] if m.get("id") == subscribes[-1]["id"])
        assert answer["payload"] == {"projectId": "p1", "seq": 5, "mode": "changes", "count": 2, "writable": True}


async def test_refused_token_asks_the_callable_and_gives_up_when_none_comes(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        given_out = iter(["not-a-jwt", token("alice")])
        asked: list[int] = []

        async def provide() -> str | None:
            asked.append(1)
            return next(given_out, None)

        async with h.client(proxy, token=provide) as a:
            await a.wait_connected()  # HTTP 401 for the first token, the second one works
            assert len(asked) == 2

        # A token that expires: the server closes with 4001, the callable has nothing new.
        short = create_token(SECRET, user_id="alice", projects=["p1"], ttl=1)
        once = iter([short])
        async with h.client(proxy, token=lambda: next(once, None), refresh_token_before_expiry=False) as a:
            notes: list[StateChanged] = []
            a.on(StateChanged, notes.append)
            await a.wait_connected()
            await a.wait_for(lambda: a.state is ConnectionState.ERROR)
            assert any(n.close_code == 4001 for n in notes)
            a.submit_create("p1", ev(), id="later")
            with pytest.raises(ClientGaveUp):
                await a.wait_idle()
            assert a.is_pending("later")  # kept in the store for a later client

        # A static token cannot be refreshed: 401 -> error state, no retry loop.
        async with h.client(proxy, token="not-a-jwt") as a:
            with pytest.raises(ClientGaveUp):
                await a.wait_connected()
            assert a.state is ConnectionState.ERROR and proxy.accepted >= 1


async def test_token_is_refreshed_on_the_live_connection_before_it_expires(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy(record=True)
        tokens = [create_token(SECRET, user_id="alice", projects=["p1"], ttl=2),
                  create_token(SECRET, user_id="alice", projects=["p1"], ttl=3600)]
        async with h.client(proxy, token=lambda: tokens.pop(0) if tokens else None) as a:
            await a.subscribe("p1")
            await poll(lambda: sent(proxy, "auth:refresh"))
            await trio.sleep(2.5)  # past the first token's expiry
            await a.create("p1", ev())
            assert a.state is ConnectionState.CONNECTED and proxy.accepted == 1


async def test_gives_up_after_max_attempts_and_reconnect_starts_again(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        proxy.refuse()
        policy = ReconnectPolicy(initial=0.01, factor=2, max_delay=0.05, max_attempts=3)
        async with h.client(proxy, reconnect=policy) as a:
            notes: list[StateChanged] = []
            a.on(StateChanged, notes.append)
            with pytest.raises(ClientGaveUp):
                await a.wait_connected()
            retries = [n for n in notes if n.state is ConnectionState.RECONNECTING]
            assert [n.attempt for n in retries] == [1, 2, 3]
            assert all(0 <= n.delay <= backoff_ceiling(n.attempt - 1, policy) for n in retries)
            proxy.heal()
            a.reconnect()
            await a.wait_connected()
            await a.subscribe("p1")
            a.reconnect()  # on a live connection: a new one at once, resuming the subscription
            await a.wait_for(lambda: proxy.accepted == 2 and a.is_live("p1"))


# -- protocol manners: acks, presence, cursors ---------------------------------------------------


async def test_acks_every_server_message_with_an_id_except_acks_and_pongs(tmp_path: Path) -> None:
    """Changes are acked cumulatively (hello offers it), one ack per project per
    ACK_INTERVAL; everything else with an id is acked by id, once, in order."""
    async with harness(tmp_path) as h:
        pa, pb = await h.proxy(record=True), await h.proxy()
        async with h.client(pa, "alice", heartbeat=HeartbeatPolicy(interval=0.05, timeout=5)) as a:
            await a.subscribe("p1")
            async with h.client(pb, "bob") as b:
                await b.subscribe("p1")
                created = await b.create("p1", ev(), id="x")
                await b.update("x", title="Moved")
                b.send_cursor(3, 4, element_id="x")
                await b.delete("x")
                await a.wait_for(lambda: a.last_seq("p1") == 3 and bool(a.cursors("p1")))
            await a.create("p1", ev(), id="mine")
            with pytest.raises(MutationRefused):
                await a.create("p1", ev(), id="mine")  # exists: an error with an id
            await poll(lambda: len(sent(pa, "ping")) >= 2)
            await a.wait_for(lambda: not a.presence("p1"))
            session = next(s for s in h.app.sessions if s.identity.user_id == "alice")
            await poll(lambda: not session.unacked)
        assert created["id"] == "x"
        [conn] = pa.connections
        ups, downs = (([m for m in side if "__close__" not in m]) for side in transcript(conn))
        changes = ("event:created", "event:updated", "event:deleted")
        must_ack = [m["id"] for m in downs
                    if isinstance(m.get("id"), str) and m["type"] not in ("ack", "pong", *changes)]
        acks = [m for m in ups if m.get("type") == "ack"]
        by_id = [m for m in acks if "payload" not in m]
        assert [m["id"] for m in by_id] == must_ack  # each once, in order, nothing else
        assert all(set(m) == {"type", "id"} for m in by_id)
        cumulative = [m["payload"] for m in acks if "payload" in m]
        assert all(set(m) == {"type", "payload"} for m in acks if "payload" in m)
        seen = [m["seq"] for m in downs if m["type"] in changes]
        assert seen == [1, 2, 3]
        upto = [p["seq"] for p in cumulative]
        assert {p["projectId"] for p in cumulative} == {"p1"}
        assert upto == sorted(set(upto)) and upto[-1] == 3  # rising, covering every change
        assert {m["type"] for m in downs} >= {"hello", "sync:snapshot", "user:joined", "user:left", "event:created",
                                              "event:updated", "event:deleted", "user:cursor", "ack", "pong", "error"}
        assert {m["type"] for m in ups} <= {"ack", "ping", "subscribe", "event:create"}


async def test_cumulative_acks_follow_the_cadence_the_hello_asks_for(tmp_path: Path) -> None:
    """A server that asks for cumulative acks every 30 s ([server] ack_interval) gets
    none while changes arrive (the client's own cadence is 0.1 s); close() sends the
    pending one."""
    async with harness(tmp_path, ack_interval=30.0) as h:
        proxy = await h.proxy(record=True)
        async with h.client(proxy, "alice") as a:
            await a.subscribe("p1")
            assert a.hello is not None and a.hello["ackIntervalMs"] == 30_000
            async with h.client(await h.proxy(), "bob") as b:
                await b.subscribe("p1")
                await b.create("p1", ev(), id="x")
                await b.update("x", title="Moved")
            await a.wait_for(lambda: a.last_seq("p1") == 2)
            await trio.sleep(0.5)  # five of the client's own cadence
            assert [m for m in sent(proxy, "ack") if "payload" in m] == []
        assert [m["payload"] for m in sent(proxy, "ack") if "payload" in m] == [{"projectId": "p1", "seq": 2}]


async def test_presence_cursors_and_remote_changes_are_observable(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy, "alice") as a:
            await a.subscribe("p1")
            with a.notifications(PresenceChanged, CursorMoved, RemoteChange, MutationSettled) as notes:
                async with h.client(proxy, "bob", token=token("bob", ["p1"], name="Bob")) as b:
                    await b.subscribe("p1")
                    joined = await notes.receive()
                    assert isinstance(joined, PresenceChanged) and joined.joined and joined.user["name"] == "Bob"
                    await b.wait_for(lambda: bool(b.presence("p1")))  # told right after its snapshot
                    assert [u["id"] for u in a.presence("p1")] == ["bob"] and b.presence("p1")[0]["id"] == "alice"
                    b.send_cursor(10, 20, element_id="cell-3")
                    cursor = await notes.receive()
                    assert cursor == CursorMoved("p1", "bob", 10, 20, "cell-3")
                    event = await b.create("p1", ev(title="Bob's"))
                    change = await notes.receive()
                    assert isinstance(change, RemoteChange), change
                    assert (change.kind, change.user_id, change.seq, change.event) == ("created", "bob", 1, event)
                    await b.unsubscribe("p1")
                    left = await notes.receive()
                    assert isinstance(left, PresenceChanged) and not left.joined and left.user["id"] == "bob"
                    assert a.presence("p1") == []


async def test_a_store_is_used_by_one_client_at_a_time(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy, store=tmp_path / "s"):
            with pytest.raises(StoreLocked):
                async with h.client(proxy, store=tmp_path / "s"):
                    pass
        async with h.client(proxy, store=tmp_path / "s") as a:
            await a.wait_connected()


# -- convergence under random disconnects (property) ------------------------------------------


STEP = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 1), st.sampled_from(["Standup", "Review", "Retro"])),
    st.tuples(st.just("update"), st.integers(0, 1), st.integers(0, 7),
              st.sampled_from(["title", "location"]), st.sampled_from(["A", "B", "C"])),
    st.tuples(st.just("delete"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.sampled_from(["drop", "down", "heal", "stall"]), st.integers(0, 1)),
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.01, 0.05, 0.1])),
)


@settings(max_examples=int(os.environ.get("CONVERGE_EXAMPLES", "10")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schedule=st.lists(STEP, min_size=4, max_size=14))
async def test_two_clients_converge_after_random_disconnects(schedule: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with harness(Path(tmp)) as h:
            proxies = [await h.proxy(), await h.proxy()]
            hb = HeartbeatPolicy(interval=0.05, timeout=0.2)
            async with h.client(proxies[0], "alice", heartbeat=hb, connect_timeout=0.5) as a, \
                    h.client(proxies[1], "bob", heartbeat=hb, connect_timeout=0.5) as b:
                clients = [a, b]
                applied: list[list[tuple[str, int]]] = [[], []]
                for i, c in enumerate(clients):
                    c.on(RemoteChange, lambda n, i=i: applied[i].append((n.project_id, n.seq)))
                    await c.subscribe("p1")
                created = 0
                for step in schedule:
                    kind = step[0]
                    if kind == "pause":
                        await trio.sleep(step[1])
                        continue
                    c, proxy = clients[step[1]], proxies[step[1]]
                    if kind == "create":
                        created += 1
                        c.submit_create("p1", ev(title=step[2], startDate=f"2026-02-{created:02d}T09:00:00Z",
                                                 endDate=f"2026-02-{created:02d}T10:00:00Z"))
                    elif kind in ("update", "delete"):
                        view = c.events("p1")
                        if view:
                            target = view[step[2] % len(view)]
                            if kind == "update":
                                c.submit_update(target["id"], {step[3]: step[4]})
                            else:
                                c.submit_delete(target["id"])
                    elif kind == "drop":
                        proxy.drop_all()
                    elif kind == "down":
                        proxy.down()
                    elif kind == "stall":
                        proxy.stall()
                    else:
                        proxy.heal()
                if any(step[0] == "stall" for step in schedule):
                    await trio.sleep(0.3)  # long enough for the heartbeat to notice a stall
                for proxy in proxies:
                    proxy.heal()
                for c in clients:
                    await c.wait_synced()
                final = h.store.current_seq("p1")
                event(f"changes committed: {min(final, 6)}{'+' if final >= 6 else ''}")
                reconnects = sum(p.accepted for p in proxies) - 2
                event(f"reconnects: {min(reconnects, 4)}{'+' if reconnects >= 4 else ''}")
                for c in clients:
                    await c.wait_for(lambda c=c: c.last_seq("p1") == final and c.is_live("p1") and not c.queue)
                assert a.events("p1") == b.events("p1") == server_view(h)
                for seqs in applied:  # every change applied once, in order
                    assert [s for _, s in seqs] == sorted(set(s for _, s in seqs))
                await poll(lambda: all(not s.unacked for s in h.app.sessions))  # everything acked


# -- the import and watch commands -------------------------------------------------------------------


async def test_import_is_resumable_and_applies_each_event_once(tmp_path: Path) -> None:
    events = [ev(title=f"Imported {i}", startDate=f"2026-03-01T{i % 24:02d}:00:00Z",
                 endDate=f"2026-03-01T{i % 24:02d}:30:00Z") for i in range(40)]
    events += [ev(title="Twin"), ev(title="Twin")]  # identical events are two events
    plan = plan_import(events, "p1")
    assert len({p.envelope_id for p in plan}) == len({p.event_id for p in plan}) == 42
    assert plan == plan_import(events, "p1")  # deterministic
    store = tmp_path / "import-store"
    async with harness(tmp_path) as h:
        proxy = await h.proxy()
        async with h.client(proxy, store=store) as a:
            with trio.CancelScope() as interrupted:
                def stop_early(progress: Any) -> None:
                    if progress.imported >= 10:
                        interrupted.cancel()
                await import_events(a, plan, stop_early)
            assert interrupted.cancelled_caught
        async with h.client(proxy, store=store) as a:
            result = await import_events(a, plan)
        assert result.total == 42 and not result.failed
        assert result.skipped >= 10 and result.imported + result.skipped == 42
        assert h.store.current_seq("p1") == 42 and len(server_view(h)) == 42
        async with h.client(proxy, store=store) as a:
            again = await import_events(a, plan)
            assert a.progress.total == 0  # nothing was even queued
        assert (again.skipped, again.imported) == (42, 0) and h.store.current_seq("p1") == 42


async def test_the_example_in_docs_client_md_runs(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "docs" / "client.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(example)
    async with harness(tmp_path) as h:
        env = {**os.environ, "BAROSYNC_URL": f"ws://127.0.0.1:{h.app.port}/ws",
               "BAROSYNC_TOKEN": token("alice", ["demo"], name="Alice")}
        done = await trio.run_process([sys.executable, str(tmp_path / "example.py")], cwd=tmp_path, env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode()
        assert "connection: connected" in out and "stored" in out and "version 1" in out
        assert "QueueProgress(pending=0, completed=3, failed=0, total=3)" in out
        assert h.store.current_seq("demo") == 3


async def _read_until(stream: trio.abc.ReceiveStream, buf: bytearray, needle: bytes) -> None:
    while needle not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise AssertionError(f"stream ended before {needle!r}: {bytes(buf)!r}")
        buf.extend(data)


async def test_cli_import_and_watch(tmp_path: Path) -> None:
    events = [ev(title=f"CLI {i}", startDate=f"2026-04-{i + 1:02d}T09:00:00Z", endDate=f"2026-04-{i + 1:02d}T10:00:00Z")
              for i in range(12)]
    (tmp_path / "events.json").write_text(json.dumps(events))
    env = {**os.environ, "BAROSYNC_TOKEN": token("alice")}
    async with harness(tmp_path) as h:
        url = f"ws://127.0.0.1:{h.app.port}/ws"
        cmd = [sys.executable, "-m", "barosync", "import", str(tmp_path / "events.json"), "--url", url,
               "--project", "p1", "--store", str(tmp_path / "cli-store")]
        first = await trio.run_process(cmd, env=env, capture_stdout=True, capture_stderr=True, check=False)
        assert first.returncode == 0, first.stderr.decode()
        assert "12/12 (100%) imported 12, skipped 0, failed 0" in first.stderr.decode()
        rerun = await trio.run_process(cmd, env=env, capture_stdout=True, capture_stderr=True, check=False)
        assert rerun.returncode == 0 and "imported 0, skipped 12" in rerun.stderr.decode()
        assert h.store.current_seq("p1") == 12

        watch = await trio.lowlevel.open_process(
            [sys.executable, "-m", "barosync", "watch", "--url", url, "--project", "p1"],
            env=env, stdout=-1, stderr=-1)
        out = bytearray()
        try:
            assert watch.stdout is not None
            await _read_until(watch.stdout, out, b"snapshot of p1 at seq 12: 12 events")
            proxy = await h.proxy()
            async with h.client(proxy, "bob") as b:
                await b.subscribe("p1")
                await _read_until(watch.stdout, out, b"* bob (bob) joined p1")
                await b.create("p1", ev(title="Live one"), id="live-1")
                await _read_until(watch.stdout, out, b"+ created live-1 'Live one'")
            await _read_until(watch.stdout, out, b"* bob (bob) left p1")
            watch.send_signal(signal.SIGINT)
            assert await watch.wait() == 0
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
        assert b"state: connected" in out

        refused = await trio.run_process(
            [sys.executable, "-m", "barosync", "watch", "--url", url, "--project", "p1", "--token", "not-a-jwt"],
            capture_stdout=True, capture_stderr=True, check=False)
        assert refused.returncode == 1 and b"no fresh token" in refused.stderr
