"""Recurrence expansion is bounded (expansion.py): rules refused at write time when the
expander could not bound them, stored rules from before that check stopped by the
guard, and a property over generated rules and windows. No sockets: the server-level
half is tests/test_hostile_requests.py."""

from __future__ import annotations

import sys
import tracemalloc
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from barosync.domain import expansion
from barosync.formats import ical, ics, occurrences
from barosync.domain.models import ValidationError, new_event

from ical_helpers import calendar

UTC = timezone.utc


def later(start: str) -> str:
    """An hour after a date-time (the same day for a date)."""
    if "T" not in start:
        return start
    return (datetime.fromisoformat(start.replace("Z", "+00:00")) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(rrule: str, start: str = "2026-01-05T09:00:00Z") -> Any:
    end = later(start)
    return new_event({"projectId": "p1", "title": "Series", "startDate": start, "endDate": end,
                      "recurrence": {"rrule": rrule}}, user_id="alice", now_ms=1)


def stored(rrule: str, start: str = "2026-01-05T09:00:00Z") -> dict[str, Any]:
    """An event as an older release may have stored it, before rules were bounded."""
    return {"id": "legacy", "projectId": "p1", "title": "Series", "startDate": start,
            "endDate": later(start), "allDay": False, "version": 1, "createdAt": 1, "updatedAt": 1,
            "recurrence": {"rrule": rrule, "rdates": [], "exdates": [], "overrides": []}}


@pytest.mark.parametrize("rrule, words", [
    ("FREQ=DAILY;INTERVAL=0", "INTERVAL"),
    ("FREQ=WEEKLY;INTERVAL=-2", "INTERVAL"),
    ("FREQ=MONTHLY;BYSETPOS=999999;BYDAY=MO", "BYSETPOS"),
    ("FREQ=DAILY;BYHOUR=24", "BYHOUR"),
    ("FREQ=NEVER;COUNT=3", "RRULE"),
    ("FREQ=SECONDLY", "COUNT or an UNTIL"),
    ("FREQ=MINUTELY;UNTIL=20301231T000000Z", "COUNT or an UNTIL"),
    ("FREQ=DAILY;BYHOUR=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23", "COUNT or an UNTIL"),
    # BY* parts that never meet: dateutil would step day by day to the year 9999.
    ("FREQ=MINUTELY;COUNT=5;BYMONTH=2;BYMONTHDAY=30", "no occurrence"),
    ("FREQ=HOURLY;COUNT=2;BYMONTH=4;BYMONTHDAY=31", "no occurrence"),
])
def test_rules_the_expander_cannot_bound_are_refused_when_written(rrule: str, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        create(rrule)
    assert refused.value.field == "recurrence.rrule"
    assert words in refused.value.message, refused.value.message


@pytest.mark.parametrize("rrule, start", [
    ("FREQ=DAILY", "2026-01-05T09:00:00Z"),
    ("FREQ=WEEKLY;BYDAY=MO,WE,FR", "2026-01-05T09:00:00Z"),
    ("FREQ=MONTHLY;BYDAY=-1FR", "2026-01-05T09:00:00Z"),
    ("FREQ=YEARLY", "1950-03-01"),  # a birthday
    ("FREQ=HOURLY;UNTIL=20260301T000000Z", "2026-01-05T09:00:00Z"),
    ("FREQ=SECONDLY;COUNT=10", "2026-01-05T09:00:00Z"),
    ("FREQ=MINUTELY;COUNT=3;BYMONTH=2;BYMONTHDAY=29", "2027-01-05T09:00:00Z"),  # a leap day, a year on
])
def test_everyday_rules_are_accepted(rrule: str, start: str) -> None:
    assert create(rrule, start).recurrence["rrule"] == rrule


def test_an_expansion_that_runs_long_inside_the_rule_engine_is_stopped_at_its_deadline() -> None:
    """dateutil steps day by day to 9999 for a rule whose BY* parts never meet (9 s of
    one core here) without returning: the guard stops it at the deadline, and the
    thread's profiler is restored."""
    cal = ical.to_resource(stored("FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30"))
    with pytest.raises(expansion.ExpansionLimit) as stopped:
        expansion.run_guarded(lambda: list(occurrences.between(cal, datetime(2026, 3, 1, tzinfo=UTC),
                                                        datetime(2026, 3, 2, tzinfo=UTC))), seconds=0.2)
    assert stopped.value.limit == "deadline"
    assert sys.getprofile() is None


@pytest.mark.parametrize("rrule", ["FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30", "FREQ=DAILY;INTERVAL=0",
                                   "FREQ=MONTHLY;BYSETPOS=999999;BYDAY=MO", "FREQ=SECONDLY"])
def test_a_rule_stored_by_an_older_release_and_refused_today_counts_as_its_first_occurrence(rrule: str) -> None:
    """One such event must not make every query of its calendar fail or time out."""
    event = stored(rrule)
    found = expansion.run_guarded(occurrences.of, event, datetime(2026, 1, 1, tzinfo=UTC),
                                  datetime(2027, 1, 1, tzinfo=UTC))
    assert [o.decoded("dtstart") for o in found] == [datetime(2026, 1, 5, 9, tzinfo=UTC)]
    assert not occurrences.overlaps(event, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def test_an_answer_holds_at_most_max_instances_of_one_event() -> None:
    event = stored("FREQ=MINUTELY;INTERVAL=15;COUNT=150000")  # 96 a day, for four years
    window = (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC))
    with pytest.raises(expansion.ExpansionLimit) as stopped:
        expansion.run_guarded(occurrences.of, event, *window, seconds=60)  # the count stops it, not the clock
    assert stopped.value.limit == "instances" and str(expansion.MAX_INSTANCES) in stopped.value.message
    week = (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 12, tzinfo=UTC))
    assert len(expansion.run_guarded(occurrences.of, event, *week)) == 7 * 96 - 36  # from 09:00 on the 5th


def test_an_open_window_is_clipped_to_the_dates_barosync_expands() -> None:
    lo, hi = expansion.clip(datetime(1200, 1, 1, tzinfo=UTC), None)
    assert (lo, hi) == (expansion.MIN_DATE, expansion.MAX_DATE)
    assert expansion.clip(datetime(2300, 1, 1, tzinfo=UTC), None) == (expansion.MAX_DATE, expansion.MAX_DATE)


# -- a property over generated rules and windows -----------------------------------------

FREQS = ["YEARLY", "MONTHLY", "WEEKLY", "DAILY", "HOURLY", "MINUTELY", "SECONDLY"]
DAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]


def _numbers(low: int, high: int, signed: bool = False) -> st.SearchStrategy[str]:
    one = st.integers(low - 2, high + 2)
    if signed:
        one = one | st.integers(-high - 2, -low)
    return st.lists(one, min_size=1, max_size=4).map(lambda xs: ",".join(map(str, xs)))


@st.composite
def rules(draw: st.DrawFn) -> str:
    parts = [f"FREQ={draw(st.sampled_from(FREQS))}"]
    if draw(st.booleans()):
        parts.append(f"INTERVAL={draw(st.integers(-1, 400))}")
    for name, values in (("BYMONTH", _numbers(1, 12)), ("BYMONTHDAY", _numbers(1, 31, True)),
                         ("BYYEARDAY", _numbers(1, 366, True)), ("BYWEEKNO", _numbers(1, 53, True)),
                         ("BYHOUR", _numbers(0, 23)), ("BYMINUTE", _numbers(0, 59)), ("BYSECOND", _numbers(0, 60)),
                         ("BYSETPOS", _numbers(1, 366, True)),
                         ("BYDAY", st.lists(st.sampled_from(DAYS), min_size=1, max_size=3).map(",".join))):
        if draw(st.integers(0, 4)) == 0:
            parts.append(f"{name}={draw(values)}")
    end = draw(st.sampled_from(["count", "until", "none"]))
    if end == "count":
        parts.append(f"COUNT={draw(st.integers(0, 300_000))}")
    elif end == "until":
        until = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=draw(st.integers(-1000, 2_000_000)))
        parts.append(f"UNTIL={until:%Y%m%dT%H%M%SZ}")
    return ";".join(parts)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules(), start_hours=st.integers(-200_000, 200_000), window_start=st.integers(-400_000, 1_600_000),
       window_hours=st.integers(1, 200_000))
def test_every_expansion_is_refused_or_ends_within_its_bounds(rule: str, start_hours: int, window_start: int,
                                                              window_hours: int) -> None:
    """Any FREQ, INTERVAL, BY* parts, COUNT or UNTIL or neither, any window: the rule is
    refused when written, or expanding it ends within its deadline (a limit reached
    says which) with at most MAX_INSTANCES occurrences, in bounded memory."""
    start = datetime(2026, 1, 1, 9, tzinfo=UTC) + timedelta(hours=start_hours)
    try:
        create(rule, start.strftime("%Y-%m-%dT%H:%M:%SZ"))
    except ValidationError as e:
        assert e.field == "recurrence.rrule"
        return
    event = stored(rule, start.strftime("%Y-%m-%dT%H:%M:%SZ"))
    lo = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=window_start)
    tracemalloc.start()
    try:
        found = expansion.run_guarded(occurrences.of, event, lo, lo + timedelta(hours=window_hours), seconds=0.5)
        assert len(found) <= expansion.MAX_INSTANCES
    except expansion.ExpansionLimit as e:
        assert e.limit in ("deadline", "instances")
    finally:
        _size, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 256 * 1024 * 1024, f"{rule}: {peak / 1e6:.0f} MB"


# -- ICS import -------------------------------------------------------------------------------

DAY = (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 6, tzinfo=UTC))


@pytest.mark.parametrize("vevent, words", [
    ("UID:a\r\nDTSTART:20260105T090000Z\r\nRRULE:FREQ=DAILY;INTERVAL=0", "INTERVAL"),
    # 199 bytes that made 86,400 events for a one-day window.
    ("UID:b\r\nDTSTART:20260105T000000Z\r\nRRULE:FREQ=SECONDLY", "COUNT or an UNTIL"),
    ("UID:c\r\nDTSTART:20260105T000000Z\r\nRRULE:FREQ=SECONDLY;COUNT=86400", "more than 1000 occurrences"),
    ("UID:d\r\nDTSTART:20260105T090000Z\r\nRRULE:FREQ=MONTHLY;BYSETPOS=999999;BYDAY=MO", "BYSETPOS"),
])
def test_an_import_refuses_rules_and_expansions_past_its_limits(vevent: str, words: str) -> None:
    with pytest.raises(ics.IcsError) as refused:
        expansion.run_guarded(lambda: ics.parse(calendar(vevent), project_id="p1", window=DAY))
    assert words in str(refused.value), refused.value


def test_an_import_window_and_event_count_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ics, "MAX_EVENTS", 100)  # the real cap, 50,000, takes a while to build
    one = calendar("UID:a\r\nDTSTART:20260105T090000Z\r\nRRULE:FREQ=DAILY")
    with pytest.raises(ics.IcsError, match="at most 3653 days"):
        ics.parse(one, project_id="p1", window=(datetime(2000, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)))
    many = calendar(*(f"UID:e{i}\r\nDTSTART:20260105T090000Z" for i in range(ics.MAX_EVENTS + 1)))
    with pytest.raises(ics.IcsError, match=f"more than {ics.MAX_EVENTS} events"):
        ics.parse(many, project_id="p1", window=DAY)


MALFORMED = [
    "DTSTART:notadate",
    "DTSTART:00000101T000000Z",
    "DTSTART:20260105T090000Z\r\nDURATION:PXYZ",
    "DTSTART:20260105T090000Z\r\nDURATION:P99999999999W",
    "DTSTART:20260105T090000Z\r\nRDATE:xx",
    "DTSTART:20260105T090000Z\r\nEXDATE:garbage\r\nRRULE:FREQ=DAILY;COUNT=3",
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_icalendar_is_refused_with_a_reason_never_a_crash(body: str) -> None:
    text = calendar(f"UID:m\r\n{body}")
    with pytest.raises(ical.IcalError) as refused:
        ical.from_resource(text, project_id="p1", event_id="m")
    assert str(refused.value)
    with pytest.raises(ics.IcsError):
        ics.parse(text, project_id="p1", window=DAY)
