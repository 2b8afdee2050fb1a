"""Calendars made, renamed and deleted from a calendar app (calendars/caldav_collections.py):
each is a barosync project, with its maker as owner. python-caldav drives a real
`barosync serve`."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import caldav
import pytest
from caldav.elements import dav as dav_elements

from attack_helpers import ServerProcess, barosync_cmd
from caldav_helpers import Http, app_password, event_ics, start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start(tmp_path / "data")
    yield srv
    srv.stop()


def test_an_account_makes_renames_and_deletes_a_calendar_from_its_app(server: ServerProcess) -> None:
    done = subprocess.run(barosync_cmd("user", "create", "olive", "--admin", "--password-stdin", "--data",
                                       str(server.data_dir)), input="olive's long password\n", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    password = app_password(server.data_dir, "olive")  # every project
    with caldav.DAVClient(url=f"http://127.0.0.1:{server.port}/dav/", username="olive", password=password) as client:
        principal = client.principal()
        trip = principal.make_calendar(name="Team Trip", cal_id="trip")
        assert {c.get_display_name() for c in principal.calendars()} == {"Team Trip"}
        trip.save_event(event_ics("flight-1", "Flight"))
        trip.set_properties([dav_elements.DisplayName("Trip 2027")])
        [listed] = principal.calendars()
        assert listed.get_display_name() == "Trip 2027" and [e.icalendar_component["summary"]
                                                             for e in listed.events()] == ["Flight"]
        with pytest.raises(caldav.lib.error.MkcalendarError, match="405"):  # the name is taken
            principal.make_calendar(name="Again", cal_id="trip")
        trip.delete()
        assert principal.calendars() == []  # closed to everyone; the web app restores it for 30 days
        # Made again at the same URL by its owner (apps and python-caldav's tests do):
        # open again and empty, the old event deleted as an ordinary deletion.
        again = principal.make_calendar(name="Trip, again", cal_id="trip")
        [listed] = principal.calendars()
        assert listed.get_display_name() == "Trip, again" and again.events() == []
        again.save_event(event_ics("flight-2", "Train"))
        assert [e.icalendar_component["summary"] for e in again.events()] == ["Train"]
    # Only an account makes calendars: an app password of a user with no account cannot.
    bot = app_password(server.data_dir, "bot")
    status, _, body = Http(server.port, "bot", bot)("MKCALENDAR", "/dav/calendars/bot/mine/")
    assert status == 403 and b"accounts" in body


def test_the_same_uid_in_two_calendars_is_two_events(server: ServerProcess) -> None:
    subprocess.run(barosync_cmd("user", "create", "olive", "--admin", "--password-stdin", "--data",
                                str(server.data_dir)), input="olive's long password\n", text=True, check=True,
                   capture_output=True, timeout=60)
    http = Http(server.port, "olive", app_password(server.data_dir, "olive"))
    for cal in ("c1", "c2"):
        assert http("MKCALENDAR", f"/dav/calendars/olive/{cal}/")[0] == 201
    # A copy to another calendar keeps the UID (python-caldav's copy(keep_uid=True)).
    assert http("PUT", "/dav/calendars/olive/c1/u%40x.ics", event_ics("u@x", "Party"))[0] == 201
    status, _, body = http("PUT", "/dav/calendars/olive/c2/u%40x.ics", event_ics("u@x", "Party"))
    assert status == 201, body
    assert http("PUT", "/dav/calendars/olive/c2/u%40x.ics", event_ics("u@x", "Moved party"))[0] == 204
    assert b"SUMMARY:Party" in http("GET", "/dav/calendars/olive/c1/u%40x.ics")[2]
    assert http("DELETE", "/dav/calendars/olive/c2/u%40x.ics")[0] == 204
    assert http("GET", "/dav/calendars/olive/c2/u%40x.ics")[0] == 404
    assert http("GET", "/dav/calendars/olive/c1/u%40x.ics")[0] == 200


def test_an_app_sets_a_calendars_color_and_description_all_or_nothing(server: ServerProcess) -> None:
    subprocess.run(barosync_cmd("user", "create", "olive", "--admin", "--password-stdin", "--data",
                                str(server.data_dir)), input="olive's long password\n", text=True, check=True,
                   capture_output=True, timeout=60)
    http = Http(server.port, "olive", app_password(server.data_dir, "olive"))
    made = ('<c:mkcalendar xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav" xmlns:a="http://apple.com/ns/ical/">'
            '<d:set><d:prop><d:displayname>Garden</d:displayname><a:calendar-color>#22AA55FF</a:calendar-color>'
            '<c:calendar-description>Sowing and harvest</c:calendar-description></d:prop></d:set></c:mkcalendar>')
    assert http("MKCALENDAR", "/dav/calendars/olive/garden/", made)[0] == 201
    ask = ('<d:propfind xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav" xmlns:a="http://apple.com/ns/ical/">'
           '<d:prop><d:displayname/><a:calendar-color/><c:calendar-description/></d:prop></d:propfind>')

    def props() -> tuple[str, str, str | None]:
        status, _, body = http("PROPFIND", "/dav/calendars/olive/garden/", ask, Depth="0")
        assert status == 207, body
        root = ET.fromstring(body)
        text = lambda t: (root.find(f".//{t}").text if root.find(f".//{t}") is not None else None)  # noqa: E731
        return (text("{DAV:}displayname"), text("{http://apple.com/ns/ical/}calendar-color"),
                text("{urn:ietf:params:xml:ns:caldav}calendar-description"))

    assert props() == ("Garden", "#22AA55FF", "Sowing and harvest")
    patch = ('<d:propertyupdate xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav" '
             'xmlns:a="http://apple.com/ns/ical/"><d:set><d:prop><a:calendar-color>{color}</a:calendar-color>'
             '<d:displayname>Allotment</d:displayname></d:prop></d:set>'
             '<d:remove><d:prop><c:calendar-description/></d:prop></d:remove></d:propertyupdate>')
    status, _, body = http("PROPPATCH", "/dav/calendars/olive/garden/", patch.format(color="green"))
    assert status == 207 and b"403 Forbidden" in body and b"424 Failed Dependency" in body
    assert props() == ("Garden", "#22AA55FF", "Sowing and harvest")  # all or nothing
    status, _, body = http("PROPPATCH", "/dav/calendars/olive/garden/", patch.format(color="#8844CC"))
    assert status == 207 and b"200 OK" in body and b"403" not in body
    assert props() == ("Allotment", "#8844CC", None)
