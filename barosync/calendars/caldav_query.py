"""What a CalDAV calendar-query selects (RFC 4791 §9.7 filters), what an ``expand``
answers (§9.6.5) and a free-busy-query's busy time (§7.10): plain functions of events
and a parsed report, no IO.

They expand recurrences, so caldav.py runs them in a worker thread under
expansion.py's bounds (``app.expand``), never on the event loop.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import icalendar

from . import dav
from ..formats import ical, occurrences, tasks
from .dav import CALDAV, tag

PropFilters = tuple[tuple[str, str | None, bool, bool], ...]  # name, text, negate, is-not-defined


def matching(events: list[dict[str, Any]], report: dav.Report) -> list[dict[str, Any]]:
    """The events (tasks, journals) the report's component, time range and property
    filters select."""
    kind = report.components[1] if len(report.components) > 1 else None
    return [e for e in events
            if (kind is None or tasks.component(e) == kind)
            and (not (report.start or report.end) or occurrences.overlaps(e, report.start, report.end))
            and (not report.prop_filters or matches(e, report.prop_filters))]


def expanded_data(events: list[dict[str, Any]], report: dav.Report) -> dict[str, bytes]:
    """calendar-data with ``expand``, by event id, when the report asks for it."""
    if report.expand is None or not report.props or tag(CALDAV, "calendar-data") not in report.props:
        return {}
    return {e["id"]: occurrences.expanded(e, *report.expand).to_ical() for e in events}


def matches(e: dict[str, Any], filters: PropFilters) -> bool:
    """Whether the event's master component passes every prop-filter."""
    master = tasks.master(ical.to_resource(e), tasks.component(e))
    for name, text, negate, missing in filters:
        value = master.get(name)
        if missing:
            if value is not None:
                return False
            continue
        if value is None:
            return False
        if text is not None:
            values = value if isinstance(value, list) else [value]
            hit = any(text.lower() in str(v).lower() for v in values)
            if hit == negate:
                return False
    return True


def free_busy(events: list[dict[str, Any]], report: dav.Report, *, now: datetime | None = None) -> bytes:
    """RFC 4791 §7.10: one VFREEBUSY with the busy periods of the events in the
    report's range, recurrences expanded, overlapping ones merged. Transparent and
    cancelled events leave the time free; tentative ones are BUSY-TENTATIVE."""
    assert report.start is not None and report.end is not None
    busy: dict[str, list[tuple[datetime, datetime]]] = {"BUSY": [], "BUSY-TENTATIVE": []}
    for e in events:
        if tasks.component(e) != tasks.VEVENT:
            continue
        for v in occurrences.of(e, report.start, report.end):
            status = str(v.get("status", "")).upper()
            if str(v.get("transp", "")).upper() == "TRANSPARENT" or status == "CANCELLED":
                continue
            first = v.decoded("dtstart")
            last = v.decoded("dtend") if v.get("dtend") is not None else (
                first + v.decoded("duration") if v.get("duration") is not None else
                first if isinstance(first, datetime) else first + timedelta(days=1))
            start, end = ical.as_utc(first), ical.as_utc(last)
            start, end = max(start, report.start), min(end, report.end)
            if end > start:
                busy["BUSY-TENTATIVE" if status == "TENTATIVE" else "BUSY"].append((start, end))
    fb = icalendar.FreeBusy()
    fb.add("dtstamp", now or datetime.now(timezone.utc))
    fb.add("dtstart", report.start)
    fb.add("dtend", report.end)
    for kind, periods in busy.items():
        for start, end in _merged(periods):
            fb.add("freebusy", [(start, end)], parameters={"FBTYPE": kind})
    cal = icalendar.Calendar()
    cal.add("prodid", ical.PRODID)
    cal.add("version", "2.0")
    cal.add_component(fb)
    return cal.to_ical()


def _merged(periods: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for start, end in sorted(periods):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
