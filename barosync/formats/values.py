"""iCalendar values as barosync stores them (dates and date-times as ISO 8601 text)
and as the icalendar library decodes them, and the error for a resource barosync
cannot store: shared by ical.py (events) and tasks.py (tasks, journals). No IO."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any


class IcalError(ValueError):
    """A resource barosync cannot store; ``precondition`` is the CalDAV condition."""

    def __init__(self, message: str, precondition: str = "valid-calendar-data") -> None:
        super().__init__(message)
        self.precondition = precondition


def iso(value: date | datetime) -> str:
    """A date as YYYY-MM-DD, a zoned date-time in UTC with Z, a floating one as is."""
    if not isinstance(value, datetime):
        return value.isoformat()
    if value.tzinfo is None:
        return value.isoformat()
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def instant(value: str) -> date | datetime:
    """A stored date (YYYY-MM-DD) or date-time as Python's value."""
    if "T" not in value:
        return date.fromisoformat(value[:10])
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def as_utc(value: date | datetime) -> datetime:
    """A zoned instant in UTC; floating times and dates taken as UTC."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.combine(value, datetime.min.time(), tzinfo=timezone.utc)


def as_list(value: Any) -> list[Any]:
    """A property icalendar gives as one value or a list (it may appear several times)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
