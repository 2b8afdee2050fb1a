"""An event's identity is (project, id), in every transport and in storage: the same id
(a CalDAV UID) lives in two projects as two events, no answer says whether an id exists
in a project the user cannot read, and a data directory (or PostgreSQL log) written by
release 0.1.0, where an id was unique on the whole server, is migrated in place at
start, once and crash-safe."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lmdb
import orjson
import pytest
import trio

from barosync.hooks.auth import create_token
from barosync.config import Config
from barosync.storage.ops import check
from barosync.core.app import open_log

from attack_helpers import WS, ServerProcess, event_payload, write_config
from caldav_helpers import Http, app_password, event_ics
from conftest import make_config, running, token

RELEASE_0_1_0 = Path(__file__).parent / "data" / "release-0.1.0.tar.gz"


def lmdb_only(tmp_path: Path) -> None:
    if make_config(tmp_path).cluster_postgres:
        pytest.skip("the LMDB layout")


async def test_the_same_id_in_two_projects_is_two_events(tmp_path: Path) -> None:
    async with running(tmp_path / "data") as (app, _):
        alice = await WS.connect(app.port, token("alice", ["p1", "p2"]))
        for project in ("p1", "p2"):
            answer = await alice.request("event:create", event_payload(project, id="shared", title=f"in {project}"))
            assert answer["type"] == "ack", answer
        # An id in two of the user's projects needs its project to be named.
        answer = await alice.request("event:update", {"id": "shared", "version": 1, "title": "which?"})
        assert answer["type"] == "error" and answer["payload"]["field"] == "projectId", answer
        answer = await alice.request("event:update", {"id": "shared", "projectId": "p2", "version": 1, "title": "p2 only"})
        assert answer["type"] == "ack", answer
        assert [e["title"] for e in (await trio.to_thread.run_sync(app.store.snapshot, "p1"))[1]] == ["in p1"]
        assert [e["title"] for e in (await trio.to_thread.run_sync(app.store.snapshot, "p2"))[1]] == ["p2 only"]
        # Another user creating that id in a project of theirs learns nothing about p1.
        bob = await WS.connect(app.port, token("bob", ["p3"]))
        answer = await bob.request("event:create", event_payload("p3", id="shared"))
        assert answer["type"] == "ack", answer
        # An old client's delete without projectId finds the one project this user has.
        answer = await bob.request("event:delete", {"id": "shared", "version": 1})
        assert answer["type"] == "ack", answer
        status, _, body = await trio.to_thread.run_sync(lambda: Http(app.port)(
            "GET", "/api/events/shared?projectId=p1", Authorization=f"Bearer {token('alice', ['p1', 'p2'])}"))
        assert status == 200 and orjson.loads(body)["title"] == "in p1"
        for ws in (alice, bob):
            await ws.abort()


def test_a_uid_in_two_calendars_and_an_event_moved_between_them(tmp_path: Path) -> None:
    """A UID used to exist once on the whole server: moving an event between calendars
    failed (vdirsyncer then lost it), the same invitation could not sit in two people's
    calendars, and the 409 told whether a UID exists in a calendar one cannot read."""
    server = ServerProcess(tmp_path / "data")
    try:
        alice = Http(server.port, "alice", app_password(server.data_dir, "alice", "team", "home"))
        bob = Http(server.port, "bob", app_password(server.data_dir, "bob", "bobs"))
        invite = event_ics("invite-1", "Offsite")
        assert alice("PUT", "/dav/calendars/alice/team/invite-1.ics", invite)[0] == 201
        assert bob("PUT", "/dav/calendars/bob/bobs/invite-1.ics", invite)[0] == 201  # no 409, no leak
        # Moved: deleted from one calendar, put into the other (what vdirsyncer does).
        assert alice("DELETE", "/dav/calendars/alice/team/invite-1.ics")[0] == 204
        assert alice("PUT", "/dav/calendars/alice/home/invite-1.ics", invite)[0] == 201
        status, _, body = alice("GET", "/dav/calendars/alice/home/invite-1.ics")
        assert status == 200 and b"SUMMARY:Offsite" in body
        assert alice("GET", "/dav/calendars/alice/team/invite-1.ics")[0] == 404
        assert bob("GET", "/dav/calendars/bob/bobs/invite-1.ics")[0] == 200
    finally:
        server.stop()


def release_0_1_0(into: Path) -> Path:
    """The data directory barosync 0.1.0 wrote (tests/data/make_release_0_1_0.py)."""
    with tarfile.open(RELEASE_0_1_0) as archive:
        archive.extractall(into, filter="data")
    return into


def test_a_data_directory_of_release_0_1_0_is_migrated_in_place_at_start(tmp_path: Path) -> None:
    lmdb_only(tmp_path)
    data = release_0_1_0(tmp_path / "data")
    assert check(data) == 1  # schema 1: check says to start the server once
    # Its history is from December 2025: keep it, to see it came along.
    config = write_config(tmp_path / "barosync.toml", storage__history_retention=100 * 365 * 86400)
    server = ServerProcess(data, config=config)
    try:
        assert "migrated the data" in server.stderr
        assert "/#setup=" in server.next_line()  # no account yet: the owner is named in the browser
        # A token of 0.1.0's secret, as the team's own application minted them, still opens.
        tok = create_token((data / "secret").read_text().strip(), user_id="alice", projects=["team", "ops"])
        rest = Http(server.port)
        status, _, body = rest("GET", "/api/projects/team/events", Authorization=f"Bearer {tok}")
        assert status == 200 and [e["title"] for e in orjson.loads(body)["events"]] == ["Daily standup"]
        status, _, body = rest("GET", "/api/projects/ops/events", Authorization=f"Bearer {tok}")
        assert sorted(e["id"] for e in orjson.loads(body)["events"]) == ["retro", "weekly"]

        async def edits() -> None:
            ws = await WS.connect(server.port, tok)
            # History came along: an edit based on version 1 merges with bob's rename.
            answer = await ws.request("event:update", {"id": "standup", "projectId": "team", "version": 1,
                                                      "location": "Room 2"})
            assert answer["type"] == "ack" and answer["payload"]["event"]["title"] == "Daily standup", orjson.dumps(answer)
            assert answer["payload"]["event"]["location"] == "Room 2"
            # The deleted id is still known in its project: brought back, one version on.
            answer = await ws.request("event:create", event_payload("team", id="gone", title="Back", restore=True))
            assert answer["type"] == "ack" and answer["payload"]["event"]["version"] == 3, answer
            # A retry of an envelope 0.1.0 answered still gets its first answer.
            retried = await ws.request("event:create", event_payload("team", id="standup"), id="env-1")
            assert retried["type"] == "ack" and retried["payload"]["seq"] == 1, retried
            await ws.abort()

        trio.run(edits)
    finally:
        server.stop()
    assert check(data) == 0
    second = ServerProcess(data, config=config)  # once: a second start migrates nothing
    try:
        assert "migrated" not in second.stderr
    finally:
        second.stop()


def add_schema_1_events(data: Path, n: int) -> None:
    """Many more events in release 0.1.0's layout (index: id -> project; versions:
    id NUL version), written as it wrote them, so that a migration takes a while."""
    env = lmdb.open(str(data), max_dbs=16, map_size=1 << 30)
    try:
        dbs = {name: env.open_db(name.encode()) for name in ("events", "index", "changelog", "versions", "seqs")}
        with env.begin(write=True) as txn:
            seq = int.from_bytes(txn.get(b"ops", db=dbs["seqs"]), "big")
            for i in range(n):
                seq += 1
                event = {"id": f"bulk-{i}", "projectId": "ops", "title": f"Bulk {i}", "startDate": "2026-12-07T09:00:00Z",
                         "endDate": "2026-12-07T10:00:00Z", "allDay": False, "version": 1, "createdAt": 1, "updatedAt": 1,
                         "createdBy": "bulk", "updatedBy": "bulk", "attendees": []}
                change = {"type": "event:created", "id": f"ops:{seq}", "seq": seq, "projectId": "ops", "version": 1,
                          "userId": "bulk", "timestamp": 1, "payload": event}
                txn.put(b"ops\0" + event["id"].encode(), orjson.dumps(event), db=dbs["events"])
                txn.put(event["id"].encode(), b"ops", db=dbs["index"])
                txn.put(b"ops\0" + seq.to_bytes(8, "big"), orjson.dumps(change), db=dbs["changelog"])
                txn.put(event["id"].encode() + b"\0" + (1).to_bytes(8, "big"), seq.to_bytes(8, "big"), db=dbs["versions"])
            txn.put(b"ops", seq.to_bytes(8, "big"), db=dbs["seqs"])
    finally:
        env.close()


# Opens a data directory (migrating it), saying "opening" first so the kill can be
# timed from the start of the migration rather than from the interpreter's start.
OPEN = "import sys; from barosync.config import Config; from barosync.core.app import open_log; " \
       "c = Config(data_dir=sys.argv[1]); print('opening', flush=True); " \
       "open_log(c).close()"


@pytest.mark.slow
def test_a_migration_killed_with_sigkill_leaves_data_that_migrates_again(tmp_path: Path) -> None:
    """One write transaction: kill -9 at any moment leaves schema 1 whole (migrated at
    the next start) or schema 2 whole, never a mixture; nothing is lost either way."""
    lmdb_only(tmp_path)
    legacy = release_0_1_0(tmp_path / "legacy")
    add_schema_1_events(legacy, 60_000)  # about 0.3 s of migration here
    outcomes = set()
    for n, delay in enumerate((0.02, 0.12, 0.3)):
        data = tmp_path / f"try-{n}"
        shutil.copytree(legacy, data)
        opener = subprocess.Popen([sys.executable, "-c", OPEN, str(data)], stdout=subprocess.PIPE)
        assert opener.stdout is not None and opener.stdout.readline() == b"opening\n"
        time.sleep(delay)
        opener.send_signal(signal.SIGKILL)
        opener.wait(timeout=60)
        opener.stdout.close()
        found = check(data)
        outcomes.add("migrated" if found == 0 else "not yet")
        assert found in (0, 1)  # 1: schema 1 as it was ("start the server once")
        config = Config(data_dir=data)
        store = open_log(config)  # the next start
        try:
            assert len(store.snapshot("ops")[1]) == 60_002 and len(store.snapshot("team")[1]) == 1
            assert store.projects_of("bulk-123") == ["ops"] and store.known("team", "gone")
        finally:
            store.close()
        assert check(data) == 0
    assert "not yet" in outcomes, "no kill landed before the migration committed: give it more events"
