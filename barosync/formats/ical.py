"""One event as a CalDAV resource (a VCALENDAR with its VEVENTs) and back, through
the ``icalendar`` library; tasks and journals go to tasks.py. No IO, no trio.

In: the modeled properties become event fields (instants in UTC, the zone they were
given in as ``timeZone``, RRULE/RDATE/EXDATE and RECURRENCE-ID overrides as
``recurrence``); everything else — alarms, categories, X- properties, attendee
parameters, VTIMEZONE definitions — is kept verbatim in ``ical``.
Out: ``ical`` again, with the modeled properties written from the event's current
fields, so an app gets back what it sent plus whatever browsers changed since.

Modeled properties are taken out of ``ical`` so that two edits of different fields
from the same version do not both change ``ical`` (they would clash in a merge).
"""

from __future__ import annotations

import functools

import zoneinfo
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any, Iterable

import icalendar
from icalendar.timezone import tzp

from ..domain.recurrence import known_valid
from . import tasks
from .values import IcalError, as_list, as_utc, instant, iso

PRODID = "-//barosync//barosync calendar//EN"
# Written from event fields on the way out; never kept in ``ical``.
MODELED = ("SUMMARY", "DTSTART", "DTEND", "DURATION", "LOCATION", "DESCRIPTION", "COLOR", "RRULE", "RDATE",
           "EXDATE", "DTSTAMP", "LAST-MODIFIED")
# An override (RECURRENCE-ID) keeps its own attendees, colour and SEQUENCE: the
# event model has no place for them per occurrence.
OVERRIDE_MODELED = ("SUMMARY", "DTSTART", "DTEND", "DURATION", "LOCATION", "DESCRIPTION", "DTSTAMP",
                    "LAST-MODIFIED")
# Modeled text whose parameters (LANGUAGE, ALTREP) an app may have set: kept in
# ``ical`` with an empty value, so the parameters come back around the current text.
TEXT_WITH_PARAMS = ("SUMMARY", "LOCATION", "DESCRIPTION", "COLOR")
# In ``ical`` only: the app gave this VEVENT neither DTEND nor DURATION.
DEFAULT_END = "X-BAROSYNC-DEFAULT-END"


# -- in -------------------------------------------------------------------------------------


def parse_calendar(data: bytes | str) -> icalendar.Calendar:
    try:
        cal = icalendar.Calendar.from_ical(data)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise IcalError(f"not an iCalendar object: {e}"[:300]) from None
    if cal.name != "VCALENDAR":
        raise IcalError(f"expected a VCALENDAR, found {cal.name}")
    return cal


def from_resource(data: bytes | str, *, project_id: str, event_id: str) -> dict[str, Any]:
    """Event fields (with ``id``, ``projectId`` and every client field) for one
    CalDAV resource: one UID, a master VEVENT and its RECURRENCE-ID overrides.
    Anything malformed is an IcalError saying what."""
    try:
        return _from_resource(data, project_id=project_id, event_id=event_id)
    except IcalError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as e:
        # icalendar decodes values lazily: a malformed DTSTART, DURATION, EXDATE or
        # TZID surfaces only here.
        raise IcalError(f"a property barosync cannot read: {type(e).__name__}: {e}"[:300]) from None


def _from_resource(data: bytes | str, *, project_id: str, event_id: str) -> dict[str, Any]:
    cal = parse_calendar(data)
    kind = tasks.kind_of(cal)
    if kind is not None:
        text = data.decode() if isinstance(data, bytes) else data
        return tasks.from_resource(cal, text, kind, project_id=project_id, event_id=event_id)
    if not any(c.name == "VEVENT" for c in cal.subcomponents):
        raise IcalError("a calendar resource holds an event (VEVENT), a task (VTODO) or a journal entry (VJOURNAL)",
                        "supported-calendar-component")
    vevents = [c for c in cal.subcomponents if c.name == "VEVENT"]
    uids = {str(v.get("uid", "")) for v in vevents}
    if len(uids) != 1 or "" in uids:
        raise IcalError("a calendar object resource holds one event: every VEVENT with the same, non-empty UID")
    masters = [v for v in vevents if v.get("recurrence-id") is None]
    if len(masters) != 1:
        raise IcalError("the resource needs exactly one VEVENT without RECURRENCE-ID (the event itself)")
    master = masters[0]
    fields = _fields(master)
    fields["id"] = event_id
    fields["projectId"] = project_id
    zone = master["dtstart"].params.get("TZID") if fields["allDay"] is False else None
    fields["timeZone"] = str(zone) if zone else None
    fields["recurrence"] = _recurrence(master, [v for v in vevents if v is not master])
    for v in vevents:
        no_end = v.get("dtend") is None and v.get("duration") is None
        _strip(v, MODELED if v is master else OVERRIDE_MODELED)
        if no_end:
            # RFC 5545's default end (a day for a date, none for a date-time): given
            # back as the app stored it, with no DTEND, while the end is that default.
            v.add(DEFAULT_END, "TRUE")
    fields["ical"] = cal.to_ical().decode()
    known_valid(fields["ical"])  # written from a parsed calendar: no need to parse it again
    return fields


def _strip(v: icalendar.Event, modeled: tuple[str, ...]) -> None:
    """Take the modeled values out of a VEVENT, leaving the parameters of modeled text
    (on an empty value) and whether the end was given as DURATION."""
    for name in modeled:
        prop = v.get(name)
        if prop is None:
            continue
        if name in TEXT_WITH_PARAMS and not isinstance(prop, list) and getattr(prop, "params", None):
            v[name] = icalendar.vText("")
            v[name].params.update(prop.params)
        elif name == "DURATION" and v.get("dtend") is None:
            v[name] = icalendar.vDuration(timedelta(0))
        else:
            v.pop(name)


def span(v: icalendar.Component) -> tuple[date | datetime, date | datetime, bool]:
    """A VEVENT's start, end and whether it is all-day, from DTSTART and DTEND or
    DURATION (RFC 5545 §3.6.1 defaults), each checked to be what it says."""
    uid = v.get("uid")
    if v.get("dtstart") is None:
        raise IcalError(f"VEVENT {uid} has no DTSTART")
    start = v.decoded("dtstart")
    if not isinstance(start, (date, datetime)):
        raise IcalError(f"VEVENT {uid}: DTSTART is not a date or a date-time")
    all_day = not isinstance(start, datetime)
    if v.get("dtend") is not None:
        end = v.decoded("dtend")
        if not isinstance(end, (date, datetime)):
            raise IcalError(f"VEVENT {uid}: DTEND is not a date or a date-time")
    elif v.get("duration") is not None:
        duration = v.decoded("duration")
        if not isinstance(duration, timedelta):
            raise IcalError(f"VEVENT {uid}: DURATION is not a duration (like PT1H)")
        try:
            end = start + duration
        except OverflowError:
            raise IcalError(f"VEVENT {uid}: DURATION runs past the year 9999") from None
    else:
        end = start + timedelta(days=1) if all_day else start
    if isinstance(end, datetime) != isinstance(start, datetime):
        raise IcalError("DTSTART and DTEND must both be dates or both be date-times")
    if as_utc(end) < as_utc(start):
        raise IcalError("DTEND is before DTSTART")
    return start, end, all_day


def _fields(v: icalendar.Event) -> dict[str, Any]:
    start, end, all_day = span(v)
    out: dict[str, Any] = {
        "title": str(v.get("summary") or "(no title)")[:500] or "(no title)",
        "startDate": iso(start),
        "endDate": iso(end),
        "allDay": all_day,
        "location": _text(v, "location"),
        "description": _text(v, "description"),
        "color": _text(v, "color"),
        "attendees": [address(a) for a in as_list(v.get("attendee"))],
    }
    if not out["title"].strip():
        out["title"] = "(no title)"
    return out


def _text(v: icalendar.Event, name: str) -> str | None:
    value = v.get(name)
    return str(value) if value is not None and str(value) != "" else None


def address(prop: Any) -> str:
    """An ATTENDEE as barosync lists it: the mail address, or the user id."""
    value = str(prop)
    for prefix in ("mailto:", "MAILTO:", "urn:barosync:user:"):
        if value.startswith(prefix):
            return value[len(prefix):]
    return value


def _dates(v: icalendar.Event, name: str) -> list[str]:
    out = []
    for prop in as_list(v.get(name)):
        for item in prop.dts:
            if isinstance(item.dt, (date, datetime)):  # PERIOD values are not supported
                out.append(iso(item.dt))
    return out


def _recurrence(master: icalendar.Event, overrides: list[icalendar.Event]) -> dict[str, Any] | None:
    rrule = master.get("rrule")
    rules = as_list(rrule)
    if len(rules) > 1:
        raise IcalError("more than one RRULE in an event is not supported (RFC 5545 deprecates it)")
    out: dict[str, Any] = {
        "rrule": rules[0].to_ical().decode() if rules else None,
        "rdates": _dates(master, "rdate"),
        "exdates": _dates(master, "exdate"),
        "overrides": [],
    }
    for v in overrides:
        fields = _fields(v)
        entry = {"recurrenceId": iso(v.decoded("recurrence-id")), "startDate": fields["startDate"],
                 "endDate": fields["endDate"], "title": fields["title"]}
        for key in ("location", "description"):
            if fields[key] is not None:
                entry[key] = fields[key]
        if fields["allDay"]:
            entry["allDay"] = True
        out["overrides"].append(entry)
    if out["rrule"] is None and not out["rdates"] and not out["overrides"]:
        return None
    return out


# -- out ------------------------------------------------------------------------------------


def _day(value: str) -> date:
    found = instant(value)
    return found.date() if isinstance(found, datetime) else found


def _stamp(ms: int | None) -> datetime:
    return datetime.fromtimestamp((ms or 0) / 1000, tz=timezone.utc)


def zone(name: str | None) -> tzinfo | None:
    """The tzinfo for a TZID: IANA names, Windows names, and zones defined by a
    VTIMEZONE that was parsed earlier (icalendar registers those)."""
    if not name:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        pass
    try:
        return tzp.timezone(name)
    except Exception:
        return None


def _when(value: str, all_day: bool, tz: tzinfo | None) -> Any:
    if all_day:
        return _day(value)
    found = instant(value)
    if not isinstance(found, datetime):
        found = datetime.combine(found, datetime.min.time())
    if found.tzinfo is not None and tz is not None:
        return found.astimezone(tz)
    return found


def _add_when(component: icalendar.Component, name: str, value: Any, tzid: str | None) -> None:
    component.add(name, value)
    prop = component[name]
    if isinstance(value, datetime) and value.tzinfo is not None and tzid and value.utcoffset() is not None:
        if str(value.tzinfo) != "UTC" and getattr(value.tzinfo, "key", None) != "UTC":
            prop.params["TZID"] = tzid


def _add_dates(component: icalendar.Component, name: str, values: list[str], all_day: bool, tz: tzinfo | None,
               tzid: str | None) -> None:
    if not values:
        return
    found = [_when(v, all_day, tz) for v in values]
    component.add(name, found)
    prop = component[name]
    if tzid and tz is not None and not all_day and isinstance(found[0], datetime) and found[0].tzinfo is not None:
        prop.params["TZID"] = tzid


def to_resource(e: dict[str, Any]) -> icalendar.Calendar:
    """The event as one CalDAV resource (master VEVENT plus overrides); a task or
    journal as the app sent it (tasks.py)."""
    if tasks.component(e) != tasks.VEVENT:
        return tasks.to_resource(e)
    cal = parse_calendar(e["ical"]) if e.get("ical") else None
    if cal is None:
        cal = icalendar.Calendar()
        cal.add("prodid", PRODID)
        cal.add("version", "2.0")
    kept = [c for c in cal.subcomponents if c.name == "VEVENT"]
    cal.subcomponents = [c for c in cal.subcomponents if c.name != "VEVENT"]
    master = next((c for c in kept if c.get("recurrence-id") is None), None) or icalendar.Event()
    extras_by_rid = {}
    for c in kept:
        if c.get("recurrence-id") is not None:
            extras_by_rid[iso(c.decoded("recurrence-id"))] = c
    tzid = e.get("timeZone")
    tz = zone(tzid) if not e.get("allDay") else None
    if tz is None:
        tzid = None
    _write(master, e, e, tz, tzid, master=True)
    if master.get("uid") is None:
        master.add("uid", e["id"])
    uid = master["uid"]
    recurrence = e.get("recurrence") or None
    all_day = bool(e.get("allDay"))
    if recurrence:
        if recurrence.get("rrule"):
            master.add("rrule", icalendar.vRecur.from_ical(recurrence["rrule"]))
        _add_dates(master, "rdate", recurrence.get("rdates") or [], all_day, tz, tzid)
        _add_dates(master, "exdate", recurrence.get("exdates") or [], all_day, tz, tzid)
    cal.add_component(master)
    for o in (recurrence or {}).get("overrides") or []:
        v = extras_by_rid.get(o["recurrenceId"])
        if v is None:
            v = icalendar.Event()
            v.add("uid", uid)
            rid = _when(o["recurrenceId"], all_day, tz)
            _add_when(v, "recurrence-id", rid, tzid)
        fields = {"title": o.get("title") or e["title"], "startDate": o["startDate"], "endDate": o["endDate"],
                  "allDay": o.get("allDay", all_day), "location": o.get("location"),
                  "description": o.get("description")}
        _write(v, fields, e, tz, tzid, master=False)
        cal.add_component(v)
    if tzid and tz is not None and not any(c.name == "VTIMEZONE" and str(c.get("tzid")) == tzid for c in cal.subcomponents):
        _add_missing_timezones(cal)
    return cal


def _add_missing_timezones(cal: icalendar.Calendar) -> None:
    """As ``Calendar.add_missing_timezones``, with each zone's VTIMEZONE built once
    per process: building one takes ~5 ms, and a calendar app's first sync renders
    every event of a project."""
    try:
        missing = sorted(cal.get_missing_tzids())
    except Exception:
        return
    at = len(cal.timezones)
    for name in missing:
        found = _vtimezone(name)
        if found is not None:  # a zone icalendar cannot describe: apps fall back to the TZID name
            cal.subcomponents.insert(at, found)
            at += 1


@functools.lru_cache(maxsize=256)
def _vtimezone(tzid: str) -> icalendar.Timezone | None:
    """One zone's VTIMEZONE, shared by every render (never changed after it is built)."""
    try:
        return icalendar.Timezone.from_tzid(tzid)
    except Exception:
        return None


def _write(v: icalendar.Event, f: dict[str, Any], e: dict[str, Any], tz: tzinfo | None, tzid: str | None, *,
           master: bool) -> None:
    params = {name: v[name].params for name in TEXT_WITH_PARAMS if name in v and not isinstance(v[name], list)}
    as_duration = v.get("duration") is not None
    default_end = v.pop(DEFAULT_END, None) is not None
    for name in MODELED if master else OVERRIDE_MODELED:
        v.pop(name, None)
    all_day = bool(f.get("allDay"))
    v.add("summary", f["title"])
    start = _when(f["startDate"], all_day, tz)
    end = _when(f["endDate"], all_day, tz)
    if all_day and end <= start:
        end = start + timedelta(days=1)  # DTEND is exclusive
    _add_when(v, "dtstart", start, tzid)
    if default_end and end == (start + timedelta(days=1) if all_day else start):
        pass  # no DTEND, as the app stored it (to_resource parses ``ical`` afresh each time)
    elif as_duration:
        v.add("duration", end - start)
    else:
        _add_when(v, "dtend", end, tzid)
    v.add("dtstamp", _stamp(e.get("updatedAt")))
    # CREATED and SEQUENCE: an app's own stay as it sent them; events made elsewhere
    # get barosync's.
    native = not e.get("ical")
    if native and master:
        v.add("created", _stamp(e.get("createdAt")))
    v.add("last-modified", _stamp(e.get("updatedAt")))
    for key in ("location", "description"):
        if f.get(key):
            v.add(key, f[key])
    if master and f.get("color"):
        v.add("color", f["color"])
    for name, kept in params.items():
        if name in v:
            v[name].params.update(kept)
    if not master:
        return
    if native:
        # SEQUENCE counts revisions from 0; barosync's versions count from 1.
        v.add("sequence", max(0, int(e.get("version", 1)) - 1))
    # Attendees as listed in the event, each with the parameters an app gave it.
    known = {address(a).lower(): a for a in as_list(v.pop("ATTENDEE", None))}
    for who in f.get("attendees") or []:
        prop = known.get(who.lower())
        if prop is None:
            prop = icalendar.vCalAddress(f"mailto:{who}" if "@" in who else f"urn:barosync:user:{who}")
            prop.params["CN"] = icalendar.vText(who)
        v.add("attendee", prop, encode=0)


def resource_bytes(e: dict[str, Any]) -> bytes:
    if tasks.component(e) != tasks.VEVENT:
        return tasks.resource_bytes(e)
    return to_resource(e).to_ical()


def feed(project_id: str, events: Iterable[dict[str, Any]], *, name: str | None = None) -> bytes:
    """Many events as one VCALENDAR (the read-only ICS feed): each event's VEVENTs,
    and each VTIMEZONE once."""
    cal = icalendar.Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("calscale", "GREGORIAN")
    cal.add("x-wr-calname", name or project_id)
    zones: set[str] = set()
    for e in events:
        for c in to_resource(e).subcomponents:
            if c.name == "VTIMEZONE":
                key = str(c.get("tzid"))
                if key in zones:
                    continue
                zones.add(key)
            cal.add_component(c)
    return cal.to_ical()
