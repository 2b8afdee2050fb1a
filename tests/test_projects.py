"""Projects made, renamed, deleted and restored (storage/projects.py, /auth/projects in
transports/signin.py): a deleted project is closed to everyone at once and comes back
as it was. Real LMDB, a real server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from barosync.config import Config
from barosync.core.app import open_log
from barosync.storage.accounts import AccountError
from barosync.storage.projects import RESTORE_DAYS, Projects, slug

from conftest import IN_CLUSTER, event_payload, http_exchange, running, ws_url
from test_accounts import CSRF, PASSWORD, cookie_of, mint, sign_in

def test_ids_come_from_names_and_never_take_one_in_use(tmp_path: Path) -> None:
    assert slug("Team Offsite 2027") == "team-offsite-2027" and slug("Café ☕") == "cafe" and slug("☕") == "project"
    store = open_log(Config(data_dir=tmp_path / "data"))
    try:
        projects = Projects(store.tables(Projects.TABLES))
        assert projects.create("Launch", by="alice").id == "launch"
        assert projects.create("Launch!", by="bob").id == "launch-2"
        assert projects.create("Ops", by="alice", taken={"ops"}).id == "ops-2"  # "ops" is a token's project
        with pytest.raises(AccountError, match="1 to 100 characters"):
            projects.create("  ", by="alice")
        assert projects.rename("launch", "Launch day").name == "Launch day"
        assert projects.rename("legacy", "Old one").name == "Old one"  # a token's project gets a record
        deleted = projects.delete("launch", now=1_000_000)
        assert deleted.restorable_until() == 1_000_000 + RESTORE_DAYS * 86400
        with pytest.raises(AccountError, match="restore it first"):
            projects.rename("launch", "Renamed while deleted")
        with pytest.raises(AccountError, match="no longer be restored"):
            projects.restore("launch", now=1_000_000 + RESTORE_DAYS * 86400 + 1)
        assert Projects(store.tables(Projects.TABLES)).deleted == {"launch"}  # as a restart reads it
        assert projects.restore("launch", now=1_000_000 + 86400).deleted is None and not projects.deleted
        # Reopened under a new name at any age (a calendar app making it again).
        with pytest.raises(AccountError, match="is not deleted"):
            projects.reopen("launch", "Launch again")
        projects.delete("launch", now=1_000_000)
        reopened = projects.reopen("launch", "Launch again")
        assert (reopened.name, reopened.deleted, projects.deleted) == ("Launch again", None, frozenset())
    finally:
        store.close()


async def test_an_owner_makes_renames_deletes_and_restores_a_project(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name="Alice", password=PASSWORD, projects=["p1"])
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=[])
        _, alice, _ = await sign_in(app.port, "alice")
        _, bob, _ = await sign_in(app.port, "bob")

        async def ask(who: dict[str, str], method: str, path: str, body: Any = None) -> tuple[int, Any]:
            status, _, answer = await http_exchange(app.port, method, path, body,
                                                    headers={**CSRF, "Cookie": cookie_of(who)})
            return status, answer

        status, made = await ask(alice, "POST", "/auth/projects", {"name": "Team Offsite"})
        assert status == 200 and made["project"] == {"id": "team-offsite", "name": "Team Offsite", "role": "owner"}
        assert (await ask(alice, "POST", "/auth/projects", {"name": ""}))[0] == 400
        status, listed = await ask(alice, "GET", "/auth/projects")
        assert listed["projects"] == [{"id": "p1", "name": "p1", "role": "editor", "color": None},
                                      {"id": "team-offsite", "name": "Team Offsite", "role": "owner", "color": None}]
        status, _ = await ask(alice, "POST", "/auth/members/team-offsite", {"user": "bob", "role": "editor"})
        assert status == 200
        assert (await ask(bob, "POST", "/auth/projects/team-offsite", {"name": "Mine now"}))[0] == 403
        assert (await ask(alice, "POST", "/auth/projects/team-offsite", {"name": "Offsite"}))[1]["project"]["name"] == "Offsite"

        # Bob's tab has the project open, with an event in it, when Alice deletes it.
        tok = await mint(app.port, cookie_of(bob))
        async with open_websocket_url(ws_url(app, tok)) as ws:
            await ws.get_message()
            await ws.send_message(json.dumps({"type": "subscribe", "id": "s1", "payload": {"projectId": "team-offsite"}}))
            await ws.send_message(json.dumps({"type": "event:create", "id": "c1",
                                              "payload": event_payload("team-offsite", id="e1", title="Flights")}))
            with trio.fail_after(5):
                while '"c1"' not in await ws.get_message():
                    pass
            status, _ = await ask(alice, "DELETE", "/auth/projects/team-offsite")
            assert status == 200
            with trio.fail_after(1.5):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
            assert closed.value.reason.code == 4001
        tok = await mint(app.port, cookie_of(bob))
        assert (await http_exchange(app.port, "GET", "/api/projects/team-offsite/events", tok=tok))[0] == 403
        async with open_websocket_url(ws_url(app, tok)) as ws:
            await ws.get_message()
            await ws.send_message(json.dumps({"type": "subscribe", "id": "s2", "payload": {"projectId": "team-offsite"}}))
            with trio.fail_after(5):
                try:
                    while '"forbidden"' not in (answer := await ws.get_message()):
                        pass
                    assert '"s2"' in answer
                except ConnectionClosed as e:
                    # The other node of a cluster reads deletions in its sweep (every
                    # 0.5 s): within that, the subscribe passes and the sweep closes it.
                    assert IN_CLUSTER and e.reason.code == 4001 and "deleted" in e.reason.reason, e.reason
        assert "team-offsite" not in {p["id"] for p in (await ask(bob, "GET", "/auth/projects"))[1]["projects"]}
        assert (await ask(bob, "GET", "/auth/projects"))[1]["deleted"] == []  # an editor restores nothing
        assert (await ask(bob, "POST", "/auth/projects/team-offsite/restore"))[0] == 403
        listed = (await ask(alice, "GET", "/auth/projects"))[1]
        assert [(d["id"], d["name"]) for d in listed["deleted"]] == [("team-offsite", "Offsite")]
        assert (await ask(alice, "POST", "/auth/projects/team-offsite/restore"))[0] == 200
        status, _, events = await http_exchange(app.port, "GET", "/api/projects/team-offsite/events",
                                                tok=await mint(app.port, cookie_of(bob)))
        assert status == 200 and [e["title"] for e in events["events"]] == ["Flights"]  # as it was
        assert (await ask(alice, "PUT", "/auth/projects/team-offsite"))[0] == 405
        assert (await ask(alice, "POST", "/auth/projects/team-offsite/archive"))[0] == 404
