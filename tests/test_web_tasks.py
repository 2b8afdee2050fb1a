"""Tasks and journal entries from a tasks app in the web calendar (web/app/items.js):
in Chromium, against a real server, the tasks put there over CalDAV."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from caldav_helpers import Http, app_password
from test_web_app import App
from test_web_client import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


def item(kind: str, uid: str, summary: str, *lines: str) -> str:
    body = "\r\n".join((f"UID:{uid}", "DTSTAMP:20261201T080000Z", f"SUMMARY:{summary}", *lines))
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//tasks//EN\r\nBEGIN:{kind}\r\n{body}\r\n"
            f"END:{kind}\r\nEND:VCALENDAR\r\n")


def test_tasks_show_where_they_have_a_date_and_in_the_task_list(chromium, server) -> None:
    alice = App(chromium, server.link("alice", "Alice"))
    alice.wait_connected()
    http = Http(server.port, "alice", app_password(server.data, "alice", "team"))
    due = (datetime.now(timezone.utc) + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    stamp = due.strftime("%Y%m%dT%H%M%SZ")
    assert http("PUT", "/dav/calendars/alice/team/report.ics",
                item("VTODO", "report", "Send the report", f"DUE:{stamp}", "STATUS:NEEDS-ACTION",
                     "X-APP:kept"))[0] == 201
    assert http("PUT", "/dav/calendars/alice/team/milk.ics", item("VTODO", "milk", "Buy milk"))[0] == 201
    assert http("PUT", "/dav/calendars/alice/team/notes.ics",
                item("VJOURNAL", "notes", "Day notes", f"DTSTART;VALUE=DATE:{due:%Y%m%d}"))[0] == 201

    # On the grid: the dated task and the journal entry; the undated task only in the list.
    alice.event("☐ Send the report").wait_for(timeout=10_000)
    alice.event("✎ Day notes").wait_for(timeout=10_000)
    assert alice.event("Buy milk").count() == 0
    alice.page.wait_for_selector("#tasks:not([hidden]) #tasks-list li >> nth=1")
    assert alice.page.locator("#tasks-list button").all_inner_texts() == ["☐ Send the report", "☐ Buy milk"]

    # Completed in the app: live in the list and on the grid.
    etag = http("GET", "/dav/calendars/alice/team/report.ics")[1]["etag"]
    done = item("VTODO", "report", "Send the report", f"DUE:{stamp}", "STATUS:COMPLETED",
                "COMPLETED:20261207T120000Z", "X-APP:kept")
    assert http("PUT", "/dav/calendars/alice/team/report.ics", done, If_Match=etag)[0] == 204
    alice.page.wait_for_selector(".fc-event.task.done", timeout=10_000)
    alice.page.wait_for_function(
        "() => [...document.querySelectorAll('#tasks-list button')].map(b => b.textContent).join('|')"
        " === '☐ Buy milk|☑ Send the report'")

    # Opened from the list: its dates are the app's, its title the browser may change,
    # and the app gets the new title written into what it stored.
    alice.page.click("#tasks-list button >> text=Buy milk")
    alice.page.wait_for_selector("#editor[open]")
    assert alice.text("#editor-title") == "Edit task" and alice.page.is_visible("#editor-app-note")
    assert alice.page.is_disabled("#editor-form input[name=start]")
    alice.fill_editor("Buy oat milk")
    deadline = datetime.now() + timedelta(seconds=10)
    while b"SUMMARY:Buy oat milk" not in http("GET", "/dav/calendars/alice/team/milk.ics")[2]:
        assert datetime.now() < deadline, "the new title did not reach the task"
    body = http("GET", "/dav/calendars/alice/team/report.ics")[2]
    assert b"X-APP:kept" in body and b"STATUS:COMPLETED" in body
    alice.shot("tasks-beside-the-calendar")
    assert alice.errors == []


def test_a_calendar_made_renamed_and_recolored_in_an_app_shows_in_the_web_app(chromium, server) -> None:
    from test_web_app import create_project, join, session_request

    owner = App(chromium, server.proc.next_line().removeprefix("open "))
    join(owner, "olive", "Olive Owner", "a long owner password")
    create_project(owner, "Team")
    password = session_request(owner, server, "POST", "/auth/app-passwords", {"name": "phone"})["password"]
    http = Http(server.port, "olive", password)
    made = ('<c:mkcalendar xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav" xmlns:a="http://apple.com/ns/ical/">'
            '<d:set><d:prop><d:displayname>Garden</d:displayname><a:calendar-color>#22AA55FF</a:calendar-color>'
            '</d:prop></d:set></c:mkcalendar>')
    assert http("MKCALENDAR", "/dav/calendars/olive/garden/", made)[0] == 201
    # Its maker's access changed (owner of a new project): the app reconnects and reads
    # the project list again, so the new calendar is there within seconds.
    owner.page.wait_for_function(
        "() => [...document.getElementById('project').options].some(o => o.text === 'Garden')", timeout=15_000)
    patch = ('<d:propertyupdate xmlns:d="DAV:" xmlns:a="http://apple.com/ns/ical/"><d:set><d:prop>'
             '<d:displayname>Allotment</d:displayname><a:calendar-color>#8844CC</a:calendar-color>'
             '</d:prop></d:set></d:propertyupdate>')
    assert http("PROPPATCH", "/dav/calendars/olive/garden/", patch)[0] == 207
    # A rename: seen when the tab comes back into view (or at the next periodic read).
    owner.page.evaluate("() => document.dispatchEvent(new Event('visibilitychange'))")
    owner.page.wait_for_function(
        "() => [...document.getElementById('project').options].some(o => o.text === 'Allotment'"
        " && o.dataset.color === '#8844CC')", timeout=10_000)
    owner.page.select_option("#project", "garden")
    assert http("PUT", "/dav/calendars/olive/garden/beans.ics",
                "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//t//EN\r\nBEGIN:VEVENT\r\nUID:beans\r\n"
                f"DTSTAMP:20261201T000000Z\r\nDTSTART:{datetime.now(timezone.utc):%Y%m%dT%H0000Z}\r\n"
                f"DURATION:PT1H\r\nSUMMARY:Sow beans\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")[0] == 201
    beans = owner.event("Sow beans")
    beans.wait_for(timeout=10_000)
    assert beans.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(136, 68, 204)"  # the calendar's color
    assert owner.errors == []
