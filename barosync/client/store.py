"""The client's persistent state in one LMDB environment.

- ``queue``: the offline queue, ``u64 key -> mutation`` in the order the application
  made them; an entry leaves only when the server answered it;
- ``envs``: envelope id -> queue key (so a mutation is never queued twice);
- ``seqs``: project -> last applied seq;
- ``events``: ``project \\0 event id -> event``: the server's state of each project as
  of that seq (the local view is this plus the pending mutations);
- ``done``: envelope ids the application asked to remember once acked (imports).

Everything that belongs together commits in one transaction. Commits do not fsync
by themselves (the environment is opened with ``sync=False``: a crashed *process*
loses nothing, LMDB stays consistent); a commit that adds mutations to the queue is
flushed with an explicit ``sync`` before the call that made them returns, so what the
user did survives a power loss too. Losing an unsynced applied change only means it
is fetched again (``since`` is persisted in the same transaction).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import attrs
import lmdb
import orjson

from .model import StoreLocked

_U64 = struct.Struct(">Q")
DEFAULT_MAP_SIZE = 64 * 1024 * 1024
LOCK_FILE = "client.lock"


@attrs.define
class QueueItem:
    """One queued mutation. ``version`` is the version an update/delete is based on
    (rewritten when an earlier queued mutation of the same event is acked)."""

    key: int
    envelope_id: str
    kind: str  # "create" | "update" | "delete"
    project_id: str
    event_id: str
    fields: dict[str, Any]
    version: int | None = None
    timestamp: int = 0
    remember: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> "QueueItem":
        return cls(**orjson.loads(data))

    def payload(self) -> dict[str, Any]:
        """The envelope payload as the server expects it."""
        if self.kind == "create":
            return {**self.fields, "id": self.event_id, "projectId": self.project_id}
        if self.kind == "update":
            return {**self.fields, "id": self.event_id, "projectId": self.project_id, "version": self.version}
        body: dict[str, Any] = {"id": self.event_id, "projectId": self.project_id}
        if self.version is not None:
            body["version"] = self.version
        return body


def _ek(project_id: str, event_id: str) -> bytes:
    return project_id.encode() + b"\0" + event_id.encode()


class Batch:
    """Writes collected for one transaction (applied by :meth:`ClientStore.commit`)."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.needs_sync = False

    def put_item(self, item: QueueItem, *, new: bool = False) -> None:
        self.ops.append(("put_item", (item,)))
        if new:
            self.needs_sync = True

    def del_item(self, item: QueueItem) -> None:
        self.ops.append(("del_item", (item,)))

    def set_seq(self, project_id: str, seq: int) -> None:
        self.ops.append(("set_seq", (project_id, seq)))

    def put_event(self, project_id: str, event: dict[str, Any]) -> None:
        self.ops.append(("put_event", (project_id, event)))

    def del_event(self, project_id: str, event_id: str) -> None:
        self.ops.append(("del_event", (project_id, event_id)))

    def clear_project(self, project_id: str) -> None:
        self.ops.append(("clear_project", (project_id,)))

    def mark_done(self, envelope_id: str, seq: int | None) -> None:
        self.ops.append(("mark_done", (envelope_id, seq)))


class ClientStore:
    """One client's LMDB environment. ``path=None`` makes a temporary one that is
    removed on close. Only one ClientStore may have a path open at a time (a lock
    file guards it across processes)."""

    def __init__(self, path: str | os.PathLike[str] | None, *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self._temporary = path is None
        self.path = Path(tempfile.mkdtemp(prefix="barosync-client-")) if path is None else Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"the client store {str(self.path)!r} is in use by another client") from None
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, sync=False, metasync=False)
        self._queue = self.env.open_db(b"queue")
        self._envs = self.env.open_db(b"envs")
        self._seqs = self.env.open_db(b"seqs")
        self._events = self.env.open_db(b"events")
        self._done = self.env.open_db(b"done")
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.env.sync(True)
        finally:
            self.env.close()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            if self._temporary:
                shutil.rmtree(self.path, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------

    def load_queue(self) -> list[QueueItem]:
        with self.env.begin() as txn:
            return [QueueItem.from_json(v) for _, v in txn.cursor(db=self._queue)]

    def next_key(self) -> int:
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._queue)
            return _U64.unpack(cursor.key())[0] + 1 if cursor.last() else 1

    def load_projects(self) -> dict[str, tuple[int, dict[str, dict[str, Any]]]]:
        """project -> (last applied seq, events by id)."""
        out: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=self._seqs):
                out[key.decode()] = (_U64.unpack(value)[0], {})
            for key, value in txn.cursor(db=self._events):
                project = key.split(b"\0", 1)[0].decode()
                event = orjson.loads(value)
                out.setdefault(project, (0, {}))[1][event["id"]] = event
        return out

    def is_done(self, envelope_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(envelope_id.encode(), db=self._done) is not None

    def done_ids(self, envelope_ids: list[str]) -> set[str]:
        with self.env.begin() as txn:
            return {e for e in envelope_ids if txn.get(e.encode(), db=self._done) is not None}

    # -- writing ---------------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        if not batch.ops:
            return
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for name, args in batch.ops:
                        getattr(self, "_" + name)(txn, *args)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        if batch.needs_sync:
            self.env.sync(True)

    def _put_item(self, txn: lmdb.Transaction, item: QueueItem) -> None:
        txn.put(_U64.pack(item.key), item.to_json(), db=self._queue)
        txn.put(item.envelope_id.encode(), _U64.pack(item.key), db=self._envs)

    def _del_item(self, txn: lmdb.Transaction, item: QueueItem) -> None:
        txn.delete(_U64.pack(item.key), db=self._queue)
        txn.delete(item.envelope_id.encode(), db=self._envs)

    def _set_seq(self, txn: lmdb.Transaction, project_id: str, seq: int) -> None:
        txn.put(project_id.encode(), _U64.pack(seq), db=self._seqs)

    def _put_event(self, txn: lmdb.Transaction, project_id: str, event: dict[str, Any]) -> None:
        txn.put(_ek(project_id, event["id"]), orjson.dumps(event), db=self._events)

    def _del_event(self, txn: lmdb.Transaction, project_id: str, event_id: str) -> None:
        txn.delete(_ek(project_id, event_id), db=self._events)

    def _clear_project(self, txn: lmdb.Transaction, project_id: str) -> None:
        prefix = project_id.encode() + b"\0"
        cursor = txn.cursor(db=self._events)
        if cursor.set_range(prefix):
            while cursor.key().startswith(prefix):
                if not cursor.delete():
                    break

    def _mark_done(self, txn: lmdb.Transaction, envelope_id: str, seq: int | None) -> None:
        txn.put(envelope_id.encode(), orjson.dumps({"seq": seq}), db=self._done)
