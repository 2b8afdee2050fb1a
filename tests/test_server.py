"""The WebSocket surface end to end: real server, real sockets, real LMDB."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from barosync.core import admin
from barosync.hooks.auth import create_token
from barosync.core.app import App

from conftest import Client, event_payload, http_exchange, new_id, one_node, open_client, running, token, ws_url




async def rejected_status(url: str, headers: list[tuple[str, str]] | None = None) -> int:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=headers):
            pass
    return info.value.status_code


# -- handshake ------------------------------------------------------------------------


async def test_handshake_refuses_missing_bad_and_expired_tokens(app):
    assert await rejected_status(ws_url(app)) == 401
    assert await rejected_status(ws_url(app, "not-a-jwt")) == 401
    forged = create_token("another-secret-entirely-0123456789-abcdef", user_id="alice", projects=["p1"])
    assert await rejected_status(ws_url(app, forged)) == 401
    expired = create_token("test-secret-that-is-long-enough-for-hs256-0123456789", user_id="alice", projects=["p1"], ttl=1, now=time.time() - 3600)
    assert await rejected_status(ws_url(app, expired)) == 401


async def test_handshake_accepts_bearer_header(app):
    async with open_websocket_url(ws_url(app), extra_headers=[("Authorization", f"Bearer {token('bob')}")]) as ws:
        hello = json.loads(await ws.get_message())
    assert hello["type"] == "hello"
    assert hello["payload"]["user"]["id"] == "bob"


async def test_handshake_accepts_the_token_as_a_subprotocol_and_picks_barosync_v1(app):
    # What the browser client does, so that no token is in a URL a proxy or console logs.
    async with open_websocket_url(ws_url(app), subprotocols=["barosync.v1", f"barosync.bearer.{token('bob')}"]) as ws:
        hello = json.loads(await ws.get_message())
        assert ws.subprotocol == "barosync.v1"
    assert hello["type"] == "hello" and hello["payload"]["user"]["id"] == "bob"
    with pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(ws_url(app), subprotocols=["barosync.v1", "barosync.bearer.not-a-jwt"]):
            pass
    assert refused.value.status_code == 401


async def test_hello_describes_session_and_limits(client_factory):
    c = await client_factory("alice", name="Alice A.")
    hello = c.hello
    assert hello["type"] == "hello" and hello["id"]
    p = hello["payload"]
    assert p["sessionId"] and p["protocol"] == 1
    assert p["user"] == {"id": "alice", "name": "Alice A.", "avatar": None, "color": None}
    assert p["heartbeat"] == {"interval": 30000, "timeout": 60000}
    assert p["maxMessageBytes"] == 65536
    assert p["tokenExpiresAt"] > time.time() * 1000


async def test_subscribe_to_project_outside_token_is_forbidden(client_factory):
    c = await client_factory("alice", projects=["p1"])
    answer = await c.subscribe("p2")
    assert answer["type"] == "error"
    assert answer["payload"]["code"] == "forbidden"
    create = await c.create("p2")
    assert create["payload"]["code"] == "forbidden"
    assert (await c.subscribe("p1"))["type"] == "ack"


async def test_all_projects_token(client_factory):
    c = await client_factory("root", projects="*")
    assert (await c.subscribe("anything"))["type"] == "ack"


# -- the seed browser client's shapes ---------------------------------------------------


async def test_ping_without_id_or_payload_gets_pong_echoing_timestamp(client_factory):
    c = await client_factory()
    await c.send_raw(json.dumps({"type": "ping", "timestamp": 1764144000123}))
    pong = await c.recv()
    assert pong["type"] == "pong"
    assert pong["timestamp"] == 1764144000123


async def test_acks_without_payload_or_id_are_accepted_and_tracked(app, client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await b.subscribe()
    await a.subscribe()
    await a.create()
    created = await b.recv_type("event:created")
    session = next(s for s in app.sessions if s.identity.user_id == "bob")
    assert created["id"] in session.unacked
    await b.send_raw(json.dumps({"type": "ack", "id": created["id"], "timestamp": 1}))
    await b.send_raw(json.dumps({"type": "ack", "timestamp": 1}))  # no id: ignored
    await b.send_raw(json.dumps({"type": "ping"}))
    assert (await b.recv())["type"] == "pong"  # both acks were read and answered nothing
    assert created["id"] not in session.unacked


async def test_cumulative_ack_settles_that_projects_changes_up_to_its_seq(app, client_factory):
    a = await client_factory("alice", projects=["p1", "p2"])
    b = await client_factory("bob", projects=["p1", "p2"])
    assert b.hello["payload"]["cumulativeAcks"] is True
    assert b.hello["payload"]["ackIntervalMs"] == 250  # [server] ack_interval's default
    await b.subscribe("p1")
    await b.subscribe("p2")
    await a.subscribe("p1")
    await a.subscribe("p2")
    for project in ("p1", "p1", "p1", "p2"):
        await a.create(project)
    got = [await b.recv_type("event:created") for _ in range(4)]
    session = next(s for s in app.sessions if s.identity.user_id == "bob")
    assert set(session.unacked) >= {"p1:1", "p1:2", "p1:3", "p2:1"}
    await b.send_raw(json.dumps({"type": "ack", "payload": {"projectId": "p1", "seq": 2}}))
    await b.send_raw(json.dumps({"type": "ping"}))
    assert (await b.recv())["type"] == "pong"
    assert {m for m in session.unacked if ":" in m} == {"p1:3", "p2:1"}  # exact: p1 up to 2, nothing else
    progress = admin._progress(session, "p1", app.store.current_seq("p1"))
    assert progress["acked"] == 2 and progress["behind"] == 1
    # A cumulative ack and an ack by id in one breath, then one past the head
    await b.send_raw(json.dumps({"type": "ack", "id": got[3]["id"]}))
    await b.send_raw(json.dumps({"type": "ack", "payload": {"projectId": "p1", "seq": 99}}))
    await b.send_raw(json.dumps({"type": "ping"}))
    assert (await b.recv())["type"] == "pong"
    assert not [m for m in session.unacked if ":" in m]


@pytest.mark.parametrize("payload, field", [
    ({"projectId": "p1"}, "seq"),
    ({"projectId": "p1", "seq": -1}, "seq"),
    ({"projectId": "p1", "seq": "3"}, "seq"),
    ({"seq": 3}, "projectId"),
    ({"projectId": 7, "seq": 3}, "projectId"),
])
async def test_malformed_cumulative_ack_gets_an_error_and_the_connection_stays(client_factory, payload, field):
    c = await client_factory()
    await c.send_raw(json.dumps({"type": "ack", "id": "a-1", "payload": payload}))
    err = await c.recv()
    assert err["type"] == "error"
    assert err["payload"]["code"] == "invalid" and err["payload"]["field"] == field
    assert err["payload"]["ref"] == "a-1"
    assert (await c.subscribe("p1"))["type"] == "ack"


async def test_client_sent_user_id_is_ignored(client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await a.subscribe()
    await b.subscribe()
    ack = await a.request("event:create", event_payload(), userId="mallory")
    assert ack["payload"]["event"]["createdBy"] == "alice"
    created = await b.recv_type("event:created")
    assert created["userId"] == "alice"


# -- changes ----------------------------------------------------------------------------


async def test_create_acks_stored_event_and_fans_out_with_seq(client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await a.subscribe()
    await b.subscribe()
    ack = await a.create(title="Planning", attendees=["alice", "bob", "alice"])
    event = ack["payload"]["event"]
    assert ack["payload"]["seq"] == 1
    assert event["version"] == 1 and event["createdBy"] == "alice" and event["projectId"] == "p1"
    assert event["attendees"] == ["alice", "bob"]
    created = await b.recv_type("event:created")
    assert created["seq"] == 1 and created["projectId"] == "p1"
    assert created["payload"] == event
    assert created["version"] == 1


async def test_update_and_delete(client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await a.subscribe()
    await b.subscribe()
    event = (await a.create(id="ev-1"))["payload"]["event"]
    upd = await b.request("event:update", {"id": "ev-1", "version": event["version"], "title": "Moved", "location": "Room 2"})
    assert upd["type"] == "ack"
    assert upd["payload"]["event"]["version"] == 2
    assert upd["payload"]["event"]["title"] == "Moved"
    assert upd["payload"]["event"]["updatedBy"] == "bob"
    assert upd["payload"]["event"]["createdBy"] == "alice"
    updated = await a.recv_type("event:updated")
    assert updated["seq"] == 2 and updated["payload"]["location"] == "Room 2"
    gone = await a.request("event:delete", {"id": "ev-1", "version": 2})
    assert gone["type"] == "ack"
    assert gone["payload"] == {"id": "ev-1", "projectId": "p1", "version": 3, "seq": 3}
    deleted = await b.recv_type("event:deleted")
    assert deleted["payload"] == {"id": "ev-1", "projectId": "p1", "version": 3}
    # Editing what someone deleted is a conflict; under the default strategy the
    # deletion stands and the sender is told so.
    again = await a.request("event:update", {"id": "ev-1", "version": 2, "title": "x"})
    assert again["type"] == "conflict:detected"
    assert again["payload"]["remoteVersion"] is None and again["payload"]["resolved"] is None
    gone_again = await a.request("event:delete", {"id": "ev-1"})
    assert gone_again["type"] == "error" and gone_again["payload"]["code"] == "not_found"


async def test_stale_version_is_a_conflict_and_stores_nothing(app, client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await a.subscribe()
    await b.subscribe()
    await a.create(id="ev-c", title="Base")
    await a.request("event:update", {"id": "ev-c", "version": 1, "title": "Alice's"})
    conflict = await b.request("event:update", {"id": "ev-c", "version": 1, "title": "Bob's"})
    assert conflict["type"] == "conflict:detected"
    p = conflict["payload"]
    assert p["strategy"] == "merge"  # the default; both changed the title: a person decides
    assert "resolved" not in p
    assert p["base"]["title"] == "Base" and p["base"]["version"] == 1
    assert p["remoteVersion"]["title"] == "Alice's" and p["remoteVersion"]["version"] == 2
    assert p["localVersion"]["title"] == "Bob's"
    assert p["fields"] == ["title"]
    assert app.store.get_event("p1", "ev-c")["title"] == "Alice's"
    assert app.store.current_seq("p1") == 2


async def test_event_ids_are_never_reused(client_factory):
    a = await client_factory()
    await a.subscribe()
    await a.create(id="dup")
    again = await a.create(id="dup")
    assert again["type"] == "error" and again["payload"]["code"] == "exists"


async def test_three_concurrent_writers_seq_strictly_increasing_without_gaps(app, nursery):
    per_writer = 40
    watchers = [await open_client(nursery, app, token(f"w{i}")) for i in range(3)]
    writers = [await open_client(nursery, app, token(f"u{i}")) for i in range(3)]
    for c in watchers + writers:
        await c.subscribe()

    total = per_writer * len(writers)
    # A writer sees its own changes as acks and the others' as broadcasts: together,
    # every seq once, in order.
    writer_seqs: dict[Client, list[int]] = {c: [] for c in writers}

    async def write(c: Client) -> None:
        ids = [await c.send("event:create", event_payload(title=f"t{n}")) for n in range(per_writer)]
        while len(writer_seqs[c]) < total:
            msg = await c.recv()
            if msg["type"] == "ack" and msg["id"] in ids:
                writer_seqs[c].append(msg["payload"]["seq"])
            elif msg["type"] == "event:created":
                writer_seqs[c].append(msg["seq"])

    async with trio.open_nursery() as n:
        for c in writers:
            n.start_soon(write, c)
    for seqs in writer_seqs.values():
        assert seqs == list(range(1, total + 1))
    for w in watchers:
        seqs = [(await w.recv_type("event:created"))["seq"] for _ in range(total)]
        assert seqs == list(range(1, total + 1))


# -- idempotency, resume, snapshot --------------------------------------------------------


async def test_retried_envelope_id_applies_once_and_answers_the_same(app, client_factory):
    a = await client_factory()
    await a.subscribe()
    env_id = new_id()
    first = await a.request("event:create", event_payload(), id=env_id)
    second = await a.request("event:create", event_payload(title="changed on retry"), id=env_id)
    assert first["payload"] == second["payload"]
    assert app.store.current_seq("p1") == 1
    assert len(app.store.snapshot("p1")[1]) == 1


async def test_same_envelope_id_from_another_user_is_not_their_answer(client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    env_id = new_id()
    first = await a.request("event:create", event_payload(), id=env_id)
    second = await b.request("event:create", event_payload(), id=env_id)
    assert second["payload"]["event"]["id"] != first["payload"]["event"]["id"]


async def test_retry_after_restart_answers_the_original(data_dir):
    env_id = new_id()
    async with running(data_dir) as (app, nursery):
        c = await open_client(nursery, app, token())
        first = await c.request("event:create", event_payload(), id=env_id)
    async with running(data_dir) as (app, nursery):
        c = await open_client(nursery, app, token())
        second = await c.request("event:create", event_payload(), id=env_id)
        assert second["payload"] == first["payload"]
        assert app.store.current_seq("p1") == 1


async def test_resume_with_since_across_restart_gets_exactly_the_missed_changes(data_dir):
    async with running(data_dir) as (app, nursery):
        c = await open_client(nursery, app, token())
        await c.subscribe()
        for n in range(5):
            await c.create(title=f"e{n}")
    async with running(data_dir) as (app, nursery):
        c = await open_client(nursery, app, token())
        answer = await c.subscribe(since=2)
        assert answer["payload"] == {"projectId": "p1", "seq": 5, "mode": "changes", "count": 3, "writable": True}
        missed = [await c.recv() for _ in range(3)]
        assert [m["seq"] for m in missed] == [3, 4, 5]
        assert [m["payload"]["title"] for m in missed] == ["e2", "e3", "e4"]
        # live changes continue the sequence
        other = await open_client(nursery, app, token("bob"))
        await other.create(title="live")
        assert (await c.recv_type("event:created"))["seq"] == 6


async def test_subscribe_without_since_gets_snapshot_then_live(client_factory):
    a = await client_factory("alice")
    for n in range(3):
        await a.create(id=f"s{n}", title=f"e{n}")
    await a.request("event:delete", {"id": "s1"})
    b = await client_factory("bob")
    answer = await b.subscribe()
    assert answer["payload"]["mode"] == "snapshot"
    snap = await b.recv_type("sync:snapshot")
    assert snap["payload"]["seq"] == 4
    assert sorted(e["id"] for e in snap["payload"]["events"]) == ["s0", "s2"]
    await a.create(title="after")
    assert (await b.recv_type("event:created"))["seq"] == 5


async def test_since_ahead_of_server_gets_snapshot(client_factory):
    a = await client_factory()
    answer = await a.subscribe(since=99)
    assert answer["payload"]["mode"] == "snapshot"
    assert (await a.recv_type("sync:snapshot"))["payload"]["seq"] == 0


async def test_subscribe_racing_a_commit_sees_every_seq_once(app, nursery):
    writer = await open_client(nursery, app, token("writer"))
    total = 60

    async def write() -> None:
        for n in range(total):
            await writer.send("event:create", event_payload(title=f"r{n}"))

    nursery.start_soon(write)
    readers = []
    for i in range(6):
        c = await open_client(nursery, app, token(f"r{i}"))
        answer = await c.subscribe(since=0)
        readers.append((c, answer["payload"]["seq"]))
        await trio.sleep(0.005)
    for c, _ in readers:
        seqs = []
        while len(seqs) < total:
            msg = await c.recv()
            if msg.get("seq"):
                seqs.append(msg["seq"])
        assert seqs == list(range(1, total + 1))


# -- bad input ------------------------------------------------------------------------------


async def test_bad_input_gets_error_and_connection_stays_usable(client_factory):
    c = await client_factory()
    await c.send_raw("{not json")
    assert (await c.recv())["payload"]["code"] == "bad_json"
    await c.send_raw(json.dumps({"type": "event:teleport", "id": "x1"}))
    err = await c.recv()
    assert err["payload"] == {"code": "unknown_type", "message": err["payload"]["message"], "ref": "x1", "field": "type"}
    await c.send_raw(json.dumps({"type": "event:create", "payload": event_payload()}))
    assert (await c.recv())["payload"]["field"] == "id"
    bad = await c.request("event:create", event_payload(endDate="2026-01-05T08:00:00Z"))
    assert bad["type"] == "error"
    assert bad["payload"]["code"] == "invalid" and bad["payload"]["field"] == "endDate"
    bad = await c.request("event:create", event_payload(title=""))
    assert bad["payload"]["field"] == "title"
    bad = await c.request("event:update", {"id": "nope", "version": 1})
    assert bad["payload"]["code"] == "not_found"
    await c.send_raw(b"\x00binary")
    assert (await c.recv())["payload"]["code"] == "bad_envelope"
    assert (await c.create())["type"] == "ack"


async def test_frame_over_limit_closes_with_1009(client_factory):
    c = await client_factory()
    await c.send_raw(json.dumps({"type": "ping", "pad": "x" * 70_000}))
    with pytest.raises(ConnectionClosed) as info:
        with trio.fail_after(5):
            while True:
                await c.ws.get_message()
    assert info.value.reason.code == 1009


async def test_silent_client_is_closed_after_heartbeat_timeout(data_dir):
    async with running(data_dir, heartbeat_interval=0.1, heartbeat_timeout=0.3) as (app, nursery):
        c = await open_client(nursery, app, token())
        with pytest.raises(ConnectionClosed) as info:
            with trio.fail_after(5):
                while True:
                    await c.ws.get_message()
        assert info.value.reason.code == 4000


async def test_token_expiry_closes_with_4001_unless_refreshed(data_dir):
    async with running(data_dir) as (app, nursery):
        short = create_token("test-secret-that-is-long-enough-for-hs256-0123456789", user_id="alice", projects=["p1"], ttl=2)
        refreshed = await open_client(nursery, app, short)
        expiring = await open_client(nursery, app, short)
        ack = await refreshed.request("auth:refresh", {"token": token("alice")})
        assert ack["type"] == "ack"
        with pytest.raises(ConnectionClosed) as info:
            with trio.fail_after(8):
                while True:
                    await expiring.ws.get_message()
        assert info.value.reason.code == 4001
        await refreshed.send("ping")
        assert (await refreshed.recv_type("pong"))["type"] == "pong"


async def test_refresh_with_another_users_token_is_refused(client_factory):
    c = await client_factory("alice")
    err = await c.request("auth:refresh", {"token": token("mallory")})
    assert err["type"] == "error" and err["payload"]["code"] == "forbidden"
    with pytest.raises(ConnectionClosed) as info:
        with trio.fail_after(5):
            while True:
                await c.ws.get_message()
    assert info.value.reason.code == 4001


# -- HTTP on the same port ------------------------------------------------------------------


async def http_get(app: App, path: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    stream = await trio.open_tcp_stream("127.0.0.1", app.port)
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


async def test_healthz_and_unknown_paths(app):
    status, body = await http_get(app, "/healthz")
    assert status == 200 and body["status"] == "ok"
    status, body = await http_get(app, "/nope")
    assert status == 404 and "/ws" in body["message"]
    status, body = await http_get(app, "/healthz", "POST")
    assert status == 405
    status, body = await http_get(app, "/ws")
    assert status == 426


@one_node
async def test_metrics_in_prometheus_text_format(app, client_factory):
    a = await client_factory("alice")
    b = await client_factory("bob")
    await b.subscribe()
    await a.create()
    await b.recv_type("event:created")
    stream = await trio.open_tcp_stream("127.0.0.1", app.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"text/plain" in head
    lines = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    assert float(lines["barosync_connections"]) == 2
    assert float(lines["barosync_deliveries_total"]) == 1
    assert float(lines["barosync_mutations_total"]) == 1
    assert float(lines["barosync_rooms"]) == 1


async def test_ids_too_long_in_utf8_bytes_are_refused_and_nothing_is_stored(app, client_factory):
    c = await client_factory(projects="*")
    answer = await c.create("\U0001F600" * 120)  # 120 characters, 480 bytes
    assert answer["type"] == "error" and answer["payload"]["field"] == "projectId"
    assert (await c.create("ok"))["payload"]["seq"] == 1


async def test_a_closed_connection_is_freed_without_waiting_for_the_cycle_collector(app, client_factory):
    """Each connection's protocol object must not outlive it in a reference cycle:
    with thousands of reconnects those piled up until a rare full collection."""
    import gc
    import weakref

    from websockets.protocol import Protocol

    client = await client_factory()
    await client.subscribe()
    [session] = app.sessions
    protocol_ref = weakref.ref(session.transport._ws)
    assert isinstance(protocol_ref(), Protocol)
    del session
    gc.disable()
    try:
        await client.ws.aclose()
        with trio.fail_after(5):
            while app.sessions:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert protocol_ref() is None
    finally:
        gc.enable()


async def test_head_answers_with_the_get_headers_and_no_body(app) -> None:
    """HEAD of the web app, /healthz and a static file: the GET's length and
    no body (h11 refused a body here, and the connection used to drop unanswered)."""
    for path in ("/", "/healthz", "/app/app.js"):
        status, headers, body = await http_exchange(app.port, "GET", path)
        assert status == 200, path
        status, head_headers, head_body = await http_exchange(app.port, "HEAD", path)
        assert status == 200 and head_body in (b"", None), path
        if path != "/healthz":  # its uptime changes the length
            assert head_headers["content-length"] == headers["content-length"] == str(len(body)), path
