"""Operations on a data directory: ``barosync backup``, ``restore`` and ``check``.

All three read the LMDB environment through a read-only handle of their own
(``readonly=True, lock=True``: it registers in the reader table like any reader), so
they are safe while a server runs on the same directory in another process. A read
transaction sees one committed state, which is what makes a backup consistent and a
check meaningful on a live store. (LMDB forbids opening one environment twice in one
process, so these are meant for a separate ``barosync`` process, not for the server's.)

The layout read here is the one documented at the top of ``store.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import lmdb
import orjson

from ..config import SECRET_FILE, Config
from .store import SCHEMA_VERSION
from . import accounts
from .feeds import Feeds
from .projects import Projects
from .tables import LmdbTables

DATA_FILE = "data.mdb"
SUB_DATABASES = ("events", "index", "changelog", "versions", "seqs", "idem", "idem_by_seq", "meta")
TABLES = accounts.Accounts.TABLES + Feeds.TABLES + Projects.TABLES  # beside the log (tables.py)
# A badly damaged store could produce a line per record; the first ones say enough.
MAX_PROBLEM_LINES = 200

_U64 = struct.Struct(">Q")


class OpsError(Exception):
    """The operation cannot be done; the message is one line for the operator."""


# -- the command-line entry ------------------------------------------------------------


def run(command: str, args: argparse.Namespace, config: Config) -> int:
    """Dispatch ``barosync backup|restore|check`` (called by cli.main)."""
    try:
        if config.cluster_postgres:
            from . import pg_ops

            try:
                return pg_ops.run(command, args, config)
            except pg_ops.OpsError as e:
                raise OpsError(str(e)) from None
        if command == "backup":
            return backup(config.data_dir, Path(args.dest))
        if command == "restore":
            return restore(Path(args.src), config.data_dir, force=args.force)
        if command == "check":
            return check(config.data_dir)
    except OpsError as e:
        print(f"barosync {command}: {e}", file=sys.stderr)
        return 1
    except lmdb.Error as e:
        print(f"barosync {command}: {config.data_dir}: LMDB error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown operation {command!r}")


# -- opening ---------------------------------------------------------------------------


@contextmanager
def open_readonly(data_dir: Path, *, lock: bool = True) -> Iterator[lmdb.Environment]:
    """The environment in ``data_dir``, read-only. ``lock=True`` (the default) takes
    part in LMDB's reader table, as it must while a server may be writing."""
    if not (data_dir / DATA_FILE).is_file():
        if not data_dir.exists():
            raise OpsError(f"{data_dir}: no such directory (check --data, --config or [storage] path)")
        raise OpsError(f"{data_dir}: no barosync data here (no {DATA_FILE}; check --data, --config or [storage] path)")
    try:
        env = lmdb.open(str(data_dir), readonly=True, lock=lock, max_dbs=len(SUB_DATABASES) + len(TABLES) + 1,
                        subdir=True)
    except lmdb.Error as e:
        raise OpsError(f"{data_dir}: cannot open the LMDB environment read-only: {e}") from None
    try:
        yield env
    finally:
        env.close()


def _begin(env: lmdb.Environment) -> lmdb.Transaction:
    """A read transaction; adopts the new map size when a running server grew it."""
    try:
        return env.begin()
    except lmdb.MapResizedError:
        env.set_mapsize(0)
        return env.begin()


# -- check -----------------------------------------------------------------------------


@attrs.define
class Report:
    projects: int = 0
    events: int = 0
    changes: int = 0
    idempotency: int = 0
    accounts: int = 0
    secret: bool = False
    problems: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.projects} projects, {self.events} events, {self.changes} changes, "
                f"{self.idempotency} idempotency records, {self.accounts} accounts")


@attrs.define
class _Change:
    event_id: str
    version: Any
    type: str
    payload: Any


def _split_seq_key(key: bytes) -> tuple[str, int] | None:
    if len(key) < 9 or key[-9] != 0:
        return None
    return key[:-9].decode(errors="replace"), _U64.unpack(key[-8:])[0]


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def inspect(env: lmdb.Environment) -> Report:
    """Verify everything the store promises about itself, in one read transaction."""
    report = Report()
    problem = report.problems.append
    dbs: dict[str, Any] = {}
    for name in SUB_DATABASES:
        try:
            dbs[name] = env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            problem(f"meta: sub-database {name!r} is missing (not a barosync data directory?)")
    if len(dbs) != len(SUB_DATABASES):
        return report

    with _begin(env) as txn:
        schema = txn.get(b"schema", db=dbs["meta"])
        if schema is None:
            problem("meta: no schema version recorded")
        elif schema == b"1":
            problem("meta: schema 1 (barosync 0.1.0): start `barosync serve` on it once to migrate it in place, "
                    "then check again")
            return report
        elif schema != str(SCHEMA_VERSION).encode():
            problem(f"meta: schema {schema.decode(errors='replace')}, this barosync reads {SCHEMA_VERSION}")

        # Seq counters.
        counters: dict[str, int] = {}
        for key, value in txn.cursor(db=dbs["seqs"]):
            project = key.decode(errors="replace")
            if len(value) != 8:
                problem(f"seqs: project {project!r}: counter is not an 8-byte number")
                continue
            counters[project] = _U64.unpack(value)[0]

        # The changelog: per project, a contiguous run of seqs ending at the counter.
        # (A missing prefix is what history retention leaves behind.)
        changes: dict[tuple[str, int], _Change] = {}
        last_change: dict[tuple[str, str], tuple[int, _Change]] = {}
        kept: dict[str, list[int]] = {}
        for key, value in txn.cursor(db=dbs["changelog"]):
            report.changes += 1
            split = _split_seq_key(key)
            if split is None:
                problem(f"changelog: malformed key {bytes(key)!r}")
                continue
            project, seq = split
            kept.setdefault(project, []).append(seq)
            change = _loads(value)
            payload = change.get("payload") if isinstance(change, dict) else None
            if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
                problem(f"changelog: project {project!r} seq {seq}: not a change message with an event id")
                continue
            if change.get("seq") != seq or change.get("projectId") != project:
                problem(f"changelog: project {project!r} seq {seq}: the message says project "
                        f"{change.get('projectId')!r} seq {change.get('seq')!r}")
            record = _Change(payload["id"], change.get("version"), str(change.get("type")), payload)
            changes[project, seq] = record
            last_change[project, record.event_id] = (seq, record)

        pruned: set[str] = set()
        for project in sorted(set(counters) | set(kept)):
            seqs = kept.get(project, [])
            counter = counters.get(project)
            if counter is None:
                problem(f"changelog: project {project!r} has changes (seq {seqs[0]}..{seqs[-1]}) but no seq counter")
                continue
            if not seqs:
                if counter:
                    pruned.add(project)  # all of its history was pruned
                continue
            if seqs[0] > 1:
                pruned.add(project)
            for before, after in zip(seqs, seqs[1:]):
                if after != before + 1:
                    missing = f"seq {before + 1}" if after == before + 2 else f"seqs {before + 1}..{after - 1}"
                    problem(f"changelog: project {project!r} is missing {missing} (a gap between {before} and {after})")
            if seqs[-1] > counter:
                problem(f"changelog: project {project!r} has seq {seqs[-1]}, beyond its seq counter {counter}")
            elif seqs[-1] < counter:
                missing = f"seq {counter}" if counter == seqs[-1] + 1 else f"seqs {seqs[-1] + 1}..{counter}"
                problem(f"changelog: project {project!r} ends at seq {seqs[-1]} but its seq counter is {counter} "
                        f"(missing {missing})")
        report.projects = len(set(counters) | set(kept))

        # Current events: each one is what the last change for it says, and indexed.
        present: set[tuple[str, str]] = set()
        for key, value in txn.cursor(db=dbs["events"]):
            report.events += 1
            project_b, sep, event_b = bytes(key).partition(b"\0")
            project, event_id = project_b.decode(errors="replace"), event_b.decode(errors="replace")
            if not sep:
                problem(f"events: malformed key {bytes(key)!r}")
                continue
            present.add((project, event_id))
            where = f"event {event_id!r} of project {project!r}"
            event = _loads(value)
            if not isinstance(event, dict):
                problem(f"events: {where} is not a JSON object")
                continue
            if event.get("id") != event_id or event.get("projectId") != project:
                problem(f"events: {where} says it is event {event.get('id')!r} of project {event.get('projectId')!r}")
            if txn.get(event_b + b"\0" + project_b, db=dbs["index"]) is None:
                problem(f"index: {where} is not in the index")
            found = last_change.get((project, event_id))
            if found is None:
                if project not in pruned:
                    problem(f"events: {where} has no change in the changelog")
                continue
            seq, last = found
            if last.type == "event:deleted":
                problem(f"events: {where} was deleted at seq {seq} but is still stored")
            elif last.payload != event:
                fields = sorted(f for f in set(event) | set(last.payload) if event.get(f) != last.payload.get(f))
                problem(f"events: {where} does not match its last change (seq {seq}): "
                        f"differs in {', '.join(fields)}")

        for (project, event_id), (seq, last) in sorted(last_change.items()):
            if last.type != "event:deleted" and (project, event_id) not in present:
                problem(f"events: event {event_id!r} of project {project!r} is missing, but its last change "
                        f"(seq {seq}, {last.type}) did not delete it")
            if (project, event_id) not in present:  # (present ones were checked above)
                if txn.get(event_id.encode() + b"\0" + project.encode(), db=dbs["index"]) is None:
                    problem(f"index: event {event_id!r} of project {project!r} (seq {seq}) is not in the index")

        for key in txn.cursor(db=dbs["index"]).iternext(keys=True, values=False):
            event_b, sep, project_b = bytes(key).partition(b"\0")
            event_id, project = event_b.decode(errors="replace"), project_b.decode(errors="replace")
            if not sep:
                problem(f"index: malformed key {bytes(key)!r} (event id, NUL, project)")
            elif project not in counters:
                problem(f"index: knows event {event_id!r} in project {project!r}, which has no seq counter")

        # Version history: each entry names the changelog entry that made that version.
        for key, value in txn.cursor(db=dbs["versions"]):
            split = _split_seq_key(key)
            event_b, sep, owner = bytes(key)[:-9].partition(b"\0") if split is not None else (b"", b"", b"")
            if split is None or not sep or len(value) != 8:
                problem(f"versions: malformed entry {bytes(key)!r} (event id, NUL, project, NUL, version)")
                continue
            version = split[1]
            project, event_id = owner.decode(errors="replace"), event_b.decode(errors="replace")
            seq = _U64.unpack(value)[0]
            where = f"versions: event {event_id!r} of project {project!r} version {version}"
            if txn.get(event_b + b"\0" + owner, db=dbs["index"]) is None:
                problem(f"{where}: the event is not in the index")
                continue
            change = changes.get((project, seq))
            if change is None:
                problem(f"{where} points at seq {seq} of project {project!r}, which is not in the changelog")
            elif change.event_id != event_id or change.version != version:
                problem(f"{where} points at seq {seq} of project {project!r}, which is a change of event "
                        f"{change.event_id!r} version {change.version!r}")

        # Idempotency records: the original answer, never ahead of its project.
        for key, value in txn.cursor(db=dbs["idem"]):
            report.idempotency += 1
            user, _, envelope = bytes(key).decode(errors="replace").partition("\0")
            where = f"idem: record {envelope!r} of user {user!r}"
            answer = _loads(value)
            if not isinstance(answer, dict):
                problem(f"{where} is not a JSON object")
                continue
            project, seq = answer.get("projectId"), answer.get("seq")
            if not isinstance(project, str) or not isinstance(seq, int) or isinstance(seq, bool):
                problem(f"{where} has no projectId and seq")
                continue
            counter = counters.get(project, 0)
            if seq > counter:
                problem(f"{where} is dangling: seq {seq} is beyond project {project!r}'s seq counter {counter}")
                continue
            change = changes.get((project, seq))
            event = answer.get("event")
            answered = event.get("id") if isinstance(event, dict) else answer.get("id")
            if change is not None and change.event_id != answered:
                problem(f"{where} answers for event {answered!r}, but seq {seq} of project {project!r} "
                        f"changed event {change.event_id!r}")

        # Which idempotency record each change was recorded under (pruning a change
        # forgets its record through this): it must name a record of that change.
        for key, value in txn.cursor(db=dbs["idem_by_seq"]):
            raw = bytes(key)
            if len(raw) < 9 or raw[-9] != 0:
                problem(f"idem_by_seq: key {raw[:80]!r} is not a project, NUL and an 8-byte seq")
                continue
            project, seq = raw[:-9].decode(errors="replace"), _U64.unpack(raw[-8:])[0]
            where = f"idem_by_seq: seq {seq} of project {project!r}"
            if seq > counters.get(project, 0):
                problem(f"{where} is beyond the project's seq counter {counters.get(project, 0)}")
                continue
            record = txn.get(bytes(value), db=dbs["idem"])
            answer = _loads(record) if record is not None else None
            if record is None:
                problem(f"{where} names an idempotency record that is not there")
            elif not isinstance(answer, dict) or (answer.get("projectId"), answer.get("seq")) != (project, seq):
                problem(f"{where} names a record that answers for another change")
    return report


def check(data_dir: Path) -> int:
    report = _check_dir(data_dir, lock=True)
    _print_problems(report.problems, sys.stdout)
    state = "ok" if report.ok else f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}"
    print(f"checked {data_dir}: {report.summary()}: {state}")
    return 0 if report.ok else 1


def _check_dir(data_dir: Path, *, lock: bool) -> Report:
    with open_readonly(data_dir, lock=lock) as env:
        report = inspect(env)
        with LmdbTables(env, TABLES, create=False).read() as txn:
            report.accounts, problems = accounts.audit(txn)
        report.problems += problems
    report.secret = (data_dir / SECRET_FILE).is_file()
    return report


def _print_problems(problems: list[str], stream: Any) -> None:
    for line in problems[:MAX_PROBLEM_LINES]:
        print(line, file=stream)
    if len(problems) > MAX_PROBLEM_LINES:
        print(f"... and {len(problems) - MAX_PROBLEM_LINES} more problems", file=stream)


# -- backup and restore ----------------------------------------------------------------


def _refuse_non_empty(path: Path, what: str, advice: str) -> None:
    if path.is_symlink() and not path.exists():
        raise OpsError(f"{path} is a dangling symlink")
    if path.exists():
        if not path.is_dir():
            raise OpsError(f"{path} exists and is not a directory")
        if any(path.iterdir()):
            raise OpsError(f"{path} is not empty: {what} {advice}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dest: Path, mode: int) -> None:
    """Copy to ``dest`` (which must not exist), with ``mode``, and fsync it."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(dest, mode)  # O_CREAT's mode is filtered by the umask


def _copy_env(env: lmdb.Environment, dest: Path) -> None:
    """LMDB's consistent copy (one read transaction; compacted: free pages dropped)."""
    for attempt in range(3):
        try:
            env.copy(str(dest), compact=True)
            return
        except lmdb.MapResizedError:
            # The running server grew the map: adopt its size and copy again.
            (dest / DATA_FILE).unlink(missing_ok=True)
            env.set_mapsize(0)
    raise OpsError("the data directory kept growing during the copy; try again")


def backup(data_dir: Path, dest: Path) -> int:
    """A consistent, compacted copy of the environment (LMDB's own copy, from one read
    transaction) plus the secret file, into a new or empty ``dest``."""
    _refuse_non_empty(dest, "a backup goes into a new or empty directory", "(it never overwrites one)")
    if dest.resolve() == data_dir.resolve():
        raise OpsError(f"{dest} is the data directory itself")
    with open_readonly(data_dir) as env:
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        written: list[Path] = []
        try:
            target = dest / DATA_FILE
            written.append(target)
            _copy_env(env, dest)
            os.chmod(target, 0o600)
            _fsync_path(target)
            secret = data_dir / SECRET_FILE
            if secret.is_file():
                _copy_file(secret, dest / SECRET_FILE, 0o600)
                written.append(dest / SECRET_FILE)
            _fsync_path(dest)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            raise
    # Check the copy (not the live store): it is what a restore would bring back.
    report = _check_dir(dest, lock=False)
    secret_note = ("with the secret file (mode 0600: keep the backup private)" if report.secret
                   else "without a secret file (the data directory has none: is [auth] secret set in the config? back that up too)")
    print(f"backed up {data_dir} to {dest}: {report.summary()}, {secret_note}")
    if not report.ok:
        _print_problems(report.problems, sys.stderr)
        print(f"barosync backup: the backup was written, but check found {len(report.problems)} problems "
              "(in the data directory it was copied from)", file=sys.stderr)
        return 1
    return 0


def restore(src: Path, data_dir: Path, *, force: bool = False) -> int:
    """Copy a backup into an empty or new data directory (the server must not be
    running on it); the secret file comes along when the backup has one."""
    if not (src / DATA_FILE).is_file():
        raise OpsError(f"{src} is not a barosync backup (no {DATA_FILE} in it)")
    _refuse_non_empty(data_dir, "restore only into an empty or new data directory",
                      "(stop the server, move the old directory aside, then restore)")
    report = _check_dir(src, lock=False)
    if not report.ok:
        _print_problems(report.problems, sys.stderr)
        if not force:
            raise OpsError(f"{src}: check found {len(report.problems)} problems in the backup; "
                           "nothing was restored (--force restores it anyway)")
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    partial = data_dir / (DATA_FILE + ".restoring")
    try:
        written.append(partial)
        _copy_file(src / DATA_FILE, partial, 0o600)
        # link() never replaces: if a server was started on this directory meanwhile
        # and created its own data.mdb, this fails instead of pulling it from under it.
        os.link(partial, data_dir / DATA_FILE)
        written.append(data_dir / DATA_FILE)
        partial.unlink()
        written.remove(partial)
        if report.secret:
            _copy_file(src / SECRET_FILE, data_dir / SECRET_FILE, 0o600)
            written.append(data_dir / SECRET_FILE)
        _fsync_path(data_dir)
    except FileExistsError as e:
        partial.unlink(missing_ok=True)
        raise OpsError(f"{e.filename} appeared while restoring: is a server running on {data_dir}? "
                       "Stop it, empty the directory and restore again") from None
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    secret_note = "and the secret file" if report.secret else "(the backup has no secret file)"
    print(f"restored {src} into {data_dir}: {report.summary()} {secret_note}")
    return 0
