"""Durable state in one embedded LMDB environment, and the single writer.

Sub-databases (keys are UTF-8; seqs and versions are 8-byte big-endian so that LMDB's
byte order is numeric order):

- ``events``    project \\0 event id    -> event JSON (current state; deleted events absent)
- ``index``     event id                -> project id (kept after delete: ids are never reused)
- ``changelog`` project \\0 seq         -> the change message JSON exactly as fanned out
- ``versions``  event id \\0 version    -> seq of the change that produced that version
- ``seqs``      project                 -> last seq
- ``idem``      user \\0 envelope id    -> the original answer (JSON)

A change, its seq and its idempotency record are written in one transaction. The
single writer task commits every waiting mutation as one transaction (group commit),
with fsync, in a worker thread; the ack is sent only after that commit returned.
Reads happen directly on the event loop: they are short and never span an await,
which is also what makes it safe to grow the map between batches.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import lmdb
import orjson
import trio

from . import protocol
from .models import Event, ValidationError, apply_changes, event_from_wire, event_to_wire

SCHEMA_VERSION = 1
# Most mutations one group commit takes; bounds the latency of the batch behind it.
MAX_BATCH = 2048
# Grow the map when less than this share of it is free before a batch.
GROW_WHEN_FREE_BELOW = 0.25
# Mutations that may wait for the writer before submitters are made to wait.
QUEUE_DEPTH = 8192

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
    conflict: dict[str, Any] | None = None


class Store:
    def __init__(self, path: Path, *, map_size: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=8,
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
        self.meta = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self.meta)
            if found is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.meta)
            elif int(found) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"data directory {self.path} has schema {int(found)}, this barosync reads {SCHEMA_VERSION}"
                )

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
        """The change messages after ``since`` in seq order, or None when the
        changelog cannot answer (``since`` is ahead of the project, or older than
        what is kept) and the client needs a snapshot instead."""
        with self.env.begin() as txn:
            last = self.current_seq(project_id, txn)
            if since > last:
                return None
            if since == last:
                return []
            cursor = txn.cursor(db=self.changelog)
            prefix = project_id.encode() + b"\0"
            if not cursor.set_range(_seq_key(project_id, since + 1)):
                return None
            out = []
            expected = since + 1
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                if _U64.unpack(key[len(prefix):])[0] != expected:
                    return None  # pruned history: a gap means we cannot replay
                out.append(bytes(value))
                expected += 1
            return out if expected == last + 1 else None

    def iter_changelog(self, project_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        prefix = project_id.encode() + b"\0"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.changelog)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    yield _U64.unpack(key[len(prefix):])[0], orjson.loads(value)

    def event_at_version(self, event_id: str, version: int, txn: lmdb.Transaction) -> dict[str, Any] | None:
        """The event as it was at ``version``, from history (the base of a merge)."""
        raw = txn.get(_k(event_id) + b"\0" + _U64.pack(version), db=self.versions)
        project = txn.get(event_id.encode(), db=self.index)
        if raw is None or project is None:
            return None
        change = txn.get(project + b"\0" + raw, db=self.changelog)
        return orjson.loads(change)["payload"] if change is not None else None

    # -- map growth (event loop, between batches) ------------------------------------

    def map_usage(self) -> tuple[int, int]:
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        return used, info["map_size"]

    def grow_if_needed(self, *, force: bool = False) -> bool:
        """Double the map while less than a quarter of it is free. Only called when
        no transaction is open in this process (LMDB's rule for resizing)."""
        used, size = self.map_usage()
        new = size
        while force or (new - used) < new * GROW_WHEN_FREE_BELOW:
            new *= 2
            force = False
        if new != size:
            self.env.set_mapsize(new)
            return True
        return False

    # -- the write path (worker thread, one at a time) -------------------------------

    def commit_batch(self, batch: list[Mutation]) -> list[Outcome] | None:
        """Apply every mutation in one transaction and commit it with fsync.
        Returns None when the map filled up (nothing was committed; grow and retry)."""
        try:
            with self.env.begin(write=True) as txn:
                return [self._apply(txn, m) for m in batch]
        except lmdb.MapFullError:
            return None

    def _apply(self, txn: lmdb.Transaction, m: Mutation) -> Outcome:
        idem_key = _k(m.user_id, m.envelope_id)
        previous = txn.get(idem_key, db=self.idem)
        if previous is not None:
            answer = orjson.loads(previous)
            return Outcome("replayed", answer.get("projectId", m.project_id), answer=answer, seq=answer.get("seq", 0))
        try:
            if m.kind == "create":
                return self._create(txn, m, idem_key)
            return self._update_or_delete(txn, m, idem_key)
        except ValidationError as e:
            return Outcome("error", m.project_id, error=protocol.ProtocolError(
                protocol.E_INVALID, f"`{e.field}` {e.message}", ref=m.envelope_id, field=e.field))

    def _create(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        assert m.event is not None
        ekey = m.event.id.encode()
        if txn.get(ekey, db=self.index) is not None:
            return Outcome("error", m.project_id, error=protocol.ProtocolError(
                protocol.E_EXISTS, f"an event with id {m.event.id!r} already exists (ids are never reused)",
                ref=m.envelope_id, field="id"))
        txn.put(ekey, m.project_id.encode(), db=self.index)
        return self._commit_change(txn, m, idem_key, "create", event_to_wire(m.event))

    def _update_or_delete(self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes) -> Outcome:
        raw = txn.get(_k(m.project_id, m.event_id), db=self.events)
        if raw is None:
            return Outcome("error", m.project_id, error=protocol.ProtocolError(
                protocol.E_NOT_FOUND, f"no event {m.event_id!r} (it may have been deleted)",
                ref=m.envelope_id, field="id"))
        stored = orjson.loads(raw)
        if m.base_version is not None and m.base_version != stored["version"]:
            return self._conflict(txn, m, stored)
        if m.kind == "delete":
            gone = {"id": m.event_id, "projectId": m.project_id, "version": stored["version"] + 1}
            txn.delete(_k(m.project_id, m.event_id), db=self.events)
            return self._commit_change(txn, m, idem_key, "delete", gone)
        updated = apply_changes(event_from_wire(stored), m.changes or {}, user_id=m.user_id, now_ms=m.received_ms)
        return self._commit_change(txn, m, idem_key, "update", event_to_wire(updated))

    def _conflict(self, txn: lmdb.Transaction, m: Mutation, stored: dict[str, Any]) -> Outcome:
        # Until the pluggable strategies land, every conflict is resolved "manually":
        # nothing is stored and the sender is told everything it needs to retry.
        base = self.event_at_version(m.event_id, m.base_version or 0, txn)
        local = dict(base or stored)
        local.update(m.changes or {})
        fields = sorted((m.changes or {}).keys())
        info = {
            "ref": m.envelope_id,
            "id": m.event_id,
            "projectId": m.project_id,
            "localVersion": local if m.kind == "update" else None,
            "remoteVersion": stored,
            "base": base,
            "strategy": "manual",
            "fields": fields,
            "operation": m.kind,
        }
        return Outcome("conflict", m.project_id, conflict=info)

    def _commit_change(
        self, txn: lmdb.Transaction, m: Mutation, idem_key: bytes, kind: str, payload: dict[str, Any]
    ) -> Outcome:
        pkey = m.project_id.encode()
        raw = txn.get(pkey, db=self.seqs)
        seq = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(pkey, _U64.pack(seq), db=self.seqs)
        version = payload["version"]
        if kind != "delete":
            txn.put(_k(m.project_id, m.event_id), orjson.dumps(payload), db=self.events)
        change = orjson.dumps({
            "type": protocol.CHANGE_TYPES[kind],
            "id": f"{m.project_id}:{seq}",
            "seq": seq,
            "projectId": m.project_id,
            "userId": m.user_id,
            "version": version,
            "timestamp": m.received_ms,
            "payload": payload,
        })
        txn.put(_seq_key(m.project_id, seq), change, db=self.changelog)
        txn.put(_k(m.event_id) + b"\0" + _U64.pack(version), _U64.pack(seq), db=self.versions)
        if kind == "delete":
            answer = {"id": m.event_id, "projectId": m.project_id, "version": version, "seq": seq}
        else:
            answer = {"event": payload, "projectId": m.project_id, "seq": seq}
        txn.put(idem_key, orjson.dumps(answer), db=self.idem)
        return Outcome("applied", m.project_id, answer=answer, seq=seq, change=change)


class Writer:
    """The one task that writes: takes whatever mutations are waiting, commits them
    as one transaction off the event loop, then hands each outcome on in order."""

    def __init__(self, store: Store, on_outcome: Callable[[Mutation, Outcome], None]) -> None:
        self.store = store
        self._on_outcome = on_outcome
        self._send, self._receive = trio.open_memory_channel[Mutation](QUEUE_DEPTH)
        # Projects with a commit in flight: their LMDB state may be ahead of what was
        # fanned out, so a subscriber must wait for the batch before reading.
        self.busy_projects: set[str] = set()
        self._batch_done = trio.Event()
        self.closed = trio.Event()
        self.batches = 0
        self.committed = 0

    async def submit(self, m: Mutation) -> None:
        try:
            self._send.send_nowait(m)
        except trio.WouldBlock:
            await self._send.send(m)

    async def wait_idle(self, project_id: str) -> None:
        while project_id in self.busy_projects:
            await self._batch_done.wait()

    def close(self) -> None:
        """No more mutations; run() returns once the queue is drained."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._run()
        finally:
            self.closed.set()

    async def _run(self) -> None:
        async with self._receive:
            while True:
                try:
                    batch = [await self._receive.receive()]
                except trio.EndOfChannel:
                    return
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)

    async def _commit(self, batch: list[Mutation]) -> None:
        self.busy_projects = {m.project_id for m in batch}
        try:
            self.store.grow_if_needed()
            while True:
                # Not abandoned on cancel: a commit that started finishes, so an ack is
                # never lost for a change that became durable.
                outcomes = await trio.to_thread.run_sync(self.store.commit_batch, batch)
                if outcomes is not None:
                    break
                self.store.grow_if_needed(force=True)
            self.batches += 1
            self.committed += len(batch)
            for m, outcome in zip(batch, outcomes):
                self._on_outcome(m, outcome)
        finally:
            self.busy_projects = set()
            self._batch_done.set()
            self._batch_done = trio.Event()
