"""ical.py and recurrence.py without a server: resources in and out, apps' extras
kept, recurrence validated and expanded."""

from __future__ import annotations

from datetime import datetime, timezone

import icalendar
import pytest

from barosync.formats import ical, occurrences
from barosync.domain.models import ValidationError, apply_changes, changed_fields, event_from_wire, event_to_wire, new_event
from barosync.domain.recurrence import check_recurrence

from ical_helpers import CORPUS, same_calendar, split_by_uid

RESOURCES = [(f"{path.name}:{uid}", data) for path in sorted(CORPUS.glob("*.ics"))
             for uid, data in split_by_uid(path.read_bytes()).items()]


def stored(data: bytes, event_id: str = "e1") -> dict:
    fields = ical.from_resource(data, project_id="p1", event_id=event_id)
    return event_to_wire(new_event(fields, user_id="alice", now_ms=1_790_000_000_000))


@pytest.mark.parametrize("name,data", RESOURCES, ids=[n for n, _ in RESOURCES])
def test_corpus_resources_come_back_with_every_property(name: str, data: bytes) -> None:
    ok, why = same_calendar(data, ical.resource_bytes(stored(data)))
    assert ok, why


def test_the_corpus_covers_what_apps_send() -> None:
    text = b"".join(data for _, data in RESOURCES)
    for needle in (b"VALUE=DATE:", b"RRULE:", b"EXDATE", b"RDATE", b"RECURRENCE-ID", b"BEGIN:VALARM", b"CATEGORIES",
                   b"X-MICROSOFT", b"W. Europe Standard Time", b"Asia/Tokyo", b"PARTSTAT=", b"LANGUAGE="):
        assert needle in text, needle
    assert len({n.split(":")[0].split("-")[0] for n, _ in RESOURCES}) == 4  # apple, google, outlook, thunderbird


def test_fields_are_in_utc_with_the_zone_kept() -> None:
    data = split_by_uid((CORPUS / "apple-weekly-override.ics").read_bytes())["5F2B-1@apple"]
    e = stored(data)
    assert (e["startDate"], e["endDate"], e["timeZone"]) == ("2026-01-05T08:00:00Z", "2026-01-05T09:00:00Z", "Europe/Berlin")
    assert e["recurrence"] == {
        "rrule": "FREQ=WEEKLY;COUNT=10;BYDAY=MO", "rdates": [], "exdates": ["2026-01-12T08:00:00Z"],
        "overrides": [{"recurrenceId": "2026-01-19T08:00:00Z", "startDate": "2026-01-19T13:00:00Z",
                       "endDate": "2026-01-19T14:00:00Z", "title": "Weekly sync (moved)"}]}
    assert "SUMMARY" not in e["ical"] and "BEGIN:VALARM" in e["ical"]  # modeled text is not kept twice


def test_a_browser_edit_keeps_the_apps_zone_alarms_and_attendee_parameters() -> None:
    data = split_by_uid((CORPUS / "apple-weekly-override.ics").read_bytes())["5F2B-1@apple"]
    e = event_from_wire(stored(data))
    changes = changed_fields({"title": "Weekly sync v2", "startDate": "2026-01-05T09:00:00Z",
                              "endDate": "2026-01-05T10:00:00Z", "attendees": ["bob@example.com", "carol"]})
    out = icalendar.Calendar.from_ical(ical.resource_bytes(event_to_wire(apply_changes(e, changes, user_id="bob", now_ms=2))))
    master = next(c for c in out.walk("VEVENT") if c.get("recurrence-id") is None)
    assert str(master["summary"]) == "Weekly sync v2"
    assert master["dtstart"].params["TZID"] == "Europe/Berlin"
    assert master.decoded("dtstart").replace(tzinfo=None) == datetime(2026, 1, 5, 10, 0)  # 09:00Z in Berlin
    assert [str(a) for a in master["attendee"]] == ["mailto:bob@example.com", "urn:barosync:user:carol"]
    assert master["attendee"][0].params["PARTSTAT"] == "ACCEPTED"
    assert len(master.walk("VALARM")) == 1 and str(master["categories"].to_ical()) == "b'Work,Team'"


def test_an_event_made_in_a_browser_is_a_plain_resource() -> None:
    e = event_to_wire(new_event({"projectId": "p1", "id": "b1", "title": "Lunch", "startDate": "2026-02-02T12:00:00Z",
                                 "endDate": "2026-02-02T13:00:00Z", "attendees": ["ann@example.org"]},
                                user_id="ann", now_ms=1_790_000_000_000))
    cal = icalendar.Calendar.from_ical(ical.resource_bytes(e))
    [v] = cal.walk("VEVENT")
    assert (str(v["uid"]), str(v["summary"]), v.decoded("sequence")) == ("b1", "Lunch", 0)
    assert v.decoded("dtstart") == datetime(2026, 2, 2, 12, tzinfo=timezone.utc)


def test_recurrence_and_overrides_expand_into_a_range() -> None:
    data = split_by_uid((CORPUS / "apple-weekly-override.ics").read_bytes())["5F2B-1@apple"]
    e = stored(data)
    start, end = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, tzinfo=timezone.utc)
    got = sorted(v.decoded("dtstart").astimezone(timezone.utc) for v in occurrences.of(e, start, end))
    # Mondays 5, 19 (moved to 13:00Z), 26; the 12th is an EXDATE.
    assert got == [datetime(2026, 1, 5, 8, tzinfo=timezone.utc), datetime(2026, 1, 19, 13, tzinfo=timezone.utc),
                   datetime(2026, 1, 26, 8, tzinfo=timezone.utc)]
    assert occurrences.overlaps(e, datetime(2026, 1, 12, tzinfo=timezone.utc), datetime(2026, 1, 13, tzinfo=timezone.utc)) is False
    assert occurrences.overlaps(e, datetime(2026, 3, 2, tzinfo=timezone.utc), datetime(2026, 3, 3, tzinfo=timezone.utc)) is True
    assert occurrences.overlaps(e, datetime(2026, 6, 1, tzinfo=timezone.utc), None) is False  # COUNT=10 is over by then
    expanded = occurrences.expanded(e, start, end)
    rids = sorted(str(v["recurrence-id"].to_ical().decode()) for v in expanded.walk("VEVENT"))
    assert rids == ["20260105T080000Z", "20260119T080000Z", "20260126T080000Z"]
    assert all(v.get("rrule") is None for v in expanded.walk("VEVENT"))


@pytest.mark.parametrize("data,why", [
    (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VFREEBUSY\r\nUID:t\r\nEND:VFREEBUSY\r\nEND:VCALENDAR\r\n", "VEVENT"),
    (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VTODO\r\nUID:t\r\nEND:VTODO\r\nBEGIN:VEVENT\r\nUID:t\r\n"
     b"DTSTART:20260101T000000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n", "one kind of component"),
    (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VTODO\r\nUID:t\r\nDUE:nonsense\r\nEND:VTODO\r\nEND:VCALENDAR\r\n",
     "date format"),
    (b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:a\r\nDTSTART:20260101T000000Z\r\nEND:VEVENT\r\n"
     b"BEGIN:VEVENT\r\nUID:b\r\nDTSTART:20260101T000000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n", "one event"),
    (b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:a\r\nSUMMARY:x\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n", "DTSTART"),
    (b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:a\r\nRECURRENCE-ID:20260101T000000Z\r\nDTSTART:20260101T000000Z\r\n"
     b"END:VEVENT\r\nEND:VCALENDAR\r\n", "without RECURRENCE-ID"),
    (b"not iCalendar at all", "iCalendar"),
])
def test_resources_barosync_cannot_store_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(ical.IcalError, match=why):
        ical.from_resource(data, project_id="p1", event_id="e1")


@pytest.mark.parametrize("value,field", [
    ("weekly", "recurrence"),
    ({"rrule": "WEEKLY"}, "recurrence.rrule"),
    ({"rrule": "BYDAY=MO"}, "recurrence.rrule"),
    ({"rrule": "FREQ=DAILY;COUNT=2;UNTIL=20260101T000000Z"}, "recurrence.rrule"),
    ({"rrule": "FREQ=DAILY", "exdates": ["tomorrow"]}, "recurrence.exdates"),
    ({"rrule": "FREQ=DAILY", "overrides": [{"recurrenceId": "2026-01-01T00:00:00Z"}]}, "recurrence.overrides.startDate"),
    ({"rrule": "FREQ=DAILY", "overrides": [{"recurrenceId": "2026-01-01T00:00:00Z", "startDate": "2026-01-02T00:00:00Z",
                                            "endDate": "2026-01-01T00:00:00Z"}]}, "recurrence.overrides.endDate"),
    ({"rrule": "FREQ=DAILY", "every": 2}, "recurrence"),
    ({"rdates": []}, "recurrence"),
])
def test_recurrence_is_validated_naming_the_field(value: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_recurrence(value)
    assert caught.value.field == field


def test_recurrence_is_normalised_to_every_key() -> None:
    assert check_recurrence({"rrule": "FREQ=WEEKLY;BYDAY=MO"}) == {
        "rrule": "FREQ=WEEKLY;BYDAY=MO", "rdates": [], "exdates": [], "overrides": []}
    assert check_recurrence(None) is None


def test_the_feed_carries_recurrence_and_each_zone_once() -> None:
    events = [stored(data, f"e{i}") for i, (_, data) in enumerate(RESOURCES)]
    cal = icalendar.Calendar.from_ical(ical.feed("p1", events + events[:1]))
    zones = [str(z["tzid"]) for z in cal.walk("VTIMEZONE")]
    assert len(zones) == len(set(zones)) and "Europe/Berlin" in zones
    assert any(v.get("rrule") is not None for v in cal.walk("VEVENT"))


@pytest.mark.parametrize("start, default_end", [("DTSTART;VALUE=DATE:20261207", "2026-12-08"),
                                                ("DTSTART:20261207T090000Z", "2026-12-07T09:00:00Z")])
def test_an_event_stored_without_an_end_comes_back_without_one(start: str, default_end: str) -> None:
    """RFC 5545's default end (a day for a date, the start for a date-time) is the
    event's end, but the app stored no DTEND: it gets none back, until the end moves."""
    text = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:no-end\r\n"
            f"DTSTAMP:20261201T000000Z\r\n{start}\r\nSUMMARY:Holiday\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
    fields = ical.from_resource(text, project_id="p1", event_id="no-end")
    assert fields["endDate"] == default_end
    event = {**fields, "version": 1, "createdAt": 1, "updatedAt": 1}
    back = ical.resource_bytes(event)
    assert b"DTEND" not in back and b"DURATION" not in back and b"X-BAROSYNC" not in back, back
    moved = {**event, "endDate": "2026-12-10" if "VALUE=DATE" in start else "2026-12-07T10:00:00Z"}
    assert b"DTEND" in ical.resource_bytes(moved)


def test_a_zone_without_its_vtimezone_gets_one_built_once_per_process() -> None:
    event = {"id": "e1", "projectId": "p", "title": "Standup", "startDate": "2026-12-07T09:00:00Z",
             "endDate": "2026-12-07T10:00:00Z", "timeZone": "America/Chicago", "allDay": False, "version": 1}
    built = ical._vtimezone.cache_info().misses
    renders = [icalendar.Calendar.from_ical(ical.to_resource(event).to_ical()) for _ in range(3)]
    for cal in renders:  # each render carries the zone its times name (RFC 5545)
        assert [str(z["tzid"]) for z in cal.walk("VTIMEZONE")] == ["America/Chicago"]
        assert str(cal.walk("VEVENT")[0]["dtstart"].params["TZID"]) == "America/Chicago"
    assert ical._vtimezone.cache_info().misses - built <= 1  # built at most once, then shared
