"""Event validation and (un)structuring, without IO."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from barosync.domain.models import (
    CLIENT_FIELDS,
    MAX_ID_BYTES,
    MAX_ID_CHARS,
    MAX_TITLE_CHARS,
    Event,
    ValidationError,
    apply_changes,
    changed_fields,
    event_from_wire,
    event_to_wire,
    new_event,
)

NOW = 1_764_144_000_000


def payload(**fields: Any) -> dict[str, Any]:
    body = {"projectId": "p1", "title": "Standup", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def create(**fields: Any) -> Event:
    return new_event(payload(**fields), user_id="alice", now_ms=NOW)


def refused_field(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        create(**fields)
    assert info.value.field in str(info.value)
    return info.value.field


def update(event: Event, user: str = "bob", now: int = NOW + 1000, **fields: Any) -> Event:
    return apply_changes(event, changed_fields(fields), user_id=user, now_ms=now)


# -- new_event --------------------------------------------------------------------------


def test_new_event_is_version_one_owned_by_the_author():
    event = create(description="daily", location="Room 1", color="#ff0000", allDay=False)
    assert event.project_id == "p1"
    assert event.title == "Standup"
    assert event.start_date == "2026-01-05T09:00:00Z" and event.end_date == "2026-01-05T09:15:00Z"
    assert (event.description, event.location, event.color) == ("daily", "Room 1", "#ff0000")
    assert event.version == 1
    assert event.created_at == event.updated_at == NOW
    assert event.created_by == event.updated_by == "alice"


def test_new_event_keeps_a_client_chosen_id_or_makes_unique_ones():
    assert create(id="evt-1").id == "evt-1"
    generated = {create().id for _ in range(50)}
    assert len(generated) == 50 and all(generated)


@pytest.mark.parametrize("wire", ["projectId", "title", "startDate", "endDate"])
def test_required_fields_missing_are_named(wire):
    assert refused_field(**{wire: ...}) == wire


@pytest.mark.parametrize("wire", ["projectId", "title", "startDate", "endDate"])
def test_required_fields_null_are_named(wire):
    assert refused_field(**{wire: None}) == wire


@pytest.mark.parametrize("title", ["", "   ", "x" * (MAX_TITLE_CHARS + 1), 5, ["Standup"]])
def test_bad_titles_are_refused(title):
    assert refused_field(title=title) == "title"


@pytest.mark.parametrize("title", ["x", "x" * MAX_TITLE_CHARS, "회의 ☕"])
def test_titles_of_one_to_500_chars_are_accepted(title):
    assert create(title=title).title == title


@pytest.mark.parametrize(
    "start, end",
    [
        ("2026-01-05", "2026-01-05"),  # all-day, one day
        ("2026-01-05", "2026-01-07"),
        ("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"),
        ("2026-01-05T09:00:00.123Z", "2026-01-05T09:00:00.124Z"),
        ("2026-01-05T09:00:00+09:00", "2026-01-05T00:00:00Z"),  # same instant, different offsets
        ("2026-01-05T09:00:00", "2026-01-05T09:30:00"),  # both floating (no offset)
        ("2026-01-05", "2026-01-05T12:00:00"),  # date-only counts as floating midnight
    ],
)
def test_iso_8601_dates_are_accepted_verbatim(start, end):
    event = create(startDate=start, endDate=end)
    assert (event.start_date, event.end_date) == (start, end)


@pytest.mark.parametrize(
    "start, end",
    [
        ("2026-01-05T10:00:00Z", "2026-01-05T09:59:59Z"),
        ("2026-01-06", "2026-01-05"),
        ("2026-01-05T09:00:00+09:00", "2026-01-04T23:59:59Z"),  # earlier once offsets are applied
    ],
)
def test_end_before_start_is_refused_on_end_date(start, end):
    assert refused_field(startDate=start, endDate=end) == "endDate"


@pytest.mark.parametrize(
    "start, end",
    [
        ("2026-01-05T09:00:00Z", "2026-01-05T10:00:00"),
        ("2026-01-05T09:00:00", "2026-01-05T10:00:00+01:00"),
        ("2026-01-05", "2026-01-05T10:00:00Z"),
    ],
)
def test_mixing_floating_and_offset_times_is_refused(start, end):
    assert refused_field(startDate=start, endDate=end) == "endDate"


@pytest.mark.parametrize("value", ["tomorrow", "2026-13-01", "2026-02-30", "05/01/2026", "", 1767600000000, True])
def test_invalid_start_date_is_named(value):
    assert refused_field(startDate=value) == "startDate"


@pytest.mark.parametrize("value", ["2026-01-05T25:00:00Z", "soon", ["2026-01-05"]])
def test_invalid_end_date_is_named(value):
    assert refused_field(endDate=value) == "endDate"


def test_date_with_a_trailing_nul_is_refused():
    assert refused_field(startDate="2026-01-05T09:00:00\x00") == "startDate"


def test_date_error_message_shows_an_example():
    with pytest.raises(ValidationError) as info:
        create(startDate="next tuesday")
    assert "RFC 3339" in info.value.message and "2026-01-31" in info.value.message and "next tuesday" in info.value.message


def test_attendees_are_deduplicated_in_order():
    assert create(attendees=["bob", "carol", "bob", "alice", "carol"]).attendees == ["bob", "carol", "alice"]


def test_attendees_null_means_none():
    assert create(attendees=None).attendees == []


@pytest.mark.parametrize("attendees", ["bob", {"bob": True}, ["bob", 5], ["bob", ""], ["x" * 321], [None]])
def test_attendees_must_be_a_list_of_strings(attendees):
    assert refused_field(attendees=attendees) == "attendees"


@pytest.mark.parametrize(
    "wire, value",
    [("allDay", "yes"), ("allDay", 1), ("description", 5), ("location", ["a"]), ("color", "c" * 33), ("description", "d" * 10_001)],
)
def test_optional_fields_of_the_wrong_shape_are_named(wire, value):
    assert refused_field(**{wire: value}) == wire


@pytest.mark.parametrize("wire, value", [("id", ""), ("id", 7), ("id", "i" * 129), ("projectId", ""), ("projectId", 3)])
def test_bad_ids_are_named(wire, value):
    assert refused_field(**{wire: value}) == wire


def test_server_owned_fields_from_the_client_are_ignored():
    event = create(version=99, createdAt=1, updatedAt=2, createdBy="mallory", updatedBy="mallory", userId="mallory", junk=True)
    assert event.version == 1
    assert event.created_at == event.updated_at == NOW
    assert event.created_by == event.updated_by == "alice"


# -- changed_fields / apply_changes -----------------------------------------------------------


def test_update_changes_only_the_given_fields_and_bumps_the_version():
    event = create(description="daily", attendees=["bob"])
    updated = update(event, title="Retro", attendees=["bob", "carol"])
    assert updated.title == "Retro" and updated.attendees == ["bob", "carol"]
    assert updated.description == "daily" and updated.start_date == event.start_date
    assert updated.version == event.version + 1
    assert updated.updated_by == "bob" and updated.updated_at == NOW + 1000
    assert updated.created_by == "alice" and updated.created_at == NOW
    assert updated.id == event.id and updated.project_id == event.project_id


def test_changed_fields_ignores_server_owned_and_unknown_fields():
    assert changed_fields({"id": "e1", "version": 3, "projectId": "p2", "createdBy": "mallory", "title": "Retro", "junk": 1}) == {"title": "Retro"}


def test_changed_fields_clears_optional_fields_with_null():
    assert changed_fields({"description": None, "location": None, "color": None, "attendees": None, "allDay": None}) == {
        "description": None,
        "location": None,
        "color": None,
        "attendees": [],
        "allDay": False,
    }


@pytest.mark.parametrize("wire", ["title", "startDate", "endDate"])
def test_required_fields_cannot_be_cleared(wire):
    with pytest.raises(ValidationError) as info:
        changed_fields({wire: None})
    assert info.value.field == wire


@pytest.mark.parametrize("wire, value", [("title", ""), ("startDate", "nope"), ("attendees", "bob"), ("allDay", "no")])
def test_changed_fields_names_the_bad_field(wire, value):
    with pytest.raises(ValidationError) as info:
        changed_fields({wire: value})
    assert info.value.field == wire


def test_update_moving_end_before_start_is_refused_on_end_date():
    event = create()
    with pytest.raises(ValidationError) as info:
        update(event, endDate="2026-01-05T08:00:00Z")
    assert info.value.field == "endDate"
    with pytest.raises(ValidationError) as info:
        update(event, startDate="2026-01-05T10:00:00Z")
    assert info.value.field == "endDate"


def test_update_mixing_floating_and_offset_times_is_refused():
    with pytest.raises(ValidationError) as info:
        update(create(), endDate="2026-01-05T10:00:00")
    assert info.value.field == "endDate"


def test_update_moving_both_dates_together_is_accepted():
    updated = update(create(), startDate="2026-02-01", endDate="2026-02-02")
    assert (updated.start_date, updated.end_date) == ("2026-02-01", "2026-02-02")


def test_apply_changes_leaves_the_stored_event_untouched():
    event = create(attendees=["bob"])
    before = event_to_wire(event)
    update(event, title="Retro", attendees=["carol"])
    assert event_to_wire(event) == before


# -- wire form ---------------------------------------------------------------------------


def test_wire_form_uses_camel_case_names():
    wire = event_to_wire(create(id="e1", allDay=False))
    assert set(wire) == {
        "id", "projectId", "title", "description", "startDate", "endDate", "allDay", "location",
        "attendees", "color", "recurrence", "timeZone", "ical", "version", "createdAt", "updatedAt", "createdBy", "updatedBy",
    }
    assert wire["projectId"] == "p1" and wire["startDate"] == "2026-01-05T09:00:00Z" and wire["createdBy"] == "alice"


# What check_id accepts: bounded in characters and in UTF-8 bytes, no NUL.
ids = st.text(min_size=1, max_size=MAX_ID_CHARS).filter(lambda s: "\0" not in s and len(s.encode()) <= MAX_ID_BYTES)
optional_text = st.none() | st.text(max_size=50)
events = st.builds(
    Event,
    id=ids,
    project_id=ids,
    title=st.text(min_size=1, max_size=MAX_TITLE_CHARS),
    start_date=st.datetimes().map(lambda d: d.isoformat()),
    end_date=st.dates().map(lambda d: d.isoformat()),
    description=optional_text,
    all_day=st.booleans(),
    location=optional_text,
    attendees=st.lists(st.text(min_size=1, max_size=40), unique=True, max_size=8),
    color=st.none() | st.text(max_size=32),
    version=st.integers(min_value=1, max_value=2**53),
    created_at=st.integers(min_value=0, max_value=2**53),
    updated_at=st.integers(min_value=0, max_value=2**53),
    created_by=ids,
    updated_by=ids,
)


@settings(deadline=None)
@given(events)
def test_wire_round_trip(event):
    assert event_from_wire(event_to_wire(event)) == event


@settings(deadline=None)
@given(events)
def test_wire_round_trip_through_json(event):
    # What the store and the clients actually hold.
    assert event_from_wire(orjson.loads(orjson.dumps(event_to_wire(event)))) == event




@st.composite
def valid_payloads(draw: st.DrawFn) -> dict[str, Any]:
    start, end = sorted([draw(st.datetimes()), draw(st.datetimes())])
    as_dates = draw(st.booleans())
    body: dict[str, Any] = {
        "projectId": draw(ids),
        "title": draw(st.text(min_size=1, max_size=MAX_TITLE_CHARS).filter(str.strip)),
        "startDate": start.date().isoformat() if as_dates else start.isoformat(),
        "endDate": end.date().isoformat() if as_dates else end.isoformat(),
    }
    for wire, strategy in {
        "id": ids,
        "description": optional_text,
        "location": optional_text,
        "color": st.none() | st.text(max_size=32),
        "allDay": st.booleans(),
        "attendees": st.lists(st.text(min_size=1, max_size=40), max_size=8),
    }.items():
        if draw(st.booleans()):
            body[wire] = draw(strategy)
    return body


@settings(deadline=None)
@given(valid_payloads())
def test_a_created_event_sent_back_creates_the_same_client_fields(body):
    # A client that echoes an event it received (REST replay, copy to another tab)
    # gets the same event fields back: the wire form is valid input.
    first = new_event(body, user_id="alice", now_ms=NOW)
    again = new_event(event_to_wire(first), user_id="bob", now_ms=NOW + 1)
    assert {a: getattr(again, a) for a in CLIENT_FIELDS.values()} == {a: getattr(first, a) for a in CLIENT_FIELDS.values()}
    assert (again.id, again.project_id, again.version, again.created_by) == (first.id, first.project_id, 1, "bob")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)
wire_names = st.sampled_from(sorted({*CLIENT_FIELDS, "id", "projectId", "version"}))
date_like = st.sampled_from(["2026-01-05", "2026-01-05T09:00:00Z", "2026-01-05T09:00:00", "2026-01-04T23:00:00-02:00", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(wire_names, json_values | date_like | st.text(max_size=5), max_size=10))
def test_arbitrary_payloads_give_an_event_or_a_validation_error(body):
    try:
        event = new_event(body, user_id="alice", now_ms=NOW)
    except ValidationError as e:
        assert e.field in {*CLIENT_FIELDS, "id", "projectId"}
        return
    assert isinstance(event, Event) and event.version == 1
    orjson.dumps(event_to_wire(event))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(wire_names, json_values | date_like, max_size=10))
def test_arbitrary_updates_give_an_event_or_a_validation_error(body):
    event = create(startDate="2026-01-05", endDate="2026-01-06")
    try:
        updated = apply_changes(event, changed_fields(body), user_id="bob", now_ms=NOW)
    except ValidationError as e:
        assert e.field in CLIENT_FIELDS
        return
    assert updated.version == 2 and updated.id == event.id and updated.project_id == event.project_id
