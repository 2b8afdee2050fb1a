"""CalDAV's writes: PUT and DELETE of one event, through the one write path.

A stale ``If-Match`` is an edit based on an older version: the project's conflict
strategy decides, and where it settles the edit without a person the answer is 2xx
without an ETag (RFC 4791 §5.3.4), so the app fetches what was stored.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable

from . import dav
from ..formats import ical
from ..wire import protocol
from .dav import CALDAV, DAV
from ..domain.models import Identity
from ..core.mutations import run_mutation
from ..wire.protocol import ProtocolError

if TYPE_CHECKING:
    from ..core.app import App

XML = b"application/xml; charset=utf-8"
ICS = b"text/calendar; charset=utf-8"
# protocol error -> HTTP status for a PUT or DELETE: RFC 4791 reports a failed
# precondition (what `invalid` means here) as 403.
STATUS = protocol.HTTP_STATUS | {protocol.E_INVALID: 403}

Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]


class Fail(Exception):
    def __init__(self, status: int, message: str, *, condition: str | None = None, ns: str = DAV,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.condition = condition
        self.ns = ns
        self.headers = headers or []

    def answer(self) -> Answer:
        if self.condition is not None:
            return self.status, dav.error(self.condition, self.ns, self.message), XML, self.headers
        return self.status, self.message.encode() + b"\n", b"text/plain; charset=utf-8", self.headers


def etag(e: dict[str, Any]) -> str:
    """Changes with every version (and when an id is used again after a deletion)."""
    return f'"{e["version"]}-{e["updatedAt"]}"'


def _version_of(value: str) -> int | None:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    try:
        return int(value.strip('"').split("-", 1)[0])
    except ValueError:
        return None


class Writes:
    """PUT and DELETE of one event resource, through the one write path (a part of
    caldav.py's CalDav, which routes to it)."""

    def __init__(self, app: "App", *, stored: Callable[[dict[str, Any]], Any] = lambda e: None) -> None:
        self.app = app
        # Told each event a PUT stored (caldav.py renders it now, while its bytes are
        # at hand: the app's next sync reads it, ~0.6 ms sooner each).
        self.stored = stored

    async def put(self, identity: Identity, project: str, event_id: str, home: str | None,
                   stored: dict[str, Any] | None, path: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        if_match = headers.get(b"if-match")
        if_none = headers.get(b"if-none-match")
        if if_none is not None and if_none.strip() == b"*" and stored is not None:
            raise Fail(412, "the event exists already (If-None-Match: *)")
        try:
            fields = ical.from_resource(body, project_id=project, event_id=event_id)
        except ical.IcalError as e:
            raise Fail(403, str(e), condition=e.precondition, ns=CALDAV) from None
        base = None
        if if_match is not None:
            condition = if_match.decode("latin-1").strip()
            if condition == "*":
                if stored is None:
                    raise Fail(412, "no such event to match (If-Match: *)")
            else:
                base = _version_of(condition)
                if base is None:
                    raise Fail(412, f"If-Match {condition!r} is not an ETag this server gave")
                if stored is None and home is None:
                    raise Fail(412, "no such event to match (If-Match)")
        # An If-Match of an event deleted since goes to the conflict strategy, like a
        # browser's edit of it would.
        if stored is None and base is None:
            kind, payload = "create", fields
        else:
            kind = "update"
            version = base if base is not None else stored["version"]  # type: ignore[index]
            payload = fields | {"version": version}  # projectId: the same UID may be in another calendar
        if if_match is not None:
            condition = if_match
        elif stored is not None:
            condition = f"v{stored['version']}".encode()
        else:
            # A create: the same bytes PUT again after a DELETE (an app's undo, a file
            # restored in a synced folder) must create again, not get the first
            # creation's answer back. The project's head tells the two apart, while a
            # retry of a create that changed nothing yet still finds its answer.
            condition = f"new@{await self.app.queries.head(project)}".encode()
        key = _key(identity, b"PUT", path, condition, body)
        outcome = await self._run(identity, kind, key, payload, revive=kind == "create")
        if outcome.status == "conflict":
            return self._settled(outcome.conflict or {}, 204)
        event = (outcome.answer or {}).get("event")
        extra = [(b"etag", etag(event).encode())] if event is not None and outcome.conflict is None else []
        if event is not None:
            self.stored(event)
        return (201 if kind == "create" else 204), b"", b"text/plain", extra

    async def delete(self, identity: Identity, project: str, event_id: str, stored: dict[str, Any] | None,
                      headers: dict[bytes, bytes]) -> Answer:
        if stored is None:
            raise Fail(404, f"no event {event_id!r} in {project!r}")
        if_match = headers.get(b"if-match")
        payload: dict[str, Any] = {"id": event_id, "projectId": project}
        if if_match is not None and if_match.strip() != b"*":
            base = _version_of(if_match.decode("latin-1"))
            if base is None:
                raise Fail(412, f"If-Match {if_match.decode('latin-1')!r} is not an ETag this server gave")
            payload["version"] = base
        key = _key(identity, b"DELETE", event_id, if_match or f"v{stored['version']}".encode(), b"")
        outcome = await self._run(identity, "delete", key, payload)
        if outcome.status == "conflict":
            return self._settled(outcome.conflict or {}, 204)
        return 204, b"", b"text/plain", []

    def _settled(self, conflict: dict[str, Any], status: int) -> Answer:
        """A stale If-Match the strategy answered without storing: 2xx when nothing
        the app changed is lost (the stored event already has it), else 412."""
        local, stored = conflict.get("localVersion") or {}, conflict.get("resolved", conflict.get("remoteVersion"))
        manual = "resolved" not in conflict
        if not manual and conflict.get("operation") == "update" and stored is not None and all(
                stored.get(f) == local.get(f) for f in conflict.get("fields", [])):
            return status, b"", b"text/plain", []
        raise Fail(412, f"the event changed since your version, and the calendar's conflict strategy "
                        f"({conflict.get('strategy')}) kept the other change to {', '.join(conflict.get('fields') or ['it'])}: "
                        "fetch it and edit again")

    async def _run(self, identity: Identity, kind: str, key: str, payload: dict[str, Any], *, revive: bool = False) -> Any:
        try:
            outcome = await run_mutation(self.app, identity, kind, key, payload, revive=revive)
        except ProtocolError as e:
            raise Fail(protocol.http_status(e.code, STATUS), e.message) from None
        if outcome.status == "error":
            err = outcome.error
            if err is None:
                raise Fail(500, "the change failed inside the server; try again later")
            headers = [protocol.retry_after_header(err.retry_after)] if err.retry_after else []
            raise Fail(protocol.http_status(err.code, STATUS), err.message, headers=headers)
        return outcome


def _key(identity: Identity, method: bytes, path: str, condition: bytes, body: bytes) -> str:
    """The envelope id of a request: a retried PUT (same body, same If-Match or the
    same stored version) is applied once and gets the original answer."""
    h = hashlib.sha256(b"\0".join([identity.user_id.encode(), method, path.encode(), condition, body]))
    return "dav-" + h.hexdigest()[:40]
