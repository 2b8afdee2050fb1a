"""The calendar-app parts of an event: ``recurrence``, ``timeZone`` and ``ical``.
Validation only: plain functions, no IO, the same words for every transport.

``recurrence`` is RFC 5545's recurrence set as JSON: ``rrule`` (the RRULE value,
e.g. ``FREQ=WEEKLY;BYDAY=MO``), ``rdates`` and ``exdates`` (occurrence starts added
and removed) and ``overrides`` (single occurrences changed: RECURRENCE-ID). The event's
own ``startDate``/``endDate`` are the first occurrence, so a client that ignores
``recurrence`` still shows that one.

``ical`` is what a calendar app sent that barosync does not model (alarms, categories,
X- properties, parameters, VTIMEZONE definitions): an iCalendar text kept and served
back unchanged (ical.py).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import icalendar

from . import expansion
from .validation import ValidationError, check_dates, parse_instant

MAX_RRULE_CHARS = 1_000
MAX_DATES = 1_000
MAX_OVERRIDES = 1_000
MAX_TZID_CHARS = 128
MAX_ICAL_CHARS = 256 * 1024
OVERRIDE_TEXT = {"title": 500, "location": 10_000, "description": 10_000}
KEYS = ("rrule", "rdates", "exdates", "overrides")


def check_recurrence(value: Any) -> dict[str, Any] | None:
    """A ``recurrence`` value, normalised to have every key (None: not recurring)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError("recurrence", "must be an object {rrule, rdates, exdates, overrides} or null")
    unknown = set(value) - set(KEYS)
    if unknown:
        raise ValidationError("recurrence", f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(KEYS)})")
    rrule = value.get("rrule")
    if rrule is not None:
        if not isinstance(rrule, str) or not rrule or len(rrule) > MAX_RRULE_CHARS:
            raise ValidationError("recurrence.rrule", f"must be an RRULE value of at most {MAX_RRULE_CHARS} characters, like FREQ=WEEKLY;BYDAY=MO")
        try:
            parsed = icalendar.vRecur.from_ical(rrule)
        except (ValueError, KeyError, TypeError) as e:
            raise ValidationError("recurrence.rrule", f"is not an RFC 5545 RRULE: {e}"[:300]) from None
        if "FREQ" not in parsed:
            raise ValidationError("recurrence.rrule", "needs FREQ (like FREQ=WEEKLY)")
        if "COUNT" in parsed and "UNTIL" in parsed:
            raise ValidationError("recurrence.rrule", "may have COUNT or UNTIL, not both")
        try:
            expansion.check_rule(rrule)
        except expansion.RuleError as e:
            raise ValidationError("recurrence.rrule", str(e)) from None
    out = {
        "rrule": rrule,
        "rdates": _dates(value.get("rdates"), "recurrence.rdates"),
        "exdates": _dates(value.get("exdates"), "recurrence.exdates"),
        "overrides": _overrides(value.get("overrides")),
    }
    if rrule is None and not out["rdates"] and not out["overrides"]:
        raise ValidationError("recurrence", "needs an rrule, rdates or overrides (or use null: not recurring)")
    return out


def check_expandable(value: dict[str, Any] | None, start_date: str) -> None:
    """The event's rule, from its start, within what barosync expands (expansion.py):
    checked wherever a recurrence and a start meet (create, update, merge)."""
    if not value or not value.get("rrule"):
        return
    try:
        expansion.check_span(value["rrule"], parse_instant(start_date, "startDate"))
    except expansion.RuleError as e:
        raise ValidationError("recurrence.rrule", str(e)) from None


def _dates(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_DATES:
        raise ValidationError(field, f"must be a list of at most {MAX_DATES} dates or date-times")
    for item in value:
        parse_instant(item, field)
    return list(dict.fromkeys(value))


def _overrides(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_OVERRIDES:
        raise ValidationError("recurrence.overrides", f"must be a list of at most {MAX_OVERRIDES} occurrences")
    out = []
    seen = set()
    for item in value:
        field = "recurrence.overrides"
        if not isinstance(item, dict):
            raise ValidationError(field, "each must be an object {recurrenceId, startDate, endDate, ...}")
        for key in ("recurrenceId", "startDate", "endDate"):
            parse_instant(item.get(key), f"{field}.{key}")
        if item["recurrenceId"] in seen:
            raise ValidationError(f"{field}.recurrenceId", f"{item['recurrenceId']!r} appears twice")
        seen.add(item["recurrenceId"])
        try:
            check_dates(item["startDate"], item["endDate"])
        except ValidationError as e:
            raise ValidationError(f"{field}.{e.field}", e.message) from None
        clean = {k: item[k] for k in ("recurrenceId", "startDate", "endDate")}
        for key, limit in OVERRIDE_TEXT.items():
            text = item.get(key)
            if text is not None and (not isinstance(text, str) or len(text) > limit):
                raise ValidationError(f"{field}.{key}", f"must be a string of at most {limit} characters")
            if text is not None:
                clean[key] = text
        if item.get("allDay") is not None:
            if not isinstance(item["allDay"], bool):
                raise ValidationError(f"{field}.allDay", "must be true or false")
            clean["allDay"] = item["allDay"]
        out.append(clean)
    return out


def check_time_zone(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TZID_CHARS or "\0" in value:
        raise ValidationError("timeZone", f"must be a time zone name (like Europe/Berlin) of at most {MAX_TZID_CHARS} characters, or null")
    return value


# ``ical`` texts known to parse: the ones ical.from_resource just wrote from a parsed
# calendar, and the last ones checked (an app's edits resend the same text), so a PUT
# is not parsed twice.
_VALID: OrderedDict[str, None] = OrderedDict()
VALID_REMEMBERED = 512


def known_valid(value: str) -> None:
    _VALID[value] = None
    _VALID.move_to_end(value)
    while len(_VALID) > VALID_REMEMBERED:
        _VALID.popitem(last=False)


def check_ical(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ICAL_CHARS:
        raise ValidationError("ical", f"must be iCalendar text of at most {MAX_ICAL_CHARS} characters, or null")
    if value in _VALID:
        return value
    try:
        cal = icalendar.Calendar.from_ical(value)
    except (ValueError, KeyError, IndexError) as e:
        raise ValidationError("ical", f"is not iCalendar text: {e}"[:300]) from None
    if cal.name != "VCALENDAR":
        raise ValidationError("ical", "must be a VCALENDAR")
    known_valid(value)
    return value
