"""CalDAV for calendar apps (RFC 4791, 6578 sync-collection, 6764 discovery, 5397
current-user-principal): one calendar collection per project the user may read.

A transport like rest.py: every change goes through the one write path
(mutations.py, then the writer), so a PUT from a phone gets the same validation,
seq, conflict strategy, fsync-before-answer and fan-out as a browser's change. XML
is built and parsed in dav.py, iCalendar in ical.py; this module holds the HTTP side.

Layout::

    /.well-known/caldav             -> 301 /dav/
    /dav/                           the DAV root (current-user-principal)
    /dav/principals/{user}/         the principal (calendar-home-set)
    /dav/calendars/{user}/          the calendar home: one calendar per project
    /dav/calendars/{user}/{project}/           a project
    /dav/calendars/{user}/{project}/{id}.ics   an event (UID = id, unless the app
                                               named the resource otherwise)
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, TypeVar
from urllib.parse import quote, unquote, urlsplit
from xml.etree import ElementTree as ET

import orjson

from . import caldav_query, dav
from ..domain import expansion
from ..formats import ical, tasks
from .caldav_collections import Collections
from .caldav_signin import AppPasswordSignIn
from ..storage.cache_file import CacheFile
from .dav import CALDAV, CS, DAV, APPLE, DavError, element, tag
from ..domain.models import ALL_PROJECTS, Identity, ValidationError, check_id
from ..storage.reads import UNREACHABLE_RETRY_AFTER
from .caldav_writes import ICS, XML, Answer, Fail, Writes, etag

if TYPE_CHECKING:
    from ..core.app import App

log = logging.getLogger(__name__)

T = TypeVar("T")

ROOT = "/dav/"
WELL_KNOWN = "/.well-known/caldav"
METHODS = (b"OPTIONS", b"GET", b"HEAD", b"PUT", b"DELETE", b"PROPFIND", b"PROPPATCH", b"REPORT", b"MKCALENDAR", b"MKCOL")
ALLOW = b"OPTIONS, GET, HEAD, PUT, DELETE, PROPFIND, PROPPATCH, REPORT, MKCALENDAR, MKCOL"
SYNC_PREFIX = "http://barosync.org/ns/sync/"
# Rendered resources, kept by (project, id) and ETag (so never stale) in memory and
# in this directory of the data dir (storage/cache_file.py: a cache, deleted at will).
RENDER_CACHE = "caldav-cache"
# What a calendar holds: events, tasks and journal entries (formats/tasks.py).
COMPONENTS = ("VEVENT", "VTODO", "VJOURNAL")
PALETTE = ("#3b82f6", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#f97316")



def sync_token(data_id: str, seq: int) -> str:
    return f"{SYNC_PREFIX}{data_id}/{seq}"


class CalDav:
    """What the CalDAV front keeps between requests: the app-password sign-in
    (caldav_signin.py) and the rendered resources (``rendered``, whose ``run`` the
    server starts and whose ``close`` it calls on the way out)."""

    def __init__(self, app: "App") -> None:
        self.app = app
        # Rendering a resource takes ~0.6 ms: each is rendered once, when an app PUTs
        # it or a sync first reads it, and the file keeps them across a restart.
        self.rendered = CacheFile(app.config.data_dir / RENDER_CACHE)
        self.writes = Writes(app, stored=self.render)
        self.sign_in = AppPasswordSignIn(app)
        self.collections = Collections(app)

    def render(self, e: dict[str, Any]) -> bytes:
        key = f"{e.get('projectId')}\0{e['id']}".encode()
        version = etag(e).encode()
        found = self.rendered.get(key, version)
        if found is None:
            found = ical.resource_bytes(e)
            self.rendered.put(key, version, found)
        return found

    # -- entry ---------------------------------------------------------------------

    async def handle(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """Answer one CalDAV request; never raises for anything a client can send."""
        try:
            return await self._dispatch(method, path, headers, body)
        except Fail as e:
            return e.answer()
        except DavError as e:
            return 400, str(e).encode() + b"\n", b"text/plain; charset=utf-8", []
        except Exception as e:
            why = self.app.read.unreachable(e)
            if why is None:
                raise
            return (503, f"{why}: the calendar cannot be read now; try again in {UNREACHABLE_RETRY_AFTER} s\n".encode(),
                    b"text/plain; charset=utf-8",
                    [(b"retry-after", str(UNREACHABLE_RETRY_AFTER).encode())])

    async def _dispatch(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        if path.rstrip("/") == WELL_KNOWN:
            return 301, b"", b"text/plain", [(b"location", ROOT.encode())]
        if method == b"OPTIONS":
            return 200, b"", b"text/plain", [(b"dav", b"1, 3, calendar-access"), (b"allow", ALLOW)]
        if method not in METHODS:
            raise Fail(405, f"{method.decode(errors='replace')} is not supported here", headers=[(b"allow", ALLOW)])
        identity = await self.sign_in.identity(headers)
        rel = path[len(ROOT):] if path.startswith(ROOT) else ""
        parts = [unquote(p) for p in rel.split("/") if p]
        if method in (b"MKCALENDAR", b"MKCOL"):
            if len(parts) != 3 or parts[0] != "calendars":
                raise Fail(403, "a new calendar goes in your calendar home: /dav/calendars/USER/NAME/",
                           condition="resource-must-be-null")
            self._own(identity, parts[1])
            return await self.collections.make(identity, parts[2], body)
        if method == b"REPORT" and (not parts or parts[0] == "principals"):
            return self._principal_search(identity, body)
        if not parts:
            return self._propfind_only(method, headers, body, [(ROOT, self._root_props(identity))])
        if parts[0] == "principals" and len(parts) == 2:
            self._own(identity, parts[1])
            return self._propfind_only(method, headers, body, [(self._principal(identity), self._principal_props(identity))])
        if parts[0] != "calendars" or len(parts) < 2 or len(parts) > 4:
            raise Fail(404, f"no such resource {path!r}; calendars are under {ROOT}calendars/USER/")
        self._own(identity, parts[1])
        if len(parts) == 2:
            return await self._home(method, identity, headers, body)
        project = parts[2]
        if project not in await self._projects(identity):
            # The same answer whether the project exists or not: names cannot be probed.
            raise Fail(404, f"no calendar {project!r} for {identity.user_id}: an app password reaches only the "
                            f"projects it was made for (`barosync token create --app-password --user "
                            f"{identity.user_id} --project {project}`)")
        if len(parts) == 3:
            return await self._calendar(method, identity, project, headers, body)
        return await self._object(method, identity, project, parts[3], path, headers, body)

    def _principal_search(self, identity: Identity, body: bytes) -> Answer:
        """An app looking up principals by name finds only its own user's: a team's
        people are not listed to calendar apps (scheduling is not offered either)."""
        matches, props = dav.principal_search(body)
        found = all(m in identity.name.lower() or m in identity.user_id.lower() for m in matches)
        return _multistatus([_props_response(self._principal(identity), self._principal_props(identity), props)]
                            if found else [])

    def _own(self, identity: Identity, user: str) -> None:
        if user != identity.user_id:
            raise Fail(403, f"this is {user}'s space; you are signed in as {identity.user_id}")

    async def _projects(self, identity: Identity) -> list[str]:
        # Every project: those with events, and those made in an app or the web app.
        names = ({p for p, _ in await self.app.queries.projects()} | {p.id for p in await self.app.tables_call(
            self.app.projects.list)} if identity.projects == ALL_PROJECTS else set(identity.projects))
        return sorted([p for p in names if await self.app.authorize(identity, "subscribe", p)])

    # -- resources and their properties --------------------------------------------------

    def _principal(self, identity: Identity) -> str:
        return f"{ROOT}principals/{quote(identity.user_id, safe='')}/"

    def _home_href(self, identity: Identity) -> str:
        return f"{ROOT}calendars/{quote(identity.user_id, safe='')}/"

    def _calendar_href(self, identity: Identity, project: str) -> str:
        return f"{self._home_href(identity)}{quote(project, safe='')}/"

    def _common(self, identity: Identity) -> dict[str, Callable[[], ET.Element]]:
        return {
            tag(DAV, "current-user-principal"): lambda: element(tag(DAV, "current-user-principal"),
                                                                children=[dav.href(self._principal(identity))]),
        }

    def _root_props(self, identity: Identity) -> dict[str, Callable[[], ET.Element]]:
        return {**self._common(identity),
                tag(DAV, "resourcetype"): lambda: element(tag(DAV, "resourcetype"), children=[element(tag(DAV, "collection"))]),
                tag(DAV, "displayname"): lambda: element(tag(DAV, "displayname"), "barosync")}

    def _principal_props(self, identity: Identity) -> dict[str, Callable[[], ET.Element]]:
        return {**self._common(identity),
                tag(DAV, "resourcetype"): lambda: element(tag(DAV, "resourcetype"), children=[
                    element(tag(DAV, "collection")), element(tag(DAV, "principal"))]),
                tag(DAV, "displayname"): lambda: element(tag(DAV, "displayname"), identity.name),
                tag(DAV, "principal-URL"): lambda: element(tag(DAV, "principal-URL"), children=[dav.href(self._principal(identity))]),
                tag(CALDAV, "calendar-home-set"): lambda: element(tag(CALDAV, "calendar-home-set"),
                                                                  children=[dav.href(self._home_href(identity))]),
                tag(CALDAV, "calendar-user-address-set"): lambda: element(tag(CALDAV, "calendar-user-address-set"), children=[
                    dav.href(f"urn:barosync:user:{identity.user_id}")])}

    def _home_props(self, identity: Identity) -> dict[str, Callable[[], ET.Element]]:
        return {**self._common(identity),
                tag(DAV, "resourcetype"): lambda: element(tag(DAV, "resourcetype"), children=[element(tag(DAV, "collection"))]),
                tag(DAV, "displayname"): lambda: element(tag(DAV, "displayname"), f"{identity.name}'s calendars"),
                tag(DAV, "owner"): lambda: element(tag(DAV, "owner"), children=[dav.href(self._principal(identity))])}

    async def _calendar_props(self, identity: Identity, project: str) -> dict[str, Callable[[], ET.Element]]:
        queries = self.app.queries
        token = sync_token(queries.history_id, await queries.head(project))
        writable = await self.app.authorize(identity, "create", project)
        record = await self.app.tables_call(self.app.projects.get, project)
        name = record.name if record is not None else project
        privileges = [tag(DAV, "read"), tag(CALDAV, "read-free-busy")]
        if writable:
            privileges += [tag(DAV, "write"), tag(DAV, "write-content"), tag(DAV, "bind"), tag(DAV, "unbind")]
        color = (record.color if record is not None and record.color else
                 PALETTE[int(hashlib.sha256(project.encode()).hexdigest(), 16) % len(PALETTE)])
        description = record.description if record is not None else None

        def privilege_set() -> ET.Element:
            return element(tag(DAV, "current-user-privilege-set"), children=[
                element(tag(DAV, "privilege"), children=[element(p)]) for p in privileges])

        reports = [tag(CALDAV, "calendar-query"), tag(CALDAV, "calendar-multiget"), tag(DAV, "sync-collection"),
                   tag(CALDAV, "free-busy-query")]
        return {**self._common(identity),
                tag(DAV, "resourcetype"): lambda: element(tag(DAV, "resourcetype"), children=[
                    element(tag(DAV, "collection")), element(tag(CALDAV, "calendar"))]),
                tag(DAV, "displayname"): lambda: element(tag(DAV, "displayname"), name),
                tag(APPLE, "calendar-color"): lambda: element(tag(APPLE, "calendar-color"), color),
                **({tag(CALDAV, "calendar-description"): lambda: element(tag(CALDAV, "calendar-description"),
                                                                         description)} if description else {}),
                tag(CALDAV, "supported-calendar-component-set"): lambda: element(
                    tag(CALDAV, "supported-calendar-component-set"), children=[_comp(c) for c in COMPONENTS]),
                tag(CALDAV, "supported-calendar-data"): lambda: element(tag(CALDAV, "supported-calendar-data"), children=[
                    _attrs(element(tag(CALDAV, "calendar-data")), {"content-type": "text/calendar", "version": "2.0"})]),
                tag(CALDAV, "max-resource-size"): lambda: element(tag(CALDAV, "max-resource-size"),
                                                                  str(self.app.config.max_message_bytes)),
                tag(CALDAV, "max-instances"): lambda: element(tag(CALDAV, "max-instances"),
                                                              str(expansion.MAX_INSTANCES)),
                tag(CALDAV, "min-date-time"): lambda: element(tag(CALDAV, "min-date-time"), _ical_utc(expansion.MIN_DATE)),
                tag(CALDAV, "max-date-time"): lambda: element(tag(CALDAV, "max-date-time"), _ical_utc(expansion.MAX_DATE)),
                tag(CS, "getctag"): lambda: element(tag(CS, "getctag"), token),
                tag(DAV, "sync-token"): lambda: element(tag(DAV, "sync-token"), token),
                tag(DAV, "current-user-privilege-set"): privilege_set,
                tag(DAV, "owner"): lambda: element(tag(DAV, "owner"), children=[dav.href(self._principal(identity))]),
                tag(DAV, "supported-report-set"): lambda: element(tag(DAV, "supported-report-set"), children=[
                    element(tag(DAV, "supported-report"), children=[element(tag(DAV, "report"), children=[element(r)])])
                    for r in reports])}

    def _event_props(self, e: dict[str, Any], expanded: bytes | None = None) -> dict[str, Callable[[], ET.Element]]:
        """``expanded``: the calendar-data of an ``expand`` report, made in a worker
        thread (CalDav._expand); else the stored event's resource."""
        def data() -> ET.Element:
            text = expanded if expanded is not None else self.render(e)
            return element(tag(CALDAV, "calendar-data"), text.decode())

        return {tag(DAV, "getetag"): lambda: element(tag(DAV, "getetag"), etag(e)),
                tag(DAV, "getcontenttype"): lambda: element(tag(DAV, "getcontenttype"),
                                                            f"text/calendar; charset=utf-8; component={tasks.component(e).lower()}"),
                tag(DAV, "resourcetype"): lambda: element(tag(DAV, "resourcetype")),
                tag(DAV, "getlastmodified"): lambda: element(tag(DAV, "getlastmodified"), _http_date(e["updatedAt"])),
                tag(CALDAV, "calendar-data"): data}

    def _event_href(self, identity: Identity, project: str, event_id: str) -> str:
        return f"{self._calendar_href(identity, project)}{quote(event_id, safe='')}.ics"

    # -- methods on collections -----------------------------------------------------------

    def _propfind_only(self, method: bytes, headers: dict[bytes, bytes], body: bytes,
                       resources: list[tuple[str, dict[str, Callable[[], ET.Element]]]]) -> Answer:
        if method == b"PROPPATCH":
            return _proppatch(resources[0][0], body)
        if method != b"PROPFIND":
            raise Fail(405, "this collection answers PROPFIND", headers=[(b"allow", b"OPTIONS, PROPFIND")])
        wanted = dav.propfind(body)
        return _multistatus([_props_response(href, props, wanted) for href, props in resources])

    async def _home(self, method: bytes, identity: Identity, headers: dict[bytes, bytes], body: bytes) -> Answer:
        resources = [(self._home_href(identity), self._home_props(identity))]
        if method == b"PROPFIND" and _depth(headers) > 0:
            for project in await self._projects(identity):
                resources.append((self._calendar_href(identity, project), await self._calendar_props(identity, project)))
        return self._propfind_only(method, headers, body, resources)

    async def _calendar(self, method: bytes, identity: Identity, project: str, headers: dict[bytes, bytes],
                        body: bytes) -> Answer:
        if method == b"REPORT":
            return await self._report(identity, project, dav.report(body))
        if method in (b"GET", b"HEAD"):
            raise Fail(405, "a calendar collection has no body; use PROPFIND or REPORT (or the ICS feed, /ics/)",
                       headers=[(b"allow", ALLOW)])
        if method == b"DELETE":
            return await self.collections.remove(identity, project)
        if method == b"PROPPATCH":
            return await self.collections.proppatch(identity, project, self._calendar_href(identity, project), body)
        if method != b"PROPFIND":
            raise Fail(405, f"{method.decode()} is for events ({{id}}.ics), not the calendar", headers=[(b"allow", ALLOW)])
        resources = [(self._calendar_href(identity, project), await self._calendar_props(identity, project))]
        if method == b"PROPFIND" and _depth(headers) > 0:
            _seq, events = await self.app.queries.snapshot(project)
            for e in events:
                resources.append((self._event_href(identity, project, e["id"]), self._event_props(e)))
        return self._propfind_only(method, headers, body, resources)

    async def _report(self, identity: Identity, project: str, report: dav.Report) -> Answer:
        if report.kind == "sync-collection":
            return await self._sync(identity, project, report)
        _check_window(report.start, report.end)
        if report.kind == "free-busy-query":
            _seq, events = await self.app.queries.snapshot(project)
            return 200, await self._expand(caldav_query.free_busy, events, report), ICS, []
        if report.expand:
            _check_window(*report.expand)
        if report.kind == "calendar-multiget":
            ids = [self._id_from_href(identity, project, h) for h in report.hrefs]
            found = await self.app.queries.events(project, ids)
            expanded = await self._expand(caldav_query.expanded_data, [e for e in found if e is not None], report) \
                if report.expand else {}
            out = []
            for h, e in zip(report.hrefs, found):
                if e is None:
                    out.append(dav.response(h, status=404))
                else:
                    out.append(_props_response(h, self._event_props(e, expanded.get(e["id"])), report.props))
            return _multistatus(out)
        out = []
        if report.components[0] == "VCALENDAR" and report.components[1:2] in (("VEVENT",), ("VTODO",),
                                                                                ("VJOURNAL",), ()):
            _seq, events = await self.app.queries.snapshot(project)
            matching = await self._expand(caldav_query.matching, events, report)
            expanded = await self._expand(caldav_query.expanded_data, matching, report) if report.expand else {}
            for e in matching:
                out.append(_props_response(self._event_href(identity, project, e["id"]),
                                           self._event_props(e, expanded.get(e["id"])), report.props))
        return _multistatus(out)

    async def _expand(self, fn: Callable[..., T], events: list[dict[str, Any]], report: dav.Report) -> T:
        """fn(events, report) off the event loop under expansion's bounds (app.expand);
        a limit reached is RFC 4791's max-instances precondition."""
        try:
            return await self.app.expand(fn, events, report)
        except expansion.ExpansionLimit as e:
            raise Fail(403, f"{e.message} (expanding recurring events: at most {expansion.MAX_INSTANCES} "
                            f"occurrences per event, {expansion.DEADLINE:g} s per request); ask for a shorter range",
                       condition="max-instances", ns=CALDAV) from None

    async def _sync(self, identity: Identity, project: str, report: dav.Report) -> Answer:
        queries = self.app.queries
        if report.sync_level != "1":
            raise Fail(403, "only sync-level 1 is supported (a calendar has no sub-collections)",
                       condition="number-of-matches-within-limits")
        out = []
        if not report.sync_token:
            seq, events = await queries.snapshot(project)
            for e in events:
                out.append(_props_response(self._event_href(identity, project, e["id"]), self._event_props(e), report.props))
            return _multistatus(out, sync_token=sync_token(queries.history_id, seq))
        since = self._parse_token(report.sync_token)
        found = await queries.changes_after(project, since)
        if found is None:
            raise Fail(403, "this sync token is older than the history kept (or from another server): sync from scratch",
                       condition="valid-sync-token")
        changes, _complete = found
        touched: dict[str, None] = {}
        for raw in changes:
            payload = _change_id(raw)
            touched.pop(payload, None)
            touched[payload] = None
        for event_id, e in zip(touched, await queries.events(project, list(touched))):
            href = self._event_href(identity, project, event_id)
            out.append(dav.response(href, status=404) if e is None else _props_response(href, self._event_props(e), report.props))
        return _multistatus(out, sync_token=sync_token(queries.history_id, since + len(changes)))

    def _parse_token(self, token: str) -> int:
        data_id, _, seq = token[len(SYNC_PREFIX):].rpartition("/") if token.startswith(SYNC_PREFIX) else ("", "", "")
        if data_id != self.app.queries.history_id or not seq.isdigit():
            raise Fail(403, "not a sync token of this server's data (restored or replaced?): sync from scratch",
                       condition="valid-sync-token")
        return int(seq)

    def _id_from_href(self, identity: Identity, project: str, href: str) -> str | None:
        # Compared unquoted: apps differ in what they percent-encode (an "@" or not).
        path = unquote(urlsplit(href).path)
        prefix = f"{ROOT}calendars/{identity.user_id}/{project}/"
        if not path.startswith(prefix) or not path.endswith(".ics"):
            return None
        return path[len(prefix):-4] or None

    # -- methods on events ----------------------------------------------------------------

    async def _object(self, method: bytes, identity: Identity, project: str, name: str, path: str,
                      headers: dict[bytes, bytes], body: bytes) -> Answer:
        if not name.endswith(".ics") or len(name) == 4:
            raise Fail(404, "events are named {id}.ics")
        event_id = name[:-4]
        try:
            check_id(event_id, "id")
        except ValidationError as e:
            raise Fail(403, f"the resource name {e.message} (before .ics)") from None
        known, stored = await self.app.queries.find(project, event_id)
        home = project if known else None
        if method in (b"GET", b"HEAD", b"PROPFIND"):
            if stored is None:
                raise Fail(404, f"no event {name!r} in {project!r}")
            if method == b"PROPFIND":
                return _multistatus([_props_response(self._event_href(identity, project, event_id),
                                                     self._event_props(stored), dav.propfind(body))])
            return 200, self.render(stored), ICS, [(b"etag", etag(stored).encode())]
        if method == b"PUT":
            return await self.writes.put(identity, project, event_id, home, stored, path, headers, body)
        if method == b"DELETE":
            return await self.writes.delete(identity, project, event_id, stored, headers)
        raise Fail(405, f"{method.decode()} is not supported on an event", headers=[(b"allow", ALLOW)])


def _ical_utc(value: datetime) -> str:
    return value.strftime("%Y%m%dT%H%M%SZ")


def _check_window(start: datetime | None, end: datetime | None) -> None:
    """A time range wholly outside the dates barosync expands is RFC 4791's
    min-date-time or max-date-time precondition; one that overlaps them is clipped."""
    if start is not None and start >= expansion.MAX_DATE:
        raise Fail(403, f"this calendar holds dates before {expansion.MAX_DATE:%Y-%m-%d}", condition="max-date-time",
                   ns=CALDAV)
    if end is not None and end <= expansion.MIN_DATE:
        raise Fail(403, f"this calendar holds dates from {expansion.MIN_DATE:%Y-%m-%d}", condition="min-date-time",
                   ns=CALDAV)


def _change_id(raw: bytes) -> str:
    return orjson.loads(raw)["payload"]["id"]


def _depth(headers: dict[bytes, bytes]) -> int:
    value = headers.get(b"depth", b"infinity").strip().lower()
    return 0 if value == b"0" else 1


def _comp(name: str) -> ET.Element:
    return _attrs(element(tag(CALDAV, "comp")), {"name": name})


def _attrs(el: ET.Element, values: dict[str, str]) -> ET.Element:
    for k, v in values.items():
        el.set(k, v)
    return el


def _http_date(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _props_response(href: str, available: dict[str, Callable[[], ET.Element]], wanted: tuple[str, ...] | None) -> ET.Element:
    if wanted is None:  # allprop: everything but what costs a rendering
        return dav.response(href, [make() for name, make in available.items() if name != tag(CALDAV, "calendar-data")])
    if wanted == ():
        return dav.response(href, [ET.Element(name) for name in available])
    found = [available[n]() for n in wanted if n in available]
    return dav.response(href, found, [n for n in wanted if n not in available])


def _proppatch(href: str, body: bytes) -> Answer:
    names = dav.proppatch(body)
    return _multistatus([dav.response(href, forbidden=names)])


def _multistatus(responses: list[ET.Element], *, sync_token: str | None = None) -> Answer:
    return 207, dav.multistatus(responses, sync_token=sync_token), XML, []
