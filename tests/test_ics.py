"""ICS: the read-only feed (parsed back by `icalendar`), feed tokens and their
revocation, and imports through the one write path — pure functions without sockets,
then the real server."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import icalendar
import jwt
import trio

from barosync.formats import ical, ics
from barosync.hooks.auth import create_token

from attack_helpers import WS, Rejected, ServerProcess, barosync_cmd, mint, start_server
from conftest import SECRET, http_exchange, open_client, running, token

SAMPLE = Path(__file__).resolve().parent / "data" / "real-world.ics"
NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_a_real_world_file_is_read_with_zones_all_day_and_recurrence() -> None:
    found = {e["id"]: e for e in ics.parse(SAMPLE.read_bytes(), project_id="p1", now=NOW)}
    assert set(found) == {
        "holiday@example.com",
        "standup-1@example.com/20261207T083000Z",  # 09:30 in Berlin
        "standup-1@example.com/20261221T083000Z",  # the overridden occurrence, named by its RECURRENCE-ID
        "standup-1@example.com/20261228T083000Z",
    }  # 12-14 is excluded by EXDATE
    moved = found["standup-1@example.com/20261221T083000Z"]
    assert (moved["title"], moved["startDate"], moved["endDate"]) == ("Standup (moved)", "2026-12-21T09:00:00Z", "2026-12-21T09:15:00Z")
    holiday = found["holiday@example.com"]
    assert holiday["allDay"] and holiday["startDate"] == "2026-12-24T00:00:00Z" and holiday["endDate"] == "2026-12-27T00:00:00Z"
    assert holiday["attendees"] == ["alice@example.com"] and holiday["description"] == "Office closed"
    assert found["standup-1@example.com/20261207T083000Z"]["location"] == "Room 2"


def test_the_feed_parses_back_to_the_events() -> None:
    events = [
        {"id": "a", "projectId": "p1", "title": "Standup", "startDate": "2026-12-07T08:30:00Z", "endDate": "2026-12-07T08:45:00Z",
         "location": "Room 2", "description": "daily", "attendees": ["alice", "bob@example.com"], "color": "#4363d8",
         "version": 3, "createdAt": 1764000000000, "updatedAt": 1764100000000},
        {"id": "b", "projectId": "p1", "title": "Holidays", "startDate": "2026-12-24T00:00:00Z", "endDate": "2026-12-27T00:00:00Z",
         "allDay": True, "version": 1, "createdAt": 1764000000000, "updatedAt": 1764000000000},
    ]
    cal = icalendar.Calendar.from_ical(ical.feed("p1", events, name="Team"))
    assert str(cal["x-wr-calname"]) == "Team" and str(cal["version"]) == "2.0"
    vevents = {str(v["uid"]): v for v in cal.walk("VEVENT")}
    a, b = vevents["a"], vevents["b"]
    assert str(a["summary"]) == "Standup" and a["sequence"] == 2 and str(a["location"]) == "Room 2"
    assert a.decoded("dtstart") == datetime(2026, 12, 7, 8, 30, tzinfo=timezone.utc)
    assert sorted(str(x) for x in a["attendee"]) == ["mailto:bob@example.com", "urn:barosync:user:alice"]
    assert str(b.decoded("dtstart")) == "2026-12-24" and str(b.decoded("dtend")) == "2026-12-27"  # DATE values
    # And what a calendar app would import from it is what the project holds.
    back = {e["id"]: e for e in ics.parse(ical.feed("p1", events), project_id="p1", now=NOW)}
    for e in events:
        for key in ("title", "startDate", "endDate", "location", "description", "attendees", "color"):
            assert back[e["id"]].get(key) == e.get(key), key


def feed_url(port: int, project: str, tok: str) -> str:
    return f"http://127.0.0.1:{port}/ics/{project}.ics?token={tok}"


def fetch(url: str, etag: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


async def test_a_feed_token_opens_its_feed_only_and_polling_costs_nothing(data_dir) -> None:
    async with running(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", ["p1"]))
        await alice.subscribe()
        for n in range(2):
            await alice.create(title=f"event {n}")
        feed_token = create_token(SECRET, user_id="alice", projects=["p1"], scope="feed")
        url = feed_url(app.port, "p1", feed_token)
        status, body, headers = await trio.to_thread.run_sync(fetch, url)
        assert status == 200 and headers["content-type"].startswith("text/calendar")
        titles = sorted(str(v["summary"]) for v in icalendar.Calendar.from_ical(body).walk("VEVENT"))
        assert titles == ["event 0", "event 1"]
        status, body, _ = await trio.to_thread.run_sync(fetch, url, headers["etag"])
        assert status == 304 and body == b""
        await alice.create(title="event 2")
        status, _, later = await trio.to_thread.run_sync(fetch, url, headers["etag"])
        assert status == 200 and later["etag"] != headers["etag"]
        # A feed token opens nothing else; an access token opens no feed.
        assert (await trio.to_thread.run_sync(fetch, feed_url(app.port, "p2", feed_token)))[0] == 403
        assert (await trio.to_thread.run_sync(fetch, feed_url(app.port, "p1", token("alice", ["p1"]))))[0] == 401
        status, _, _ = await http_exchange(app.port, "GET", "/api/projects/p1/events", tok=feed_token)
        assert status == 401
        try:
            await WS.connect(app.port, feed_token)
            raise AssertionError("a feed token opened a WebSocket")
        except Rejected as e:
            assert e.status == 401


async def test_a_revoked_feed_token_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = await start_server(data)
    try:
        await trio.to_thread.run_sync(lambda: mint(data, "alice", "--project", "p1"))
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            barosync_cmd("token", "create", "--data", str(data), "--user", "alice", "--project", "p1", "--feed",
                         "--url", f"http://127.0.0.1:{server.port}"), capture_output=True, text=True, timeout=60))
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.startswith(f"http://127.0.0.1:{server.port}/ics/p1.ics?token=")
        assert (await trio.to_thread.run_sync(fetch, url))[0] == 200
        # A calendar app's subscription must not stop the next day: it lasts until revoked.
        claims = jwt.decode(url.split("token=")[1], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] >= 10 * 365 * 24 * 3600
        revoked = await trio.to_thread.run_sync(lambda: subprocess.run(
            barosync_cmd("token", "revoke", "--data", str(data), url.split("token=")[1]), capture_output=True, text=True, timeout=60))
        assert revoked.returncode == 0 and "revoked token" in revoked.stdout
        status, body, _ = await trio.to_thread.run_sync(fetch, url)
        assert status == 401 and b"revoked" in body
    finally:
        server.stop()


async def test_an_import_goes_through_the_write_path_once(data_dir) -> None:
    async with running(data_dir) as (app, nursery):
        watcher = await open_client(nursery, app, token("bob", ["team"]))
        await watcher.subscribe("team")
        body = SAMPLE.read_bytes()
        path = "/api/projects/team/import?from=2026-12-01T00:00:00Z&to=2027-01-31T00:00:00Z"
        status, _, first = await http_exchange(app.port, "POST", path, body, tok=token("alice", ["team"]),
                                               headers={"Content-Type": "text/calendar"})
        assert status == 200 and (first["created"], first["unchanged"], first["refused"]) == (4, 0, [])
        created = [await watcher.recv_type("event:created") for _ in range(4)]
        assert sorted(m["seq"] for m in created) == [1, 2, 3, 4]
        # Round trip: the project's feed reads back as what the file said.
        feed_token = create_token(SECRET, user_id="alice", projects=["team"], scope="feed")
        status, body, _ = await trio.to_thread.run_sync(fetch, feed_url(app.port, "team", feed_token))
        window = (datetime(2026, 12, 1, tzinfo=timezone.utc), datetime(2027, 1, 31, tzinfo=timezone.utc))
        expected = {e["id"]: e for e in ics.parse(SAMPLE.read_bytes(), project_id="team", window=window)}
        back = {e["id"]: e for e in ics.parse(body, project_id="team", window=window)}
        assert status == 200 and back == expected
        status, _, again = await http_exchange(app.port, "POST", path, body, tok=token("alice", ["team"]))
        assert status == 200 and (again["created"], again["updated"], again["unchanged"]) == (0, 0, 4)
        assert app.store.current_seq("team") == 4  # nothing changed the second time
        # The file changed upstream: only that event is updated.
        status, _, third = await http_exchange(app.port, "POST", path, body.replace(b"SUMMARY:Holidays", b"SUMMARY:Holidays!"),
                                               tok=token("alice", ["team"]))
        assert (third["updated"], third["unchanged"]) == (1, 3)
        updated = await watcher.recv_type("event:updated")
        assert updated["payload"]["title"] == "Holidays!" and updated["seq"] == 5
        status, _, bad = await http_exchange(app.port, "POST", path, b"not a calendar", tok=token("alice", ["team"]))
        assert status == 400 and "iCalendar" in bad["message"]
        status, _, _ = await http_exchange(app.port, "POST", path, body, tok=token("carol", ["other"]))
        assert status == 403


def test_the_cli_imports_an_ics_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        tok = mint(data, "alice", "--project", "team")
        done = subprocess.run(barosync_cmd("import", str(SAMPLE), "--project", "team", "--url", f"ws://127.0.0.1:{server.port}/ws",
                                           "--token", tok, "--store", str(tmp_path / "import-state")),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/projects/team/events",
                                         headers={"Authorization": f"Bearer {tok}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            events: list[dict[str, Any]] = json.loads(response.read())["events"]
        assert "holiday@example.com" in {e["id"] for e in events}
        assert all(e["projectId"] == "team" for e in events) and len(events) >= 2
    finally:
        server.stop()


def test_a_feed_token_cannot_be_made_for_several_projects(tmp_path: Path) -> None:
    done = subprocess.run(barosync_cmd("token", "create", "--data", str(tmp_path / "d"), "--user", "a", "--all-projects", "--feed"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "one --project" in done.stderr

