"""Limits with safe defaults: rate, subscriptions, connections, origins, slow
handshakes, history retention."""

from __future__ import annotations

import os

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

import barosync.core.session as session_module

from conftest import event_payload, open_client, running, token, ws_url



async def test_flood_gets_rate_limited_then_closed_with_1008(data_dir, monkeypatch):
    monkeypatch.setattr(session_module, "FLOOD_GRACE", 0.5)
    async with running(data_dir, rate_limit=5.0, rate_burst=5) as (app, nursery):
        c = await open_client(nursery, app, token())
        assert c.hello["payload"]["rateLimit"] == {"perSecond": 5.0, "burst": 5}
        unsubscribe = {"projectId": "p1"}
        for _ in range(8):
            await c.send("unsubscribe", unsubscribe)
        answers = [await c.recv() for _ in range(8)]
        assert [a["type"] for a in answers[:5]] == ["ack"] * 5
        limited = [a for a in answers if a["type"] == "error"]
        assert limited and all(a["payload"]["code"] == "rate_limited" and a["payload"]["ref"] for a in limited)
        # Acks and pings are never limited: acks are bounded by what the server
        # sends, and a refused ping would look like a dead connection.
        for _ in range(50):
            await c.send_raw(json.dumps({"type": "ack", "id": "whatever"}))
        await c.send("ping")
        assert (await c.recv())["type"] == "pong"
        await trio.sleep(0.5)  # the bucket refills
        assert (await c.request("unsubscribe", unsubscribe))["type"] == "ack"

        # Keeping it up without a pause closes the connection.
        async def flood() -> None:
            try:
                while True:
                    await c.send("unsubscribe", unsubscribe)
                    await trio.sleep(0.01)
            except ConnectionClosed:
                pass

        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(flood)
                try:
                    while True:
                        await c.ws.get_message()
                except ConnectionClosed as closed:
                    code = closed.reason.code
        assert code == 1008


async def test_a_client_that_backs_off_is_not_closed(data_dir):
    async with running(data_dir, rate_limit=20.0, rate_burst=5) as (app, nursery):
        c = await open_client(nursery, app, token())
        for _ in range(3):
            # A pipelined burst well past the limit, then a pause, again and again.
            for _ in range(30):
                await c.send("unsubscribe", {"projectId": "p1"})
            for _ in range(30):
                assert (await c.recv())["type"] in ("ack", "error")
            await trio.sleep(0.3)
        assert (await c.request("unsubscribe", {"projectId": "p1"}))["type"] == "ack"


async def test_subscriptions_per_connection_are_capped(data_dir):
    async with running(data_dir, max_subscriptions=2) as (app, nursery):
        c = await open_client(nursery, app, token(projects="*"))
        assert (await c.subscribe("a"))["type"] == "ack"
        assert (await c.subscribe("b"))["type"] == "ack"
        refused = await c.subscribe("c")
        assert refused["type"] == "error" and refused["payload"]["code"] == "limit"
        assert (await c.subscribe("a"))["type"] == "ack"  # re-subscribing is not a new one


async def test_connections_per_user_are_capped_at_the_handshake(data_dir):
    async with running(data_dir, max_connections_per_user=2) as (app, nursery):
        for _ in range(2):
            await open_client(nursery, app, token("alice"))
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(ws_url(app, token("alice"))):
                pass
        assert info.value.status_code == 429
        await open_client(nursery, app, token("bob"))


async def test_allowed_origins_refuse_other_browsers(data_dir):
    async with running(data_dir, allowed_origins=("https://cal.example",)) as (app, nursery):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(ws_url(app, token()), extra_headers=[("Origin", "https://evil.example")]):
                pass
        assert info.value.status_code == 403
        async with open_websocket_url(ws_url(app, token()), extra_headers=[("Origin", "https://cal.example")]) as ws:
            assert json.loads(await ws.get_message())["type"] == "hello"
        # Non-browser clients send no Origin and are not affected.
        async with open_websocket_url(ws_url(app, token())) as ws:
            assert json.loads(await ws.get_message())["type"] == "hello"


async def test_handshake_sent_byte_by_byte_is_dropped_after_the_timeout(data_dir):
    async with running(data_dir, handshake_timeout=0.5) as (app, nursery):
        stream = await trio.open_tcp_stream("127.0.0.1", app.port)
        request = f"GET /ws?token={token()} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n".encode()
        closed = False
        with trio.fail_after(10):
            try:
                for byte in request:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            except trio.BrokenResourceError:
                closed = True
            if not closed:
                closed = await stream.receive_some() == b""
        assert closed
        await stream.aclose()


async def test_since_older_than_history_gets_a_snapshot_that_says_so(data_dir):
    async with running(data_dir, history_max_changes=3) as (app, nursery):
        c = await open_client(nursery, app, token())
        for n in range(6):
            await c.create(title=f"e{n}")
        kept = await c.subscribe(since=3)
        assert kept["payload"]["mode"] == "changes" and kept["payload"]["count"] == 3
        other = await open_client(nursery, app, token("bob"))
        pruned = await other.subscribe(since=1)
        assert pruned["payload"] == {"projectId": "p1", "seq": 6, "mode": "snapshot", "reason": "history_pruned",
                                     "writable": True}
        snap = await other.recv_type("sync:snapshot")
        assert len(snap["payload"]["events"]) == 6


@pytest.mark.skipif(os.environ.get("BAROSYNC_TEST_POSTGRES") == "1", reason="LMDB's map: the PostgreSQL log has none")
async def test_writes_past_the_initial_map_size_reach_clients_without_error(data_dir):
    async with running(data_dir, map_size=1024 * 1024) as (app, nursery):
        writer = await open_client(nursery, app, token("w"))
        reader = await open_client(nursery, app, token("r"))
        await reader.subscribe()
        ids = [await writer.send("event:create", event_payload(title=f"t{n}", description="y" * 9_000)) for n in range(200)]
        answers = {}
        while len(answers) < len(ids):
            msg = await writer.recv()
            if msg.get("id") in ids:
                answers[msg["id"]] = msg["type"]
        assert set(answers.values()) == {"ack"}
        seqs = [(await reader.recv_type("event:created"))["seq"] for _ in ids]
        assert seqs == list(range(1, 201))
        assert app.store.map_usage()[1] > 1024 * 1024


async def test_garbage_counts_against_the_rate_limit_too(data_dir):
    async with running(data_dir, rate_limit=5.0, rate_burst=5) as (app, nursery):
        c = await open_client(nursery, app, token())
        for _ in range(8):
            await c.send_raw("{bad")
        codes = [(await c.recv())["payload"]["code"] for _ in range(8)]
        assert codes[:5] == ["bad_json"] * 5 and "rate_limited" in codes[5:]


async def test_a_replay_larger_than_the_outbox_cap_goes_in_pieces(data_dir):
    async with running(data_dir, outbox_bytes=64 * 1024) as (app, nursery):
        c = await open_client(nursery, app, token())
        for n in range(40):
            await c.create(title=f"e{n}", description="z" * 5000)
        other = await open_client(nursery, app, token("bob"))
        answer = await other.subscribe(since=0)
        assert answer["payload"]["mode"] == "changes" and answer["payload"]["count"] == 40
        # 40 changes of ~5 KB are three times the 64 KiB cap: they come in pieces,
        # every one in order, and live changes follow without a gap.
        seqs = [(await other.recv_type("event:created"))["seq"] for _ in range(40)]
        await c.create(title="live")
        seqs.append((await other.recv_type("event:created"))["seq"])
        assert seqs == list(range(1, 42))


def test_out_of_descriptors_the_server_waits_and_accepts_again(tmp_path):
    """accept() failing with EMFILE is logged and retried (server._accept_from), not
    the end of the server: once a descriptor is free, the waiting client is served."""
    import resource
    import socket
    import time

    from attack_helpers import ServerProcess

    server = ServerProcess(tmp_path / "data")
    try:
        before = len(os.listdir(f"/proc/{server.pid}/fd"))
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{server.pid}/fd")) < before + len(held) and time.monotonic() < deadline:
            time.sleep(0.05)  # both accepted
        in_use = len(os.listdir(f"/proc/{server.pid}/fd"))
        assert in_use == before + len(held)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (in_use, in_use))
        waiting = socket.create_connection(("127.0.0.1", server.port))  # the kernel's backlog takes it
        waiting.settimeout(10)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while "accept failed: EMFILE" not in server.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "accept failed: EMFILE" in server.stderr and "ulimit -n" in server.stderr
        for s in held:
            s.close()  # descriptors free again
        answer = waiting.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert server.alive()
        waiting.close()
    finally:
        server.stop()
