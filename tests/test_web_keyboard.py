"""The web calendar with the keyboard only (web/app/keys.js), in Chromium against a real
server: the help on ?, a range picked with the arrow keys and made an event with Enter,
an event reached with Tab, edited, deleted after a question and brought back with z."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from test_web_app import App, wait_for_events
from test_web_client import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


def focused(app: App) -> str:
    return app.page.evaluate("() => { const a = document.activeElement; return a ? (a.id || a.className || a.tagName) : ''; }")


def tab_to_event(app: App, title: str, limit: int = 60) -> None:
    """Tab until an event with ``title`` has the focus (as a keyboard user would)."""
    for _ in range(limit):
        app.page.keyboard.press("Tab")
        if app.page.evaluate("t => document.activeElement?.closest('.fc-event')?.textContent.includes(t) || false",
                             title):
            return
    pytest.fail(f"{limit} Tabs did not reach the event {title!r}; the focus is on {focused(app)!r}")


def wait_titles(server: Server, expected: list[str]) -> None:
    wait_for_events(server, "team", lambda es: sorted(e["title"] for e in es) == expected)


def test_create_edit_delete_and_undo_with_the_keyboard_only(chromium, server) -> None:
    alice = App(chromium, server.link("alice", "Alice"))
    alice.wait_connected()
    keys = alice.page.keyboard
    alice.page.locator("body").focus()

    keys.press("?")  # the help
    alice.page.wait_for_selector("#help[open]")
    assert "new event" in alice.text("#help-list") and "undo the last deletion" in alice.text("#help-list")
    keys.press("Escape")
    alice.page.wait_for_selector("#help:not([open])", state="attached")

    # A range with the arrow keys: the cursor appears, Shift+Down makes it 1½ hours.
    keys.press("d")  # the day view
    keys.press("ArrowDown")
    for _ in range(2):
        keys.press("Shift+ArrowDown")
    alice.page.wait_for_selector(".fc-highlight")
    assert "selected" in alice.text("#announce")
    keys.press("Enter")
    alice.page.wait_for_selector("#editor[open]")
    start = alice.page.input_value("#editor-form input[name=start]")
    end = alice.page.input_value("#editor-form input[name=end]")
    assert alice.page.evaluate("([s, e]) => (new Date(e) - new Date(s)) / 60000", [start, end]) == 90
    assert focused(alice) == "INPUT"  # the title
    keys.type("Planning")
    keys.press("Shift+Tab")  # Save is one Shift+Tab from the title
    assert focused(alice) == "editor-save"
    keys.press("Enter")
    wait_titles(server, ["Planning"])

    # Tab to it, open it with Enter, change the title, save with Ctrl+Enter.
    alice.event("Planning").wait_for()
    tab_to_event(alice, "Planning")
    keys.press("Enter")
    alice.page.wait_for_selector("#editor[open]")
    keys.press("Control+a")
    keys.type("Planning, room 2")
    keys.press("Control+Enter")
    wait_titles(server, ["Planning, room 2"])

    # Delete asks first (Cancel is where the focus lands), then z brings it back.
    alice.page.locator("body").focus()
    tab_to_event(alice, "Planning, room 2")
    keys.press("Delete")
    alice.page.wait_for_selector("#confirm-delete[open]")
    assert focused(alice) == "confirm-delete-cancel" and "Planning, room 2" in alice.text("#confirm-delete-text")
    keys.press("Shift+Tab")
    assert focused(alice) == "confirm-delete-ok"
    keys.press("Enter")
    wait_titles(server, [])
    alice.page.wait_for_selector("#toast:not([hidden])")
    alice.page.locator("body").focus()
    keys.press("z")
    wait_titles(server, ["Planning, room 2"])
    alice.event("Planning, room 2").wait_for()
    assert alice.errors == []


def test_dates_times_and_the_first_day_follow_the_browsers_locale(chromium, server) -> None:
    """en-GB: 24-hour times on the axis and on events alike, weeks from Monday; en-US:
    12-hour times, weeks from Sunday."""
    for locale, first_day, hour in (("en-GB", "Mon", "13:00"), ("en-US", "Sun", "1:00 PM")):
        app = App(chromium, server.link("alice", "Alice"), locale=locale)
        app.wait_connected()
        assert app.page.locator(".fc-col-header-cell").first.inner_text().startswith(first_day)
        assert app.page.locator('.fc-timegrid-slot-label[data-time="13:00:00"]').inner_text().strip() == hour
        app.page.click("#new-event")
        app.fill_editor(f"Call {locale}")
        shown = app.event(f"Call {locale}").locator(".fc-event-time").inner_text()
        # The event's times are written as the axis's: 24-hour without AM/PM, or with it.
        assert ("M" in shown) is (locale == "en-US"), shown
        app.context.close()
