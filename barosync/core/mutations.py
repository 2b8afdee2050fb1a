"""The one write path's front half, shared by WebSocket and REST: validate and
authorize a client's change into a ``Mutation`` for the writer. The writer then
checks conflicts, commits, acks and fans out (store.py, hub.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..wire import protocol
from ..domain.models import Identity, ValidationError, changed_fields, check_id, check_version, new_event
from ..wire.protocol import ProtocolError
from ..storage.store import Mutation, Outcome, now_ms

if TYPE_CHECKING:
    from .app import App

# delete_every_event's deletions per commit (as an import's creations).
CLEAR_GROUP = 500

async def prepare_mutation(
    app: "App",
    identity: Identity,
    kind: str,
    envelope_id: str,
    payload: dict[str, Any],
    *,
    client_ms: int | None = None,
    revive: bool = False,
) -> Mutation:
    """Validate and authorize; raises ProtocolError (with ``ref`` = the envelope id)
    for anything the writer should never see."""
    try:
        m = await _build(app, identity, kind, envelope_id, payload, client_ms=client_ms)
        # `restore: true` on a create brings back an event deleted in its project,
        # with its id and history (an undo), as a calendar app's PUT of a UID does.
        m.revive = revive or (kind == "create" and payload.get("restore") is True)
    except ValidationError as e:
        raise ProtocolError(protocol.E_INVALID, f"`{e.field}` {e.message}", ref=envelope_id, field=e.field) from None
    if not await app.authorize(identity, m.kind, m.project_id):
        raise ProtocolError(protocol.E_FORBIDDEN, f"not allowed to {m.kind} in project {m.project_id!r}", ref=envelope_id)
    return m


async def _build(app: "App", identity: Identity, kind: str, envelope_id: str, p: dict[str, Any], *,
                 client_ms: int | None) -> Mutation:
    user = identity.user_id
    received = now_ms()
    if client_ms is not None and not 0 < client_ms < 10**15:
        client_ms = None
    common: dict[str, Any] = dict(user_id=user, envelope_id=envelope_id, received_ms=received, client_ms=client_ms)
    if kind == "create":
        event = new_event(p, user_id=user, now_ms=received)
        return Mutation(kind, project_id=event.project_id, event_id=event.id, event=event, **common)
    event_id = check_id(p.get("id"), "id")
    project_id = await locate(app, identity, event_id, p.get("projectId"), ref=envelope_id)
    if kind == "update":
        if "version" not in p:
            raise ValidationError("version", "is required: the version your edit is based on")
        return Mutation(kind, project_id=project_id, event_id=event_id, base_version=check_version(p["version"]),
                        changes=changed_fields(p), **common)
    version = check_version(p["version"]) if p.get("version") is not None else None
    return Mutation(kind, project_id=project_id, event_id=event_id, base_version=version, **common)


async def locate(app: "App", identity: Identity, event_id: str, project_id: Any, *, ref: str | None) -> str:
    """The project of the event an update, delete or read names. An event is
    (project, id): with ``projectId`` that project; without it (older clients), the
    one project among this user's that knows the id. An event in a project this user
    cannot read answers like one that does not exist, so ids cannot be probed."""
    if project_id is not None:
        project_id = check_id(project_id, "projectId")
        if await app.authorize(identity, "subscribe", project_id):
            return project_id
        raise ProtocolError(protocol.E_NOT_FOUND, f"no event {event_id!r} in {project_id!r}", ref=ref, field="id")
    found = [p for p in await app.read(app.store.projects_of, event_id)
             if await app.authorize(identity, "subscribe", p)]
    if not found:
        raise ProtocolError(protocol.E_NOT_FOUND, f"no event {event_id!r}", ref=ref, field="id")
    if len(found) > 1:
        raise ProtocolError(protocol.E_INVALID, f"event id {event_id!r} is in several of your projects "
                                                f"({', '.join(sorted(found))}): send projectId too", ref=ref,
                            field="projectId")
    return found[0]


async def run_mutation(app: "App", identity: Identity, kind: str, envelope_id: str, payload: dict[str, Any], *,
                       revive: bool = False) -> Outcome:
    """Prepare, submit and wait for the writer's outcome (REST and CalDAV: one
    request, one change). Raises ProtocolError like prepare_mutation. ``revive``: a
    create may reuse the id of an event deleted in the same project (a calendar app
    putting a UID back)."""
    m = await prepare_mutation(app, identity, kind, envelope_id, payload, revive=revive)
    waiting = _Waiting()
    await app.writer.submit(m, waiting)
    await waiting.done.wait()
    assert waiting.outcome is not None
    return waiting.outcome


class _Waiting:
    """A request waiting for its one answer (a writer.Sender)."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: Outcome | None = None

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


async def delete_every_event(app: "App", identity: Identity, project_id: str, *, group: int = CLEAR_GROUP) -> int:
    """Every event of a project deleted as ordinary deletions through the one write
    path (each one in the history, so an undo brings it back), ``group`` per commit:
    a calendar made again at the URL of a deleted one starts empty. Returns how many;
    raises ProtocolError for the first that could not be deleted."""
    _, events = await app.queries.snapshot(project_id)
    failed: list[ProtocolError] = []

    async def one(e: dict[str, Any]) -> None:
        try:
            outcome = await run_mutation(app, identity, "delete", f"clear-{project_id}-{e['id']}-{e['version']}",
                                         {"id": e["id"], "projectId": project_id, "version": e["version"]})
        except ProtocolError as err:
            failed.append(err)
            return
        if outcome.status == "error":
            failed.append(outcome.error or ProtocolError(protocol.E_INTERNAL, "a deletion failed inside the server"))

    # A group at a time, all submitted before any is awaited: one commit per group.
    for first in range(0, len(events), group):
        async with trio.open_nursery() as nursery:
            for e in events[first:first + group]:
                nursery.start_soon(one, e)
        if failed:
            raise failed[0]
    return len(events)
