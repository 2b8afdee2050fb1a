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

from ..domain import expansion
from .ical import IcalError, address, as_utc, span
from .occurrences import between

MAX_ID = 128
# Without a window from the caller: a month back, a year ahead.
DEFAULT_WINDOW = (timedelta(days=-31), timedelta(days=366))
# What one import may ask for: a window of at most ten years, at most this many
# occurrences of one VEVENT in it, and this many events in all.
MAX_WINDOW = timedelta(days=3653)
MAX_OCCURRENCES = 1_000
MAX_EVENTS = 50_000


class IcsError(ValueError):
    """The data is not an iCalendar file barosync can read; the message says why."""


# -- in -------------------------------------------------------------------------------------


def parse(data: bytes | str, *, project_id: str, window: tuple[datetime, datetime] | None = None,
          now: datetime | None = None) -> list[dict[str, Any]]:
    """Event fields (with ``id``) for every VEVENT, recurrences expanded into
    ``window`` (default: a month back to a year ahead of ``now``). Bounded: at most
    MAX_WINDOW long, MAX_OCCURRENCES per VEVENT and MAX_EVENTS in all, every rule
    checked as a stored one is (expansion.check_rule); run it under
    expansion.run_guarded, which bounds the time."""
    try:
        return _parse(data, project_id=project_id, window=window, now=now)
    except (IcsError, expansion.ExpansionLimit):
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as e:
        # icalendar reads values lazily: a malformed DTSTART, DURATION or EXDATE
        # surfaces only when it is decoded.
        raise IcsError(f"not an iCalendar file barosync can read: {type(e).__name__}: {e}"[:300]) from None


def _parse(data: bytes | str, *, project_id: str, window: tuple[datetime, datetime] | None,
           now: datetime | None) -> list[dict[str, Any]]:
    try:
        cal = icalendar.Calendar.from_ical(data)
    except (ValueError, KeyError, IndexError) as e:
        raise IcsError(f"not an iCalendar file: {e}") from None
    if cal.name != "VCALENDAR":
        raise IcsError(f"expected a VCALENDAR, found {cal.name}")
    if window is None:
        now = now or datetime.now(timezone.utc)
        window = (now + DEFAULT_WINDOW[0], now + DEFAULT_WINDOW[1])
    if window[1] - window[0] > MAX_WINDOW:
        raise IcsError(f"the import window (from, to) may span at most {MAX_WINDOW.days} days")
    out: list[dict[str, Any]] = []
    recurring = set()
    for v in cal.walk("VEVENT"):
        uid = str(v.get("uid"))
        for rule in _rules(v):
            try:
                expansion.check_rule(rule)
                expansion.check_span(rule, span(v)[0])
            except expansion.RuleError as e:
                raise IcsError(f"VEVENT {uid}: RRULE {rule[:100]!r} {e}") from None
        if v.get("rrule") is not None or v.get("rdate") is not None or v.get("recurrence-id") is not None:
            recurring.add(uid)
        else:
            out.append(_fields(v, project_id, occurrence=None))
        _count(out)
    if recurring:
        lo, hi = expansion.clip(*window)
        per_uid: dict[str, int] = {}
        for v in between(cal, lo, hi):
            uid = str(v.get("uid"))
            if uid in recurring:
                per_uid[uid] = per_uid.get(uid, 0) + 1
                if per_uid[uid] > MAX_OCCURRENCES:
                    raise IcsError(f"VEVENT {uid} has more than {MAX_OCCURRENCES} occurrences between from and to: "
                                   "import a shorter window")
                # Named by the occurrence it replaces, so a moved one keeps its id.
                which = v.decoded("recurrence-id") if v.get("recurrence-id") is not None else v.decoded("dtstart")
                out.append(_fields(v, project_id, occurrence=as_utc(which)))
                _count(out)
    return out


def _rules(v: icalendar.Event) -> list[str]:
    found = v.get("rrule")
    return [r.to_ical().decode() for r in (found if isinstance(found, list) else [found] if found is not None else [])]


def _count(out: list[dict[str, Any]]) -> None:
    if len(out) > MAX_EVENTS:
        raise IcsError(f"the file yields more than {MAX_EVENTS} events (recurrences expanded): split it, "
                       "or import a shorter window")


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
    try:
        start, end, all_day = span(v)
    except IcalError as e:
        raise IcsError(str(e)) from None
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

