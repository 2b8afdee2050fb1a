"""Tasks, journals and free-busy over CalDAV (formats/tasks.py, calendars/caldav_query.py):
python-caldav's client against a real `barosync serve`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import caldav
import icalendar
import pytest

from attack_helpers import ServerProcess, mint
from caldav_helpers import Http, app_password, event_ics, start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start(tmp_path / "data")
    yield srv
    srv.stop()


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


TASK = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//tasks//EN\r\nBEGIN:VTODO\r\nUID:{uid}\r\n"
        "DTSTAMP:20261201T080000Z\r\n{extra}SUMMARY:{summary}\r\nSTATUS:NEEDS-ACTION\r\nEND:VTODO\r\nEND:VCALENDAR\r\n")


def test_a_tasks_app_keeps_its_tasks_completes_one_and_finds_them(server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice", "home")
    http = Http(server.port, "alice", password)
    sent = TASK.format(uid="taxes", summary="File taxes", extra="DUE:20261115T170000Z\r\nX-TASKS-ORG-ORDER:3\r\n")
    assert http("PUT", "/dav/calendars/alice/home/taxes.ics", sent)[0] == 201
    status, _, body = http("GET", "/dav/calendars/alice/home/taxes.ics")
    assert status == 200 and body == sent.encode()  # as the app sent it, byte for byte
    with caldav.DAVClient(url=f"http://127.0.0.1:{server.port}/dav/", username="alice", password=password) as client:
        home = client.principal().calendars()[0]
        assert set(home.get_supported_components()) == {"VEVENT", "VTODO", "VJOURNAL"}
        home.save_todo(TASK.format(uid="milk", summary="Buy milk", extra=""))  # no date at all
        home.save_event(event_ics("standup", "Standup", "20261214T090000Z", "20261214T091500Z"))
        assert sorted(str(t.icalendar_component["summary"]) for t in home.get_todos()) == ["Buy milk", "File taxes"]
        [milk] = [t for t in home.get_todos() if str(t.icalendar_component["summary"]) == "Buy milk"]
        milk.complete()
        assert [str(t.icalendar_component["summary"]) for t in home.get_todos()] == ["File taxes"]
        everything = home.get_todos(include_completed=True)
        assert len(everything) == 2
        # A time range finds the task due in it, not one done since (RFC 4791 §9.9).
        due = home.search(todo=True, start=utc(2026, 11, 14), end=utc(2026, 11, 16), include_completed=True)
        assert [str(t.icalendar_component["summary"]) for t in due] == ["File taxes"]
        assert home.search(todo=True, start=utc(2026, 11, 20), end=utc(2026, 11, 21), include_completed=True) == []
        assert [str(e.icalendar_component["summary"]) for e in home.search(event=True, start=utc(2026, 12, 1),
                                                                             end=utc(2027, 1, 1))] == ["Standup"]
        journal = home.save_journal("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//t//EN\r\nBEGIN:VJOURNAL\r\n"
                                    "UID:j1\r\nDTSTAMP:20261207T080000Z\r\nDTSTART;VALUE=DATE:20261207\r\n"
                                    "SUMMARY:Day notes\r\nEND:VJOURNAL\r\nEND:VCALENDAR\r\n")
        assert [str(j.icalendar_component["summary"]) for j in home.get_journals()] == ["Day notes"]
        journal.delete()
        assert home.get_journals() == []
    # Browsers see the task on its due date, with its title.
    tok = mint(server.data_dir, "bob", "--project", "home")
    status, _, body = Http(server.port)("GET", "/api/projects/home/events", Authorization=f"Bearer {tok}")
    found = {e["id"]: e for e in json.loads(body)["events"]}
    assert status == 200 and (found["taxes"]["title"], found["taxes"]["startDate"]) == ("File taxes",
                                                                                       "2026-11-15T17:00:00Z")


def test_free_busy_merges_busy_time_and_leaves_transparent_time_free(server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice", "team")
    http = Http(server.port, "alice", password)
    for uid, start_, end, extra in [
        ("a", "20261214T090000Z", "20261214T100000Z", ""),
        ("b", "20261214T093000Z", "20261214T110000Z", ""),  # overlaps a: one busy period
        ("free", "20261214T120000Z", "20261214T130000Z", "TRANSP:TRANSPARENT\r\n"),
        ("maybe", "20261214T140000Z", "20261214T150000Z", "STATUS:TENTATIVE\r\n"),
        ("daily", "20261213T070000Z", "20261213T073000Z", "RRULE:FREQ=DAILY;COUNT=5\r\n"),
    ]:
        assert http("PUT", f"/dav/calendars/alice/team/{uid}.ics", event_ics(uid, uid, start_, end, extra))[0] == 201
    query = ('<c:free-busy-query xmlns:c="urn:ietf:params:xml:ns:caldav">'
             '<c:time-range start="20261214T000000Z" end="20261215T000000Z"/></c:free-busy-query>')
    status, headers, body = http("REPORT", "/dav/calendars/alice/team/", query, Depth="1")
    assert status == 200 and headers["content-type"].startswith("text/calendar")
    [fb] = icalendar.Calendar.from_ical(body).walk("VFREEBUSY")
    lines = sorted(line for line in fb.to_ical().decode().replace("\r\n ", "").splitlines()
                   if line.startswith("FREEBUSY"))
    assert lines == ["FREEBUSY;FBTYPE=BUSY-TENTATIVE;VALUE=PERIOD:20261214T140000Z/20261214T150000Z",
                     "FREEBUSY;FBTYPE=BUSY;VALUE=PERIOD:20261214T070000Z/20261214T073000Z",
                     "FREEBUSY;FBTYPE=BUSY;VALUE=PERIOD:20261214T090000Z/20261214T110000Z"]  # a and b merged
    status, _, body = http("REPORT", "/dav/calendars/alice/team/",
                           '<c:free-busy-query xmlns:c="urn:ietf:params:xml:ns:caldav"/>', Depth="1")
    assert status == 400 and b"time-range" in body
