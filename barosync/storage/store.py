"""Durable state in one embedded LMDB environment (the writer task is writer.py).

Sub-databases (keys are UTF-8; seqs and versions are 8-byte big-endian so that LMDB's
byte order is numeric order):

- ``events``    project \\0 event id    -> event JSON (current state; deleted events absent)
- ``index``     event id \\0 project    -> b"" (kept after delete until the deletion leaves
                                           the history: an id is not reused in its project
                                           before then; the same id in another project is
                                           another event)
- ``changelog`` project \\0 seq         -> the change message JSON exactly as fanned out
- ``versions``  event id \\0 project \\0 version -> seq of the change that produced that version
- ``seqs``      project                 -> last seq
- ``idem``      user \\0 envelope id    -> the original answer (JSON)
- ``idem_by_seq`` project \\0 seq       -> the ``idem`` key that change was recorded under
- ``meta``      ``schema``, ``data_id``
- ``users``, ``signins``, ``signin_keys``, ``invites``: people's accounts, sessions and
  invites (accounts.py)

Schema 1 (release 0.1.0) kept ``index`` as event id -> project and ``versions`` as
event id \\0 version: one id per server. Opening it migrates it in place, in one write
transaction (crash-safe: an interrupted migration leaves schema 1 to migrate again).

A change, its seq and its idempotency record are written in one transaction. The
single writer task (writer.py) commits every waiting mutation as one transaction
(group commit), with fsync, in a worker thread; the ack is sent only after that
commit returned.
Reads happen directly on the event loop and are short, except a streamed snapshot's,
which holds its read transaction across awaits: ``readers_open`` counts those, and
the map is grown only when none is open (writer.py waits for them when it must).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any, Iterator

import lmdb
import orjson

from ..wire import protocol
# Mutation, Outcome and now_ms are re-exported: the writer, hub and transports use them.
from .commit import Mutation, Outcome, Rules, error, now_ms  # noqa: F401
from .lmdb_layout import U64, db_key, index_key, seq_key
from .lmdb_txn import LmdbTxn, forget_change
from .tables import LmdbTables
from ..buglog import BugLog
from ..config import Config, ConfigError, private_dir

__all__ = ["Store", "Mutation", "Outcome", "now_ms", "SCHEMA_VERSION", "WHOLE"]

log = logging.getLogger(__name__)
_bugs = BugLog(log)

SCHEMA_VERSION = 2
# A page size that takes a whole project in one page.
WHOLE = 2**62
# Read transactions open at once (LMDB's default is 126).
MAX_READERS = 2048
# Grow the map when less than this share of it is free before a batch.
GROW_WHEN_FREE_BELOW = 0.25

class Store:
    kind = "lmdb"
    # Errors of the storage itself (writer.py sorts them: degrade or stop).
    faults: tuple[type[BaseException], ...] = (lmdb.Error, OSError)
    # reads.py: memory-mapped lookups of a few microseconds run inline, never yielding.
    reads_block = False
    read_threads = 1

    def __init__(self, path: Path, *, map_size: int, hook: Any, config: Config,
                 strategies: dict[str, Any] | None = None) -> None:
        self.config = config
        self.hook = hook
        # What a mutation does (commit.py), through this store's write transaction.
        self.rules = Rules(self.config, hook, strategies)
        # Read transactions held open across awaits (streamed snapshots), and whether
        # a resize of the map waits for them: LMDB's set_mapsize is undefined while
        # any transaction of the process is open, and it does not check.
        self.readers_open = 0
        self.resize_waiting = False
        self.path = Path(path)
        private_dir(self.path)
        if self.config.max_map_size:
            map_size = min(map_size, self.config.max_map_size)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=32,  # the log's 8, the accounts' and projects' tables, room to grow
            # Every snapshot being sent holds a read transaction (sent in pieces from
            # one consistent view): 100 subscribers joining at once need 100.
            max_readers=MAX_READERS,
            sync=True,
            metasync=True,
            mode=0o600,
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
        self.data_id = ""  # read (or made) by _open_meta
        while True:
            try:
                self._open_meta()
                break
            except lmdb.MapFullError:
                # A migration rewrites the indexes in one transaction: give it room
                # (no transaction is open here, so the map may grow).
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _open_meta(self) -> None:
        """Record or check the schema (migrating schema 1 in place) and the data id."""
        with self.env.begin(write=True) as txn:
            found = txn.get(b"schema", db=self.meta)
            if found is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.meta)
            elif int(found) == 1:
                self._migrate_from_1(txn)
            elif int(found) != SCHEMA_VERSION:
                raise ConfigError(
                    str(self.path), "[storage] path",
                    f"holds data of schema {int(found)}; this barosync reads schema {SCHEMA_VERSION} "
                    "(use the barosync version that wrote it, or restore a backup made for this one)")
            if txn.get(b"data_id", db=self.meta) is None:
                txn.put(b"data_id", uuid.uuid4().hex.encode(), db=self.meta)
            # Identifies this history: a restored backup keeps it, a new directory does not.
            self.data_id = txn.get(b"data_id", db=self.meta).decode()

    def _migrate_from_1(self, txn: lmdb.Transaction) -> None:
        """Schema 1 -> 2: an event's identity becomes (project, id). Inside the
        opening write transaction, so it commits whole or not at all."""
        homes = {bytes(k): bytes(v) for k, v in txn.cursor(db=self.index)}
        versions = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.versions)]
        txn.drop(self.index, delete=False)
        txn.drop(self.versions, delete=False)
        for event_id, project in homes.items():
            txn.put(event_id + b"\0" + project, b"", db=self.index)
        lost = 0
        for key, seq in versions:
            event_id, packed = key[:-9], key[-8:]
            project = homes.get(event_id)
            if project is None:
                lost += 1  # its id left the history already: nothing points at it
                continue
            txn.put(event_id + b"\0" + project + b"\0" + packed, seq, db=self.versions)
        txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.meta)
        log.warning("migrated the data in %s from schema 1 to %d: events are (project, id) now (%d ids, %d versions%s)",
                    self.path, SCHEMA_VERSION, len(homes), len(versions) - lost,
                    f"; {lost} version entries of forgotten ids dropped" if lost else "")

    def tables(self, names: tuple[str, ...]) -> LmdbTables:
        """The accounts' and projects' tables (tables.py): sub-databases of this
        environment, so backups carry them."""
        return LmdbTables(self.env, names)

    def close(self) -> None:
        self.env.close()

    # -- reads (event loop, direct) ---------------------------------------------------

    def current_seq(self, project_id: str, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.env.begin() as txn:
                return self.current_seq(project_id, txn)
        raw = txn.get(project_id.encode(), db=self.seqs)
        return U64.unpack(raw)[0] if raw else 0

    def heads(self, project_ids: list[str]) -> dict[str, int]:
        """Several projects' seqs (0 for one without changes) from one read transaction."""
        with self.env.begin() as txn:
            return {p: self.current_seq(p, txn) for p in project_ids}

    def projects(self) -> list[tuple[str, int]]:
        """Every project that has had a change, with its last seq."""
        with self.env.begin() as txn:
            return [(bytes(k).decode(), U64.unpack(v)[0]) for k, v in txn.cursor(db=self.seqs)]

    def projects_of(self, event_id: str) -> list[str]:
        """The projects an id is known in (live, or deleted within the history)."""
        prefix = event_id.encode() + b"\0"
        out = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.index)
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    out.append(bytes(key[len(prefix):]).decode())
        return out

    def known(self, project_id: str, event_id: str) -> bool:
        """Whether the id is known in the project (live, or deleted within the history)."""
        with self.env.begin() as txn:
            return txn.get(index_key(event_id, project_id), db=self.index) is not None

    def get_event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(db_key(project_id, event_id), db=self.events)
        return orjson.loads(raw) if raw is not None else None

    def snapshot(self, project_id: str) -> tuple[int, list[dict[str, Any]]]:
        """The project's events (decoded) and the seq they are current as of, consistently."""
        with self.snapshot_pages(project_id, max_bytes=WHOLE) as (seq, pages):
            return seq, [orjson.loads(raw) for raw in next(pages)]

    @contextlib.contextmanager
    def snapshot_pages(self, project_id: str, *, max_bytes: int) -> Iterator[tuple[int, Iterator[list[bytes]]]]:
        """A consistent snapshot: its seq, and its events' stored JSON in pages of
        about ``max_bytes`` (at least one event each). The pages come from one read
        transaction, open until the block ends, so a big snapshot can be sent in
        pieces, waiting for the socket in between."""
        txn = self.env.begin()
        self.readers_open += 1
        try:
            seq = self.current_seq(project_id, txn)
            if not self.resize_waiting:
                yield seq, self._pages(txn, project_id, max_bytes)
                return
            # A resize waits for every reader to close (LMDB remaps without checking
            # for them): this one reads its pages now and closes at once.
            pages = list(self._pages(txn, project_id, max_bytes))
            txn.abort()
            txn = None
            self.readers_open -= 1
            yield seq, iter(pages)
        finally:
            if txn is not None:
                txn.abort()
                self.readers_open -= 1

    def _pages(self, txn: lmdb.Transaction, project_id: str, max_bytes: int) -> Iterator[list[bytes]]:
        prefix = project_id.encode() + b"\0"
        cursor = txn.cursor(db=self.events)
        page: list[bytes] = []
        size = 0
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                if page and size + len(value) > max_bytes:
                    yield page
                    page, size = [], 0
                page.append(value)
                size += len(value) + 1
        yield page

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
            if not cursor.set_range(seq_key(project_id, since + 1)):
                return None
            out: list[bytes] = []
            expected = since + 1
            size = 0
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                if U64.unpack(key[len(prefix):])[0] != expected:
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
                return U64.unpack(cursor.key()[len(prefix):])[0]
        return None

    def iter_changelog(self, project_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        prefix = project_id.encode() + b"\0"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.changelog)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    yield U64.unpack(key[len(prefix):])[0], orjson.loads(value)

    # -- map growth (event loop, between batches) ------------------------------------

    def map_usage(self) -> tuple[int, int]:
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        return used, info["map_size"]

    def grow_if_needed(self, *, force: bool = False) -> bool:
        """Double the map while less than a quarter of it is free, up to
        ``[storage] max_map_size`` (0: no ceiling). Never while a read transaction is
        open (LMDB's rule for resizing): then only a forced grow waits for them to
        close (writer.py), and an ordinary one is left for a later batch. Raises
        MapFullError when the map must grow (``force``) but is at its ceiling."""
        if self.readers_open:
            if force:
                raise RuntimeError("the map cannot be resized while a snapshot's read transaction is open")
            return False
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

    # -- the write path (the writer's thread) ----------------------------------------

    def commit_batch(self, batch: list[Mutation]) -> list[Outcome] | None:
        """Apply every mutation in one transaction and commit it with fsync (the rules
        are commit.py's). Returns None when the map filled up (nothing was committed;
        grow and retry)."""
        failed: dict[int, Outcome] = {}
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    writes = LmdbTxn(txn, self)
                    return [failed[i] if i in failed else self._apply(writes, m, i) for i, m in enumerate(batch)]
            except lmdb.MapFullError:
                return None
            except _Poisoned as p:
                # One mutation failed halfway: the transaction is gone, so run the
                # batch again without it (the others come out the same), and refuse it.
                failed[p.index] = error(batch[p.index], protocol.E_INTERNAL,
                                        "internal server error; the change was not applied")

    def _apply(self, writes: LmdbTxn, m: Mutation, index: int) -> Outcome:
        try:
            return self.rules.apply(writes, m)
        except lmdb.MapFullError:
            raise
        except Exception as e:
            _bugs.report(f"mutation {m.envelope_id!r} by {m.user_id!r}", e)
            raise _Poisoned(index) from e

    def previous_answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        """The answer already given to this envelope, if it was applied."""
        with self.env.begin() as txn:
            raw = txn.get(db_key(user_id, envelope_id), db=self.idem)
        return orjson.loads(raw) if raw is not None else None

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
                    doomed.append(U64.unpack(key[len(prefix):])[0])
                for seq in doomed:
                    forget_change(txn, self, pkey.decode(), seq)
                dropped += len(doomed)
        return dropped


class _Poisoned(Exception):
    """A mutation failed halfway through its writes (a bug): its index in the batch."""

    def __init__(self, index: int) -> None:
        self.index = index
