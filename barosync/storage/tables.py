"""Small named tables of bytes -> bytes, in a transaction: what accounts.py and
projects.py keep, written once against this interface and stored by either backend.

- ``LmdbTables``: sub-databases of the data directory's LMDB environment (one per
  table name), so ``barosync backup`` and ``restore`` carry them with the calendars;
- ``PgTables`` (pg_tables.py): one PostgreSQL table shared by a cluster's nodes.

A write transaction sees its own writes and commits all or nothing. Writes are rare
(people signing in, an owner changing a role); reads are point lookups and scans of
small tables.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Protocol

import lmdb


class TableTxn(Protocol):
    def get(self, table: str, key: bytes) -> bytes | None:
        """The value under ``key``, or None."""

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True) -> bool:
        """Store ``value``; with ``overwrite=False`` only when the key is new (whether it was)."""

    def items(self, table: str) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of the table, in key order."""


class Tables(Protocol):
    #: Whether a call waits on the network (PostgreSQL): callers on the event loop then
    #: run it in a worker thread.
    blocking: bool

    def read(self) -> ContextManager[TableTxn]: ...

    def write(self) -> ContextManager[TableTxn]: ...


class _LmdbTxn:
    __slots__ = ("_txn", "_db")

    def __init__(self, txn: lmdb.Transaction, db: "LmdbTables") -> None:
        self._txn = txn
        self._db = db

    def get(self, table: str, key: bytes) -> bytes | None:
        handle = self._db.handle(table)
        found = self._txn.get(key, db=handle) if handle is not None else None
        return bytes(found) if found is not None else None

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True) -> bool:
        return bool(self._txn.put(key, value, db=self._db.handle(table), overwrite=overwrite))

    def items(self, table: str) -> list[tuple[bytes, bytes]]:
        handle = self._db.handle(table)
        return [(bytes(k), bytes(v)) for k, v in self._txn.cursor(db=handle)] if handle is not None else []


class LmdbTables:
    """Tables as sub-databases of an LMDB environment, opened up front (opening one
    inside another transaction of the same thread would need a write of its own)."""

    blocking = False

    def __init__(self, env: lmdb.Environment, names: tuple[str, ...], *, create: bool = True) -> None:
        """``create=False`` (a read-only environment: `barosync check`): a table not
        made yet reads as empty."""
        self.env = env
        self._handles: dict[str, lmdb._Database] = {}
        for name in names:
            try:
                self._handles[name] = env.open_db(name.encode(), create=create)
            except lmdb.NotFoundError:
                pass

    def handle(self, table: str) -> "lmdb._Database | None":
        return self._handles.get(table)

    @contextlib.contextmanager
    def read(self) -> Iterator[TableTxn]:
        with self.env.begin() as txn:
            yield _LmdbTxn(txn, self)

    @contextlib.contextmanager
    def write(self) -> Iterator[TableTxn]:
        with self.env.begin(write=True) as txn:
            yield _LmdbTxn(txn, self)
