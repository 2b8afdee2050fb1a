"""Recurring events made and edited in the web calendar (web/app/series.js), in Chromium
against a real server: a weekly series, one occurrence changed, it and the following
ones moved, every occurrence given a room; then read back by a calendar app over
CalDAV, expanded, as the six meetings they are."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import caldav
import pytest

from caldav_helpers import app_password
from test_web_app import App, wait_for_events
from test_web_client import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


def sunday_of(d: date) -> date:
    return d - timedelta(days=(d.weekday() + 1) % 7)


def open_occurrence(app: App, week: int, shown_week: list[int], title: str = "Standup") -> None:
    """Go to ``week`` (with j and k, as a keyboard user) and open the series there."""
    app.page.locator("body").focus()
    while shown_week[0] != week:
        app.page.keyboard.press("j" if week > shown_week[0] else "k")
        shown_week[0] += 1 if week > shown_week[0] else -1
    app.page.locator(".fc-event", has_text=title).first.click()
    app.page.wait_for_selector("#editor[open]")
    assert app.page.is_visible("#editor-scope")


def save_times(app: App, day: date, start: str, end: str) -> None:
    app.page.fill("#editor-form input[name=start]", f"{day:%Y-%m-%d}T{start}")
    app.page.fill("#editor-form input[name=end]", f"{day:%Y-%m-%d}T{end}")


def test_a_series_made_and_edited_three_ways_reaches_calendar_apps(chromium, server) -> None:
    alice = App(chromium, server.link("alice", "Alice"), timezone_id="UTC", locale="en-US")
    alice.wait_connected()
    today = datetime.now(timezone.utc).date()
    monday = today + timedelta(days=7 - today.weekday())  # next week's Monday
    first_week = (sunday_of(monday) - sunday_of(today)).days // 7
    shown = [0]
    week = lambda n: monday + timedelta(weeks=n)  # noqa: E731

    # Made: every week, six times.
    alice.page.click("#new-event")
    alice.page.wait_for_selector("#editor[open]")
    alice.page.fill("#editor-form input[name=title]", "Standup")
    save_times(alice, monday, "09:00", "09:30")
    alice.page.select_option("#editor-form select[name=freq]", "WEEKLY")
    alice.page.select_option("#editor-form select[name=ends]", "after")
    alice.page.fill("#editor-form input[name=count]", "6")
    alice.page.click("#editor-save")
    [series] = wait_for_events(server, "team", lambda es: len(es) == 1)
    assert series["recurrence"]["rrule"] == "FREQ=WEEKLY;COUNT=6"

    # The second one alone: later and renamed.
    open_occurrence(alice, first_week + 1, shown)
    assert alice.page.input_value("#editor-form input[name=start]") == f"{week(1):%Y-%m-%d}T09:00"
    alice.page.fill("#editor-form input[name=title]", "Standup with a demo")
    save_times(alice, week(1), "10:00", "10:30")
    alice.page.click("#editor-save")
    [series] = wait_for_events(server, "team", lambda es: es[0]["recurrence"].get("overrides"))
    assert series["recurrence"]["overrides"] == [{
        "recurrenceId": f"{week(1):%Y-%m-%d}T09:00:00Z", "startDate": f"{week(1):%Y-%m-%d}T10:00:00Z",
        "endDate": f"{week(1):%Y-%m-%d}T10:30:00Z", "title": "Standup with a demo"}]

    # The fourth and those after it: two hours later, from then on.
    open_occurrence(alice, first_week + 3, shown)
    alice.page.check("#editor-scope input[value=following]")
    save_times(alice, week(3), "11:00", "11:30")
    alice.page.click("#editor-save")
    found = wait_for_events(server, "team", lambda es: len(es) == 2)
    old, new = sorted(found, key=lambda e: e["startDate"])
    assert old["recurrence"]["rrule"] == f"FREQ=WEEKLY;UNTIL={week(3):%Y%m%d}T085959Z"
    assert (new["startDate"].replace(".000Z", "Z"), new["recurrence"]["rrule"]) == (
        f"{week(3):%Y-%m-%d}T11:00:00Z", "FREQ=WEEKLY;COUNT=3")

    # Every occurrence of the first part: a room.
    open_occurrence(alice, first_week, shown)
    alice.page.check("#editor-scope input[value=all]")
    alice.page.fill("#editor-form input[name=location]", "Room 1")
    alice.page.click("#editor-save")
    found = wait_for_events(server, "team", lambda es: any(e.get("location") == "Room 1" for e in es))
    old = min(found, key=lambda e: e["startDate"])
    assert old["startDate"].replace(".000Z", "Z") == f"{monday:%Y-%m-%d}T09:00:00Z"
    assert len(old["recurrence"]["overrides"]) == 1

    # One occurrence deleted (an EXDATE), and brought back with z.
    later = lambda es: max(es, key=lambda e: e["startDate"])  # noqa: E731
    rid = f"{week(4):%Y-%m-%d}T11:00:00Z"
    open_occurrence(alice, first_week + 4, shown)
    alice.page.click("#editor-delete")
    wait_for_events(server, "team", lambda es: later(es)["recurrence"].get("exdates") == [rid])
    alice.page.locator("body").focus()
    alice.page.keyboard.press("z")
    wait_for_events(server, "team", lambda es: not later(es)["recurrence"].get("exdates"))
    # Again, with z at once, before the deletion is acked: the undo waits for it
    # rather than conflict with this person's own change.
    version = later(server.events("team"))["version"]
    open_occurrence(alice, first_week + 4, shown)
    alice.page.click("#editor-delete")
    alice.page.locator("body").focus()
    alice.page.keyboard.press("z")
    wait_for_events(server, "team", lambda es: later(es)["version"] == version + 2
                    and not later(es)["recurrence"].get("exdates"))
    assert not alice.page.is_visible("#conflict")

    # A calendar app reads the six meetings, each where it now is.
    password = app_password(server.data, "alice", "team")
    with caldav.DAVClient(url=f"http://127.0.0.1:{server.port}/dav/", username="alice", password=password) as client:
        team = client.principal().calendars()[0]
        start = datetime.combine(monday, datetime.min.time(), tzinfo=timezone.utc)
        hits = team.search(start=start, end=start + timedelta(weeks=6), event=True, expand=True)
        got = sorted((c.icalendar_component.decoded("dtstart"), str(c.icalendar_component["summary"]),
                      str(c.icalendar_component.get("location", ""))) for c in hits)
    at = lambda n, hour: datetime.combine(week(n), datetime.min.time(), tzinfo=timezone.utc).replace(hour=hour)  # noqa: E731
    assert got == [(at(0, 9), "Standup", "Room 1"), (at(1, 10), "Standup with a demo", ""),
                   (at(2, 9), "Standup", "Room 1"), (at(3, 11), "Standup", ""), (at(4, 11), "Standup", ""),
                   (at(5, 11), "Standup", "")]
    alice.shot("series-edited")
    assert alice.errors == []
