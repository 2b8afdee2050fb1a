"""Presence per user across tabs, and throttled, coalesced, volatile cursors."""

from __future__ import annotations

import json
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from barosync.engine.hub import user_color

from conftest import Client, open_client, running, token



class RawClient:
    """A WebSocket client on a bare trio stream, so a test can stop reading or drop
    the TCP connection without a close frame."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[dict[str, Any]] = []
        self._parts: list[str] = []
        self._sending = trio.Lock()  # a test's ping task sends beside its body

    @classmethod
    async def connect(cls, port: int, tok: str) -> "RawClient":
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target=f"/ws?token={tok}")))
        client = cls(stream, ws)
        with trio.fail_after(5):
            while not any(isinstance(e, AcceptConnection) for e in client._feed(await stream.receive_some())):
                pass
        return client

    def _feed(self, data: bytes) -> list[Any]:
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for e in events:
            if isinstance(e, TextMessage):
                self._parts.append(e.data)
                if e.message_finished:
                    self.pending.append(json.loads("".join(self._parts)))
                    self._parts.clear()
        return events

    async def send(self, type: str, payload: dict[str, Any], id: str | None = None) -> None:
        body: dict[str, Any] = {"type": type, "payload": payload}
        if id:
            body["id"] = id
        async with self._sending:
            await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(body))))

    async def read_until(self, predicate, timeout: float = 5) -> list[dict[str, Any]]:
        """Everything received up to and including the first message matching predicate."""
        with trio.fail_after(timeout):
            while True:
                for i, msg in enumerate(self.pending):
                    if predicate(msg):
                        out, self.pending = self.pending[: i + 1], self.pending[i + 1 :]
                        return out
                self._feed(await self.stream.receive_some())

    async def abort(self) -> None:
        # No close frame: the server only sees the TCP connection go.
        await trio.aclose_forcefully(self.stream)


def joined(msg: dict[str, Any], user: str, project: str = "p1") -> bool:
    return msg["type"] == "user:joined" and msg["payload"]["id"] == user and msg["payload"]["projectId"] == project


def left(msg: dict[str, Any], user: str) -> bool:
    return msg["type"] == "user:left" and msg["payload"]["id"] == user


async def drain(c: Client, quiet: float = 0.2) -> list[dict[str, Any]]:
    out = []
    while True:
        with trio.move_on_after(quiet) as scope:
            out.append(await c.recv())
        if scope.cancelled_caught:
            return out


async def test_two_tabs_are_one_presence(app, nursery):
    bob = await open_client(nursery, app, token("bob"))
    await bob.subscribe()
    tab1 = await RawClient.connect(app.port, token("alice", name="Alice"))
    await tab1.send("subscribe", {"projectId": "p1"}, id="s1")
    msg = await bob.recv_type("user:joined")
    assert msg["payload"]["id"] == "alice" and msg["payload"]["name"] == "Alice"
    assert msg["payload"]["color"] == user_color("alice")
    assert msg["payload"]["lastSeen"] > 0
    tab2 = await RawClient.connect(app.port, token("alice", name="Alice"))
    await tab2.send("subscribe", {"projectId": "p1"}, id="s2")
    await tab2.read_until(lambda m: m["type"] == "ack")
    await tab1.abort()  # one tab reloads: no flapping
    assert not [m for m in await drain(bob) if m["type"].startswith("user:")]
    await tab2.abort()
    assert left(await bob.recv_type("user:left"), "alice")


async def test_newcomer_is_told_who_is_there(app, nursery):
    for user in ("alice", "bob"):
        c = await open_client(nursery, app, token(user, color="#123456" if user == "bob" else None))
        await c.subscribe()
    carol = await open_client(nursery, app, token("carol"))
    await carol.subscribe()
    present = {}
    for _ in range(2):
        m = await carol.recv_type("user:joined")
        present[m["payload"]["id"]] = m["payload"]
    assert set(present) == {"alice", "bob"}
    assert present["bob"]["color"] == "#123456"
    assert present["alice"]["color"] == user_color("alice")


async def test_presence_is_per_project(app, nursery):
    alice = await open_client(nursery, app, token("alice", projects=["p1", "p2"]))
    bob = await open_client(nursery, app, token("bob", projects=["p1", "p2"]))
    await bob.subscribe("p1")
    await alice.subscribe("p1")
    await alice.subscribe("p2")
    assert joined(await bob.recv_type("user:joined"), "alice", "p1")
    await alice.request("unsubscribe", {"projectId": "p2"})
    assert not [m for m in await drain(bob) if m["type"].startswith("user:")]
    await alice.request("unsubscribe", {"projectId": "p1"})
    m = await bob.recv_type("user:left")
    assert m["payload"] == {"id": "alice", "projectId": "p1"}


async def test_crash_and_heartbeat_timeout_cause_user_left(data_dir):
    async with running(data_dir, heartbeat_interval=0.2, heartbeat_timeout=0.5) as (app, nursery):
        watcher = await RawClient.connect(app.port, token("watcher"))

        async def keep_alive() -> None:
            while True:
                await watcher.send("ping", {})
                await trio.sleep(0.1)

        # The watcher answers no heartbeat, so it pings from the start: on two nodes a
        # user:left can take longer than the 0.5 s timeout that would close the watcher
        # too. The pings stop (their task ended) before the socket is closed under them.
        async with trio.open_nursery() as pings:
            pings.start_soon(keep_alive)
            await watcher.send("subscribe", {"projectId": "p1"}, id="w")
            crasher = await RawClient.connect(app.port, token("crasher"))
            await crasher.send("subscribe", {"projectId": "p1"}, id="c")
            silent = await RawClient.connect(app.port, token("silent"))
            await silent.send("subscribe", {"projectId": "p1"}, id="s")
            await watcher.read_until(lambda m: joined(m, "silent"))
            await crasher.abort()
            await watcher.read_until(lambda m: left(m, "crasher"))
            await watcher.read_until(lambda m: left(m, "silent"))
            pings.cancel_scope.cancel()
        await watcher.abort()


async def test_cursor_flood_is_throttled_and_last_position_wins(app, nursery):
    alice = await open_client(nursery, app, token("alice"))
    bob = await open_client(nursery, app, token("bob"))
    await alice.subscribe()
    await bob.subscribe()
    await bob.recv_type("user:joined")
    started = trio.current_time()
    for i in range(500):
        await alice.send_raw(json.dumps({"type": "user:cursor", "payload": {"x": i, "y": i * 2, "elementId": "cal"}}))
    sending = trio.current_time() - started
    cursors = [m for m in await drain(bob, quiet=0.5) if m["type"] == "user:cursor"]
    # The throttle's budget over the time the flood took (burst 2 + 20/s, a tick of
    # slack), plus the last position: far fewer than the 500 sent, however slow the
    # machine is today.
    assert 1 <= len(cursors) <= 2 + 20 * (sending + 0.05) + 1 < 500
    last = cursors[-1]["payload"]
    assert (last["x"], last["y"], last["userId"], last["elementId"]) == (499, 998, "alice", "cal")
    assert "id" not in cursors[-1]  # volatile: never acked


async def test_slow_reader_holds_one_cursor_per_user_and_changes_still_arrive(app, nursery):
    alice = await open_client(nursery, app, token("alice"))
    await alice.subscribe()
    slow = await RawClient.connect(app.port, token("slow"))
    await slow.send("subscribe", {"projectId": "p1"}, id="s")
    # Subscribed before the first change: on two nodes the join happens after the
    # subscribe's read, and a change committed before it would be in the snapshot.
    await slow.read_until(lambda m: m["type"] == "ack" and m.get("id") == "s", timeout=10)
    session = next(s for s in app.sessions if s.identity.user_id == "slow")
    # Fill the slow reader's socket until the server has to queue for it.
    n = 0
    while session.out.idle:
        await alice.create(description="x" * 8000)
        n += 1
    for i in range(5):
        await alice.send_raw(json.dumps({"type": "user:cursor", "payload": {"x": i, "y": 0}}))
        await trio.sleep(0.06)  # beyond the throttle: each one is fanned out
    assert session.out.cursors_waiting == 1
    # The cursor overtakes what waits in the server's outbox, not what the kernel
    # already holds, so read until both the last change and the cursor are in.
    got: list[dict[str, Any]] = []
    seen = lambda t: any(m["type"] == t for m in got)  # noqa: E731
    while not (seen("user:cursor") and any(m.get("seq") == n for m in got)):
        got += await slow.read_until(lambda m: m["type"] == "user:cursor" or m.get("seq") == n, timeout=10)
    got += [m for m in slow.pending]
    cursors = [m for m in got if m["type"] == "user:cursor"]
    assert len(cursors) == 1 and cursors[0]["payload"]["x"] == 4
    assert [m["seq"] for m in got if m["type"] == "event:created"] == list(range(1, n + 1))


async def test_cursor_needs_a_subscribed_project(client_factory):
    c = await client_factory("alice", projects=["p1", "p2"])
    err = await c.request("user:cursor", {"x": 1, "y": 2})
    assert err["payload"]["field"] == "projectId"
    err = await c.request("user:cursor", {"projectId": "p2", "x": 1, "y": 2})
    assert err["payload"]["code"] == "not_subscribed"
    await c.subscribe("p1")
    err = await c.request("user:cursor", {"x": "left", "y": 2})
    assert err["payload"]["field"] == "x"
