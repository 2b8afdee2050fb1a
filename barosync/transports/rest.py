"""The REST surface an offline client can replay its queue against.

Mutations go through exactly the same path as WebSocket ones (mutations.py, then the
writer): the same validation, authorization, idempotency (``Idempotency-Key`` is the
envelope id, per user), conflict strategies, and the same broadcast to subscribers.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import orjson
import trio

from ..core import admin
from ..domain import expansion
from ..formats import ical, ics
from ..wire import protocol
from ..domain.models import Identity, ValidationError, check_id, parse_instant
from ..core.mutations import locate, run_mutation
from ..wire.protocol import ProtocolError
from ..storage.reads import UNREACHABLE_RETRY_AFTER

if TYPE_CHECKING:
    from ..core.app import App

# A read PostgreSQL did not answer: 503, and when to try again.
RETRY_HEADERS = [(b"retry-after", str(UNREACHABLE_RETRY_AFTER).encode())]


# An import's events go to the writer this many at a time (one group commit each),
# and its parse and expansion may take this long (a whole calendar export).
IMPORT_GROUP = 500
IMPORT_DEADLINE = 30.0


def is_import(path: str) -> bool:
    return _PROJECT_IMPORT.fullmatch(path) is not None


def _unavailable(why: str) -> str:
    return f"{why}: the log cannot be read now; try again in {UNREACHABLE_RETRY_AFTER} s"

_PROJECT_EVENTS = re.compile(r"/api/projects/([^/]+)/events")
_PROJECT_IMPORT = re.compile(r"/api/projects/([^/]+)/import")
_FEED = re.compile(r"/ics/([^/]+)\.ics")
_ADMIN_CLOSE = re.compile(r"/api/admin/connections/([^/]+)/close")
_EVENT = re.compile(r"/api/events/([^/]+)")

Response = tuple[int, Any]
# status, JSON body, extra headers
Answer = tuple[int, Any, list[tuple[bytes, bytes]]]


def came_over_https(headers: dict[bytes, bytes]) -> bool:
    """Whether a TLS-terminating proxy in front says the browser used HTTPS (cookies
    are then Secure, and redirects go back to https)."""
    return headers.get(b"x-forwarded-proto", b"").lower() == b"https"


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: list[tuple[bytes, bytes]] | None = None,
                 **extra: Any) -> None:
        self.status = status
        self.body = {"error": code, "message": message, **extra}
        self.headers = headers or []


def _error(err: ProtocolError) -> HttpError:
    extra: dict[str, Any] = {"field": err.field} if err.field else {}
    headers = []
    if err.retry_after is not None:
        extra["retryAfter"] = err.retry_after
        headers.append(protocol.retry_after_header(err.retry_after))
    return HttpError(protocol.http_status(err.code), err.code, err.message, headers=headers, **extra)


async def handle(app: "App", method: bytes, path: str, query: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
    """Answer one /api request; never raises for anything a client can send."""
    try:
        status, answer = await _dispatch(app, method, path, query, headers, body)
        return status, answer, []
    except HttpError as e:
        return e.status, e.body, e.headers
    except ProtocolError as e:
        err = _error(e)
        return err.status, err.body, err.headers
    except Exception as e:
        why = app.read.unreachable(e)
        if why is None:
            raise
        return 503, {"error": "unavailable", "message": _unavailable(why)}, RETRY_HEADERS


async def _dispatch(app: "App", method: bytes, path: str, query: str, headers: dict[bytes, bytes], body: bytes) -> Response:
    identity = await _identity(app, headers)
    if path.startswith("/api/admin/"):
        return await _admin(app, identity, method, path)
    if path == "/api/me":
        _allow(method, b"GET")
        return 200, _me(identity)
    if path == "/api/projects":
        _allow(method, b"GET")
        deleted = app.projects.deleted
        return 200, {"projects": [{"id": p, "seq": seq} for p, seq in await app.queries.projects()
                              if identity.may_access(p) and p not in deleted]}
    if m := _PROJECT_IMPORT.fullmatch(path):
        _allow(method, b"POST")
        return await _import(app, identity, _unquote(m.group(1)), parse_qs(query), body)
    if m := _PROJECT_EVENTS.fullmatch(path):
        _allow(method, b"GET")
        return await _list(app, identity, _unquote(m.group(1)), parse_qs(query))
    if path == "/api/events":
        _allow(method, b"POST")
        key = _idempotency_key(headers)
        return await _mutate(app, identity, "create", key, _json_body(body))
    if m := _EVENT.fullmatch(path):
        event_id = _unquote(m.group(1))
        project_id = (parse_qs(query).get("projectId") or [None])[0]
        if method == b"GET":
            return await _get(app, identity, event_id, project_id)
        _allow(method, b"GET", b"PUT", b"DELETE")
        payload = _json_body(body) if method == b"PUT" or body else {}
        payload["id"] = event_id
        if project_id is not None:
            payload.setdefault("projectId", project_id)
        if method == b"DELETE" and "version" not in payload:
            version = parse_qs(query).get("version")
            if version:
                payload["version"] = _int(version[0], "version")
        return await _mutate(app, identity, "update" if method == b"PUT" else "delete", _idempotency_key(headers), payload)
    raise HttpError(404, "not_found", f"no such resource {path!r}")


async def _admin(app: "App", identity: Identity, method: bytes, path: str) -> Response:
    if not identity.admin:
        raise HttpError(403, protocol.E_FORBIDDEN, "the sync inspector needs a token with the admin claim "
                                                   "(`barosync token create --admin`)")
    if path == "/api/admin/summary":
        _allow(method, b"GET")
        return 200, await admin.summary(app)
    if m := _ADMIN_CLOSE.fullmatch(path):
        _allow(method, b"POST")
        session_id = _unquote(m.group(1))
        if not admin.close_connection(app, session_id):
            raise HttpError(404, protocol.E_NOT_FOUND, f"no open connection {session_id!r}")
        return 200, {"closed": session_id}
    raise HttpError(404, "not_found", f"no such resource {path!r} (/api/admin/summary, /api/admin/connections/ID/close)")


def _me(identity: Identity) -> dict[str, Any]:
    """Who the token says the caller is (browsers cannot see why a WebSocket
    handshake was refused; this answers 401 for the same token)."""
    return {
        "user": {"id": identity.user_id, "name": identity.name, "avatar": identity.avatar, "color": identity.color},
        "projects": identity.projects if isinstance(identity.projects, str) else sorted(identity.projects),
        "admin": identity.admin,
        "roles": dict(identity.roles),  # the projects whose role is not the editor's
        "expiresAt": identity.expires_ms,
    }


def _allow(method: bytes, *allowed: bytes) -> None:
    if method not in allowed:
        raise HttpError(405, "method_not_allowed", f"use {' or '.join(a.decode() for a in allowed)}",
                        headers=[(b"allow", b", ".join(allowed))])


def _unquote(part: str) -> str:
    return unquote(part)


def _int(value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise HttpError(400, protocol.E_INVALID, f"`{field}` must be an integer", field=field) from None


async def _identity(app: "App", headers: dict[bytes, bytes]) -> Identity:
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() != b"bearer ":
        raise HttpError(401, "unauthorized", "send Authorization: Bearer <token> (mint one with `barosync token create`)")
    identity = await app.authenticate(auth[7:].strip().decode("latin-1"))
    if identity is None:
        raise HttpError(401, "unauthorized", "token invalid or expired")
    limited(app, identity)
    return identity


def limited(app: "App", identity: Identity) -> None:
    """Spend one of the identity's HTTP requests (app.requests), or answer 429."""
    refused = app.request_refused(identity)
    if refused is not None:
        message, wait = refused
        raise HttpError(429, protocol.E_RATE_LIMITED, message, retryAfter=wait, headers=[protocol.retry_after_header(wait)])


def _idempotency_key(headers: dict[bytes, bytes]) -> str:
    key = headers.get(b"idempotency-key")
    if key is None:
        # Without a key a retry cannot be recognised; the change is still applied once.
        return uuid.uuid4().hex
    return key.decode("latin-1")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as e:
        raise HttpError(400, protocol.E_BAD_JSON, f"request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise HttpError(400, protocol.E_BAD_ENVELOPE, "request body must be a JSON object")
    return value


def _utc(value: str, field: str) -> datetime:
    try:
        instant = parse_instant(value, field)
    except ValidationError as e:
        raise HttpError(400, protocol.E_INVALID, f"`{field}` {e.message}", field=field) from None
    return instant if instant.tzinfo else instant.replace(tzinfo=timezone.utc)


async def _list(app: "App", identity: Identity, project_id: str, query: dict[str, list[str]]) -> Response:
    if not await app.authorize(identity, "subscribe", project_id):
        raise HttpError(403, protocol.E_FORBIDDEN, f"not allowed to read project {project_id!r}")
    start = _utc(query["from"][0], "from") if "from" in query else None
    end = _utc(query["to"][0], "to") if "to" in query else None
    seq, events = await app.queries.snapshot(project_id)
    if start is not None or end is not None:
        events = [
            e for e in events
            if (end is None or _utc(e["startDate"], "startDate") < end)
            and (start is None or _utc(e["endDate"], "endDate") >= start)
        ]
    events.sort(key=lambda e: _utc(e["startDate"], "startDate"))
    return 200, {"projectId": project_id, "seq": seq, "events": events}


async def _get(app: "App", identity: Identity, event_id: str, project_id: str | None) -> Response:
    try:
        project = await locate(app, identity, event_id, project_id, ref=None)
    except ValidationError as e:
        raise HttpError(400, protocol.E_INVALID, f"`{e.field}` {e.message}", field=e.field) from None
    event = await app.queries.event(project, event_id)
    if event is None:
        raise HttpError(404, protocol.E_NOT_FOUND, f"no event {event_id!r}")
    return 200, event


async def _mutate(app: "App", identity: Identity, kind: str, key: str, payload: dict[str, Any]) -> Response:
    try:
        key = check_id(key, "Idempotency-Key")
    except ValidationError as e:
        raise HttpError(400, protocol.E_INVALID, f"Idempotency-Key {e.message}") from None
    outcome = await run_mutation(app, identity, kind, key, payload)
    if outcome.status == "error":
        assert outcome.error is not None
        raise _error(outcome.error)
    if outcome.status == "conflict":
        return 409, {"error": "conflict", "message": "the event changed since your version", "conflict": outcome.conflict}
    body = dict(outcome.answer or {})
    if outcome.conflict is not None:
        body["conflict"] = outcome.conflict
    return (201 if kind == "create" else 200), body


# -- ICS: the read-only feed and the import ---------------------------------------------


async def feed(app: "App", method: bytes, path: str, query: str, headers: dict[bytes, bytes]) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """``GET /ics/{projectId}.ics?token=…``: (status, body, content type, headers).
    Only a feed token for that project opens it; the ETag is the project's seq in
    this data directory, so polling apps get 304 until something changes."""
    m = _FEED.fullmatch(path)
    if m is None:
        return _feed_error(404, "not_found", f"no such feed {path!r}: /ics/PROJECT.ics")
    if method not in (b"GET", b"HEAD"):
        status, body, content_type, _ = _feed_error(405, "method_not_allowed", "use GET")
        return status, body, content_type, [(b"allow", b"GET, HEAD")]
    project_id = _unquote(m.group(1))
    token = (parse_qs(query).get("token") or [None])[0]
    identity = await app.authenticate(token, scope="feed") if token else None
    if identity is None:
        return _feed_error(401, "unauthorized", "missing, expired, revoked or not a feed token "
                                                "(make one with `barosync token create --feed --project P`)")
    if not await app.authorize(identity, "subscribe", project_id):
        return _feed_error(403, protocol.E_FORBIDDEN, f"this feed token is not for project {project_id!r}")
    try:
        limited(app, identity)
    except HttpError as e:
        return e.status, orjson.dumps(e.body), b"application/json", e.headers
    try:
        seq, events = await app.queries.snapshot(project_id)
    except Exception as e:
        why = app.read.unreachable(e)
        if why is None:
            raise
        status, body, content_type, _ = _feed_error(503, "unavailable", _unavailable(why))
        return status, body, content_type, RETRY_HEADERS
    etag = f'"{app.queries.history_id}-{seq}"'.encode()
    extra = [(b"etag", etag), (b"cache-control", b"no-cache")]
    if headers.get(b"if-none-match") == etag:
        return 304, b"", b"text/calendar; charset=utf-8", extra
    events.sort(key=lambda e: e["startDate"])
    return 200, ical.feed(project_id, events), b"text/calendar; charset=utf-8", extra


def _feed_error(status: int, code: str, message: str) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    return status, orjson.dumps({"error": code, "message": message}), b"application/json", []


async def _import(app: "App", identity: Identity, project_id: str, query: dict[str, list[str]], body: bytes) -> Response:
    """``POST /api/projects/{id}/import`` with an ``.ics`` body: each event through the
    one write path, keyed by its UID, so importing the same file twice changes nothing
    the second time. Recurrences are expanded within ``from``/``to`` (ics.py says why)."""
    if not await app.authorize(identity, "create", project_id):
        raise HttpError(403, protocol.E_FORBIDDEN, f"not allowed to create in project {project_id!r}")
    window = None
    if "from" in query or "to" in query:
        if not ("from" in query and "to" in query):
            raise HttpError(400, protocol.E_INVALID, "give both `from` and `to` (the window recurrences are expanded in)")
        window = (_utc(query["from"][0], "from"), _utc(query["to"][0], "to"))
    try:
        # Off the event loop and under a deadline: a file's rules may ask for a lot.
        found = await app.expand(functools.partial(ics.parse, body, project_id=project_id, window=window),
                                 seconds=IMPORT_DEADLINE)
    except ics.IcsError as e:
        raise HttpError(400, protocol.E_INVALID, str(e)) from None
    except expansion.ExpansionLimit as e:
        raise HttpError(413, protocol.E_LIMIT, f"expanding the file's recurring events {e.message}: import a shorter "
                                               "window (from, to) or fewer events", limit=e.limit) from None
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    refused: list[dict[str, Any]] = []

    async def one(fields: dict[str, Any]) -> None:
        stored = await app.queries.event(project_id, fields["id"])  # None when it lives elsewhere
        if stored is not None and all(stored.get(k) == v for k, v in fields.items() if k != "projectId"):
            counts["unchanged"] += 1
            return
        if stored is None:
            kind, payload = "create", fields
        else:
            kind, payload = "update", {k: v for k, v in fields.items() if k != "projectId"} | {"version": stored["version"]}
        key = "ics-" + hashlib.sha256(orjson.dumps([kind, payload], option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        try:
            await _mutate(app, identity, kind, key, payload)
        except HttpError as e:
            refused.append({"id": fields["id"], **e.body})
            return
        except ProtocolError as e:
            refused.append({"id": fields["id"], **_error(e).body})
            return
        counts["created" if kind == "create" else "updated"] += 1

    # A group at a time, all submitted before any is awaited: the writer commits each
    # group in one transaction (one fsync), not one per event.
    for first in range(0, len(found), IMPORT_GROUP):
        async with trio.open_nursery() as group:
            for fields in found[first:first + IMPORT_GROUP]:
                group.start_soon(one, fields)
    refused.sort(key=lambda r: r["id"])
    return 200, {"projectId": project_id, **counts, "refused": refused, "events": len(found)}
