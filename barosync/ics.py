"""iCalendar (RFC 5545) in and out, through the ``icalendar`` library. No IO, no trio.

The VEVENTs of an ``.ics`` file as barosync event fields (ICS import). The other
direction — events as iCalendar for the feed and CalDAV — is ical.py.

Recurring events are expanded into single events within a window the caller gives
(``recurring-ical-events`` applies RRULE, RDATE, EXDATE and RECURRENCE-ID overrides):
an import is a one-off copy, and expanding keeps every client — the seed's browser
client included — working without learning ``recurrence``. Each occurrence gets an id
derived from the UID and its start, so importing the same file again finds the same
events.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timedelta, timezone
from typing import Any

import icalendar
import recurring_ical_events

from .ical import as_utc, address

MAX_ID = 128
# Without a window from the caller: a month back, a year ahead.
DEFAULT_WINDOW = (timedelta(days=-31), timedelta(days=366))


class IcsError(ValueError):
    """The data is not an iCalendar file barosync can read; the message says why."""


# -- in -------------------------------------------------------------------------------------


def parse(data: bytes | str, *, project_id: str, window: tuple[datetime, datetime] | None = None,
          now: datetime | None = None) -> list[dict[str, Any]]:
    """Event fields (with ``id``) for every VEVENT, recurrences expanded into
    ``window`` (default: a month back to a year ahead of ``now``)."""
    try:
        cal = icalendar.Calendar.from_ical(data)
    except (ValueError, KeyError, IndexError) as e:
        raise IcsError(f"not an iCalendar file: {e}") from None
    if cal.name != "VCALENDAR":
        raise IcsError(f"expected a VCALENDAR, found {cal.name}")
    if window is None:
        now = now or datetime.now(timezone.utc)
        window = (now + DEFAULT_WINDOW[0], now + DEFAULT_WINDOW[1])
    out: list[dict[str, Any]] = []
    recurring = set()
    for v in cal.walk("VEVENT"):
        if v.get("rrule") is not None or v.get("rdate") is not None or v.get("recurrence-id") is not None:
            recurring.add(str(v.get("uid")))
        else:
            out.append(_fields(v, project_id, occurrence=None))
    if recurring:
        for v in recurring_ical_events.of(cal).between(window[0], window[1]):
            if str(v.get("uid")) in recurring:
                # Named by the occurrence it replaces, so a moved one keeps its id.
                which = v.decoded("recurrence-id") if v.get("recurrence-id") is not None else v.decoded("dtstart")
                out.append(_fields(v, project_id, occurrence=as_utc(which)))
    return out


def _iso(value: date | datetime) -> str:
    return as_utc(value).isoformat().replace("+00:00", "Z")


def event_id(uid: str, occurrence: datetime | None) -> str:
    """The barosync id of a VEVENT (or one occurrence of it): the UID when it fits."""
    base = uid if occurrence is None else f"{uid}/{occurrence.strftime('%Y%m%dT%H%M%SZ')}"
    if 0 < len(base.encode()) <= MAX_ID and "\0" not in base:
        return base
    return "ics-" + hashlib.sha256(base.encode()).hexdigest()[:40]


def _fields(v: icalendar.Event, project_id: str, occurrence: datetime | None) -> dict[str, Any]:
    uid = v.get("uid")
    if not uid:
        raise IcsError("a VEVENT has no UID")
    start = v.decoded("dtstart", None)
    if start is None:
        raise IcsError(f"VEVENT {uid} has no DTSTART")
    all_day = not isinstance(start, datetime)
    if v.get("dtend") is not None:
        end = v.decoded("dtend")
    elif v.get("duration") is not None:
        end = start + v.decoded("duration")
    else:
        end = start + timedelta(days=1) if all_day else start
    fields: dict[str, Any] = {
        "id": event_id(str(uid), occurrence),
        "projectId": project_id,
        "title": str(v.get("summary") or "(no title)")[:500],
        "startDate": _iso(start),
        "endDate": _iso(end),
        "allDay": all_day,
    }
    for prop, key in (("location", "location"), ("description", "description"), ("color", "color")):
        if v.get(prop):
            fields[key] = str(v.get(prop))
    attendees = v.get("attendee")
    if attendees is not None:
        found = attendees if isinstance(attendees, list) else [attendees]
        fields["attendees"] = [address(a) for a in found]
    return fields

