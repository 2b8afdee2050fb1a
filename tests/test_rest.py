"""The REST surface on the same port: same write path, same broadcast, same rules."""

from __future__ import annotations

from typing import Any

import trio

from barosync.core.app import App

from conftest import event_payload, http_exchange, token


async def http(app: App, method: str, path: str, body: Any = None, *, tok: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, content = await http_exchange(app.port, method, path, body, tok=tok, headers=headers)
    return status, content


async def test_rest_create_is_broadcast_like_a_websocket_one(app, client_factory):
    watcher = await client_factory("bob")
    await watcher.subscribe()
    status, body = await http(app, "POST", "/api/events", event_payload(id="r1", title="From REST"), tok=token("alice"))
    assert status == 201
    assert body["event"]["id"] == "r1" and body["event"]["createdBy"] == "alice" and body["seq"] == 1
    created = await watcher.recv_type("event:created")
    assert created["payload"] == body["event"] and created["userId"] == "alice"


async def test_idempotency_key_is_the_envelope_id_rule(app, client_factory):
    headers = {"Idempotency-Key": "offline-42"}
    first = await http(app, "POST", "/api/events", event_payload(), tok=token(), headers=headers)
    again = await http(app, "POST", "/api/events", event_payload(title="retried"), tok=token(), headers=headers)
    assert first == again and first[0] == 201
    assert app.store.current_seq("p1") == 1
    # The same key over the WebSocket is the same change too.
    ws = await client_factory("alice")
    ack = await ws.request("event:create", event_payload(), id="offline-42")
    assert ack["payload"] == first[1]


async def test_get_update_delete_and_list_with_range(app):
    tok = token()
    for n, day in enumerate(["2026-01-05", "2026-01-06", "2026-01-09"]):
        status, _ = await http(app, "POST", "/api/events", event_payload(
            id=f"e{n}", title=f"day {day}", startDate=f"{day}T09:00:00Z", endDate=f"{day}T10:00:00Z"), tok=tok)
        assert status == 201
    status, listed = await http(app, "GET", "/api/projects/p1/events?from=2026-01-06T00:00:00Z&to=2026-01-08T00:00:00Z", tok=tok)
    assert status == 200 and [e["id"] for e in listed["events"]] == ["e1"] and listed["seq"] == 3
    status, every = await http(app, "GET", "/api/projects/p1/events", tok=tok)
    assert [e["id"] for e in every["events"]] == ["e0", "e1", "e2"]
    status, event = await http(app, "GET", "/api/events/e1", tok=tok)
    assert status == 200 and event["version"] == 1
    status, updated = await http(app, "PUT", "/api/events/e1", {"version": 1, "title": "moved"}, tok=tok)
    assert status == 200 and updated["event"]["title"] == "moved" and updated["event"]["version"] == 2
    status, gone = await http(app, "DELETE", "/api/events/e1?version=2", tok=tok)
    assert status == 200 and gone["version"] == 3
    status, _ = await http(app, "GET", "/api/events/e1", tok=tok)
    assert status == 404


async def test_stale_version_answers_409_with_the_conflict(app):
    tok = token()
    await http(app, "POST", "/api/events", event_payload(id="c1", title="base"), tok=tok)
    await http(app, "PUT", "/api/events/c1", {"version": 1, "title": "first"}, tok=tok)
    status, body = await http(app, "PUT", "/api/events/c1", {"version": 1, "title": "second"}, tok=tok)
    assert status == 409
    assert body["error"] == "conflict"
    assert body["conflict"]["remoteVersion"]["title"] == "first" and body["conflict"]["base"]["title"] == "base"


async def test_rest_refusals_are_4xx_with_a_message(app):
    status, body = await http(app, "GET", "/api/projects/p1/events")
    assert status == 401 and "Bearer" in body["message"]
    status, body = await http(app, "GET", "/api/projects/p1/events", tok="garbage")
    assert status == 401
    status, body = await http(app, "GET", "/api/projects/secret/events", tok=token())
    assert status == 403
    status, body = await http(app, "POST", "/api/events", b"{nope", tok=token())
    assert status == 400 and body["error"] == "bad_json"
    status, body = await http(app, "POST", "/api/events", event_payload(endDate="2025-01-01"), tok=token())
    assert status == 400 and body["field"] == "endDate"
    status, body = await http(app, "POST", "/api/events", event_payload("p2"), tok=token())
    assert status == 403
    status, body = await http(app, "PUT", "/api/events/none", {"version": 1}, tok=token())
    assert status == 404
    status, body = await http(app, "PATCH", "/api/events/none", {}, tok=token())
    assert status == 405
    status, body = await http(app, "POST", "/api/events", {"pad": "x" * 70_000}, tok=token())
    assert status == 413
    status, body = await http(app, "GET", "/api/projects/p1/events?from=tomorrow", tok=token())
    assert status == 400 and body["field"] == "from"


async def test_wrong_method_names_the_allowed_ones(app):
    stream = await trio.open_tcp_stream("127.0.0.1", app.port)
    async with stream:
        await stream.send_all(f"PATCH /api/events/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token()}\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some():
            raw += chunk
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b" 405 " in head.split(b"\r\n")[0]
    assert b"allow: get, put, delete" in head
