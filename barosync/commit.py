"""What one mutation does inside the writer's transaction.

The writer (writer.py) hands a batch to ``Store.commit_batch``, in its worker thread;
each mutation is checked for a repeated envelope id (the idempotency table answers
it), validated (plugins included), checked for a conflict (the project's strategy
decides, with ``base`` read from history), and recorded: the event, the change with
the project's next seq, the version index and the idempotency record, all in the one
transaction. The key layout is lmdb_layout.py's (and store.py's docstring).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Literal

import attrs
import lmdb
import orjson

from . import protocol
from .buglog import BugLog
from .conflicts import Conflict, Resolution, changed_by_client
from .lmdb_layout import U64, db_key, index_key, seq_key, version_key
from .models import CLIENT_FIELDS, Event, ValidationError, apply_changes, event_from_wire, event_to_wire

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)
_bugs = BugLog(log)

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


class Commits:
    """The write path of Store (store.py): runs in the writer's thread, one batch at
    a time. The reads of history it needs are Store's. PgStore (pg_store.py) keeps
    the same rules on SQL tables: it reuses the conflict handling and the validation
    plugins' call, and writes its own storage steps."""

    # Errors of the storage itself (writer.py sorts them: degrade or stop).
    faults: tuple[type[BaseException], ...] = (lmdb.Error, OSError)
    # Strategy name -> the resolver of the plugin providing it (set by the app from
    # plugins.strategy_resolvers); None asks the hook as a whole.
    strategies: "dict[str, Any] | None" = None

    if TYPE_CHECKING:
        env: lmdb.Environment
        config: Config
        hook: Any
        events: Any
        index: Any
        changelog: Any
        versions: Any
        seqs: Any
        idem: Any
        idem_by_seq: Any

        def event_at_version(self, project_id: str, event_id: str, version: int,
                             txn: lmdb.Transaction) -> dict[str, Any] | None: ...

        def change_at_version(self, project_id: str, event_id: str, version: int,
                              txn: lmdb.Transaction) -> dict[str, Any] | None: ...

        def _forget_change(self, txn: lmdb.Transaction, project_id: str, seq: int) -> bool: ...

    def commit_batch(self, batch: list[Mutation]) -> list[Outcome] | None:
        """Apply every mutation in one transaction and commit it with fsync.
        Returns None when the map filled up (nothing was committed; grow and retry)."""
        failed: dict[int, Outcome] = {}
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return [failed[i] if i in failed else self._apply(txn, m, i) for i, m in enumerate(batch)]
            except lmdb.MapFullError:
                return None
            except _Poisoned as p:
                # One mutation failed halfway: the transaction is gone, so run the
                # batch again without it (the others come out the same), and refuse it.
                failed[p.index] = self._error(batch[p.index], protocol.E_INTERNAL,
                                              "internal server error; the change was not applied")

    def _apply(self, txn: lmdb.Transaction, m: Mutation, index: int) -> Outcome:
        idem_key = db_key(m.user_id, m.envelope_id)
        previous = txn.get(idem_key, db=self.idem)
        if previous is not None:
            answer = orjson.loads(previous)
            return Outcome("replayed", answer.get("projectId", m.project_id), answer=answer, seq=answer.get("seq", 0))
        # Checks (and plugins) run before a mutation's first write, so a refusal
        # leaves nothing behind. Should anything fail later, halfway through its
        # writes, the whole batch is redone without it (commit_batch).
        try:
            if m.kind == "create":
                return self._create(txn, m, idem_key)
            return self._update_or_delete(txn, m, idem_key)
        except ValidationError as e:
            return self._error(m, protocol.E_INVALID, f"`{e.field}` {e.message}", e.field)
        except lmdb.MapFullError:
            raise
        except Exception as e:
            _bugs.report(f"mutation {m.envelope_id!r} by {m.user_id!r}", e)
            raise _Poisoned(index) from e

    def _error(self, m: Mutation, code: str, message: str, field: str | None = None) -> Outcome:
        return Outcome("error", m.project_id, error=protocol.ProtocolError(code, message, ref=m.envelope_id, field=field))

    def _create(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        assert m.event is not None
        # An event is (project, id): the same id in another project is another event.
        known = txn.get(index_key(m.event.id, m.project_id), db=self.index) is not None
        if known and m.revive and txn.get(db_key(m.project_id, m.event.id), db=self.events) is None:
            version = self._last_change(txn, m.project_id, m.event.id)[0] + 1
            revived = event_to_wire(attrs.evolve(m.event, version=version))
            return self._commit_change(txn, m, idem_key, "create", revived, previous=None)
        if known:
            return self._error(m, protocol.E_EXISTS, f"an event with id {m.event.id!r} already exists in this project "
                                                     "(ids of deleted events are kept for the history retention)", "id")
        return self._commit_change(txn, m, idem_key, "create", event_to_wire(m.event), previous=None)

    def _update_or_delete(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        raw = txn.get(db_key(m.project_id, m.event_id), db=self.events)
        if raw is None:
            if m.kind == "update" and m.base_version is not None and \
                    m.base_version < self._last_change(txn, m.project_id, m.event_id)[0]:
                # Edited (from a version before the deletion) after someone deleted
                # it: the strategy decides.
                return self._conflict(txn, m, idem_key, None)
            return self._error(m, protocol.E_NOT_FOUND, f"no event {m.event_id!r} (it was deleted)", "id")
        stored = orjson.loads(raw)
        if m.base_version is not None and m.base_version != stored["version"]:
            if m.base_version > stored["version"]:
                return self._error(m, protocol.E_INVALID, f"`version` {m.base_version} is ahead of the stored version {stored['version']}", "version")
            return self._conflict(txn, m, idem_key, stored)
        if m.kind == "delete":
            return self._commit_change(txn, m, idem_key, "delete", None, previous=stored)
        updated = apply_changes(event_from_wire(stored), m.changes or {}, user_id=m.user_id, now_ms=m.received_ms)
        return self._commit_change(txn, m, idem_key, "update", event_to_wire(updated), previous=stored)

    def _conflict(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes, stored: dict[str, Any] | None) -> Outcome:
        base = self.event_at_version(m.project_id, m.event_id, m.base_version or 0, txn)
        changes = m.changes or {}
        local = {**base, **changes} if base is not None and m.kind == "update" else None
        last_version, remote_time = self._last_change(txn, m.project_id, m.event_id)
        if stored is not None:
            produced = self.change_at_version(m.project_id, m.event_id, stored["version"], txn)
            remote_time = _edited_at(produced) if produced is not None else stored["updatedAt"]
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
            outcome = self._commit_change(txn, m, idem_key, "delete", None, previous=stored)
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
            # Brought back from deletion, it is new again for everyone who dropped it.
            kind = "update" if stored is not None else "create"
            outcome = self._commit_change(txn, m, idem_key, kind, event_to_wire(merged), previous=stored)
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

    def _last_change(self, txn: lmdb.Transaction, project_id: str, event_id: str) -> tuple[int, int]:
        """The latest version of an event and when it was written (ms), from history."""
        prefix = db_key(event_id, project_id) + b"\0"
        cursor = txn.cursor(db=self.versions)
        if cursor.set_range(db_key(event_id, project_id) + b"\x01"):
            found = cursor.prev()
        else:
            found = cursor.last()
        if not found or not cursor.key().startswith(prefix):
            return 0, 0
        version = U64.unpack(cursor.key()[len(prefix):])[0]
        change = txn.get(project_id.encode() + b"\0" + cursor.value(), db=self.changelog)
        return version, (_edited_at(orjson.loads(change)) if change else 0)

    def _validate(self, txn: lmdb.Transaction, m: Mutation, kind: str, event: dict[str, Any] | None,
                  previous: dict[str, Any] | None) -> tuple[protocol.ProtocolError | None, list[dict[str, Any]]]:
        hook = self.hook.barosync_validate_mutation
        if not hook.get_hookimpls():
            return None, []

        def project_events() -> Iterator[dict[str, Any]]:
            return self._project_events(txn, m.project_id)

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

    def _project_events(self, txn: lmdb.Transaction, project_id: str) -> Iterator[dict[str, Any]]:
        """Every current event of a project, in the write transaction (for plugins)."""
        prefix = project_id.encode() + b"\0"
        cursor = txn.cursor(db=self.events)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                yield orjson.loads(value)

    def _commit_change(
        self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes, kind: str,
        event: dict[str, Any] | None, *, previous: dict[str, Any] | None,
    ) -> Outcome:
        refused, warnings = self._validate(txn, m, kind, event, previous)
        if refused is not None:
            return Outcome("error", m.project_id, error=refused)
        pkey = m.project_id.encode()
        raw = txn.get(pkey, db=self.seqs)
        seq = (U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(pkey, U64.pack(seq), db=self.seqs)
        if kind == "create" and previous is None:
            txn.put(index_key(m.event_id, m.project_id), b"", db=self.index)
        if event is None:
            assert previous is not None
            version = previous["version"] + 1
            payload = {"id": m.event_id, "projectId": m.project_id, "version": version}
            txn.delete(db_key(m.project_id, m.event_id), db=self.events)
        else:
            version = event["version"]
            payload = event
            txn.put(db_key(m.project_id, m.event_id), orjson.dumps(event), db=self.events)
        change = change_message(m, kind, seq, version, payload)
        txn.put(seq_key(m.project_id, seq), change, db=self.changelog)
        keep = self.config.history_max_changes
        if keep and seq > keep:
            self._forget_change(txn, m.project_id, seq - keep)
        txn.put(version_key(m.project_id, m.event_id, version), U64.pack(seq), db=self.versions)
        if event is None:
            answer: dict[str, Any] = {**payload, "seq": seq}
        else:
            answer = {"event": payload, "projectId": m.project_id, "seq": seq}
        if warnings:
            answer["warnings"] = warnings
        txn.put(idem_key, orjson.dumps(answer), db=self.idem)
        txn.put(seq_key(m.project_id, seq), idem_key, db=self.idem_by_seq)
        return Outcome("applied", m.project_id, answer=answer, seq=seq, change=change)


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


class _Poisoned(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _edited_at(change: dict[str, Any]) -> int:
    return change.get("editedAt", change["timestamp"])
