"""A big project's snapshot: in parts of at most max_message_bytes for clients that ask
(`snapshotParts`), from one consistent read, with the changes committed meanwhile
replayed after it; whole for clients that do not ask."""

from __future__ import annotations

import json
from typing import Any

import trio

from attack_helpers import WS
from conftest import Client, event_payload, one_node, open_client, running, token

DESCRIPTION = "x" * 400


async def _fill(c: Client, project: str, n: int) -> None:
    for start in range(0, n, 50):
        ids = [await c.send("event:create", event_payload(project, title=f"e{i}", description=DESCRIPTION))
               for i in range(start, min(n, start + 50))]
        waiting = set(ids)
        while waiting:
            msg = await c.recv()
            if msg["type"] == "ack":
                waiting.discard(msg["id"])
            assert msg["type"] != "error", msg


async def _subscribe(c: Client, project: str, **extra: Any) -> dict[str, Any]:
    """Its ack (what comes before it is skipped)."""
    ref = await c.send("subscribe", {"projectId": project, **extra})
    while True:
        msg = await c.recv()
        if msg["type"] == "ack" and msg["id"] == ref:
            return msg


@one_node
async def test_a_big_snapshot_comes_in_parts_within_the_message_size(tmp_path) -> None:
    async with running(tmp_path / "data", max_message_bytes=16 * 1024) as (app, nursery):
        writer = await open_client(nursery, app, token("alice", ["big"]))
        await _fill(writer, "big", 300)  # ~150 KB of events
        reader = await open_client(nursery, app, token("bob", ["big"]))
        ack = await _subscribe(reader, "big", snapshotParts=True)
        assert ack["payload"]["mode"] == "snapshot" and ack["payload"]["seq"] == 300
        raw_sizes = []
        parts = []
        while True:
            with trio.fail_after(5):
                text = await reader.ws.get_message()
            msg = json.loads(text)
            if msg["type"] != "sync:snapshot":
                continue
            raw_sizes.append(len(text.encode()))
            parts.append(msg)
            if not msg["payload"]["more"]:
                break
        assert len(parts) > 5
        assert all(size <= 16 * 1024 for size in raw_sizes)
        assert [p["payload"]["part"] for p in parts] == list(range(len(parts)))
        assert {p["payload"]["seq"] for p in parts} == {300}
        assert len({p["id"] for p in parts}) == len(parts)
        events = [e for p in parts for e in p["payload"]["events"]]
        assert len(events) == len({e["id"] for e in events}) == 300
        # Acked by id, each part is settled.
        session = next(s for s in app.sessions if s.identity.user_id == "bob")
        assert {p["id"] for p in parts} <= set(session.unacked)
        for p in parts:
            await reader.send_raw(json.dumps({"type": "ack", "id": p["id"]}))
        await reader.send_raw(json.dumps({"type": "ping"}))
        await reader.recv_type("pong")
        assert not {p["id"] for p in parts} & set(session.unacked)

        # A client that does not ask gets one message, as before.
        plain = await open_client(nursery, app, token("carol", ["big"]))
        await _subscribe(plain, "big")
        whole = await plain.recv_type("sync:snapshot")
        assert "more" not in whole["payload"] and len(whole["payload"]["events"]) == 300


async def test_changes_committed_while_a_snapshot_streams_follow_it_once(tmp_path) -> None:
    async with running(tmp_path / "data", max_message_bytes=4 * 1024, outbox_bytes=64 * 1024,
                       rate_limit=100000.0, rate_burst=100000) as (app, nursery):
        writer = await open_client(nursery, app, token("alice", ["big"]))
        await _fill(writer, "big", 1500)  # ~900 KB: more than a small socket window holds
        # A reader with a 4 KB receive window that reads nothing yet: the stream fills
        # its outbox to the cap and waits for the socket, holding its read transaction.
        reader = await WS.connect(app.port, token("bob", ["big"]), rcvbuf=4096)
        ref = await reader.send("subscribe", {"projectId": "big", "snapshotParts": True})
        session = next(s for s in app.sessions if s.identity.user_id == "bob")
        with trio.fail_after(10):
            while session.outbox_bytes < 60 * 1024:
                await trio.sleep(0.01)
        assert "big" not in session.subscriptions  # still streaming
        for i in range(20):  # committed while the snapshot (as of seq 1500) streams
            assert (await writer.request("event:create", event_payload("big", title=f"late{i}")))["type"] == "ack"
        ack = await reader.recv_until(lambda m: m["type"] == "ack" and m.get("id") == ref)
        assert ack[-1]["payload"]["seq"] == 1500
        state: dict[str, Any] = {}
        seqs = []
        while len(state) < 1520:
            msg = await reader.recv(10)
            if msg["type"] == "sync:snapshot":
                assert msg["payload"]["seq"] == 1500
                for e in msg["payload"]["events"]:
                    assert e["id"] not in state
                    state[e["id"]] = e
            elif msg["type"] == "event:created":
                seqs.append(msg["seq"])
                assert msg["payload"]["id"] not in state
                state[msg["payload"]["id"]] = msg["payload"]
        assert seqs == list(range(1501, 1521))  # after the snapshot's seq, once, in order


async def test_a_client_that_reads_no_part_is_closed_too_slow(tmp_path, monkeypatch) -> None:
    from barosync.core import subscribe as subscribe_module

    monkeypatch.setattr(subscribe_module, "SNAPSHOT_STALL", 0.5)
    async with running(tmp_path / "data", max_message_bytes=4 * 1024, outbox_bytes=64 * 1024,
                       rate_limit=100000.0, rate_burst=100000) as (app, nursery):
        writer = await open_client(nursery, app, token("alice", ["big"]))
        await _fill(writer, "big", 1500)
        reader = await WS.connect(app.port, token("bob", ["big"]), rcvbuf=4096)
        await reader.send("subscribe", {"projectId": "big", "snapshotParts": True})
        session = next(s for s in app.sessions if s.identity.user_id == "bob")
        with trio.fail_after(10):
            while session.close_code is None:
                await trio.sleep(0.05)
        assert session.close_code == 4008 and "big" not in session.subscriptions
        # The others are served as before.
        assert (await writer.request("event:create", event_payload("big")))["type"] == "ack"
