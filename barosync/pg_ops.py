"""``barosync backup``, ``restore`` and ``check`` when the log is in PostgreSQL
(``[cluster] postgres``): PostgreSQL's own tools move the data (``pg_dump``,
``pg_restore``, from Debian's postgresql-client), and barosync adds what they cannot
know: a restored history gets a new ``dataId``, so every client — and every CalDAV
sync token — from after the dump takes a snapshot instead of trusting a position the
restore took back; ``check`` reads the log's invariants (PgStore.check)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import uuid
from pathlib import Path

from .config import Config

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
    from .pg_store import PgStore

    store = PgStore(config.cluster_postgres or "", hook=None, config=config)
    try:
        summary, problems = store.check()
    finally:
        store.close()
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{summary}: {'ok' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1
