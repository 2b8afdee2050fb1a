"""no_double_booking: an attendee cannot be in two overlapping events of a project.

An example barosync plugin (see docs/plugins.md). It implements one hook,
``barosync_validate_mutation``: a create or update that would put an attendee into
two events of the same project whose times overlap is refused with the error code
``double_booked`` (field ``attendees``), naming the attendee and the other event.

Options, in the server's config file::

    [plugins.no_double_booking]
    mode = "refuse"   # default; or "flag": store it, and put a warning in the ack

Times: ``startDate``/``endDate`` are ISO 8601 (``Z`` allowed). Events are half-open
intervals, so one that ends exactly when another starts does not overlap it. A
date-only ``endDate`` (all-day event) is exclusive like iCalendar's ``DTEND``, except
that an all-day event whose end equals its start covers that whole day. Times with no
UTC offset, and dates, are taken as UTC. Attendees are compared case-insensitively.

An update is only checked for what it changes: when the times are unchanged only
newly added attendees are checked, so editing the title of an event that was booked
before this plugin was enabled (or in ``flag`` mode) is never refused.

This file imports only the stdlib and barosync's public names, so it loads the same
way from a plugin directory inside the single-file binary.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterator

from barosync import Problem, hookimpl

NAME = "no_double_booking"
CODE = "double_booked"
MODES = ("refuse", "flag")
# More than this many clashes in one mutation are summed up in the last problem.
MAX_PROBLEMS = 10

log = logging.getLogger("barosync.plugins." + NAME)
_warned_modes: set[str] = set()


def parse_instant(value: Any, *, end: bool = False, start: Any = None) -> datetime | None:
    """An ISO 8601 date or date-time as an aware UTC datetime; None if unusable.

    A date-only value is midnight UTC of that day. With ``end=True`` a date-only
    value equal to the date-only ``start`` becomes the midnight after it (a one-day
    all-day event).
    """
    if not isinstance(value, str):
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            if end and value == start:
                moment += timedelta(days=1)
            return moment
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def interval(event: dict[str, Any]) -> tuple[datetime, datetime] | None:
    start = event.get("startDate")
    s = parse_instant(start)
    e = parse_instant(event.get("endDate"), end=True, start=start)
    if s is None or e is None or e < s:
        return None
    return s, e


def overlaps(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> bool:
    """Half-open intervals: touching (one's end == the other's start) is no overlap.
    A zero-length event overlaps an event it lies strictly inside."""
    (s1, e1), (s2, e2) = a, b
    if s1 == e1:
        return s2 < s1 < e2
    if s2 == e2:
        return s1 < s2 < e1
    return s1 < e2 and s2 < e1


def _key(attendee: str) -> str:
    return attendee.strip().casefold()


def _mode(config: Any) -> str:
    options = getattr(config, "plugin_options", {}).get(NAME, {})
    mode = options.get("mode", "refuse") if isinstance(options, dict) else "refuse"
    if mode not in MODES:
        # Never raise from a validation hook (it runs in the writer): refuse, which
        # is the safe choice, and say so once.
        if repr(mode) not in _warned_modes:
            _warned_modes.add(repr(mode))
            log.warning("[plugins.%s] mode = %r is not one of %s; using \"refuse\"", NAME, mode, ", ".join(MODES))
        mode = "refuse"
    return mode


def _describe(event: dict[str, Any]) -> str:
    title = event.get("title") or "(untitled)"
    return f"{title!r} (id {event.get('id')!r}, {event.get('startDate')} to {event.get('endDate')})"


@hookimpl
def barosync_validate_mutation(
    operation: str,
    event: dict[str, Any] | None,
    previous: dict[str, Any] | None,
    project_events: Callable[[], Iterator[dict[str, Any]]],
    config: Any,
) -> list[Problem] | None:
    if operation == "delete" or event is None:
        return None
    attendees = {_key(a): a for a in event.get("attendees") or [] if isinstance(a, str) and a.strip()}
    if previous is not None and all(previous.get(f) == event.get(f) for f in ("startDate", "endDate")):
        # Same times: only people added by this update can be newly double-booked.
        before = {_key(a) for a in previous.get("attendees") or [] if isinstance(a, str)}
        attendees = {k: a for k, a in attendees.items() if k not in before}
    if not attendees:
        return None
    span = interval(event)
    if span is None:
        return None  # the server already checked the dates; nothing sensible to compare
    refuse = _mode(config) == "refuse"
    problems: list[Problem] = []
    clashes = 0
    for other in project_events():
        if other.get("id") == event.get("id"):
            continue  # an event never clashes with (its stored version of) itself
        shared = [attendees[k] for k in (_key(a) for a in other.get("attendees") or [] if isinstance(a, str)) if k in attendees]
        if not shared:
            continue
        other_span = interval(other)
        if other_span is None or not overlaps(span, other_span):
            continue
        for attendee in dict.fromkeys(shared):
            clashes += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(Problem(
                    code=CODE,
                    message=f"{attendee} is already booked at that time in {_describe(other)}",
                    field="attendees",
                    refuse=refuse,
                ))
        if refuse:
            break  # one reason is enough to refuse
    if clashes > len(problems):
        problems.append(Problem(code=CODE, message=f"... and {clashes - len(problems)} more double bookings",
                                field="attendees", refuse=refuse))
    return problems or None
