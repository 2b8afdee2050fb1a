"""What a CalDAV calendar-query selects (RFC 4791 §9.7 filters) and what an
``expand`` answers (§9.6.5): plain functions of events and a parsed report, no IO.

They expand recurrences, so caldav.py runs them in a worker thread under
expansion.py's bounds (``app.expand``), never on the event loop.
"""

from __future__ import annotations

from typing import Any

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
