"""``barosync backup``, ``restore`` and ``check`` when the log is in PostgreSQL
(``[cluster] postgres``): PostgreSQL's own tools move the data (``pg_dump``,
``pg_restore``, from Debian's postgresql-client), and barosync adds what they cannot
know: a restored history gets a new ``dataId``, so every client — and every CalDAV
sync token — from after the dump takes a snapshot instead of trusting a position the
restore took back; ``check`` reads the log's invariants."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from ..config import Config
from .accounts import audit
from .pg_tables import PgTables

DUMP = "barosync.pgdump"
TIMEOUT = 3600


class OpsError(Exception):
    """One line for the operator (ops.py prints it)."""


def run(command: str, args: argparse.Namespace, config: Config) -> int:
    url = config.cluster_postgres or ""
    if command == "backup":
        return backup(url, Path(args.dest))
    if command == "restore":
        return restore(url, Path(args.src))
    return check(config)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise OpsError(f"{name} is missing: it comes with PostgreSQL's client tools (apt-get install postgresql-client)")
    return found


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if done.returncode != 0:
        raise OpsError(f"{what} failed: {(done.stderr or done.stdout).strip()[-500:]}")


def backup(url: str, dest: Path) -> int:
    if dest.exists() and any(dest.iterdir()):
        raise OpsError(f"{dest} is not empty: give a new or empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / DUMP
    _run([_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={out}", f"--dbname={url}"], "pg_dump")
    print(f"backed up the PostgreSQL log to {out} ({out.stat().st_size / 2**20:.1f} MiB; consistent while nodes "
          "serve). Keep each node's data directory (its secret and app passwords) too.")
    return 0


def restore(url: str, src: Path) -> int:
    dump = src / DUMP if src.is_dir() else src
    if not dump.is_file():
        raise OpsError(f"no {DUMP} in {src} (made by `barosync backup` with the cluster config)")
    import psycopg

    _run([_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction", f"--dbname={url}",
          str(dump)], "pg_restore")
    new_id = uuid.uuid4().hex
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE barosync_meta SET value = %s WHERE key = 'data_id'", (new_id,))
    print(f"restored {dump} into the cluster's database; the history's id is now {new_id}, so clients take a "
          "snapshot. Start the nodes again (they read the id at start).")
    return 0


def check(config: Config) -> int:
    import psycopg

    from .pg_store import PgStore

    url = config.cluster_postgres or ""
    PgStore(url, hook=None, config=config).close()  # the schema checked (and migrated) as a node would
    with psycopg.connect(url, autocommit=True) as conn:
        summary, problems = invariants(conn)
        with PgTables(lambda: contextlib.nullcontext(conn)).read() as txn:
            users, more = audit(txn)
        summary, problems = f"{summary}, {users} accounts", problems + more
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{summary}: {'ok' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def invariants(conn: Any) -> tuple[str, list[str]]:
    """The log's invariants, as `barosync check` reports them: each head is the
    last seq of its changelog, seqs have no gap from the oldest kept, every
    current event is indexed to its project, every answer points at a kept or
    pruned seq of its project. (A summary line, the problems found.)"""
    problems: list[str] = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        heads = conn.execute("SELECT project, seq FROM barosync_heads ORDER BY project").fetchall()
        for project, head in heads:
            low, high, count = conn.execute("SELECT min(seq), max(seq), count(*) FROM barosync_changelog "
                                            "WHERE project = %s", (project,)).fetchone()
            if count and high != head:
                problems.append(f"project {project!r}: head seq {head}, but the changelog ends at {high}")
            if count and high - low + 1 != count:
                problems.append(f"project {project!r}: {high - low + 1 - count} seqs missing between {low} and {high}")
        for project, event_id in conn.execute(
                "SELECT e.project, e.id FROM barosync_events e LEFT JOIN barosync_index i "
                "ON i.id = e.id AND i.project = e.project WHERE i.project IS NULL").fetchall():
            problems.append(f"event {event_id!r} in {project!r} is not indexed to its project")
        for user, envelope, project, seq in conn.execute(
                "SELECT d.user_id, d.envelope_id, d.project, d.seq FROM barosync_idem d "
                "LEFT JOIN barosync_heads h ON h.project = d.project WHERE h.seq IS NULL OR d.seq > h.seq").fetchall():
            problems.append(f"the answer to {user}'s {envelope!r} names seq {seq} of {project!r}, past its head")
        events = conn.execute("SELECT count(*) FROM barosync_events").fetchone()[0]
        changes = conn.execute("SELECT count(*) FROM barosync_changelog").fetchone()[0]
        answers = conn.execute("SELECT count(*) FROM barosync_idem").fetchone()[0]
    return (f"PostgreSQL log: {len(heads)} projects, {events} events, {changes} changes, {answers} idempotency "
            f"records"), problems
