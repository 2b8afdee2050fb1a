"""axe-core over every view and dialog of the web calendar, light and dark, desktop
and phone width, in Chromium against a real server: no critical and no serious
violation. (The conflict dialog is checked where tests/test_web_app.py opens one.)
Screenshots of the main views go to build/screenshots/ (docs/images has copies)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import pytest

from axe_helpers import serious_violations
from caldav_helpers import Http
from test_web_app import App, create_project, join, session_request
from test_web_client import Server

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


def check(app: App, where: str) -> None:
    found = serious_violations(app.page)
    assert found == [], f"{where}: {found}"


def seed(app: App, server: Server) -> None:
    """An event, one pending while offline, a task with a date and one without."""
    app.page.click("#new-event")
    app.fill_editor("Design review")
    app.event("Design review").wait_for()
    password = session_request(app, server, "POST", "/auth/app-passwords", {"name": "tasks"})["password"]
    http = Http(server.port, "olive", password)
    project = app.page.input_value("#project")
    due = app.page.evaluate("() => new Date(Date.now() + 3 * 3600e3).toISOString().replace(/[-:]|\\.\\d+/g, '')")
    for uid, extra in (("t1", f"DUE:{due}\r\n"), ("t2", "")):
        body = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//t//EN\r\nBEGIN:VTODO\r\n"
                f"UID:{uid}\r\nDTSTAMP:20261201T000000Z\r\n{extra}SUMMARY:Task {uid}\r\nEND:VTODO\r\nEND:VCALENDAR\r\n")
        assert http("PUT", f"/dav/calendars/olive/{project}/{uid}.ics", body)[0] == 201
    app.page.wait_for_selector("#tasks:not([hidden]) #tasks-list li >> nth=1")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_view_and_dialog_has_no_serious_accessibility_violation(chromium, server, scheme: str) -> None:
    owner = App(chromium, server.proc.next_line().removeprefix("open "), bypass_csp=True, color_scheme=scheme)
    check(owner, "the first-run page")
    join(owner, "olive", "Olive Owner", "a long owner password")
    create_project(owner, "Team")
    seed(owner, server)
    for view in ("timeGridWeek", "dayGridMonth", "timeGridDay"):
        owner.page.click(f".fc-{view}-button")
        owner.page.wait_for_selector(f".fc-{view}-view")
        check(owner, f"the {view} view ({scheme})")
        if view == "timeGridWeek":
            owner.shot(f"week-{scheme}")
    owner.page.click(".fc-timeGridWeek-button")
    # Offline, with a change waiting: the pending event and the status.
    owner.context.set_offline(True)
    owner.page.wait_for_function("() => document.getElementById('connection').dataset.state === 'offline'")
    owner.page.click("#new-event")
    owner.fill_editor("Written offline")
    owner.event("Written offline").wait_for()
    check(owner, f"offline with a change waiting ({scheme})")
    owner.context.set_offline(False)
    owner.wait_connected()

    dialogs = [("#new-event", "#editor"), ("#keys-help", "#help"), ("#manage-projects", "#projects-dialog"),
               ("#invite", "#inviting"), ("#members", "#membership"), ("#apps", "#connect")]
    for button, dialog in dialogs:
        owner.page.click(button)
        owner.page.wait_for_selector(f"{dialog}[open]")
        check(owner, f"{dialog} ({scheme})")
        owner.page.keyboard.press("Escape")
        owner.page.wait_for_selector(f"{dialog}:not([open])", state="attached")
    owner.page.locator(".fc-event", has_text="Design review").focus()  # an event's editor, with Delete
    owner.page.keyboard.press("Enter")
    owner.page.wait_for_selector("#editor[open]")
    check(owner, f"the editor of an event ({scheme})")
    owner.page.keyboard.press("Escape")
    owner.page.locator("#tasks-list button", has_text="Task t2").click()  # a task's editor
    owner.page.wait_for_selector("#editor[open]")
    check(owner, f"the editor of a task ({scheme})")
    owner.page.keyboard.press("Escape")
    owner.page.locator(".fc-event", has_text="Design review").focus()
    owner.page.keyboard.press("Delete")
    owner.page.wait_for_selector("#confirm-delete[open]")
    check(owner, f"the question before a deletion ({scheme})")
    owner.page.keyboard.press("Escape")
    assert owner.errors == []


def test_the_phone_width_shows_a_day_moves_an_event_by_touch_and_passes_axe(chromium, server) -> None:
    phone = App(chromium, server.link("alice", "Alice"), bypass_csp=True, viewport=PHONE, is_mobile=True,
                has_touch=True)
    phone.wait_connected()
    phone.page.wait_for_selector(".fc-timeGridDay-view")  # a day, not a cramped week
    phone.page.wait_for_function("() => window.scrollY > 0")  # at the morning, not at midnight
    phone.page.click("#new-event")
    phone.fill_editor("Coffee")
    phone.event("Coffee").wait_for()
    check(phone, "the phone's day view")
    phone.shot("day-phone")
    phone.page.emulate_media(color_scheme="dark")
    check(phone, "the phone's day view, dark")
    phone.shot("day-phone-dark")
    # Moved with a finger: a long press picks it up, a drag moves it two hours later.
    [before] = server.events("team")
    box = phone.event("Coffee").bounding_box()
    hour = phone.page.locator('td.fc-timegrid-slot-lane[data-time="10:00:00"]').bounding_box()
    later = phone.page.locator('td.fc-timegrid-slot-lane[data-time="12:00:00"]').bounding_box()
    assert box and hour and later
    touch = phone.context.new_cdp_session(phone.page)
    x, y = box["x"] + box["width"] / 2, box["y"] + 10
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    phone.page.wait_for_timeout(500)  # past the 300 ms long press
    for step in range(1, 11):
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [
            {"x": x, "y": y + (later["y"] - hour["y"]) * step / 10}]})
        phone.page.wait_for_timeout(30)
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    deadline = time.monotonic() + 10
    while (after := server.events("team")[0])["startDate"] == before["startDate"]:
        assert time.monotonic() < deadline, "the touch drag moved nothing"
        time.sleep(0.05)
    moved = (datetime.fromisoformat(after["startDate"].replace("Z", "+00:00"))
             - datetime.fromisoformat(before["startDate"].replace("Z", "+00:00")))
    assert moved == timedelta(hours=2), moved
    width = phone.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px screen"
    assert phone.errors == []
