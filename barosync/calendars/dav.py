"""WebDAV/CalDAV XML (RFC 4918, 4791, 6578): request bodies parsed, multistatus
answers built. Plain functions, no IO, no trio; caldav.py does the rest.

Parsing goes through defusedxml: request bodies come from the network, and entity
expansion or external entities must never be followed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable
from xml.etree import ElementTree as ET

import attrs
import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

DAV = "DAV:"
CALDAV = "urn:ietf:params:xml:ns:caldav"
CS = "http://calendarserver.org/ns/"
APPLE = "http://apple.com/ns/ical/"
for prefix, uri in (("D", DAV), ("C", CALDAV), ("CS", CS), ("A", APPLE)):
    ET.register_namespace(prefix, uri)


def tag(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


class DavError(ValueError):
    """A request body that is not what the method needs: 400 with the message."""


@attrs.frozen
class Report:
    kind: str  # calendar-query, calendar-multiget, sync-collection, free-busy-query
    props: tuple[str, ...] | None  # None: allprop
    hrefs: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    expand: tuple[datetime, datetime] | None = None
    components: tuple[str, ...] = ("VCALENDAR", "VEVENT")
    prop_filters: tuple[tuple[str, str | None, bool, bool], ...] = ()  # name, text, negate, is-not-defined
    sync_token: str | None = None
    sync_level: str = "1"


def parse(body: bytes) -> ET.Element | None:
    if not body.strip():
        return None
    try:
        return SafeET.fromstring(body)
    except (ET.ParseError, DefusedXmlException) as e:
        raise DavError(f"the request body is not well-formed XML: {e}") from None


def propfind(body: bytes) -> tuple[str, ...] | None:
    """The properties a PROPFIND asks for; None for allprop (and an empty body)."""
    root = parse(body)
    if root is None:
        return None
    if root.tag != tag(DAV, "propfind"):
        raise DavError("PROPFIND takes a DAV:propfind body")
    prop = root.find(tag(DAV, "prop"))
    if prop is not None:
        return tuple(child.tag for child in prop)
    if root.find(tag(DAV, "propname")) is not None:
        return ()
    return None


def proppatch(body: bytes) -> tuple[str, ...]:
    """The properties a PROPPATCH would set or remove (all refused)."""
    root = parse(body)
    if root is None or root.tag != tag(DAV, "propertyupdate"):
        raise DavError("PROPPATCH takes a DAV:propertyupdate body")
    return tuple(p.tag for action in root for prop in action for p in prop)


def set_properties(body: bytes) -> tuple[dict[str, str], tuple[str, ...]]:
    """What an MKCALENDAR, an extended MKCOL or a PROPPATCH body sets: (each property
    set to text, by tag; every property named, set or removed)."""
    root = parse(body)
    if root is None:
        return {}, ()
    if root.tag not in (tag(DAV, "propertyupdate"), tag(CALDAV, "mkcalendar"), tag(DAV, "mkcol")):
        raise DavError("expected a DAV:propertyupdate, CALDAV:mkcalendar or DAV:mkcol body")
    values: dict[str, str] = {}
    for action in root:
        for prop in action:
            for p in prop:
                if action.tag == tag(DAV, "set") and len(p) == 0:
                    values[p.tag] = (p.text or "").strip()
    return values, tuple(p.tag for action in root for prop in action for p in prop)


def _utc(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise DavError(f"{what} must be a UTC date-time like 20260105T000000Z, got {value!r}") from None


def report(body: bytes) -> Report:
    root = parse(body)
    if root is None:
        raise DavError("REPORT needs a body (calendar-query, calendar-multiget, sync-collection or free-busy-query)")
    kinds = {tag(CALDAV, "calendar-query"): "calendar-query", tag(CALDAV, "calendar-multiget"): "calendar-multiget",
             tag(DAV, "sync-collection"): "sync-collection", tag(CALDAV, "free-busy-query"): "free-busy-query"}
    kind = kinds.get(root.tag)
    if kind is None:
        raise DavError(f"unsupported report {root.tag} (supported: calendar-query, calendar-multiget, "
                       "sync-collection, free-busy-query)")
    if kind == "free-busy-query":
        time_range = root.find(tag(CALDAV, "time-range"))
        start = _utc(time_range.get("start"), "time-range start") if time_range is not None else None
        end = _utc(time_range.get("end"), "time-range end") if time_range is not None else None
        if start is None or end is None or end <= start:
            raise DavError("free-busy-query needs a time-range with a start before its end (RFC 4791 §7.10)")
        return Report(kind=kind, props=None, start=start, end=end)
    prop = root.find(tag(DAV, "prop"))
    props = tuple(child.tag for child in prop) if prop is not None else None
    expand = None
    if prop is not None:
        data = prop.find(tag(CALDAV, "calendar-data"))
        found = data.find(tag(CALDAV, "expand")) if data is not None else None
        if found is not None:
            start, end = _utc(found.get("start"), "expand start"), _utc(found.get("end"), "expand end")
            if start is None or end is None:
                raise DavError("expand needs start and end")
            expand = (start, end)
    fields: dict[str, Any] = {"kind": kind, "props": props, "expand": expand}
    if kind == "calendar-multiget":
        fields["hrefs"] = tuple((h.text or "").strip() for h in root.findall(tag(DAV, "href")))
    elif kind == "sync-collection":
        token = root.find(tag(DAV, "sync-token"))
        level = root.find(tag(DAV, "sync-level"))
        fields["sync_token"] = (token.text or "").strip() if token is not None else ""
        fields["sync_level"] = (level.text or "1").strip() if level is not None else "1"
    else:
        fields.update(_filter(root.find(tag(CALDAV, "filter"))))
    return Report(**fields)


def principal_search(body: bytes) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """A principal-property-search REPORT (RFC 3744 §9.4): the texts the principal's
    display name must contain (none: every principal), and the properties asked for."""
    root = parse(body)
    if root is None or root.tag != tag(DAV, "principal-property-search"):
        raise DavError("REPORT here is a principal-property-search (RFC 3744)")
    matches = tuple((m.text or "").strip().lower() for search in root.findall(tag(DAV, "property-search"))
                    for m in search.findall(tag(DAV, "match")))
    prop = root.find(tag(DAV, "prop"))
    wanted = [child.tag for child in prop] if prop is not None else []
    # python-caldav 3.6 puts the properties beside an empty <prop>, not in it.
    wanted += [child.tag for child in root if child.tag not in _SEARCH_PARTS]
    return matches, tuple(wanted) or None


_SEARCH_PARTS = {tag(DAV, "property-search"), tag(DAV, "prop"), tag(DAV, "apply-to-principal-collection-set")}


def _filter(element: ET.Element | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    components: list[str] = []
    filters = []
    node = element
    while node is not None:
        comp = node.find(tag(CALDAV, "comp-filter"))
        if comp is None:
            break
        components.append(comp.get("name", "").upper())
        time_range = comp.find(tag(CALDAV, "time-range"))
        if time_range is not None:
            out["start"] = _utc(time_range.get("start"), "time-range start")
            out["end"] = _utc(time_range.get("end"), "time-range end")
        for pf in comp.findall(tag(CALDAV, "prop-filter")):
            text = pf.find(tag(CALDAV, "text-match"))
            missing = pf.find(tag(CALDAV, "is-not-defined")) is not None
            filters.append((pf.get("name", "").upper(), text.text or "" if text is not None else None,
                            text is not None and text.get("negate-condition") == "yes", missing))
        node = comp
    if components:
        out["components"] = tuple(components)
    out["prop_filters"] = tuple(filters)
    return out


# -- answers ----------------------------------------------------------------------------


def element(name: str, text: str | None = None, children: Iterable[ET.Element] = ()) -> ET.Element:
    el = ET.Element(name)
    if text is not None:
        el.text = text
    for child in children:
        el.append(child)
    return el


def href(path: str) -> ET.Element:
    return element(tag(DAV, "href"), path)


STATUS = {200: "HTTP/1.1 200 OK", 403: "HTTP/1.1 403 Forbidden", 404: "HTTP/1.1 404 Not Found",
          424: "HTTP/1.1 424 Failed Dependency"}


def response(path: str, found: list[ET.Element] | None = None, missing: Iterable[str] = (), *,
             status: int | None = None, forbidden: Iterable[str] = (), failed: Iterable[str] = ()) -> ET.Element:
    """One DAV:response: the properties found (200), those not (404), those refused
    (403) and those not set because another was refused (424, PROPPATCH being all or
    nothing); or, with ``status``, the resource's status alone (a deletion: 404)."""
    out = element(tag(DAV, "response"), children=[href(path)])
    if status is not None:
        out.append(element(tag(DAV, "status"), STATUS[status]))
        return out
    for code, props in ((200, found or []), (404, [ET.Element(n) for n in missing]),
                        (403, [ET.Element(n) for n in forbidden]), (424, [ET.Element(n) for n in failed])):
        if props:
            out.append(element(tag(DAV, "propstat"), children=[
                element(tag(DAV, "prop"), children=props), element(tag(DAV, "status"), STATUS[code])]))
    return out


def multistatus(responses: Iterable[ET.Element], *, sync_token: str | None = None) -> bytes:
    root = element(tag(DAV, "multistatus"), children=responses)
    if sync_token is not None:
        root.append(element(tag(DAV, "sync-token"), sync_token))
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root)


def error(condition: str, ns: str = DAV, message: str | None = None) -> bytes:
    """A DAV:error body naming the precondition that failed (RFC 4918 §16)."""
    root = element(tag(DAV, "error"), children=[ET.Element(tag(ns, condition))])
    if message:
        # Apps show little of it; people reading logs and curl output see why.
        root.append(element(tag("http://barosync.org/ns/", "message"), message))
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root)
