"""The field checks every model shares: the error they raise and the date rules.
Plain code, no IO; models.py and recurrence.py build on it."""

from __future__ import annotations

import functools
import re
from datetime import date, datetime
from typing import Any


class ValidationError(Exception):
    """A field of a client's message is not acceptable."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# What browsers' Date parsing and every calendar client reads: a date, or an RFC 3339
# date-time (offset optional). Python would accept more (week dates, "20260105",
# a trailing NUL) that clients could not parse back.
_INSTANT = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})?)?"
)


def parse_instant(value: Any, field: str) -> datetime:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a date (2026-01-31) or an RFC 3339 date-time (2026-01-31T09:00:00Z)")
    try:
        return _instant(value)
    except ValueError as e:
        raise ValidationError(field, str(e)[:200]) from None


@functools.lru_cache(maxsize=4096)
def _instant(value: str) -> datetime:
    # Cached: every create and update checks its dates twice (each field, then the
    # pair), and calendars repeat the same times a lot.
    if not _INSTANT.fullmatch(value):
        raise ValueError(f"must be a date (2026-01-31) or an RFC 3339 date-time (2026-01-31T09:00:00Z), got {value!r}")
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time())
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"is not a real date or time: {value!r}") from None


def check_dates(start: str, end: str) -> None:
    s = parse_instant(start, "startDate")
    e = parse_instant(end, "endDate")
    if (s.tzinfo is None) != (e.tzinfo is None):
        raise ValidationError("endDate", "startDate and endDate must both have a UTC offset or both have none")
    if e < s:
        raise ValidationError("endDate", "must not be before startDate")
