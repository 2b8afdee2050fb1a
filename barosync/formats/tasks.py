"""Tasks and journals (VTODO, VJOURNAL) as calendar resources: kept as the app sent
them, with the fields barosync shows read from them. No IO, no trio.

barosync models events. A task or a journal entry is stored as an event whose
``ical`` is the whole resource as the app sent it, nothing taken out:

- its title, description and location are the component's, and a browser's edit of
  them is written back into the resource;
- its dates are the app's: ``startDate`` is DTSTART, else DUE, else when it was
  completed or made; ``endDate`` is DUE, else DTSTART plus DURATION, else the start.
  So the web calendar shows it where it has a date, and every other reader of events
  (REST, the ICS feed, clients) works unchanged;
- which time ranges it overlaps is RFC 4791 §9.9's rules on the component itself.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

import icalendar

from ..domain import expansion
from ..domain.recurrence import known_valid
from .values import IcalError, as_list, as_utc, iso

VEVENT, VTODO, VJOURNAL = "VEVENT", "VTODO", "VJOURNAL"
COMPONENTS = (VTODO, VJOURNAL)
# The text fields a browser edits, written back into the resource.
TEXT = (("title", "SUMMARY"), ("description", "DESCRIPTION"), ("location", "LOCATION"))
UNTITLED = "(no title)"
_FAR_PAST = datetime(1, 1, 2, tzinfo=timezone.utc)
_FAR_FUTURE = datetime(9999, 12, 30, tzinfo=timezone.utc)


def component(e: dict[str, Any]) -> str:
    """What a stored event is: VEVENT, VTODO or VJOURNAL (from its ``ical``; an
    event's always has a VEVENT, a task's or journal's none)."""
    text = e.get("ical")
    if not text or "\nBEGIN:VEVENT" in text:
        return VEVENT
    if "\nBEGIN:VTODO" in text:
        return VTODO
    return VJOURNAL if "\nBEGIN:VJOURNAL" in text else VEVENT


def kind_of(cal: icalendar.Calendar) -> str | None:
    """VTODO or VJOURNAL when the resource holds tasks or journals, else None.
    A resource of several kinds is an IcalError (RFC 4791 §4.1)."""
    kinds = {c.name for c in cal.subcomponents} - {"VTIMEZONE"}
    if not kinds & set(COMPONENTS):
        return None
    if len(kinds) != 1:
        raise IcalError(f"a calendar object resource holds one kind of component, not {', '.join(sorted(kinds))}",
                        "valid-calendar-object-resource")
    return kinds.pop()


def master(cal: icalendar.Calendar, kind: str) -> icalendar.Component:
    """The component itself (the one without RECURRENCE-ID)."""
    return next(c for c in cal.subcomponents if c.name == kind and c.get("recurrence-id") is None)


def from_resource(cal: icalendar.Calendar, text: str, kind: str, *, project_id: str, event_id: str,
                  now: datetime | None = None) -> dict[str, Any]:
    """Event fields for a task or journal resource (``text`` is what the app sent)."""
    items = [c for c in cal.subcomponents if c.name == kind]
    uids = {str(c.get("uid", "")) for c in items}
    if len(uids) != 1 or "" in uids:
        raise IcalError(f"a calendar object resource holds one {kind}: every {kind} with the same, non-empty UID")
    if sum(1 for c in items if c.get("recurrence-id") is None) != 1:
        raise IcalError(f"the resource needs exactly one {kind} without RECURRENCE-ID (the {kind} itself)")
    main = master(cal, kind)
    start, end = _span(main, kind, now or datetime.now(timezone.utc))
    for rule in as_list(main.get("rrule")):
        why = expansion.unexpandable(rule.to_ical().decode(), start)
        if why is not None:
            raise IcalError(f"{kind} {main.get('uid')}: its RRULE {why}", "valid-calendar-data")
    zone = next((main[n].params.get("TZID") for n in ("dtstart", "due") if main.get(n) is not None), None)
    fields: dict[str, Any] = {
        "id": event_id, "projectId": project_id, "title": _text(main, "summary") or UNTITLED,
        "startDate": iso(start), "endDate": iso(end), "allDay": not isinstance(start, datetime),
        "description": _text(main, "description"), "location": _text(main, "location"),
        "timeZone": str(zone) if zone and isinstance(start, datetime) else None, "recurrence": None,
        "ical": text,
    }
    fields["title"] = fields["title"][:500]
    known_valid(text)  # parsed just now: no need to parse it again
    return fields


def _span(c: icalendar.Component, kind: str, now: datetime) -> tuple[date | datetime, date | datetime]:
    start, due = _when(c, "dtstart"), _when(c, "due" if kind == VTODO else "dtend")
    if due is None and start is not None and c.get("duration") is not None:
        duration = c.decoded("duration")
        if isinstance(duration, timedelta):
            due = start + duration
    first = start or due or _when(c, "completed") or _when(c, "created") or _when(c, "dtstamp") or now
    last = due or first
    if isinstance(first, datetime) != isinstance(last, datetime) or (
            isinstance(first, datetime) and isinstance(last, datetime)
            and (first.tzinfo is None) != (last.tzinfo is None)):
        first, last = as_utc(first), as_utc(last)  # a mix of kinds: both as UTC instants
    if as_utc(last) < as_utc(first):
        last = first  # a DUE before DTSTART (RFC 5545 forbids it): an instant
    return first, last


def _when(c: icalendar.Component, name: str) -> date | datetime | None:
    if c.get(name) is None:
        return None
    value = c.decoded(name)
    if not isinstance(value, (date, datetime)):
        raise IcalError(f"{c.name} {c.get('uid')}: {name.upper()} is not a date or a date-time")
    return value


def _text(c: icalendar.Component, name: str) -> str | None:
    value = c.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value is not None and str(value).strip() else None


# -- out ------------------------------------------------------------------------------------


def to_resource(e: dict[str, Any]) -> icalendar.Calendar:
    """The resource as the app sent it, with a browser's edits of its text."""
    cal = icalendar.Calendar.from_ical(e["ical"])
    _write_edits(master(cal, component(e)), e)
    return cal


def resource_bytes(e: dict[str, Any]) -> bytes:
    """The bytes the app sent when no browser edited the text since (the usual case)."""
    cal = icalendar.Calendar.from_ical(e["ical"])
    return cal.to_ical() if _write_edits(master(cal, component(e)), e) else e["ical"].encode()


def _write_edits(main: icalendar.Component, e: dict[str, Any]) -> bool:
    """The event's title, description and location written into the component where
    a browser changed them; whether any was."""
    edited = False
    for field, name in TEXT:
        if _edited(main, field, name, e.get(field)):
            edited = True
            main.pop(name, None)
            if e.get(field):
                main.add(name.lower(), e[field])
    return edited


def _edited(c: icalendar.Component, field: str, name: str, value: str | None) -> bool:
    sent = _text(c, name)
    if field == "title":
        return (sent or UNTITLED)[:500] != value
    return sent != value


# -- RFC 4791 §9.9 --------------------------------------------------------------------------


def overlaps(c: icalendar.Component, start: datetime | None, end: datetime | None) -> bool:
    """Whether a task or journal (one occurrence: no recurrence) overlaps
    [start, end), by RFC 4791 §9.9's table; an open end is unbounded."""
    lo, hi = start or _FAR_PAST, end or _FAR_FUTURE
    at = {n: as_utc(v) for n in ("dtstart", "due", "completed", "created")
          if (v := _when(c, n)) is not None}
    if c.name == VJOURNAL:
        if "dtstart" not in at:
            return False
        day = not isinstance(c.decoded("dtstart"), datetime)
        return lo <= at["dtstart"] + (timedelta(days=1) if day else timedelta(0)) and hi > at["dtstart"]
    s = at.get("dtstart")
    if s is not None:
        duration = c.decoded("duration") if c.get("duration") is not None else None
        if isinstance(duration, timedelta):
            return lo <= s + duration and (hi > s or hi >= s + duration)
        if "due" in at:
            return (lo < at["due"] or lo <= s) and (hi > s or hi >= at["due"])
        return lo <= s < hi
    if "due" in at:
        return lo < at["due"] <= hi
    if "completed" in at and "created" in at:
        return (lo <= at["created"] or lo <= at["completed"]) and (hi >= at["created"] or hi >= at["completed"])
    if "completed" in at:
        return lo <= at["completed"] <= hi
    if "created" in at:
        return hi > at["created"]
    return True


def recurring(c: icalendar.Component) -> bool:
    return c.get("rrule") is not None or c.get("rdate") is not None
