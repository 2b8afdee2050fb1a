"""The ``barosync watch`` and ``barosync import`` commands, built on barosync.client.

``watch`` prints a project's live changes, presence and the connection state.
``import`` uploads a JSON list of events through the client's persistent queue.
Every event gets a deterministic envelope id (and, if it has none, event id) derived
from its content, so a rerun after an interruption skips what was done: queued
entries are not queued twice, remembered ones are not sent again, and anything sent
but not remembered is answered from the server's idempotency table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import attrs
import orjson
import trio

if TYPE_CHECKING:  # the client needs trio-websocket; `barosync serve` must not
    from ..client import Notification, SyncClient

# Wire names of the fields an event may carry (as in barosync.client.model).
EDITABLE_FIELDS = ("title", "description", "startDate", "endDate", "allDay", "location", "attendees", "color")

TOKEN_ENV = "BAROSYNC_TOKEN"


# -- watch ------------------------------------------------------------------------------


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _describe(event: dict[str, Any]) -> str:
    title = event.get("title")
    when = f"{event.get('startDate')} → {event.get('endDate')}"
    return f"{event.get('id')} {title!r} {when}"


def format_notification(note: Notification, *, cursors: bool = False) -> str | None:
    """One line for the terminal, or None for what ``watch`` does not print."""
    from ..client import (ConflictDetected, ConnectionState, CursorMoved, PresenceChanged, RemoteChange,
                         ServerError, SnapshotApplied, StateChanged)

    t = _clock()
    if isinstance(note, StateChanged):
        line = f"[{t}] state: {note.state.value}"
        if note.state is ConnectionState.RECONNECTING and note.delay is not None:
            line += f" (attempt {note.attempt}, in {note.delay:.1f} s)"
        if note.close_code is not None or (note.reason and note.state is not ConnectionState.CONNECTING):
            line += f" — {note.reason or ''}{f' [{int(note.close_code)}]' if note.close_code is not None else ''}"
        return line
    if isinstance(note, SnapshotApplied):
        return f"[{t}] snapshot of {note.project_id} at seq {note.seq}: {note.count} events"
    if isinstance(note, RemoteChange):
        mark = {"created": "+", "updated": "~", "deleted": "-"}[note.kind]
        body = _describe(note.event) if note.event is not None else note.event_id
        return f"[{t}] {mark} {note.kind} {body} v{note.version} by {note.user_id} (seq {note.seq})"
    if isinstance(note, PresenceChanged):
        name = note.user.get("name") or note.user.get("id")
        return f"[{t}] * {name} ({note.user.get('id')}) {'joined' if note.joined else 'left'} {note.project_id}"
    if isinstance(note, CursorMoved):
        return f"[{t}] cursor {note.user_id} at ({note.x}, {note.y}) {note.element_id or ''}".rstrip() if cursors else None
    if isinstance(note, ConflictDetected):
        c = note.conflict
        return f"[{t}] ! conflict on {c.event_id} ({c.strategy}, fields {', '.join(c.fields) or '-'})"
    if isinstance(note, ServerError):
        return f"[{t}] ! server error {note.code}: {note.message}"
    return None


async def watch(url: str, token: str, project: str, *, store: str | None = None, out: TextIO = sys.stdout,
                cursors: bool = False, client_options: dict[str, Any] | None = None) -> None:
    """Print a project's changes, presence and connection state until cancelled."""
    from ..client import ClientGaveUp, ConnectionState, StateChanged, SyncClient

    async with SyncClient(url, token=token, store=store, **(client_options or {})) as client:
        with client.notifications() as notes:
            await client.subscribe(project, wait=False)
            print(f"[{_clock()}] watching {project} at {client.url}", file=out, flush=True)
            async for note in notes:
                line = format_notification(note, cursors=cursors)
                if line is not None:
                    print(line, file=out, flush=True)
                if isinstance(note, StateChanged) and note.state is ConnectionState.ERROR:
                    raise ClientGaveUp(note.reason or "gave up")


# -- import -----------------------------------------------------------------------------


@attrs.frozen
class PlannedEvent:
    envelope_id: str
    event_id: str
    project_id: str
    fields: dict[str, Any]


def plan_import(events: list[Any], project: str | None) -> list[PlannedEvent]:
    """Deterministic ids for a list of events: the same file gives the same ids on
    every run. Identical events get distinct ids by their occurrence count, so an
    event inserted elsewhere in the file does not shift the others' ids."""
    seen: Counter[bytes] = Counter()
    plan = []
    for n, raw in enumerate(events):
        if not isinstance(raw, dict):
            raise ValueError(f"item {n} is not a JSON object")
        project_id = project or raw.get("projectId")
        if not isinstance(project_id, str) or not project_id:
            raise ValueError(f"event {n} has no projectId; pass --project")
        fields = {k: raw[k] for k in EDITABLE_FIELDS if k in raw}
        canonical = orjson.dumps({"projectId": project_id, "id": raw.get("id"), **fields}, option=orjson.OPT_SORT_KEYS)
        occurrence = seen[canonical]
        seen[canonical] += 1
        digest = hashlib.sha256(canonical + b"#%d" % occurrence).hexdigest()
        event_id = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else digest[:32]
        plan.append(PlannedEvent("import-" + digest[:40], event_id, project_id, fields))
    return plan


@attrs.define
class ImportResult:
    total: int = 0
    imported: int = 0
    skipped: int = 0  # done by an earlier run
    failed: list[tuple[str, str]] = attrs.field(factory=list)  # (event id, why)

    @property
    def finished(self) -> int:
        return self.imported + self.skipped + len(self.failed)


async def import_events(client: SyncClient, plan: list[PlannedEvent],
                        on_progress: Callable[[ImportResult], None] | None = None) -> ImportResult:
    """Queue every planned event (skipping what an earlier run finished) and wait
    for the server's answers. An ``exists`` answer counts as already imported."""
    from ..client import MutationRefused

    result = ImportResult(total=len(plan))
    done = client.remembered(p.envelope_id for p in plan)
    result.skipped = len(done)
    todo = [p for p in plan if p.envelope_id not in done]
    pending = []
    for project_id in dict.fromkeys(p.project_id for p in todo):
        group = [p for p in todo if p.project_id == project_id]
        pending += client.submit_creates(
            project_id, [{**p.fields, "id": p.event_id} for p in group],
            envelope_ids=[p.envelope_id for p in group], remember=True)
    if on_progress:
        on_progress(result)
    for p in pending:
        try:
            await p.result()
            result.imported += 1
        except MutationRefused as e:
            if e.code == "exists":
                result.skipped += 1
            else:
                result.failed.append((p.event_id, str(e)))
        if on_progress:
            on_progress(result)
    return result


class ProgressBar:
    """A one-line progress bar on a stream (stderr), redrawn at most ~10 times a second."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self._last = 0.0
        self.tty = stream.isatty()

    def __call__(self, r: ImportResult, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.1 and r.finished < r.total:
            return
        self._last = now
        frac = r.finished / r.total if r.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"[{bar}] {r.finished}/{r.total} ({frac:.0%}) imported {r.imported}, "
                f"skipped {r.skipped}, failed {len(r.failed)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def load_events(path: str | os.PathLike[str], project: str | None = None) -> list[Any]:
    """A JSON list of events, or the VEVENTs of an ``.ics`` file (recurrences
    expanded, see ics.py) for ``project``."""
    if str(path).lower().endswith(".ics"):
        from ..formats import ics

        if project is None:
            raise ValueError("an .ics file needs --project P (iCalendar has no project)")
        return ics.parse(Path(path).read_bytes(), project_id=project)
    data = orjson.loads(Path(path).read_bytes())
    if isinstance(data, dict) and isinstance(data.get("events"), list):
        data = data["events"]
    if not isinstance(data, list):
        raise ValueError("the file must hold a JSON list of events")
    return data


async def run_import(url: str, token: str, path: str, project: str | None, store: str | None,
                     *, stderr: TextIO = sys.stderr, client_options: dict[str, Any] | None = None) -> ImportResult:
    from ..client import ConnectionState, StateChanged, SyncClient

    plan = plan_import(load_events(path, project), project)
    bar = ProgressBar(stderr)
    async with SyncClient(url, token=token, store=store, **(client_options or {})) as client:
        def report(note: StateChanged) -> None:
            if note.state in (ConnectionState.RECONNECTING, ConnectionState.ERROR):
                stderr.write(f"\nconnection {note.state.value}: {note.reason or note.close_code}\n")

        client.on(StateChanged, report)
        result = await import_events(client, plan, bar)
        bar(result, final=True)
        return result


# -- command line -------------------------------------------------------------------------


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server WebSocket URL, e.g. ws://127.0.0.1:8080/ws")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"access token (default: ${TOKEN_ENV}); see `barosync token create`")
    p.add_argument("--project", required=True, metavar="P", help="the project to watch")
    p.add_argument("--store", metavar="DIR", help="client state directory (default: a temporary one)")
    p.add_argument("--cursors", action="store_true", help="print cursor movements too")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a JSON list of events, or an iCalendar file (.ics, with --project)")
    p.add_argument("--url", required=True, help="server WebSocket URL, e.g. ws://127.0.0.1:8080/ws")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"access token (default: ${TOKEN_ENV})")
    p.add_argument("--project", metavar="P", help="project of the events (default: each event's projectId)")
    p.add_argument("--store", metavar="DIR", default="barosync-import",
                   help="client state directory; keep it to resume an interrupted import (default ./barosync-import)")


async def _until_signal(work: Callable[[], Any]) -> Any:
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def run() -> None:
            result.append(await work())
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return None
    return result[0] if result else None


def watch_main(args: argparse.Namespace) -> int:
    from ..client import ClientGaveUp

    if not args.token:
        print(f"barosync: watch needs --token (or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    try:
        trio.run(_until_signal, lambda: watch(args.url, args.token, args.project, store=args.store, cursors=args.cursors))
    except (Exception, BaseExceptionGroup) as raised:
        if (found := _find(raised, ClientGaveUp)) is not None:
            print(f"barosync: watch: {found}", file=sys.stderr)
            return 1
        if (found := _find(raised, ValueError)) is not None:
            print(f"barosync: watch: {found}", file=sys.stderr)
            return 2
        raise
    return 0


def import_main(args: argparse.Namespace) -> int:
    from ..client import ClientGaveUp, StoreLocked

    if not args.token:
        print(f"barosync: import needs --token (or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    try:
        plan_import(load_events(args.file, args.project), args.project)
    except (OSError, ValueError) as e:
        print(f"barosync: import: {args.file}: {e}", file=sys.stderr)
        return 2
    try:
        result = trio.run(_until_signal, lambda: run_import(args.url, args.token, args.file, args.project, args.store))
    except (Exception, BaseExceptionGroup) as raised:
        found = _find(raised, ClientGaveUp) or _find(raised, StoreLocked)
        if found is None:
            raise
        print(f"\nbarosync: import: {found}; rerun the same command to resume", file=sys.stderr)
        return 1
    if result is None:
        print("\nbarosync: import interrupted; rerun the same command (same --store) to resume", file=sys.stderr)
        return 130
    for event_id, why in result.failed[:10]:
        print(f"barosync: import: event {event_id}: {why}", file=sys.stderr)
    if len(result.failed) > 10:
        print(f"barosync: import: … and {len(result.failed) - 10} more failures", file=sys.stderr)
    return 1 if result.failed else 0


def _find(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` inside (nested) exception groups."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None
