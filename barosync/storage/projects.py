"""Projects a team made in the web app: their names, and which are deleted.

A project's events live in the log under its id (storage/store.py); a table beside the
accounts' (tables.py: in the LMDB environment, so backup and restore carry it; in a
cluster, PostgreSQL's) adds what people see:

- ``projects``: project id -> {name, by, created, deleted}. ``deleted`` is when an owner
  deleted it (null: it is not). A deleted project is closed to everyone, on every
  transport (core/app.py), and its events stay untouched, so an owner can restore it,
  as it was, for RESTORE_DAYS days.

A project without a record (named only in tokens, as before accounts) is open and
its id is its name. Everything here is synchronous.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Any, Iterable

import attrs
import orjson

from .accounts import AccountError
from .tables import Tables

RESTORE_DAYS = 30
MAX_DESCRIPTION_CHARS = 1000
_COLOR = re.compile(r"#[0-9A-Fa-f]{6}(?:[0-9A-Fa-f]{2})?")
MAX_PROJECT_NAME_CHARS = 100
_SLUG_CHARS = 40


class ProjectExists(AccountError):
    """The id asked for is a project's already (deleted ones keep theirs for RESTORE_DAYS)."""


@attrs.frozen
class Project:
    id: str
    name: str
    by: str | None
    created: int
    deleted: int | None  # when (epoch seconds); None: it is open
    # As a calendar app set them (CalDAV's calendar-color, calendar-description).
    color: str | None = None
    description: str | None = None

    def restorable_until(self) -> int | None:
        return self.deleted + RESTORE_DAYS * 24 * 3600 if self.deleted is not None else None


def _project(project_id: str, raw: bytes) -> Project:
    d = orjson.loads(raw)
    return Project(id=project_id, name=d["name"], by=d.get("by"), created=d["created"], deleted=d.get("deleted"),
                   color=d.get("color"), description=d.get("description"))


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_PROJECT_NAME_CHARS:
        raise AccountError(f"a project's name has 1 to {MAX_PROJECT_NAME_CHARS} characters")
    return name.strip()


def check_color(value: object) -> str | None:
    """#RRGGBB or #RRGGBBAA (as Apple's and DAVx⁵'s calendar-color), or "" to clear."""
    if value == "":
        return None
    if not isinstance(value, str) or not _COLOR.fullmatch(value):
        raise AccountError(f"a calendar's color is #RRGGBB or #RRGGBBAA, not {str(value)[:40]!r}")
    return value


def check_description(value: object) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION_CHARS:
        raise AccountError(f"a calendar's description has at most {MAX_DESCRIPTION_CHARS} characters")
    return value


def slug(name: str) -> str:
    """An id people can read in a URL: "Team Offsite 2027" -> "team-offsite-2027"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:_SLUG_CHARS].strip("-") or "project"


class Projects:
    """Project records, in ``tables``. The deleted ones are also kept in memory,
    because every authorization asks: this process's changes update it at once, and
    ``refresh`` reads another node's (core/app.py, every SIGNED_OUT_CHECK seconds)."""

    TABLES = ("projects",)

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.deleted: frozenset[str] = frozenset()
        self.refresh()

    def refresh(self) -> None:
        self.deleted = frozenset(p.id for p in self.list() if p.deleted is not None)

    def get(self, project_id: str) -> Project | None:
        with self.tables.read() as txn:
            raw = txn.get("projects", project_id.encode())
        return _project(project_id, raw) if raw is not None else None

    def list(self) -> list[Project]:
        with self.tables.read() as txn:
            return [_project(k.decode(), v) for k, v in txn.items("projects")]

    def name(self, project_id: str) -> str:
        found = self.get(project_id)
        return found.name if found is not None else project_id

    def create(self, name: str, *, by: str, taken: Iterable[str] = (), now: float | None = None,
               project_id: str | None = None) -> Project:
        """A new project named ``name``; its id is made from the name, unlike every id
        in ``taken`` (those the log and people's access already use) and every record's.
        With ``project_id`` (a calendar app names its new calendar's URL), that id or
        AccountError."""
        name = check_name(name)
        base, taken = project_id or slug(name), set(taken)
        record = {"name": name, "by": by, "created": int(now if now is not None else time.time()), "deleted": None}
        with self.tables.write() as txn:
            chosen, n = base, 1
            while chosen in taken or txn.get("projects", chosen.encode()) is not None:
                if project_id is not None:
                    raise ProjectExists(f"project {project_id!r} exists already (or was deleted in the last "
                                        f"{RESTORE_DAYS} days)")
                n += 1
                chosen = f"{base}-{n}"
            project_id = chosen
            txn.put("projects", project_id.encode(), orjson.dumps(record))
        return _project(project_id, orjson.dumps(record))

    def rename(self, project_id: str, name: str, *, now: float | None = None) -> Project:
        """A project named anew (one made before records existed gets its record)."""
        return self.update(project_id, name=name, now=now)

    def update(self, project_id: str, *, name: str | None = None, color: str | None = None,
               description: str | None = None, now: float | None = None) -> Project:
        """A project's name, color or description changed (None: left as it is; ""
        clears a color or description). One made before records existed gets its record."""
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = check_name(name)
        if color is not None:
            changes["color"] = check_color(color)
        if description is not None:
            changes["description"] = check_description(description)
        with self.tables.write() as txn:
            raw = txn.get("projects", project_id.encode())
            record = orjson.loads(raw) if raw is not None else {
                "name": project_id, "by": None, "created": int(now if now is not None else time.time()),
                "deleted": None}
            if record["deleted"] is not None:
                raise AccountError(f"project {project_id!r} is deleted: restore it first")
            record.update(changes)
            txn.put("projects", project_id.encode(), orjson.dumps(record))
        return _project(project_id, orjson.dumps(record))

    def delete(self, project_id: str, *, now: float | None = None) -> Project:
        """Closed to everyone from now on; restorable for RESTORE_DAYS days."""
        at = int(now if now is not None else time.time())
        with self.tables.write() as txn:
            raw = txn.get("projects", project_id.encode())
            record = orjson.loads(raw) if raw is not None else {"name": project_id, "by": None, "created": at}
            if record.get("deleted") is not None:
                raise AccountError(f"project {project_id!r} is deleted already")
            record["deleted"] = at
            txn.put("projects", project_id.encode(), orjson.dumps(record))
        self.deleted = self.deleted | {project_id}
        return _project(project_id, orjson.dumps(record))

    def reopen(self, project_id: str, name: str) -> Project:
        """A deleted project open again under a new name, at any age (a calendar app
        making a calendar again at the URL of one it deleted): its events are the
        caller's to clear, which ``restore`` keeps."""
        name = check_name(name)
        with self.tables.write() as txn:
            raw = txn.get("projects", project_id.encode())
            record = orjson.loads(raw) if raw else None
            if record is None or record.get("deleted") is None:
                raise AccountError(f"project {project_id!r} is not deleted")
            record.update(name=name, deleted=None, color=None, description=None)
            txn.put("projects", project_id.encode(), orjson.dumps(record))
        self.deleted = self.deleted - {project_id}
        return _project(project_id, orjson.dumps(record))

    def restore(self, project_id: str, *, now: float | None = None) -> Project:
        found = self.get(project_id)
        if found is None or found.deleted is None:
            raise AccountError(f"project {project_id!r} is not deleted")
        until = found.restorable_until()
        assert until is not None
        if (now if now is not None else time.time()) > until:
            raise AccountError(f"project {project_id!r} was deleted more than {RESTORE_DAYS} days ago: "
                               "it can no longer be restored")
        with self.tables.write() as txn:
            record = orjson.loads(txn.get("projects", project_id.encode()) or b"{}")
            record["deleted"] = None
            txn.put("projects", project_id.encode(), orjson.dumps(record))
        self.deleted = self.deleted - {project_id}
        return _project(project_id, orjson.dumps(record))
