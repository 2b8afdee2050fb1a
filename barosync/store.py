"""Durable state in one embedded LMDB environment (the writer task is writer.py).

Sub-databases (keys are UTF-8; seqs and versions are 8-byte big-endian so that LMDB's
byte order is numeric order):

- ``events``    project \\0 event id    -> event JSON (current state; deleted events absent)
- ``index``     event id                -> project id (kept after delete: ids are never reused)
- ``changelog`` project \\0 seq         -> the change message JSON exactly as fanned out
- ``versions``  event id \\0 version    -> seq of the change that produced that version
- ``seqs``      project                 -> last seq
- ``idem``      user \\0 envelope id    -> the original answer (JSON)

A change, its seq and its idempotency record are written in one transaction. The
single writer task (writer.py) commits every waiting mutation as one transaction
(group commit), with fsync, in a worker thread; the ack is sent only after that
commit returned.
Reads happen directly on the event loop: they are short and never span an await,
which is also what makes it safe to grow the map between batches.
"""

from __future__ import annotations

import logging
import struct
import uuid
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import lmdb
import orjson

from . import protocol
from .config import Config, ConfigError
from .conflicts import Conflict, Resolution, changed_by_client
from .models import CLIENT_FIELDS, Event, ValidationError, apply_changes, event_from_wire, event_to_wire

log = logging.getLogger("barosync.store")

SCHEMA_VERSION = 1
# Grow the map when less than this share of it is free before a batch.
GROW_WHEN_FREE_BELOW = 0.25

_U64 = struct.Struct(">Q")


def _k(*parts: str) -> bytes:
    return "\0".join(parts).encode()


def _seq_key(project_id: str, seq: int) -> bytes:
    return project_id.encode() + b"\0" + _U64.pack(seq)


def now_ms() -> int:
    return int(time.time() * 1000)


@attrs.define(slots=True)
class Mutation:
    """One client change on its way to the writer. ``project_id`` is known before
    submission (creates carry it, updates and deletes are looked up by event id)."""

    kind: str  # "create" | "update" | "delete"
    user_id: str
    envelope_id: str
    project_id: str
    event_id: str
    reply: Callable[["Outcome"], None]
    event: Event | None = None  # create: the validated new event
    base_version: int | None = None  # update/delete: the version the edit was based on
    changes: dict[str, Any] | None = None  # update: checked wire fields
    received_ms: int = 0
    client_ms: int | None = None  # the envelope's timestamp: when the client made the edit
    origin: Any = None  # the session it came from, which gets the ack, not the broadcast


@attrs.define(slots=True)
class Outcome:
    """What the writer decided for one mutation."""

    status: str  # "applied" | "replayed" | "conflict" | "error"
    project_id: str
    answer: dict[str, Any] | None = None  # the ack payload (applied, replayed)
    seq: int = 0
    change: bytes | None = None  # the change message JSON (applied)
    error: protocol.ProtocolError | None = None
    conflict: dict[str, Any] | None = None  # for conflict:detected to the sender


class Store:
    def __init__(self, path: Path, *, map_size: int, hook: Any = None, config: Config | None = None) -> None:
        self.config = config or Config()
        if hook is None:
            from .plugins import build_plugin_manager

            hook = build_plugin_manager(self.config).hook
        self.hook = hook
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.max_map_size:
            map_size = min(map_size, self.config.max_map_size)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=16,
            sync=True,
            metasync=True,
            # Readers are short and the writer is one thread; no TLS ties a reader
            # to the thread that created it.
            lock=True,
        )
        self.events = self.env.open_db(b"events")
        self.index = self.env.open_db(b"index")
        self.changelog = self.env.open_db(b"changelog")
        self.versions = self.env.open_db(b"versions")
        self.seqs = self.env.open_db(b"seqs")
        self.idem = self.env.open_db(b"idem")
        # project \0 seq -> the idempotency key that change was recorded under, so
        # forgetting a change forgets its idempotency record too.
        self.idem_by_seq = self.env.open_db(b"idem_by_seq")
        self.meta = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self.meta)
            if found is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.meta)
            elif int(found) != SCHEMA_VERSION:
                raise ConfigError(
                    str(self.path), "[storage] path",
                    f"holds data of schema {int(found)}; this barosync reads schema {SCHEMA_VERSION} "
                    "(use the barosync version that wrote it, or restore a backup made for this one)")
            if txn.get(b"data_id", db=self.meta) is None:
                txn.put(b"data_id", uuid.uuid4().hex.encode(), db=self.meta)
            # Identifies this history: a restored backup keeps it, a new directory does not.
            self.data_id = txn.get(b"data_id", db=self.meta).decode()

    def close(self) -> None:
        self.env.close()

    # -- reads (event loop, direct) ---------------------------------------------------

    def current_seq(self, project_id: str, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.env.begin() as txn:
                return self.current_seq(project_id, txn)
        raw = txn.get(project_id.encode(), db=self.seqs)
        return _U64.unpack(raw)[0] if raw else 0

    def project_of(self, event_id: str) -> str | None:
        with self.env.begin() as txn:
            raw = txn.get(event_id.encode(), db=self.index)
        return raw.decode() if raw is not None else None

    def get_event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(_k(project_id, event_id), db=self.events)
        return orjson.loads(raw) if raw is not None else None

    def snapshot(self, project_id: str) -> tuple[int, list[dict[str, Any]]]:
        """The project's events and the seq they are current as of, consistently."""
        prefix = project_id.encode() + b"\0"
        with self.env.begin() as txn:
            seq = self.current_seq(project_id, txn)
            events = []
            cursor = txn.cursor(db=self.events)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    events.append(orjson.loads(value))
        return seq, events

    def changes_since(self, project_id: str, since: int) -> list[bytes] | None:
        """Every change message after ``since`` in seq order, or None when the
        changelog cannot answer (``since`` is ahead of the project, or older than
        what is kept) and the client needs a snapshot instead."""
        found = self.replay(project_id, since)
        return None if found is None else found[0]

    def replay(self, project_id: str, since: int, *, max_bytes: int | None = None) -> tuple[list[bytes], bool] | None:
        """The change messages after ``since``, in seq order, up to about
        ``max_bytes`` (always at least one), and whether they reach the project's
        last seq; None when the changelog cannot answer (see changes_since)."""
        with self.env.begin() as txn:
            last = self.current_seq(project_id, txn)
            if since > last:
                return None
            if since == last:
                return [], True
            cursor = txn.cursor(db=self.changelog)
            prefix = project_id.encode() + b"\0"
            if not cursor.set_range(_seq_key(project_id, since + 1)):
                return None
            out: list[bytes] = []
            expected = since + 1
            size = 0
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                if _U64.unpack(key[len(prefix):])[0] != expected:
                    return None  # pruned history: a gap means we cannot replay
                if out and max_bytes is not None and size + len(value) > max_bytes:
                    return out, False
                size += len(value)
                out.append(bytes(value))
                expected += 1
            return (out, True) if expected == last + 1 else None

    def first_kept_seq(self, project_id: str) -> int | None:
        """The oldest seq the changelog still has for a project (None: none kept)."""
        prefix = project_id.encode() + b"\0"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.changelog)
            if cursor.set_range(prefix) and cursor.key().startswith(prefix):
                return _U64.unpack(cursor.key()[len(prefix):])[0]
        return None

    def iter_changelog(self, project_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        prefix = project_id.encode() + b"\0"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.changelog)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    yield _U64.unpack(key[len(prefix):])[0], orjson.loads(value)

    def change_at_version(self, event_id: str, version: int, txn: lmdb.Transaction) -> dict[str, Any] | None:
        """The changelog entry that produced ``version`` of an event, if history has it."""
        raw = txn.get(_k(event_id) + b"\0" + _U64.pack(version), db=self.versions)
        project = txn.get(event_id.encode(), db=self.index)
        if raw is None or project is None:
            return None
        change = txn.get(project + b"\0" + raw, db=self.changelog)
        return orjson.loads(change) if change is not None else None

    def event_at_version(self, event_id: str, version: int, txn: lmdb.Transaction) -> dict[str, Any] | None:
        """The event as it was at ``version``, from history (the base of a merge);
        None when history no longer has it or that version is its deletion."""
        change = self.change_at_version(event_id, version, txn)
        if change is None or change["type"] == protocol.CHANGE_TYPES["delete"]:
            return None
        return change["payload"]

    # -- map growth (event loop, between batches) ------------------------------------

    def map_usage(self) -> tuple[int, int]:
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        return used, info["map_size"]

    def grow_if_needed(self, *, force: bool = False) -> bool:
        """Double the map while less than a quarter of it is free, up to
        ``[storage] max_map_size`` (0: no ceiling). Only called when no transaction
        is open in this process (LMDB's rule for resizing). Raises MapFullError when
        the map must grow (``force``) but is at its ceiling."""
        used, size = self.map_usage()
        ceiling = self.config.max_map_size or float("inf")
        new = size
        while (force or (new - used) < new * GROW_WHEN_FREE_BELOW) and new < ceiling:
            new = int(min(new * 2, ceiling))
            force = False
        if force:
            raise lmdb.MapFullError(f"map at its ceiling of {size} bytes ([storage] max_map_size)")
        if new != size:
            self.env.set_mapsize(new)
            return True
        return False

    def probe_space(self, nbytes: int) -> None:
        """Write ``nbytes`` and take them back, each with a synced commit: the
        writer's test that the disk takes writes again. Raises what a commit
        would raise."""
        with self.env.begin(write=True) as txn:
            txn.put(b"space_probe", bytes(nbytes), db=self.meta)
        with self.env.begin(write=True) as txn:
            txn.delete(b"space_probe", db=self.meta)

    def previous_answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        """The answer already given to this envelope, if it was applied."""
        with self.env.begin() as txn:
            raw = txn.get(_k(user_id, envelope_id), db=self.idem)
        return orjson.loads(raw) if raw is not None else None

    # -- the write path (worker thread, one at a time) -------------------------------

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
        idem_key = _k(m.user_id, m.envelope_id)
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
            log.exception("mutation %s failed", m.envelope_id)
            raise _Poisoned(index) from e

    def _error(self, m: Mutation, code: str, message: str, field: str | None = None) -> Outcome:
        return Outcome("error", m.project_id, error=protocol.ProtocolError(code, message, ref=m.envelope_id, field=field))

    def _create(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        assert m.event is not None
        ekey = m.event.id.encode()
        if txn.get(ekey, db=self.index) is not None:
            return self._error(m, protocol.E_EXISTS, f"an event with id {m.event.id!r} already exists (ids are never reused)", "id")
        return self._commit_change(txn, m, idem_key, "create", event_to_wire(m.event), previous=None)

    def _update_or_delete(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        raw = txn.get(_k(m.project_id, m.event_id), db=self.events)
        if raw is None:
            if m.kind == "update" and m.base_version is not None and m.base_version < self._last_change(txn, m.event_id)[0]:
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
        base = self.event_at_version(m.event_id, m.base_version or 0, txn)
        changes = m.changes or {}
        local = {**base, **changes} if base is not None and m.kind == "update" else None
        last_version, remote_time = self._last_change(txn, m.event_id)
        if stored is not None:
            produced = self.change_at_version(m.event_id, stored["version"], txn)
            remote_time = _edited_at(produced) if produced is not None else stored["updatedAt"]
        tiebreak_name = self.config.merge_tiebreak

        def tiebreak(c: Conflict) -> Resolution | None:
            return self.hook.barosync_resolve_conflict(strategy=tiebreak_name, conflict=c)

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
            tiebreak=tiebreak,
        )
        strategy = self.config.strategy_for(m.project_id)
        resolution = self.hook.barosync_resolve_conflict(strategy=strategy, conflict=conflict)
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

    def _last_change(self, txn: lmdb.Transaction, event_id: str) -> tuple[int, int]:
        """The latest version of an event and when it was written (ms), from history."""
        prefix = _k(event_id) + b"\0"
        cursor = txn.cursor(db=self.versions)
        if cursor.set_range(_k(event_id) + b"\x01"):
            found = cursor.prev()
        else:
            found = cursor.last()
        if not found or not cursor.key().startswith(prefix):
            return 0, 0
        version = _U64.unpack(cursor.key()[len(prefix):])[0]
        project = txn.get(event_id.encode(), db=self.index) or b""
        change = txn.get(project + b"\0" + cursor.value(), db=self.changelog)
        return version, (_edited_at(orjson.loads(change)) if change else 0)

    def _forget_change(self, txn: lmdb.Transaction, project_id: str, seq: int) -> bool:
        """Drop one changelog entry and the version index that points at it."""
        key = _seq_key(project_id, seq)
        raw = txn.get(key, db=self.changelog)
        if raw is None:
            return False
        change = orjson.loads(raw)
        txn.delete(key, db=self.changelog)
        txn.delete(_k(change["payload"]["id"]) + b"\0" + _U64.pack(change["version"]), db=self.versions)
        idem_key = txn.pop(key, db=self.idem_by_seq)
        if idem_key is not None:
            txn.delete(idem_key, db=self.idem)
        return True

    def prune(self, *, now_ms: int, limit: int = 100_000) -> int:
        """Enforce ``history_retention``: forget changes older than it, and the
        idempotency records of what was forgotten. Runs as a write transaction in the
        writer's thread; returns how many changes were dropped (at most ``limit``)."""
        cutoff = now_ms - int(self.config.history_retention * 1000)
        dropped = 0
        with self.env.begin(write=True) as txn:
            projects = [bytes(k) for k, _ in txn.cursor(db=self.seqs)]
            for pkey in projects:
                prefix = pkey + b"\0"
                cursor = txn.cursor(db=self.changelog)
                if not cursor.set_range(prefix):
                    continue
                doomed = []
                for key, value in cursor:
                    if not key.startswith(prefix) or dropped + len(doomed) >= limit:
                        break
                    if orjson.loads(value)["timestamp"] >= cutoff:
                        break
                    doomed.append(_U64.unpack(key[len(prefix):])[0])
                for seq in doomed:
                    self._forget_change(txn, pkey.decode(), seq)
                dropped += len(doomed)
        return dropped

    def _validate(self, txn: lmdb.Transaction, m: Mutation, kind: str, event: dict[str, Any] | None,
                  previous: dict[str, Any] | None) -> tuple[protocol.ProtocolError | None, list[dict[str, Any]]]:
        hook = self.hook.barosync_validate_mutation
        if not hook.get_hookimpls():
            return None, []
        prefix = m.project_id.encode() + b"\0"

        def project_events() -> Iterator[dict[str, Any]]:
            cursor = txn.cursor(db=self.events)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    yield orjson.loads(value)

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

    def _commit_change(
        self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes, kind: str,
        event: dict[str, Any] | None, *, previous: dict[str, Any] | None,
    ) -> Outcome:
        refused, warnings = self._validate(txn, m, kind, event, previous)
        if refused is not None:
            return Outcome("error", m.project_id, error=refused)
        pkey = m.project_id.encode()
        raw = txn.get(pkey, db=self.seqs)
        seq = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(pkey, _U64.pack(seq), db=self.seqs)
        if kind == "create" and previous is None:
            txn.put(m.event_id.encode(), pkey, db=self.index)
        if event is None:
            assert previous is not None
            version = previous["version"] + 1
            payload = {"id": m.event_id, "projectId": m.project_id, "version": version}
            txn.delete(_k(m.project_id, m.event_id), db=self.events)
        else:
            version = event["version"]
            payload = event
            txn.put(_k(m.project_id, m.event_id), orjson.dumps(event), db=self.events)
        change = orjson.dumps({
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
        txn.put(_seq_key(m.project_id, seq), change, db=self.changelog)
        keep = self.config.history_max_changes
        if keep and seq > keep:
            self._forget_change(txn, m.project_id, seq - keep)
        txn.put(_k(m.event_id) + b"\0" + _U64.pack(version), _U64.pack(seq), db=self.versions)
        if event is None:
            answer: dict[str, Any] = {**payload, "seq": seq}
        else:
            answer = {"event": payload, "projectId": m.project_id, "seq": seq}
        if warnings:
            answer["warnings"] = warnings
        txn.put(idem_key, orjson.dumps(answer), db=self.idem)
        txn.put(_seq_key(m.project_id, seq), idem_key, db=self.idem_by_seq)
        return Outcome("applied", m.project_id, answer=answer, seq=seq, change=change)


class _Poisoned(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


def _edited_at(change: dict[str, Any]) -> int:
    return change.get("editedAt", change["timestamp"])
