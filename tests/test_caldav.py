"""CalDAV against a real server process, driven by real clients: the `caldav`
library (discovery, edits, sync by token), raw HTTP where a header matters, a
WebSocket subscriber for the live path, and vdirsyncer (test_vdirsyncer.py)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import caldav
import icalendar
import pytest
import trio

from attack_helpers import WS, ServerProcess, mint, write_config
from caldav_helpers import Http, app_password, cli, event_ics, hrefs, privileges, responses, start, sync_token_of
from ical_helpers import CORPUS, same_calendar, split_by_uid

PROPFIND_CALENDARS = ('<d:propfind xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><d:displayname/>'
                      '<d:current-user-privilege-set/><d:sync-token/></d:prop></d:propfind>')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start(tmp_path / "data")
    yield srv
    srv.stop()


def seed(srv: ServerProcess, project: str, title: str, event_id: str) -> None:
    """An event written by a browser-side client (REST with an access token)."""
    tok = mint(srv.data_dir, "seeder", "--all-projects")
    body = json.dumps({"id": event_id, "projectId": project, "title": title,
                       "startDate": "2026-12-08T10:00:00Z", "endDate": "2026-12-08T11:00:00Z"})
    status, _, answer = Http(srv.port)("POST", "/api/events", body, Authorization=f"Bearer {tok}")
    assert status == 201, answer


def test_caldav_client_discovers_its_calendars_edits_and_syncs_by_token(server: ServerProcess) -> None:
    seed(server, "team", "Browser-made", "b-1")
    seed(server, "secret", "Not for alice's phone", "s-1")
    password = app_password(server.data_dir, "alice", "team", "ops")
    with caldav.DAVClient(url=f"http://127.0.0.1:{server.port}/", username="alice", password=password) as client:
        principal = client.principal()  # /.well-known/caldav → current-user-principal → calendar-home-set
        calendars = {c.get_display_name(): c for c in principal.calendars()}
        assert set(calendars) == {"team", "ops"}
        team = calendars["team"]
        assert [str(e.icalendar_component["summary"]) for e in team.events()] == ["Browser-made"]
        token = team.objects_by_sync_token(load_objects=False).sync_token

        team.save_event(dtstart=datetime(2026, 12, 9, 9, tzinfo=timezone.utc),
                        dtend=datetime(2026, 12, 9, 10, tzinfo=timezone.utc), summary="Planning", uid="plan-1")
        browser = team.event_by_uid("b-1")
        browser.icalendar_component["summary"] = "Browser-made, edited on a phone"
        browser.save()
        team.event_by_uid("plan-1").delete()
        team.save_event(dtstart=datetime(2026, 12, 10, 9, tzinfo=timezone.utc),
                        dtend=datetime(2026, 12, 10, 10, tzinfo=timezone.utc), summary="Retro", uid="retro-1")

        changed = team.objects_by_sync_token(sync_token=token, load_objects=True)
        by_name = {str(o.url).rsplit("/", 1)[1]: o for o in changed}
        assert set(by_name) == {"b-1.ics", "plan-1.ics", "retro-1.ics"}
        assert by_name["plan-1.ics"].data is None  # deleted: a 404 in the answer
        assert str(by_name["b-1.ics"].icalendar_component["summary"]) == "Browser-made, edited on a phone"
        again = team.objects_by_sync_token(sync_token=changed.sync_token, load_objects=True)
        assert list(again) == [] and again.sync_token == changed.sync_token

        found = team.search(start=datetime(2026, 12, 10, tzinfo=timezone.utc),
                            end=datetime(2026, 12, 11, tzinfo=timezone.utc), event=True)
        assert [str(e.icalendar_component["summary"]) for e in found] == ["Retro"]

    # The change from the phone is a mutation like any other: in the REST view too.
    tok = mint(server.data_dir, "bob", "--project", "team")
    status, _, body = Http(server.port)("GET", "/api/projects/team/events", Authorization=f"Bearer {tok}")
    assert {e["title"] for e in json.loads(body)["events"]} == {"Browser-made, edited on a phone", "Retro"}


def test_discovery_paths_and_collection_properties(server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice", "team")
    anon, http = Http(server.port), Http(server.port, "alice", password)
    status, headers, _ = anon("GET", "/.well-known/caldav")
    assert status == 301 and headers["location"] == "/dav/"
    status, headers, _ = anon("OPTIONS", "/dav/")
    assert status == 200 and "calendar-access" in headers["dav"] and "REPORT" in headers["allow"]
    status, headers, _ = anon("PROPFIND", "/dav/", Depth="0")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    status, _, body = http("PROPFIND", "/", '<propfind xmlns="DAV:"><prop><current-user-principal/></prop></propfind>', Depth="0")
    assert status == 207 and "/dav/principals/alice/" in hrefs(body)
    status, _, body = http("PROPFIND", "/dav/principals/alice/", '<propfind xmlns="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">'
                           '<prop><c:calendar-home-set/></prop></propfind>', Depth="0")
    assert "/dav/calendars/alice/" in hrefs(body)
    status, _, body = http("PROPFIND", "/dav/calendars/alice/team/", Depth="0")  # allprop
    text = body.decode()
    for needle in ("<C:calendar />", "<A:calendar-color>#", '<C:comp name="VEVENT" />', "<CS:getctag>",
                   "<D:sync-token>http://barosync.org/ns/sync/"):
        assert needle in text, needle
    assert privileges(responses(body)["/dav/calendars/alice/team/"]) >= {"read", "write", "bind", "unbind"}
    status, _, body = http("PROPPATCH", "/dav/calendars/alice/team/", '<propertyupdate xmlns="DAV:"><set><prop>'
                           '<displayname>Renamed</displayname></prop></set></propertyupdate>')
    assert status == 207 and b"403 Forbidden" in body
    status, _, body = http("MKCALENDAR", "/dav/calendars/alice/new/")  # alice has no account: only a token
    assert status == 403 and b"accounts" in body  # (an account's: tests/test_caldav_collections.py)


def test_put_get_delete_with_etags_and_preconditions(server: ServerProcess) -> None:
    http = Http(server.port, "alice", app_password(server.data_dir, "alice", "team"))
    url = "/dav/calendars/alice/team/w-1.ics"
    status, headers, _ = http("PUT", url, event_ics("w-1", "Workshop"), If_None_Match="*", Content_Type="text/calendar")
    assert status == 201
    first = headers["etag"]
    status, _, _ = http("PUT", url, event_ics("w-1", "Again"), If_None_Match="*")
    assert status == 412
    status, headers, body = http("GET", url)
    assert status == 200 and headers["etag"] == first and b"SUMMARY:Workshop" in body
    status, headers, _ = http("PUT", url, event_ics("w-1", "Workshop (room 2)"), If_Match=first)
    assert status == 204 and headers["etag"] != first
    second = headers["etag"]
    status, _, body = http("PUT", url, "BEGIN:VCALENDAR\r\nBEGIN:VFREEBUSY\r\nUID:t\r\nEND:VFREEBUSY\r\nEND:VCALENDAR\r\n")
    assert status == 403 and b"supported-calendar-component" in body
    mixed = event_ics("w-1", "Workshop").replace("END:VCALENDAR", "BEGIN:VTODO\r\nUID:w-1\r\nEND:VTODO\r\nEND:VCALENDAR")
    status, _, body = http("PUT", url, mixed)
    assert status == 403 and b"one kind of component" in body
    status, _, body = http("PUT", url, "this is not a calendar")
    assert status == 403 and b"valid-calendar-data" in body
    status, _, _ = http("DELETE", url, If_Match='"1-0"')  # stale: merge keeps the newer edit
    assert status == 412
    status, _, _ = http("DELETE", url, If_Match=second)
    assert status == 204
    assert http("GET", url)[0] == 404
    # A calendar app putting the UID back (undo) brings the event back.
    status, headers, _ = http("PUT", url, event_ics("w-1", "Workshop, restored"), If_None_Match="*")
    assert status == 201 and headers["etag"].startswith('"4-')


def test_the_same_bytes_put_again_after_a_delete_come_back(server: ServerProcess) -> None:
    """An app's undo, a file restored in a synced folder, an .ics imported again: the
    PUT's bytes are those of the first creation, and it used to get that creation's
    answer back (201, the old ETag) and store nothing."""
    http = Http(server.port, "alice", app_password(server.data_dir, "alice", "team"))
    url = "/dav/calendars/alice/team/u-1.ics"
    body = event_ics("u-1", "Undo me")
    status, headers, _ = http("PUT", url, body, Content_Type="text/calendar")
    assert status == 201
    first = headers["etag"]
    assert http("DELETE", url)[0] == 204
    for _ in range(2):  # and once more: a retry of the restore changes nothing
        status, headers, _ = http("PUT", url, body, Content_Type="text/calendar")
        assert status in (201, 204)
        status, got, answer = http("GET", url)
        assert status == 200 and b"SUMMARY:Undo me" in answer and got["etag"] != first


def test_a_retried_put_is_stored_once(server: ServerProcess) -> None:
    http = Http(server.port, "alice", app_password(server.data_dir, "alice", "team"))
    url = "/dav/calendars/alice/team/r-1.ics"
    etag = http("PUT", url, event_ics("r-1", "One"))[1]["etag"]
    body = event_ics("r-1", "Two")
    assert http("PUT", url, body, If_Match=etag)[0] == 204
    assert http("PUT", url, body, If_Match=etag)[0] == 204  # the answer was lost; the app sends it again
    _, _, found = http("PROPFIND", "/dav/calendars/alice/team/", PROPFIND_CALENDARS, Depth="0")
    assert sync_token_of(found).endswith("/2")  # two changes, not three


@pytest.mark.parametrize("strategy", ["merge", "last_write_wins", "first_write_wins"])
def test_two_apps_put_the_same_event_from_the_same_etag(tmp_path: Path, strategy: str) -> None:
    config = write_config(tmp_path / "c.toml", conflict__default=strategy)
    srv = start(tmp_path / "data", config=config)
    try:
        http = Http(srv.port, "alice", app_password(srv.data_dir, "alice", "team"))
        url = "/dav/calendars/alice/team/c-1.ics"
        etag = http("PUT", url, event_ics("c-1", "Design review"))[1]["etag"]
        # Phone moves it to room 5; laptop renames it: different fields.
        phone = http("PUT", url, event_ics("c-1", "Design review", extra="LOCATION:Room 5\r\n"), If_Match=etag)
        laptop = http("PUT", url, event_ics("c-1", "Design review (v2)"), If_Match=etag)
        assert phone[0] == 204 and "etag" in phone[1]
        stored = icalendar.Calendar.from_ical(http("GET", url)[2]).walk("VEVENT")[0]
        if strategy == "merge":
            assert laptop[0] == 204 and "etag" not in laptop[1]  # settled: fetch what was stored
            assert (str(stored["summary"]), str(stored["location"])) == ("Design review (v2)", "Room 5")
        elif strategy == "last_write_wins":
            assert laptop[0] == 204 and "etag" not in laptop[1]
            assert str(stored["summary"]) == "Design review (v2)"
        else:
            assert laptop[0] == 412
            assert (str(stored["summary"]), str(stored["location"])) == ("Design review", "Room 5")
        # Both change the same field differently: merge asks a person (412), nothing lost.
        etag = http("GET", url)[1]["etag"]
        a = http("PUT", url, event_ics("c-1", "Title A"), If_Match=etag)
        b = http("PUT", url, event_ics("c-1", "Title B"), If_Match=etag)
        assert a[0] == 204
        expected = {"merge": 412, "last_write_wins": 204, "first_write_wins": 412}[strategy]
        assert b[0] == expected
    finally:
        srv.stop()


def test_100_concurrent_puts_from_10_clients_are_all_stored_once(server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice", "team")
    results: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        http = Http(server.port, "alice", password)
        for i in range(10):
            status = http("PUT", f"/dav/calendars/alice/team/k{n}-{i}.ics", event_ics(f"k{n}-{i}", f"Event {n}/{i}"))[0]
            with lock:
                results.append(status)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [201] * 100
    http = Http(server.port, "alice", password)
    _, _, body = http("PROPFIND", "/dav/calendars/alice/team/", '<propfind xmlns="DAV:"><prop><getetag/></prop></propfind>', Depth="1")
    assert len([h for h in hrefs(body) if h.endswith(".ics")]) == 100
    _, _, body = http("PROPFIND", "/dav/calendars/alice/team/", PROPFIND_CALENDARS, Depth="0")
    assert sync_token_of(body).endswith("/100")


def test_auth_matrix(tmp_path: Path, server: ServerProcess) -> None:
    seed(server, "secret", "Confidential offsite", "s-1")
    password = app_password(server.data_dir, "alice", "team")
    bob = app_password(server.data_dir, "bob", "team")
    port = server.port
    assert Http(port, "alice", password + "x")("PROPFIND", "/dav/", Depth="0")[0] == 401
    assert Http(port, "bob", password)("PROPFIND", "/dav/", Depth="0")[0] == 401  # alice's password, bob's name
    assert Http(port, "alice", "bsp_nonsense")("PROPFIND", "/dav/", Depth="0")[0] == 401
    http = Http(port, "alice", password)
    status, _, body = http("PROPFIND", "/dav/calendars/bob/", Depth="1")
    assert status == 403 and b"signed in as alice" in body
    for path in ("/dav/calendars/alice/secret/", "/dav/calendars/alice/secret/s-1.ics"):
        for method in ("PROPFIND", "GET", "REPORT", "PUT", "DELETE"):
            status, _, body = http(method, path, Depth="1")
            assert status == 404 and b"Confidential" not in body, (method, path, status)
            assert b"--project secret" in body  # what to do next
    _, _, body = http("PROPFIND", "/dav/calendars/alice/", Depth="1")
    assert not any("secret" in h for h in hrefs(body))
    listing = cli(server.data_dir, "token", "list")
    assert "alice" in listing.stdout and "bob" in listing.stdout and password not in listing.stdout
    ident = next(line.split()[0] for line in listing.stdout.splitlines() if " alice " in line)
    assert cli(server.data_dir, "token", "revoke", ident).returncode == 0
    assert http("PROPFIND", "/dav/", Depth="0")[0] == 401  # revoked: refused at the next request
    assert Http(port, "bob", bob)("PROPFIND", "/dav/", Depth="0")[0] == 207


def test_basic_sign_in_over_plain_http_off_loopback_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", server__host="0.0.0.0", caldav__tls_header="X-Forwarded-Proto")
    srv = start(tmp_path / "data", config=config)
    try:
        http = Http(srv.port, "alice", app_password(srv.data_dir, "alice", "team"))
        status, _, body = http("PROPFIND", "/dav/", Depth="0")
        assert status == 403 and b"plain HTTP" in body and b"X-Forwarded-Proto" in body
        status, _, _ = http("PROPFIND", "/dav/", Depth="0", X_Forwarded_Proto="https")
        assert status == 207
    finally:
        srv.stop()


def test_read_only_project_says_so_and_refuses_writes(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "read_only.py").write_text(
        "from barosync.hooks.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def barosync_authorize(identity, action, project_id):\n"
        "    if project_id == 'handbook' and action != 'subscribe':\n"
        "        return False\n")
    srv = start(tmp_path / "data", config=write_config(tmp_path / "c.toml", plugins__paths=[str(plugins)]))
    try:
        http = Http(srv.port, "alice", app_password(srv.data_dir, "alice", "handbook", "team"))
        _, _, body = http("PROPFIND", "/dav/calendars/alice/", PROPFIND_CALENDARS, Depth="1")
        found = responses(body)
        assert privileges(found["/dav/calendars/alice/handbook/"]) == {"read", "read-free-busy"}
        assert "write" in privileges(found["/dav/calendars/alice/team/"])
        status, _, body = http("PUT", "/dav/calendars/alice/handbook/x.ics", event_ics("x", "Nope"))
        assert status == 403 and b"not allowed" in body
    finally:
        srv.stop()


def test_sync_tokens_from_elsewhere_or_too_old_ask_for_a_full_sync(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", storage__history_max_changes=5)
    srv = start(tmp_path / "data", config=config)
    try:
        http = Http(srv.port, "alice", app_password(srv.data_dir, "alice", "team"))
        for i in range(8):
            http("PUT", f"/dav/calendars/alice/team/h{i}.ics", event_ics(f"h{i}", f"H{i}"))
        base = "/dav/calendars/alice/team/"
        for token in ("http://barosync.org/ns/sync/someone-else/3", "garbage"):
            status, _, body = http("REPORT", base, f'<sync-collection xmlns="DAV:"><sync-token>{token}</sync-token>'
                                   '<sync-level>1</sync-level><prop><getetag/></prop></sync-collection>')
            assert status == 403 and b"valid-sync-token" in body
        _, _, body = http("REPORT", base, '<sync-collection xmlns="DAV:"><sync-token/><sync-level>1</sync-level>'
                          '<prop><getetag/></prop></sync-collection>')
        current = sync_token_of(body)
        assert current.endswith("/8") and len([h for h in hrefs(body) if h.endswith(".ics")]) == 8
        old = current[:-1] + "1"  # seq 1: its successors are past the 5 changes kept
        status, _, body = http("REPORT", base, f'<sync-collection xmlns="DAV:"><sync-token>{old}</sync-token>'
                               '<sync-level>1</sync-level><prop><getetag/></prop></sync-collection>')
        assert status == 403 and b"valid-sync-token" in body
    finally:
        srv.stop()


def test_corpus_round_trips_through_put_and_get(server: ServerProcess) -> None:
    http = Http(server.port, "alice", app_password(server.data_dir, "alice", "team"))
    n = 0
    for path in sorted(CORPUS.glob("*.ics")):
        for uid, data in split_by_uid(path.read_bytes()).items():
            n += 1
            url = f"/dav/calendars/alice/team/corpus-{n}.ics"  # named by the app, not by the UID
            status, _, body = http("PUT", url, data, Content_Type="text/calendar")
            assert status == 201, body
            ok, why = same_calendar(data, http("GET", url)[2])
            assert ok, f"{path.name} {uid}: {why}"
    assert n == 8


def test_recurring_event_is_expanded_by_a_time_range_query(server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice", "team")
    data = split_by_uid((CORPUS / "apple-weekly-override.ics").read_bytes())["5F2B-1@apple"]
    assert Http(server.port, "alice", password)("PUT", "/dav/calendars/alice/team/weekly.ics", data)[0] == 201
    with caldav.DAVClient(url=f"http://127.0.0.1:{server.port}/dav/", username="alice", password=password) as client:
        team = client.principal().calendars()[0]
        hit = team.search(start=datetime(2026, 2, 2, tzinfo=timezone.utc), end=datetime(2026, 2, 3, tzinfo=timezone.utc),
                          event=True, expand=True)
        assert [e.icalendar_component.decoded("dtstart") for e in hit] == [datetime(2026, 2, 2, 8, tzinfo=timezone.utc)]
        miss = team.search(start=datetime(2026, 1, 12, tzinfo=timezone.utc), end=datetime(2026, 1, 13, tzinfo=timezone.utc),
                           event=True)
        assert miss == []  # the 12th is an EXDATE


async def test_live_both_ways_with_a_websocket_subscriber(tmp_path: Path) -> None:
    srv = await trio.to_thread.run_sync(lambda: start(tmp_path / "data"))
    try:
        password = await trio.to_thread.run_sync(lambda: app_password(srv.data_dir, "alice", "team"))
        tok = await trio.to_thread.run_sync(lambda: mint(srv.data_dir, "bob", "--project", "team"))
        http = Http(srv.port, "alice", password)
        ws = await WS.connect(srv.port, tok)
        answer = await ws.request("subscribe", {"projectId": "team"})
        assert answer["type"] in ("ack", "sync:snapshot"), answer
        await ws.recv_until(lambda m: m["type"] == "sync:snapshot" or m["type"] == "ack")
        url = "/dav/calendars/alice/team/live-1.ics"
        status, headers, _ = await trio.to_thread.run_sync(lambda: http("PUT", url, event_ics("live-1", "From the phone")))
        assert status == 201
        with trio.fail_after(10):
            [created] = [m for m in await ws.recv_until(lambda m: m["type"] == "event:created") if m["type"] == "event:created"]
        assert created["payload"]["title"] == "From the phone" and created["seq"] == 1 and created["userId"] == "alice"

        sync = '<sync-collection xmlns="DAV:"><sync-token>{}</sync-token><sync-level>1</sync-level><prop><getetag/></prop></sync-collection>'
        _, _, body = await trio.to_thread.run_sync(lambda: http("REPORT", "/dav/calendars/alice/team/", sync.format("")))
        token = sync_token_of(body)
        ack = await ws.request("event:update", {"id": "live-1", "version": 1, "title": "Edited in a browser"})
        assert ack["type"] == "ack", ack
        _, _, body = await trio.to_thread.run_sync(lambda: http("REPORT", "/dav/calendars/alice/team/", sync.format(token)))
        assert hrefs(body)[:1] == [url] and '"2-' in body.decode()
        assert b"Edited in a browser" in (await trio.to_thread.run_sync(lambda: http("GET", url)))[2]

        etag = (await trio.to_thread.run_sync(lambda: http("GET", url)))[1]["etag"]
        status, _, _ = await trio.to_thread.run_sync(lambda: http("DELETE", url, If_Match=etag))
        assert status == 204
        with trio.fail_after(10):
            msgs = await ws.recv_until(lambda m: m["type"] == "event:deleted")
        assert msgs[-1]["payload"]["id"] == "live-1" and msgs[-1]["seq"] == 3
        await ws.abort()
    finally:
        await trio.to_thread.run_sync(srv.stop)


def test_edits_of_a_deleted_event_and_hrefs_however_encoded(server: ServerProcess) -> None:
    http = Http(server.port, "alice", app_password(server.data_dir, "alice", "team"))
    base = "/dav/calendars/alice/team/"
    assert http("PUT", base + "ghost.ics", event_ics("ghost", "Never was"), If_Match='"1-1"')[0] == 412
    etag = http("PUT", base + "gone.ics", event_ics("gone", "Soon deleted"))[1]["etag"]
    assert http("DELETE", base + "gone.ics", If_Match=etag)[0] == 204
    # The phone still has it and edits it: merge keeps the deletion and says so.
    status, _, body = http("PUT", base + "gone.ics", event_ics("gone", "Edited offline"), If_Match=etag)
    assert status == 412 and b"conflict strategy" in body
    assert http("GET", base + "gone.ics")[0] == 404
    # An id with an "@" (as many apps' UIDs have), asked for encoded and not.
    assert http("PUT", base + "a%40b.ics", event_ics("a@b", "At sign"))[0] == 201
    body = ('<C:calendar-multiget xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:getetag/>'
            f'</D:prop><D:href>{base}a%40b.ics</D:href><D:href>{base}a@b.ics</D:href>'
            f'<D:href>http://127.0.0.1:{server.port}{base}a@b.ics</D:href></C:calendar-multiget>')
    status, _, answer = http("REPORT", base, body)
    assert status == 207
    assert [r.findtext("{DAV:}status") or r.find("{DAV:}propstat/{DAV:}status").text for r in responses(answer).values()] \
        == ["HTTP/1.1 200 OK"] * 3
