"""dav.py without sockets: request bodies parsed, answers built, hostile XML refused."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from defusedxml import ElementTree as SafeET

from barosync.calendars import dav
from barosync.calendars.dav import CALDAV, CS, DAV, DavError, tag


def test_propfind_forms() -> None:
    assert dav.propfind(b"") is None
    assert dav.propfind(b'<propfind xmlns="DAV:"><allprop/></propfind>') is None
    assert dav.propfind(b'<propfind xmlns="DAV:"><propname/></propfind>') == ()
    body = (b'<d:propfind xmlns:d="DAV:" xmlns:cs="http://calendarserver.org/ns/"><d:prop><d:displayname/>'
            b'<cs:getctag/></d:prop></d:propfind>')
    assert dav.propfind(body) == (tag(DAV, "displayname"), tag(CS, "getctag"))
    with pytest.raises(DavError, match="DAV:propfind"):
        dav.propfind(b'<prop xmlns="DAV:"/>')


def test_calendar_query_with_time_range_expand_and_prop_filter() -> None:
    body = b"""<?xml version="1.0"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
 <D:prop><D:getetag/><C:calendar-data><C:expand start="20260101T000000Z" end="20260201T000000Z"/></C:calendar-data></D:prop>
 <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">
   <C:time-range start="20260105T000000Z" end="20260112T000000Z"/>
   <C:prop-filter name="UID"><C:text-match collation="i;octet">abc</C:text-match></C:prop-filter>
 </C:comp-filter></C:comp-filter></C:filter>
</C:calendar-query>"""
    r = dav.report(body)
    assert r.kind == "calendar-query"
    assert r.props == (tag(DAV, "getetag"), tag(CALDAV, "calendar-data"))
    assert r.components == ("VCALENDAR", "VEVENT")
    assert (r.start, r.end) == (datetime(2026, 1, 5, tzinfo=timezone.utc), datetime(2026, 1, 12, tzinfo=timezone.utc))
    assert r.expand == (datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, tzinfo=timezone.utc))
    assert r.prop_filters == (("UID", "abc", False, False),)


def test_multiget_and_sync_collection() -> None:
    r = dav.report(b'<C:calendar-multiget xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav"><D:prop><D:getetag/>'
                   b'</D:prop><D:href>/dav/calendars/a/p/1.ics</D:href><D:href> /dav/calendars/a/p/2.ics </D:href>'
                   b'</C:calendar-multiget>')
    assert r.hrefs == ("/dav/calendars/a/p/1.ics", "/dav/calendars/a/p/2.ics")
    r = dav.report(b'<sync-collection xmlns="DAV:"><sync-token>t/5</sync-token><sync-level>1</sync-level>'
                   b'<prop><getetag/></prop></sync-collection>')
    assert (r.kind, r.sync_token, r.sync_level) == ("sync-collection", "t/5", "1")
    r = dav.report(b'<sync-collection xmlns="DAV:"><sync-token/><prop><getetag/></prop></sync-collection>')
    assert r.sync_token == ""


@pytest.mark.parametrize("body,why", [
    (b"", "needs a body"),
    (b"<unclosed", "well-formed"),
    (b'<x:schedule-query xmlns:x="urn:ietf:params:xml:ns:caldav"/>', "unsupported report"),
    (b'<x:free-busy-query xmlns:x="urn:ietf:params:xml:ns:caldav"/>', "needs a time-range"),
    (b'<C:calendar-query xmlns:C="urn:ietf:params:xml:ns:caldav"><C:filter><C:comp-filter name="VCALENDAR">'
     b'<C:time-range start="tomorrow"/></C:comp-filter></C:filter></C:calendar-query>', "UTC date-time"),
    # Entity expansion (billion laughs) and external entities are never followed.
    (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
     b'<sync-collection xmlns="DAV:"><sync-token>&b;</sync-token></sync-collection>', "well-formed"),
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
     b'<sync-collection xmlns="DAV:"><sync-token>&e;</sync-token></sync-collection>', "well-formed"),
])
def test_bad_and_hostile_bodies_are_refused_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(DavError, match=why):
        dav.report(body)


def test_multistatus_holds_found_missing_and_deleted() -> None:
    out = dav.multistatus([
        dav.response("/a.ics", [dav.element(tag(DAV, "getetag"), '"1-2"')], [tag(CS, "getctag")]),
        dav.response("/b.ics", status=404),
    ], sync_token="tok/1")
    root = SafeET.fromstring(out)
    responses = root.findall(tag(DAV, "response"))
    assert [r.findtext(tag(DAV, "href")) for r in responses] == ["/a.ics", "/b.ics"]
    statuses = [s.text for s in responses[0].iter(tag(DAV, "status"))]
    assert statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"]
    assert responses[1].findtext(tag(DAV, "status")) == "HTTP/1.1 404 Not Found"
    assert root.findtext(tag(DAV, "sync-token")) == "tok/1"
