"""tables.py's tables in PostgreSQL, shared by a cluster's nodes: one table,
``barosync_tables (tbl, key, value)``, made with the log's (pg_schema.py).

Reads take a pooled connection for one transaction; a write transaction first takes
an advisory lock, so that the nodes' account writes (rare: people signing in, an
owner changing a role) run one at a time and a read-then-write in one (an invite used
once, the setup link's one owner) holds across nodes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator

import psycopg

from .tables import TableTxn

WRITE_LOCK = 727275  # pg_schema.py's lock is 727274


class _PgTxn:
    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def get(self, table: str, key: bytes) -> bytes | None:
        found = self._conn.execute("SELECT value FROM barosync_tables WHERE tbl = %s AND key = %s",
                                   (table, key)).fetchone()
        return bytes(found[0]) if found is not None else None

    def put(self, table: str, key: bytes, value: bytes, *, overwrite: bool = True) -> bool:
        if overwrite:
            self._conn.execute("INSERT INTO barosync_tables VALUES (%s, %s, %s) "
                               "ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value", (table, key, value))
            return True
        done = self._conn.execute("INSERT INTO barosync_tables VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                  (table, key, value))
        return done.rowcount == 1

    def items(self, table: str) -> list[tuple[bytes, bytes]]:
        rows = self._conn.execute("SELECT key, value FROM barosync_tables WHERE tbl = %s ORDER BY key",
                                  (table,)).fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]


class PgTables:
    blocking = True

    def __init__(self, connection: Callable[[], ContextManager[Any]]) -> None:
        self._connection = connection  # a pooled connection, in autocommit (pg_store.py)

    @contextlib.contextmanager
    def read(self) -> Iterator[TableTxn]:
        with self._connection() as conn, conn.transaction():
            yield _PgTxn(conn)

    @contextlib.contextmanager
    def write(self) -> Iterator[TableTxn]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _PgTxn(conn)
