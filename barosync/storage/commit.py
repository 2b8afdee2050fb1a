"""What one mutation does inside the writer's transaction, written once for every store.

The writer (writer.py) hands a batch to the store's ``commit_batch``, in its worker
thread; for each mutation ``Rules.apply`` checks for a repeated envelope id (the
idempotency record answers it), validates (plugins included), checks for a conflict
(the project's strategy decides, with ``base`` read from history), and records the
event, the change with the project's next seq and the idempotency record — all
through ``WriteTxn``, the small interface each store's write transaction fills
(lmdb_txn.py for LMDB, pg_store.py's ``PgTxn`` for PostgreSQL). The stores keep what
differs: how a transaction begins and commits, and what a failure mid-batch does.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol

import attrs
import orjson

from ..wire import protocol
from ..hooks.conflicts import Conflict, Resolution, changed_by_client
from ..domain.models import CLIENT_FIELDS, Event, ValidationError, apply_changes, event_from_wire, event_to_wire

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

def now_ms() -> int:
    return int(time.time() * 1000)


MutationKind = Literal["create", "update", "delete"]
OutcomeStatus = Literal["applied", "replayed", "conflict", "error"]


@attrs.define(slots=True)
class Mutation:
    """One client change on its way to the writer: a plain value (who hears its
    answer travels beside it, writer.Sender). ``project_id`` is known before
    submission (creates carry it, updates and deletes are looked up by event id)."""

    kind: MutationKind
    user_id: str
    envelope_id: str
    project_id: str
    event_id: str
    event: Event | None = None  # create: the validated new event
    base_version: int | None = None  # update/delete: the version the edit was based on
    changes: dict[str, Any] | None = None  # update: checked wire fields
    received_ms: int = 0
    client_ms: int | None = None  # the envelope's timestamp: when the client made the edit
    # create: may bring back the id of an event deleted in this project (CalDAV apps
    # put a UID back; the event continues one version past its deletion)
    revive: bool = False


@attrs.define(slots=True)
class Outcome:
    """What the writer decided for one mutation."""

    status: OutcomeStatus
    project_id: str
    answer: dict[str, Any] | None = None  # the ack payload (applied, replayed)
    seq: int = 0
    change: bytes | None = None  # the change message JSON (applied)
    error: protocol.ProtocolError | None = None
    conflict: dict[str, Any] | None = None  # for conflict:detected to the sender


class WriteTxn(Protocol):
    """A store's write transaction, as the rules use it. Reads see this transaction's
    own writes."""

    def answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        """The answer recorded for this envelope (it was applied before), or None."""

    def known(self, project_id: str, event_id: str) -> bool:
        """The id is in use in the project: live, or deleted within the history."""

    def event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        """The live event (locked for this transaction where the store locks)."""

    def last_change(self, project_id: str, event_id: str) -> tuple[int, int]:
        """The event's latest version in history and when it was edited (ms); (0, 0)."""

    def change_at_version(self, project_id: str, event_id: str, version: int) -> dict[str, Any] | None:
        """The change that produced ``version``, if history has it."""

    def project_events(self, project_id: str) -> Iterator[dict[str, Any]]:
        """Every live event of the project (for validation plugins)."""

    def next_seq(self, project_id: str) -> int:
        """The project's next seq, taken."""

    def record(self, m: Mutation, *, seq: int, version: int, event: dict[str, Any] | None, change: bytes,
               answer: dict[str, Any], new_id: bool) -> None:
        """Store the change: the event (None: deleted), the changelog entry, the
        idempotency record; ``new_id``: the id enters the project's index. Keeps
        ``[storage] history_max_changes``."""


class Rules:
    """The write rules, once: what a mutation does, given a ``WriteTxn``."""

    def __init__(self, config: "Config", hook: Any, strategies: "dict[str, Any] | None" = None) -> None:
        self.config = config
        self.hook = hook
        # Strategy name -> the resolver of the plugin providing it
        # (plugins.strategy_resolvers); None asks the hook as a whole.
        self.strategies = strategies

    def apply(self, txn: WriteTxn, m: Mutation) -> Outcome:
        """One mutation. A refusal writes nothing; any other exception leaves the
        transaction to the store (which redoes the batch without this mutation, or
        rolls back to its savepoint)."""
        answer = txn.answer(m.user_id, m.envelope_id)
        if answer is not None:
            return Outcome("replayed", answer.get("projectId", m.project_id), answer=answer, seq=answer.get("seq", 0))
        # Checks (and plugins) run before a mutation's first write, so a refusal
        # leaves nothing behind.
        try:
            if m.kind == "create":
                return self._create(txn, m)
            return self._update_or_delete(txn, m)
        except ValidationError as e:
            return error(m, protocol.E_INVALID, f"`{e.field}` {e.message}", e.field)

    def _create(self, txn: WriteTxn, m: Mutation) -> Outcome:
        assert m.event is not None
        # An event is (project, id): the same id in another project is another event.
        known = txn.known(m.project_id, m.event.id)
        if known and m.revive and txn.event(m.project_id, m.event.id) is None:
            version = txn.last_change(m.project_id, m.event.id)[0] + 1
            revived = event_to_wire(attrs.evolve(m.event, version=version))
            return self._commit_change(txn, m, "create", revived, previous=None, new_id=False)
        if known:
            return error(m, protocol.E_EXISTS, f"an event with id {m.event.id!r} already exists in this project "
                                               "(ids of deleted events are kept for the history retention)", "id")
        return self._commit_change(txn, m, "create", event_to_wire(m.event), previous=None, new_id=True)

    def _update_or_delete(self, txn: WriteTxn, m: Mutation) -> Outcome:
        stored = txn.event(m.project_id, m.event_id)
        if stored is None:
            if m.kind == "update" and m.base_version is not None and \
                    m.base_version < txn.last_change(m.project_id, m.event_id)[0]:
                # Edited (from a version before the deletion) after someone deleted
                # it: the strategy decides.
                return self._conflict(txn, m, None)
            return error(m, protocol.E_NOT_FOUND, f"no event {m.event_id!r} (it was deleted)", "id")
        if m.base_version is not None and m.base_version != stored["version"]:
            if m.base_version > stored["version"]:
                return error(m, protocol.E_INVALID, f"`version` {m.base_version} is ahead of the stored version "
                                                    f"{stored['version']}", "version")
            return self._conflict(txn, m, stored)
        if m.kind == "delete":
            return self._commit_change(txn, m, "delete", None, previous=stored)
        updated = apply_changes(event_from_wire(stored), m.changes or {}, user_id=m.user_id, now_ms=m.received_ms)
        return self._commit_change(txn, m, "update", event_to_wire(updated), previous=stored)

    def _conflict(self, txn: WriteTxn, m: Mutation, stored: dict[str, Any] | None) -> Outcome:
        produced_base = txn.change_at_version(m.project_id, m.event_id, m.base_version or 0)
        base = (produced_base["payload"] if produced_base is not None
                and produced_base["type"] != protocol.CHANGE_TYPES["delete"] else None)
        changes = m.changes or {}
        local = {**base, **changes} if base is not None and m.kind == "update" else None
        last_version, remote_time = txn.last_change(m.project_id, m.event_id)
        if stored is not None:
            produced = txn.change_at_version(m.project_id, m.event_id, stored["version"])
            remote_time = edited_at(produced) if produced is not None else stored["updatedAt"]
        tiebreak_name = self.config.merge_tiebreak

        def tiebreak(c: Conflict) -> Resolution | None:
            return self._resolve(tiebreak_name, c)

        conflict = Conflict(
            operation=m.kind,  # type: ignore[arg-type]
            base=base,
            local=local,
            remote=stored,
            changes=changes,
            client_time=min(m.client_ms or m.received_ms, m.received_ms),
            remote_time=remote_time,
            user_id=m.user_id,
            merge_tiebreak=tiebreak_name,
            project_id=m.project_id,
            event_id=m.event_id,
            tiebreak=tiebreak,
        )
        strategy = self.config.strategy_for(m.project_id)
        resolution = self._resolve(strategy, conflict)
        if resolution is None:
            resolution = Resolution("keep", fields=changed_by_client(conflict), manual=True)
        info: dict[str, Any] = {
            "ref": m.envelope_id,
            "id": m.event_id,
            "projectId": m.project_id,
            "operation": m.kind,
            "localVersion": local,
            "remoteVersion": stored,
            "base": base,
            "strategy": strategy,
            "fields": list(resolution.fields),
        }
        if resolution.action == "keep":
            if not resolution.manual:
                info["resolved"] = stored
            return Outcome("conflict", m.project_id, conflict=info)
        if resolution.action == "delete":
            if stored is None:
                info["resolved"] = None
                return Outcome("conflict", m.project_id, conflict=info)
            outcome = self._commit_change(txn, m, "delete", None, previous=stored)
        else:
            source = stored if stored is not None else (local or base)
            if source is None or resolution.event is None or not all(source.get(f) for f in ("title", "startDate", "endDate")):
                info["resolved"] = stored  # nothing usable to store: what is stored stays
                return Outcome("conflict", m.project_id, conflict=info)
            current = event_from_wire(source)
            if stored is None:  # brought back from deletion, one version past it
                current = attrs.evolve(current, version=last_version)
            wanted = {f: resolution.event[f] for f in CLIENT_FIELDS if f in resolution.event}
            merged = apply_changes(current, wanted, user_id=m.user_id, now_ms=m.received_ms)
            # Brought back from deletion, it is new again for everyone who dropped it
            # (its id is known in the project already).
            kind = "update" if stored is not None else "create"
            outcome = self._commit_change(txn, m, kind, event_to_wire(merged), previous=stored,
                                          new_id=stored is None)
        if outcome.status == "applied":
            info["resolved"] = outcome.answer.get("event") if outcome.answer else None
            outcome.conflict = info
        return outcome

    def _resolve(self, strategy: str, conflict: Conflict) -> Resolution | None:
        """Ask only the plugin that provides ``strategy`` (plugins.strategy_resolvers)."""
        resolvers = self.strategies
        if resolvers is None:
            return self.hook.barosync_resolve_conflict(strategy=strategy, conflict=conflict)
        ask = resolvers.get(strategy)
        return ask(strategy=strategy, conflict=conflict) if ask is not None else None

    def _validate(self, txn: WriteTxn, m: Mutation, kind: str, event: dict[str, Any] | None,
                  previous: dict[str, Any] | None) -> tuple[protocol.ProtocolError | None, list[dict[str, Any]]]:
        hook = self.hook.barosync_validate_mutation
        if not hook.get_hookimpls():
            return None, []

        def project_events() -> Iterator[dict[str, Any]]:
            return txn.project_events(m.project_id)

        warnings = []
        for found in hook(operation=kind, event=event, previous=previous, project_events=project_events,
                          user_id=m.user_id, config=self.config):
            for problem in found if isinstance(found, list) else [found]:
                if problem is None:
                    continue
                if problem.refuse:
                    return protocol.ProtocolError(problem.code, problem.message, ref=m.envelope_id, field=problem.field), []
                warnings.append({"code": problem.code, "message": problem.message, "field": problem.field})
        return None, warnings

    def _commit_change(self, txn: WriteTxn, m: Mutation, kind: str, event: dict[str, Any] | None, *,
                       previous: dict[str, Any] | None, new_id: bool = False) -> Outcome:
        refused, warnings = self._validate(txn, m, kind, event, previous)
        if refused is not None:
            return Outcome("error", m.project_id, error=refused)
        seq = txn.next_seq(m.project_id)
        if event is None:
            assert previous is not None
            version = previous["version"] + 1
            payload: dict[str, Any] = {"id": m.event_id, "projectId": m.project_id, "version": version}
            answer: dict[str, Any] = {**payload, "seq": seq}
        else:
            version = event["version"]
            payload = event
            answer = {"event": payload, "projectId": m.project_id, "seq": seq}
        if warnings:
            answer["warnings"] = warnings
        change = change_message(m, kind, seq, version, payload)
        txn.record(m, seq=seq, version=version, event=event, change=change, answer=answer, new_id=new_id)
        return Outcome("applied", m.project_id, answer=answer, seq=seq, change=change)


def error(m: Mutation, code: str, message: str, field: str | None = None) -> Outcome:
    """A refusal of ``m`` (nothing stored), with its ref."""
    return Outcome("error", m.project_id, error=protocol.ProtocolError(code, message, ref=m.envelope_id, field=field))


def change_message(m: Mutation, kind: str, seq: int, version: int, payload: dict[str, Any]) -> bytes:
    """The change as it is stored and fanned out (every store writes the same)."""
    return orjson.dumps({
        "type": protocol.CHANGE_TYPES[kind],
        "id": f"{m.project_id}:{seq}",
        "seq": seq,
        "projectId": m.project_id,
        "userId": m.user_id,
        "version": version,
        "timestamp": m.received_ms,
        # When the author made the edit (never later than it arrived): what
        # last_write_wins compares.
        "editedAt": min(m.client_ms or m.received_ms, m.received_ms),
        "payload": payload,
    })


def edited_at(change: dict[str, Any]) -> int:
    """When a stored change's author made the edit (ms): what last_write_wins compares
    (changes stored before ``editedAt`` existed have only their ``timestamp``)."""
    return change.get("editedAt") or change["timestamp"]
