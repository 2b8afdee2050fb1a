"""An event's occurrences: RFC 4791 time-range overlap and ``expand``, through
``recurring-ical-events``, within expansion.py's bounds. No IO, no trio; callers run
them in a worker thread under ``expansion.run_guarded`` (``app.expand``).
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta
from typing import Any, Iterator

import icalendar
import recurring_ical_events

from ..domain import expansion
from . import tasks
from .ical import PRODID, instant, as_utc, to_resource

log = logging.getLogger(__name__)

_CLASSES = {tasks.VEVENT: icalendar.Event, tasks.VTODO: icalendar.Todo, tasks.VJOURNAL: icalendar.Journal}


def of(e: dict[str, Any], start: datetime | None, end: datetime | None) -> list[icalendar.Event]:
    """The event's occurrences that overlap [start, end) (RFC 4791's time-range
    rules, recurrences expanded), within expansion.py's bounds: the window clipped to
    the dates barosync expands, at most MAX_INSTANCES of them (else ExpansionLimit).
    Run it under expansion.run_guarded: a rule can cost time before its first one."""
    lo, hi = expansion.clip(start, end)
    kind = tasks.component(e)
    return expansion.bounded(between(to_resource(sound(e)), lo, hi, kind), what=f"event {e['id']!r}")


def sound(e: dict[str, Any]) -> dict[str, Any]:
    """The event as it may be expanded: a rule that an older release stored and that
    barosync refuses today (expansion.unexpandable) is set aside, so the event counts
    as its first occurrence (and its RDATEs and overrides) and never makes a query of
    its calendar fail or run to its deadline."""
    recurrence = e.get("recurrence") or {}
    rule = recurrence.get("rrule")
    if not rule:
        return e
    try:
        why = expansion.unexpandable(rule, instant(e["startDate"]))
    except ValueError as err:
        why = str(err)
    if why is None:
        return e
    _log_set_aside(e.get("projectId"), e["id"], rule, why)
    rest = {**recurrence, "rrule": None}
    keep = rest.get("rdates") or rest.get("overrides")
    return {**e, "recurrence": rest if keep else None}


@functools.lru_cache(maxsize=1024)
def _log_set_aside(project_id: str | None, event_id: str, rule: str, why: str) -> None:
    # Once per event and rule: queries ask again and again.
    log.warning("event %r in %r: its stored RRULE %r %s; expanded as its first occurrence only "
                "(an edit of the event replaces the rule)", event_id, project_id, rule[:100], why)


def between(cal: icalendar.Calendar, start: datetime, end: datetime,
            kind: str = tasks.VEVENT) -> Iterator[icalendar.Component]:
    """Every occurrence in [start, end) of every component of ``kind``, one at a
    time. (recurring-ical-events' own between() lists them all before returning; its
    series yield them one by one, so a count can stop the expansion.)"""
    with expansion.stepping():
        query = recurring_ical_events.of(cal, components=[kind])
    for series in query.series:
        occurrences = series.between(start, end)
        while True:
            with expansion.stepping():  # the rule engine may loop long between two
                found = next(occurrences, None)
            if found is None:
                break
            yield found.as_component(query.keep_recurrence_attributes)


def overlaps(e: dict[str, Any], start: datetime | None, end: datetime | None) -> bool:
    kind = tasks.component(e)
    if kind != tasks.VEVENT:
        cal = tasks.to_resource(e)
        main = tasks.master(cal, kind)
        if not tasks.recurring(main):
            return tasks.overlaps(main, start, end)
        lo, hi = expansion.clip(start, end)
        return next(between(cal, lo, hi, kind), None) is not None
    if not e.get("recurrence"):
        s = as_utc(instant(e["startDate"]))
        f = as_utc(instant(e["endDate"]))
        if f == s and not e.get("allDay"):
            f = s + timedelta(microseconds=1)  # an instant event occupies its start
        return (end is None or s < end) and (start is None or f > start)
    lo, hi = expansion.clip(start, end)
    return next(between(to_resource(sound(e)), lo, hi), None) is not None


def expanded(e: dict[str, Any], start: datetime, end: datetime) -> icalendar.Calendar:
    """RFC 4791 §9.6.5 ``expand``: the occurrences in the range as single components
    in UTC, each with its RECURRENCE-ID, and no recurrence properties. A task or
    journal that does not recur is given back as it is."""
    kind = tasks.component(e)
    if kind != tasks.VEVENT:
        cal = tasks.to_resource(e)
        if not tasks.recurring(tasks.master(cal, kind)):
            return cal
    cal = icalendar.Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    recurring = bool(e.get("recurrence")) or kind != tasks.VEVENT
    timed = ("dtstart", "dtend", "due")
    for v in of(e, start, end):
        out = _CLASSES[kind]()
        for name, value in v.items():
            if name in ("RRULE", "RDATE", "EXDATE", "DTSTART", "DTEND", "DUE", "RECURRENCE-ID", "DURATION"):
                continue
            out[name] = value
        for name in timed:
            if v.get(name) is not None:
                value = v.decoded(name)
                out.add(name, as_utc(value) if isinstance(value, datetime) else value)
        if recurring:
            s = v.decoded("dtstart") if v.get("dtstart") is not None else v.decoded("due")
            rid = v.decoded("recurrence-id") if v.get("recurrence-id") is not None else s
            out.add("recurrence-id", as_utc(rid) if isinstance(rid, datetime) else rid)
        for sub in v.subcomponents:
            out.add_component(sub)
        cal.add_component(out)
    return cal
