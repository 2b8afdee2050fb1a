"""Comparing iCalendar objects as calendar apps read them: parsed components, not
bytes (folding, escaping, property order and how many EXDATE lines carry the dates
are free), and without what a server maintains (DTSTAMP, LAST-MODIFIED)."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import icalendar

CORPUS = Path(__file__).parent / "data" / "caldav"
SERVER_MAINTAINED = {"DTSTAMP", "LAST-MODIFIED"}
DATE_LISTS = {"EXDATE", "RDATE"}


def split_by_uid(data: bytes) -> dict[str, bytes]:
    """One CalDAV resource per UID, each with the calendar's properties and zones."""
    cal = icalendar.Calendar.from_ical(data)
    zones = [c for c in cal.subcomponents if c.name == "VTIMEZONE"]
    out: dict[str, icalendar.Calendar] = {}
    for c in cal.subcomponents:
        if c.name != "VEVENT":
            continue
        uid = str(c["uid"])
        if uid not in out:
            one = icalendar.Calendar()
            for name, value in cal.items():
                one.add(name, value)
            for z in zones:
                one.add_component(z)
            out[uid] = one
        out[uid].add_component(c)
    return {uid: c.to_ical() for uid, c in out.items()}


def _instant(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _params(prop: Any) -> tuple:
    params = getattr(prop, "params", {}) or {}
    return tuple(sorted((k.upper(), str(v)) for k, v in params.items() if k.upper() != "VALUE"))


def _value(name: str, prop: Any) -> Any:
    if hasattr(prop, "dts"):
        return tuple(sorted(_instant(d.dt) for d in prop.dts))
    if hasattr(prop, "dt"):
        return _instant(prop.dt)
    return prop.to_ical()


def normal(component: icalendar.Component) -> Any:
    props: dict[str, list] = {}
    for name, prop in component.items():
        if name in SERVER_MAINTAINED:
            continue
        for one in prop if isinstance(prop, list) else [prop]:
            if name in DATE_LISTS:
                for d in one.dts:
                    props.setdefault(name, []).append((_instant(d.dt), _params(one)))
            else:
                props.setdefault(name, []).append((_value(name, one), _params(one)))
    subs = sorted(repr(normal(c)) for c in component.subcomponents)
    return component.name, {k: sorted(v, key=repr) for k, v in props.items()}, subs


def same_calendar(a: bytes, b: bytes) -> tuple[bool, str]:
    left, right = normal(icalendar.Calendar.from_ical(a)), normal(icalendar.Calendar.from_ical(b))
    if left == right:
        return True, ""
    return False, f"sent:\n{left}\n\ngot back:\n{right}"


def calendar(*vevents: str) -> str:
    """A VCALENDAR around VEVENTs given as their property lines (CRLF-separated)."""
    body = "".join(f"BEGIN:VEVENT\r\n{v}\r\nEND:VEVENT\r\n" for v in vevents)
    return f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n{body}END:VCALENDAR\r\n"
