"""Tasks and journals (formats/tasks.py) without a server: stored as the app sent
them, their dates read for the calendar, RFC 4791 §9.9's time ranges, expand."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from barosync.domain.models import apply_changes, changed_fields, event_from_wire, event_to_wire, new_event
from barosync.formats import ical, occurrences, tasks


def todo(*lines: str, uid: str = "t1", kind: str = "VTODO") -> bytes:
    body = "\r\n".join((f"UID:{uid}", "DTSTAMP:20261201T080000Z", *lines))
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//tasks//EN\r\nBEGIN:{kind}\r\n{body}\r\n"
            f"END:{kind}\r\nEND:VCALENDAR\r\n").encode()


def stored(data: bytes) -> dict:
    fields = ical.from_resource(data, project_id="p1", event_id="t1")
    return event_to_wire(new_event(fields, user_id="alice", now_ms=1_790_000_000_000))


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def test_a_task_is_stored_as_sent_and_shown_on_its_dates() -> None:
    data = todo("SUMMARY:File taxes", "DTSTART:20261210T090000Z", "DUE:20261215T170000Z", "PRIORITY:1",
                "STATUS:NEEDS-ACTION", "CATEGORIES:HOME")
    e = stored(data)
    assert tasks.component(e) == tasks.VTODO
    assert (e["title"], e["startDate"], e["endDate"], e["allDay"]) == ("File taxes", "2026-12-10T09:00:00Z",
                                                                       "2026-12-15T17:00:00Z", False)
    assert ical.resource_bytes(e) == data  # byte for byte: nothing taken out or added


@pytest.mark.parametrize("lines,start,end,all_day", [
    (("DUE;VALUE=DATE:20070501",), "2007-05-01", "2007-05-01", True),  # due only: a day
    (("DTSTART:20261210T090000Z", "DURATION:PT2H"), "2026-12-10T09:00:00Z", "2026-12-10T11:00:00Z", False),
    ((), "2026-12-01T08:00:00Z", "2026-12-01T08:00:00Z", False),  # no date: when it was made (DTSTAMP)
    (("CREATED:20261130T100000Z",), "2026-11-30T10:00:00Z", "2026-11-30T10:00:00Z", False),
    (("DTSTART;VALUE=DATE:20261210", "DUE:20261211T120000Z"), "2026-12-10T00:00:00Z", "2026-12-11T12:00:00Z", False),
    (("DTSTART:20261212T090000Z", "DUE:20261211T090000Z"), "2026-12-12T09:00:00Z", "2026-12-12T09:00:00Z", False),
])
def test_a_tasks_dates_come_from_what_it_has(lines: tuple[str, ...], start: str, end: str, all_day: bool) -> None:
    e = stored(todo("SUMMARY:t", *lines))
    assert (e["startDate"], e["endDate"], e["allDay"]) == (start, end, all_day)


def test_a_journal_entry_and_an_untitled_task() -> None:
    e = stored(todo("DTSTART;VALUE=DATE:20261207", "DESCRIPTION:Notes of the day", kind="VJOURNAL"))
    assert tasks.component(e) == tasks.VJOURNAL and (e["title"], e["startDate"]) == ("(no title)", "2026-12-07")
    assert e["description"] == "Notes of the day"


def test_a_browser_edit_of_the_title_is_written_back_and_the_rest_kept() -> None:
    e = stored(todo("SUMMARY:Draft", "DUE:20261215T170000Z", "X-APP-FLAG:keep me"))
    edited = event_to_wire(apply_changes(event_from_wire(e), changed_fields({"title": "Final", "location": "Desk"}),
                                         user_id="bob", now_ms=1_790_000_001_000))
    out = ical.resource_bytes(edited)
    assert b"SUMMARY:Final" in out and b"LOCATION:Desk" in out and b"X-APP-FLAG:keep me" in out
    assert b"DUE:20261215T170000Z" in out and b"Draft" not in out


def test_a_recurring_task_whose_rule_cannot_be_expanded_is_refused() -> None:
    with pytest.raises(ical.IcalError, match="RRULE"):
        stored(todo("SUMMARY:t", "DTSTART:20261210T090000Z", "RRULE:FREQ=SECONDLY"))


# RFC 4791 §9.9: which tasks a time range [Dec 10, Dec 20) selects.
@pytest.mark.parametrize("lines,hit", [
    (("DTSTART:20261211T090000Z",), True),
    (("DTSTART:20261201T090000Z",), False),
    (("DTSTART:20261201T090000Z", "DURATION:P15D"), True),
    (("DTSTART:20261201T090000Z", "DUE:20261212T090000Z"), True),
    (("DTSTART:20261201T090000Z", "DUE:20261205T090000Z"), False),
    (("DUE:20261215T090000Z",), True),
    (("DUE:20070501T090000Z",), False),
    (("COMPLETED:20261212T090000Z",), True),
    (("CREATED:20261225T090000Z",), False),
    (("CREATED:20261201T090000Z",), True),
    ((), True),  # no date at all: every day, until done
])
def test_the_time_ranges_a_task_overlaps(lines: tuple[str, ...], hit: bool) -> None:
    e = {**stored(todo("SUMMARY:t", *lines)), "ical": todo("SUMMARY:t", *lines).decode().replace(
        "DTSTAMP:20261201T080000Z\r\n", "")}  # DTSTAMP is not a date of the task's
    assert occurrences.overlaps(e, utc(2026, 12, 10), utc(2026, 12, 20)) is hit


def test_a_journal_overlaps_its_day_and_one_without_a_date_none() -> None:
    dated = stored(todo("DTSTART;VALUE=DATE:20261212", kind="VJOURNAL"))
    assert occurrences.overlaps(dated, utc(2026, 12, 12, 12), utc(2026, 12, 13))
    assert not occurrences.overlaps(dated, utc(2026, 12, 14), utc(2026, 12, 15))
    undated = {**dated, "ical": dated["ical"].replace("DTSTART;VALUE=DATE:20261212\r\n", "")}
    assert not occurrences.overlaps(undated, utc(2026, 12, 1), utc(2026, 12, 31))


def test_a_recurring_task_is_found_in_a_later_year_and_expanded() -> None:
    e = stored(todo("SUMMARY:Taxes", "DTSTART:19920415T133000Z", "DUE:19920516T045959Z", "RRULE:FREQ=YEARLY"))
    assert occurrences.overlaps(e, utc(2002, 1, 1), utc(2002, 12, 31))
    out = occurrences.expanded(e, utc(2002, 1, 1), utc(2002, 12, 31)).to_ical()
    assert out.count(b"BEGIN:VTODO") == 1 and b"DTSTART:20020415T133000Z" in out
    assert b"RECURRENCE-ID:20020415T133000Z" in out and b"RRULE" not in out
