"""The durable log in PostgreSQL, shared by several nodes (``[cluster] postgres``).

The same role as store.py's LMDB environment, and the same write path: commit.py's
rules (idempotency, validation plugins, conflicts decided by the project's strategy)
run here on SQL tables instead of LMDB keys. A node's writer commits a whole batch in
one transaction that first locks the head rows of the batch's projects (in project
order, so two nodes never deadlock), which gives every project gap-free seqs in commit
order across nodes; the answer goes out only after COMMIT returned, with
``synchronous_commit = on``. An idempotency record lives as long as the change it
answered (``history_retention``), as in LMDB: a retry on any node gets the original
answer.

The tables and their migrations: pg_schema.py.

Reads are short queries on pooled connections (psycopg-pool), called from worker
threads (reads.py: at most ``READ_THREADS`` at once), never on the event loop; the
writer's transaction runs in the writer's worker thread on a connection of its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator

import orjson
import psycopg
import psycopg_pool
from psycopg import errors as pgerrors

from ..wire import protocol
from ..buglog import BugLog
from .commit import Mutation, Outcome, Rules, edited_at, error
from ..config import Config, ConfigError
from .pg_schema import prepare
from .pg_tables import PgTables

log = logging.getLogger(__name__)
_bugs = BugLog(log)
# Changes fetched per round trip while a catch-up pages through the log.
REPLAY_BATCH = 256

CONNECT_TIMEOUT = 5  # seconds
STATEMENT_TIMEOUT_MS = 10_000
# Reads at once (threads, and pooled connections): subscribes, REST and CalDAV reads,
# the rooms' gap fills. Each is one short query; more would only queue in PostgreSQL.
READ_THREADS = 4


class PgStore:
    kind = "postgresql"
    # reads.py: each read is a network round trip, so it runs in a worker thread.
    reads_block = True
    read_threads = READ_THREADS

    def __init__(self, dsn: str, *, hook: Any, config: Config, strategies: dict[str, Any] | None = None) -> None:
        self.config = config
        self.hook = hook
        # What a mutation does (commit.py), through PgTxn on the writer's connection.
        self.rules = Rules(config, hook, strategies)
        self.dsn = dsn
        # Where the node's own files are (secret, app passwords); messages name it.
        self.path = config.data_dir
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._writes: psycopg.Connection | None = None
        self._seqs: dict[str, int] = {}  # the batch's projects' heads, counted in commit_batch
        self._lock = threading.Lock()
        try:
            conn = self._connect(autocommit=True)
        except psycopg.OperationalError as e:
            raise ConfigError(config.source, "[cluster] postgres",
                              f"cannot connect to PostgreSQL: {str(e).strip()}; start it, or check the URL") from None
        with conn:
            self.data_id = prepare(conn, config)

    def _options(self) -> str:
        return f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c synchronous_commit=on"

    def _connect(self, *, autocommit: bool) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT, options=self._options())

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        """A pooled connection for one read (checked first: a broken one is replaced).
        Waiting for a free one, or for PostgreSQL to answer, ends after
        CONNECT_TIMEOUT with an OperationalError (psycopg_pool.PoolTimeout)."""
        with self._lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.dsn, min_size=1, max_size=READ_THREADS, timeout=CONNECT_TIMEOUT, name="barosync-reads",
                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "options": self._options()},
                    # A pooled connection PostgreSQL dropped (a restart) is found at
                    # checkout and replaced, not handed to the first read after it.
                    check=psycopg_pool.ConnectionPool.check_connection, open=True)
        with self._pool.connection() as conn:
            yield conn

    def tables(self, names: tuple[str, ...]) -> PgTables:
        """The accounts' and projects' tables (pg_tables.py), shared by the nodes."""
        return PgTables(self._read)

    def _writer(self) -> psycopg.Connection:
        if self._writes is None or self._writes.closed or self._writes.broken:
            self._writes = self._connect(autocommit=False)
        return self._writes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self._writes is not None:
            self._writes.close()

    # -- storage faults (writer.py) ---------------------------------------------------

    faults: tuple[type[BaseException], ...] = (psycopg.Error, OSError)

    def degraded_reason(self, e: BaseException) -> str | None:
        """Why writes are refused for now (PostgreSQL unreachable), or None when the
        error is not one that passes."""
        if isinstance(e, (psycopg.OperationalError, pgerrors.QueryCanceled, pgerrors.AdminShutdown, OSError)):
            return f"PostgreSQL unreachable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        return None

    def grow_if_needed(self, *, force: bool = False) -> bool:
        return False

    def map_usage(self) -> tuple[int, int]:
        return 0, 0

    def probe_space(self, nbytes: int) -> None:
        """Whether PostgreSQL takes writes again (writer.py's probe)."""
        conn = self._writer()
        try:
            with conn.transaction():
                conn.execute("SELECT 1")
        except psycopg.Error:
            conn.close()
            raise

    # -- reads --------------------------------------------------------------------------

    def current_seq(self, project_id: str, txn: Any = None) -> int:
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM barosync_heads WHERE project = %s", (project_id,)).fetchone()
        return row[0] if row else 0

    def heads(self, project_ids: list[str]) -> dict[str, int]:
        """Several projects' seqs in one query (sequencer.py's check)."""
        with self._read() as conn:
            return dict(conn.execute("SELECT project, seq FROM barosync_heads WHERE project = ANY(%s)",
                                     (project_ids,)).fetchall())

    def projects(self) -> list[tuple[str, int]]:
        with self._read() as conn:
            return [(p, s) for p, s in conn.execute("SELECT project, seq FROM barosync_heads WHERE seq > 0 ORDER BY project")]

    def projects_of(self, event_id: str) -> list[str]:
        with self._read() as conn:
            return [p for (p,) in conn.execute("SELECT project FROM barosync_index WHERE id = %s ORDER BY project",
                                               (event_id,))]

    def known(self, project_id: str, event_id: str) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM barosync_index WHERE id = %s AND project = %s",
                                (event_id, project_id)).fetchone() is not None

    def get_event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT body FROM barosync_events WHERE project = %s AND id = %s",
                               (project_id, event_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    def _consistent(self, project_id: str) -> tuple[int, list[bytes]]:
        with self._read() as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = conn.execute("SELECT seq FROM barosync_heads WHERE project = %s", (project_id,)).fetchone()
                bodies = [bytes(b) for (b,) in conn.execute(
                    "SELECT body FROM barosync_events WHERE project = %s ORDER BY id", (project_id,))]
        return (row[0] if row else 0), bodies

    def snapshot(self, project_id: str) -> tuple[int, list[dict[str, Any]]]:
        seq, bodies = self._consistent(project_id)
        return seq, [orjson.loads(b) for b in bodies]

    @contextlib.contextmanager
    def snapshot_pages(self, project_id: str, *, max_bytes: int) -> Iterator[tuple[int, Iterator[list[bytes]]]]:
        # Read whole in one REPEATABLE READ transaction (a cursor held open across the
        # parts would tie up the event loop's connection), then paged.
        seq, bodies = self._consistent(project_id)

        def pages() -> Iterator[list[bytes]]:
            page: list[bytes] = []
            size = 0
            for raw in bodies:
                if page and size + len(raw) > max_bytes:
                    yield page
                    page, size = [], 0
                page.append(raw)
                size += len(raw) + 1
            yield page
        yield seq, pages()

    def changes_since(self, project_id: str, since: int) -> list[bytes] | None:
        found = self.replay(project_id, since)
        return None if found is None else found[0]

    def replay(self, project_id: str, since: int, *, max_bytes: int | None = None) -> tuple[list[bytes], bool] | None:
        with self._read() as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = conn.execute("SELECT seq FROM barosync_heads WHERE project = %s", (project_id,)).fetchone()
                last = row[0] if row else 0
                if since > last:
                    return None
                if since == last:
                    return [], True
                # A server-side cursor: a page of a long backlog reads that page (and
                # at most one batch more), not the whole rest of the backlog each time.
                with conn.cursor(name="barosync_replay") as rows:
                    rows.itersize = REPLAY_BATCH
                    rows.execute("SELECT seq, change FROM barosync_changelog WHERE project = %s AND seq > %s "
                                 "ORDER BY seq", (project_id, since))
                    out: list[bytes] = []
                    expected = since + 1
                    size = 0
                    for seq, change in rows:
                        if seq != expected:
                            return None
                        if out and max_bytes is not None and size + len(change) > max_bytes:
                            return out, False
                        size += len(change)
                        out.append(bytes(change))
                        expected += 1
        return (out, True) if expected == last + 1 else None

    def first_kept_seq(self, project_id: str) -> int | None:
        with self._read() as conn:
            row = conn.execute("SELECT min(seq) FROM barosync_changelog WHERE project = %s", (project_id,)).fetchone()
        return row[0] if row and row[0] is not None else None

    def iter_changelog(self, project_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        with self._read() as conn:
            rows = conn.execute("SELECT seq, change FROM barosync_changelog WHERE project = %s ORDER BY seq",
                                (project_id,)).fetchall()
        for seq, change in rows:
            yield seq, orjson.loads(change)

    def previous_answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT answer FROM barosync_idem WHERE user_id = %s AND envelope_id = %s",
                               (user_id, envelope_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    # -- the write path -------------------------------------------------------------------

    def commit_batch(self, batch: list[Mutation]) -> list[Outcome] | None:
        """One transaction, in pipeline mode: statements whose results are not read
        go out together with the next one that is, so a create costs about three
        round trips (its idempotency check, its id check, then its writes and
        savepoint) instead of one per statement."""
        conn = self._writer()
        try:
            with conn.pipeline() as pipeline, conn.transaction():
                cur = conn.cursor()
                projects = sorted({m.project_id for m in batch})
                cur.execute("INSERT INTO barosync_heads (project, seq) SELECT p, 0 FROM unnest(%s::text[]) AS p "
                            "ON CONFLICT DO NOTHING", (projects,))
                # The head rows, locked in project order: gap-free seqs across nodes,
                # and two nodes' batches never wait on each other in a circle. Held
                # to the commit, so the seqs are counted here and written once.
                self._seqs = dict(cur.execute("SELECT project, seq FROM barosync_heads WHERE project = ANY(%s) "
                                              "ORDER BY project FOR UPDATE", (projects,)).fetchall())
                first = dict(self._seqs)
                out = []
                for m in batch:
                    out.append(self._apply_one(conn, pipeline, cur, m))
                moved = [(p, seq) for p, seq in self._seqs.items() if seq != first[p]]
                if moved:
                    cur.execute("UPDATE barosync_heads h SET seq = n.seq FROM unnest(%s::text[], %s::bigint[]) "
                                "AS n(project, seq) WHERE h.project = n.project",
                                ([p for p, _ in moved], [seq for _, seq in moved]))
            return out
        except psycopg.OperationalError:
            conn.close()
            raise

    def _apply_one(self, conn: psycopg.Connection, pipeline: Any, cur: Any, m: Mutation) -> Outcome:
        seq_before = self._seqs[m.project_id]
        try:
            try:
                with conn.transaction():  # a savepoint: a refused mutation leaves nothing behind
                    outcome = self.rules.apply(PgTxn(cur, self), m)
                    # This mutation's errors surface here, inside its own savepoint.
                    pipeline.sync()
                    return outcome
            except BaseException:
                self._seqs[m.project_id] = seq_before  # its seq was not used
                raise
        except (pgerrors.UniqueViolation, pgerrors.NotNullViolation) as e:
            if "barosync_index" in str(e):
                return error(m, protocol.E_EXISTS, f"an event with id {m.event_id!r} already exists", "id")
            answer = PgTxn(cur, self).answer(m.user_id, m.envelope_id)
            if answer is not None:  # another node stored this envelope meanwhile
                return Outcome("replayed", answer.get("projectId", m.project_id), answer=answer,
                               seq=answer.get("seq", 0))
            _bugs.report(f"mutation {m.envelope_id!r} by {m.user_id!r}", e)
            return error(m, protocol.E_INTERNAL, "internal server error; the change was not applied")
        except psycopg.OperationalError:
            raise
        except Exception as e:
            _bugs.report(f"mutation {m.envelope_id!r} by {m.user_id!r}", e)
            return error(m, protocol.E_INTERNAL, "internal server error; the change was not applied")

    def _forget(self, cur: Any, project_id: str, seq: int) -> int:
        """Drop changes up to ``seq`` from the history (idempotency records stay), and
        the ids of events deleted in what was dropped."""
        rows = cur.execute("DELETE FROM barosync_changelog WHERE project = %s AND seq <= %s RETURNING event_id, change",
                           (project_id, seq)).fetchall()
        gone = [event_id for event_id, change in rows if orjson.loads(change)["type"] == protocol.CHANGE_TYPES["delete"]]
        if gone:
            cur.execute("DELETE FROM barosync_index i WHERE i.id = ANY(%s) AND i.project = %s AND NOT EXISTS "
                        "(SELECT 1 FROM barosync_events e WHERE e.project = i.project AND e.id = i.id)",
                        (gone, project_id))
        return len(rows)

    def prune(self, *, now_ms: int, limit: int = 100_000) -> int:
        """``history_retention``: changes older than it go, and the idempotency
        records that answered for them (as LMDB's do)."""
        cutoff = now_ms - int(self.config.history_retention * 1000)
        conn = self._writer()
        dropped = 0
        try:
            with conn.transaction():
                cur = conn.cursor()
                for project, seq in cur.execute(
                        "SELECT project, max(seq) FROM barosync_changelog WHERE ts < %s GROUP BY project",
                        (cutoff,)).fetchall():
                    cur.execute("SELECT 1 FROM barosync_heads WHERE project = %s FOR UPDATE", (project,))
                    dropped += self._forget(cur, project, seq)
                    cur.execute("DELETE FROM barosync_idem WHERE project = %s AND seq <= %s", (project, seq))
                    if dropped >= limit:
                        break
        except psycopg.OperationalError:
            conn.close()
            raise
        return dropped


class PgTxn:
    """The writer's transaction on PostgreSQL as the write rules use it (commit.py's
    ``WriteTxn``): a cursor in the batch's transaction, and the batch's projects'
    heads, locked and counted by ``PgStore.commit_batch``."""

    __slots__ = ("cur", "store")

    def __init__(self, cur: Any, store: PgStore) -> None:
        self.cur = cur
        self.store = store

    def answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        row = self.cur.execute("SELECT answer FROM barosync_idem WHERE user_id = %s AND envelope_id = %s",
                               (user_id, envelope_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    def known(self, project_id: str, event_id: str) -> bool:
        return self.cur.execute("SELECT 1 FROM barosync_index WHERE id = %s AND project = %s",
                                (event_id, project_id)).fetchone() is not None

    def event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        # Locked to the commit: another node's batch edits it after this one.
        row = self.cur.execute("SELECT body FROM barosync_events WHERE project = %s AND id = %s FOR UPDATE",
                               (project_id, event_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    def last_change(self, project_id: str, event_id: str) -> tuple[int, int]:
        row = self.cur.execute("SELECT version, change FROM barosync_changelog WHERE project = %s AND event_id = %s "
                               "ORDER BY version DESC LIMIT 1", (project_id, event_id)).fetchone()
        if row is None:
            return 0, 0
        change = orjson.loads(row[1])
        return row[0], edited_at(change)

    def change_at_version(self, project_id: str, event_id: str, version: int) -> dict[str, Any] | None:
        row = self.cur.execute("SELECT change FROM barosync_changelog WHERE project = %s AND event_id = %s "
                               "AND version = %s", (project_id, event_id, version)).fetchone()
        return orjson.loads(row[0]) if row else None

    def project_events(self, project_id: str) -> Iterator[dict[str, Any]]:
        for (body,) in self.cur.execute("SELECT body FROM barosync_events WHERE project = %s", (project_id,)).fetchall():
            yield orjson.loads(body)

    def next_seq(self, project_id: str) -> int:
        seqs = self.store._seqs
        seqs[project_id] += 1
        return seqs[project_id]

    def record(self, m: Mutation, *, seq: int, version: int, event: dict[str, Any] | None, change: bytes,
               answer: dict[str, Any], new_id: bool) -> None:
        cur = self.cur
        if new_id:
            # Known from an earlier life in this project (brought back by a conflict's
            # resolution): nothing to change. Two nodes cannot race here: a batch
            # holds its projects' head rows.
            cur.execute("INSERT INTO barosync_index (id, project) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        (m.event_id, m.project_id))
        if event is None:
            cur.execute("DELETE FROM barosync_events WHERE project = %s AND id = %s", (m.project_id, m.event_id))
        else:
            cur.execute("INSERT INTO barosync_events (project, id, body) VALUES (%s, %s, %s) "
                        "ON CONFLICT (project, id) DO UPDATE SET body = EXCLUDED.body",
                        (m.project_id, m.event_id, orjson.dumps(event)))
        cur.execute("INSERT INTO barosync_changelog (project, seq, event_id, version, ts, change) "
                    "VALUES (%s, %s, %s, %s, %s, %s)", (m.project_id, seq, m.event_id, version, m.received_ms, change))
        keep = self.store.config.history_max_changes
        if keep and seq > keep:
            self.store._forget(cur, m.project_id, seq - keep)
        # Stored meanwhile by another node (a racing retry): a UniqueViolation on
        # barosync_idem_pkey at the sync, answered with the stored answer.
        cur.execute("INSERT INTO barosync_idem (user_id, envelope_id, project, seq, answer) VALUES (%s, %s, %s, %s, %s)",
                    (m.user_id, m.envelope_id, m.project_id, seq, orjson.dumps(answer)))
