"""The LMDB write transaction as the write rules use it (commit.py's ``WriteTxn``):
an ``lmdb.Transaction`` and the data file's sub-databases (``Databases``: store.py's
Store opens them; the keys are lmdb_layout.py's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol

import lmdb
import orjson

from ..wire import protocol
from .lmdb_layout import U64, db_key, index_key, seq_key, version_key

from .commit import edited_at

if TYPE_CHECKING:
    from .commit import Mutation
    from ..config import Config


class Databases(Protocol):
    """The data file's sub-databases (store.py's Store opens them)."""

    config: "Config"
    events: Any
    index: Any
    changelog: Any
    versions: Any
    seqs: Any
    idem: Any
    idem_by_seq: Any


class LmdbTxn:
    __slots__ = ("txn", "db", "keep")

    def __init__(self, txn: lmdb.Transaction, db: "Databases") -> None:
        self.txn = txn
        self.db = db  # the sub-databases: db.events, db.changelog, ...
        self.keep = db.config.history_max_changes

    def answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        raw = self.txn.get(db_key(user_id, envelope_id), db=self.db.idem)
        return orjson.loads(raw) if raw is not None else None

    def known(self, project_id: str, event_id: str) -> bool:
        return self.txn.get(index_key(event_id, project_id), db=self.db.index) is not None

    def event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        raw = self.txn.get(db_key(project_id, event_id), db=self.db.events)
        return orjson.loads(raw) if raw is not None else None

    def last_change(self, project_id: str, event_id: str) -> tuple[int, int]:
        return last_change(self.txn, self.db, project_id, event_id)

    def change_at_version(self, project_id: str, event_id: str, version: int) -> dict[str, Any] | None:
        return change_at_version(self.txn, self.db, project_id, event_id, version)

    def project_events(self, project_id: str) -> Iterator[dict[str, Any]]:
        prefix = project_id.encode() + b"\0"
        cursor = self.txn.cursor(db=self.db.events)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                yield orjson.loads(value)

    def next_seq(self, project_id: str) -> int:
        pkey = project_id.encode()
        raw = self.txn.get(pkey, db=self.db.seqs)
        seq = (U64.unpack(raw)[0] if raw else 0) + 1
        self.txn.put(pkey, U64.pack(seq), db=self.db.seqs)
        return seq

    def record(self, m: "Mutation", *, seq: int, version: int, event: dict[str, Any] | None, change: bytes,
               answer: dict[str, Any], new_id: bool) -> None:
        txn, db = self.txn, self.db
        if new_id:
            txn.put(index_key(m.event_id, m.project_id), b"", db=db.index)
        if event is None:
            txn.delete(db_key(m.project_id, m.event_id), db=db.events)
        else:
            txn.put(db_key(m.project_id, m.event_id), orjson.dumps(event), db=db.events)
        txn.put(seq_key(m.project_id, seq), change, db=db.changelog)
        if self.keep and seq > self.keep:
            forget_change(txn, db, m.project_id, seq - self.keep)
        txn.put(version_key(m.project_id, m.event_id, version), U64.pack(seq), db=db.versions)
        idem_key = db_key(m.user_id, m.envelope_id)
        txn.put(idem_key, orjson.dumps(answer), db=db.idem)
        txn.put(seq_key(m.project_id, seq), idem_key, db=db.idem_by_seq)


def last_change(txn: lmdb.Transaction, db: "Databases", project_id: str, event_id: str) -> tuple[int, int]:
    """The latest version of an event and when it was edited (ms), from history."""
    prefix = db_key(event_id, project_id) + b"\0"
    cursor = txn.cursor(db=db.versions)
    if cursor.set_range(db_key(event_id, project_id) + b"\x01"):
        found = cursor.prev()
    else:
        found = cursor.last()
    if not found or not cursor.key().startswith(prefix):
        return 0, 0
    version = U64.unpack(cursor.key()[len(prefix):])[0]
    change = txn.get(project_id.encode() + b"\0" + cursor.value(), db=db.changelog)
    return version, (edited_at(orjson.loads(change)) if change else 0)


def change_at_version(txn: lmdb.Transaction, db: "Databases", project_id: str, event_id: str,
                      version: int) -> dict[str, Any] | None:
    """The changelog entry that produced ``version`` of an event, if history has it."""
    raw = txn.get(version_key(project_id, event_id, version), db=db.versions)
    if raw is None:
        return None
    change = txn.get(project_id.encode() + b"\0" + raw, db=db.changelog)
    return orjson.loads(change) if change is not None else None


def forget_change(txn: lmdb.Transaction, db: "Databases", project_id: str, seq: int) -> bool:
    """Drop one changelog entry, the version index entry and the idempotency record
    that point at it (and the id of an event whose deletion it was)."""
    key = seq_key(project_id, seq)
    raw = txn.get(key, db=db.changelog)
    if raw is None:
        return False
    change = orjson.loads(raw)
    event_id = change["payload"]["id"]
    txn.delete(key, db=db.changelog)
    txn.delete(version_key(project_id, event_id, change["version"]), db=db.versions)
    idem_key = txn.pop(key, db=db.idem_by_seq)
    if idem_key is not None:
        txn.delete(idem_key, db=db.idem)
    if change["type"] == protocol.CHANGE_TYPES["delete"] and txn.get(db_key(project_id, event_id), db=db.events) is None:
        # Deleted longer ago than history is kept: its id is forgotten too, so
        # the index stays bounded by the retention (the id may be used again).
        txn.delete(index_key(event_id, project_id), db=db.index)
    return True
