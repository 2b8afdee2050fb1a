"""Roles: a viewer reads a project and cannot change it, whichever way it asks
(WebSocket, REST, CalDAV); a project without a role named for it is the editor's,
as every token minted before roles (docs/protocol.md, "Roles")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from barosync.domain.models import ALL_PROJECTS, EDITOR, OWNER, VIEWER, Identity, ValidationError, parse_roles
from barosync.hooks.auth import decode_token

from caldav_helpers import Http, cli, event_ics, privileges, responses, start
from conftest import SECRET, event_payload, http_exchange, token

PROPFIND = ('<d:propfind xmlns:d="DAV:"><d:prop><d:displayname/><d:current-user-privilege-set/></d:prop>'
            '</d:propfind>')


def test_a_role_decides_writes_and_any_access_reads() -> None:
    who = Identity(user_id="carol", name="Carol", projects=frozenset({"team", "ops"}),
                   roles=parse_roles({"team": VIEWER, "ops": OWNER}))
    assert [who.role(p) for p in ("team", "ops", "other")] == [VIEWER, OWNER, None]
    assert who.may("subscribe", "team") and not who.may("create", "team") and not who.may("delete", "team")
    assert who.may("update", "ops") and not who.may("subscribe", "other")
    everyone = Identity(user_id="bob", name="Bob", projects=ALL_PROJECTS, roles=parse_roles({"ops": VIEWER}))
    assert everyone.role("anything") == EDITOR and not everyone.may("create", "ops")


def test_roles_that_are_not_roles_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="one of viewer, editor, owner"):
        parse_roles({"team": "admin"})
    with pytest.raises(ValidationError, match="object"):
        parse_roles(["team"])
    assert parse_roles({"team": EDITOR}) == ()  # the default is not stored


def test_a_token_with_a_malformed_roles_claim_is_no_token() -> None:
    assert decode_token(token("carol", ["team"], roles={"team": "viewer"}), SECRET).role("team") == VIEWER
    assert decode_token(token("carol", ["team"], roles={"team": "superuser"}), SECRET) is None
    assert decode_token(token("carol", ["team"], roles="viewer"), SECRET) is None


async def test_a_viewer_subscribes_and_is_told_it_cannot_write(app, client_factory) -> None:
    editor = await client_factory("bob", ["p1"])
    viewer = await client_factory("carol", ["p1"], roles={"p1": "viewer"})
    assert (await editor.subscribe())["payload"]["writable"] is True
    ack = await viewer.subscribe()
    assert ack["payload"]["writable"] is False
    refused = await viewer.create(id="v1")
    assert refused["type"] == "error" and refused["payload"]["code"] == "forbidden"
    assert app.store.current_seq("p1") == 0
    made = await editor.create(id="e1")
    assert made["type"] == "ack"
    seen = await viewer.recv_type("event:created")  # a viewer sees edits live
    assert seen["payload"]["id"] == "e1"


async def test_a_viewer_reads_over_rest_and_cannot_write(app) -> None:
    viewer = token("carol", ["p1"], roles={"p1": "viewer"})
    status, _, made = await http_exchange(app.port, "POST", "/api/events", event_payload(id="e1"), tok=token("bob"))
    assert status == 201
    status, _, listed = await http_exchange(app.port, "GET", "/api/projects/p1/events", tok=viewer)
    assert status == 200 and [e["id"] for e in listed["events"]] == ["e1"]
    for method, path, body in (("POST", "/api/events", event_payload(id="v1")),
                               ("PUT", "/api/events/e1", {"version": 1, "title": "mine now"}),
                               ("DELETE", "/api/events/e1?version=1", None)):
        status, _, answer = await http_exchange(app.port, method, path, body, tok=viewer)
        assert status == 403 and answer["error"] == "forbidden", (method, answer)
    assert app.store.current_seq("p1") == 1


def test_a_viewers_app_password_makes_a_read_only_calendar(tmp_path: Path) -> None:
    srv = start(tmp_path / "data")
    try:
        made = cli(srv.data_dir, "token", "create", "--user", "carol", "--project", "ops", "--viewer", "team",
                   "--app-password")
        assert made.returncode == 0, made.stderr
        password = re.search(r"^password:\s+(\S+)$", made.stdout, re.M).group(1)  # type: ignore[union-attr]
        listed = cli(srv.data_dir, "token", "list")
        assert "ops, team (viewer)" in listed.stdout, listed.stdout
        dav = Http(srv.port, "carol", password)
        status, _, body = dav("PROPFIND", "/dav/calendars/carol/", PROPFIND, Depth="1")
        assert status == 207, body
        found = {href.rstrip("/").rsplit("/", 1)[-1]: privileges(r) for href, r in responses(body).items()}
        assert found["team"] == {"read", "read-free-busy"}
        assert {"read", "write", "write-content", "bind", "unbind"} <= found["ops"]
        status, _, body = dav("PUT", "/dav/calendars/carol/team/v1.ics", event_ics("v1", "Mine"),
                              Content_Type="text/calendar")
        assert status == 403, body
        status, _, _ = dav("PUT", "/dav/calendars/carol/ops/o1.ics", event_ics("o1", "Ours"),
                           Content_Type="text/calendar")
        assert status == 201
    finally:
        srv.stop()
