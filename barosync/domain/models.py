"""Calendar events and identities: attrs models, cattrs (un)structuring, validation.

Validation is plain code with no IO so that the protocol layer, REST and plugins all
reject the same things with the same words. Errors name the wire field.
"""

from __future__ import annotations

import math
import unicodedata
import uuid
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from . import recurrence
from .validation import ValidationError, check_dates, parse_instant

MAX_ID_CHARS = 128
MAX_ID_BYTES = 160
MAX_TITLE_CHARS = 500
MAX_TEXT_CHARS = 10_000
MAX_ATTENDEES = 1_000
MAX_ATTENDEE_CHARS = 320
MAX_COLOR_CHARS = 32

ALL_PROJECTS = "*"
# A member's role in a project: a viewer reads, an editor also writes, an owner also
# manages the project's members. A project an identity may access without a role
# named for it is the editor's (as every token before roles existed).
VIEWER, EDITOR, OWNER = "viewer", "editor", "owner"
ROLES = (VIEWER, EDITOR, OWNER)
WRITE_ACTIONS = frozenset({"create", "update", "delete"})


@attrs.define
class Event:
    """One calendar event as stored and as sent on the wire (camelCase there)."""

    id: str
    project_id: str
    title: str
    start_date: str
    end_date: str
    description: str | None = None
    all_day: bool = False
    location: str | None = None
    attendees: list[str] = attrs.field(factory=list)
    color: str | None = None
    # The calendar-app parts (recurrence.py): a recurrence set, the zone the times
    # were given in, and what an app sent that barosync does not model.
    recurrence: dict[str, Any] | None = None
    time_zone: str | None = None
    ical: str | None = None
    # Server-owned: whatever a client sends for these is ignored.
    version: int = 0
    created_at: int = 0
    updated_at: int = 0
    created_by: str = ""
    updated_by: str = ""


@attrs.frozen
class Problem:
    """What a validation plugin found wrong with a mutation."""

    code: str
    message: str
    field: str | None = None
    refuse: bool = True


@attrs.frozen
class Identity:
    """Who is on the other end, as established by an auth plugin (never the client)."""

    user_id: str
    name: str
    projects: frozenset[str] | str  # a set of project ids, or ALL_PROJECTS
    expires_at: float | None = None
    avatar: str | None = None
    color: str | None = None
    # What the token is for: "access" (WebSocket, REST, the web app) or "feed" (the
    # read-only ICS feed of its projects, nothing else).
    scope: str = "access"
    admin: bool = False  # may use the sync inspector (/admin, /api/admin/...)
    token_id: str | None = None  # the token's jti: what `barosync token revoke` names
    # (project, role) for the projects whose role is not the editor's; sorted pairs,
    # not a dict, so an identity stays a hashable value.
    roles: tuple[tuple[str, str], ...] = ()
    # The signed-in session (storage/accounts.py) an access token was minted from:
    # the token stops working, and its connections close, when the session ends.
    session_id: str | None = None

    @property
    def expires_ms(self) -> int | None:
        """When the token expires, in milliseconds as the wire gives times (None: never)."""
        expires = self.expires_at
        return int(expires * 1000) if expires is not None and math.isfinite(expires) else None

    def may_access(self, project_id: str) -> bool:
        return self.projects == ALL_PROJECTS or project_id in self.projects

    def role(self, project_id: str) -> str | None:
        """The identity's role in a project (None: no access)."""
        if not self.may_access(project_id):
            return None
        for project, role in self.roles:
            if project == project_id:
                return role
        return EDITOR

    def may(self, action: str, project_id: str) -> bool:
        """What the built-in auth allows: any access reads (subscribe, the feed);
        writing (create, update, delete) needs an editor or an owner."""
        role = self.role(project_id)
        if role is None:
            return False
        return role != VIEWER if action in WRITE_ACTIONS else True


def parse_roles(value: Any, field: str = "roles") -> tuple[tuple[str, str], ...]:
    """A ``{project: role}`` mapping (a token's claim, an app password's entry) as an
    identity holds it; ValidationError names what is wrong."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValidationError(field, "must be an object of project ids to roles")
    pairs = []
    for project, role in value.items():
        check_id(project, field)
        if role not in ROLES:
            raise ValidationError(field, f"role of {project!r} must be one of {', '.join(ROLES)}")
        if role != EDITOR:
            pairs.append((project, role))
    return tuple(sorted(pairs))


# Latest expiry a token may name: the end of year 9999, the last instant a date
# type, JSON's integers and every client's clock can all hold.
MAX_EXPIRES_AT = 253402300799.0
# Characters that would let a name rewrite a log line or how it reads: line breaks and
# other controls, and the bidirectional overrides (Trojan Source).
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def identity_problem(identity: Identity) -> str | None:
    """Why an identity (from any auth plugin) cannot be used, or None. Its names
    reach logs and other people's screens; its expiry reaches the wire."""
    for what, value in (("user id", identity.user_id), ("name", identity.name)):
        if any(ch in _BIDI or unicodedata.category(ch) == "Cc" for ch in value):
            return f"its {what} holds a control or bidirectional-override character"
    expires = identity.expires_at
    if expires is not None and not (math.isfinite(expires) and 0 < expires <= MAX_EXPIRES_AT):
        return "its expiry is not a time before the year 10000"
    return None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


converter = cattrs.Converter()
_renames = {a.name: override(rename=_camel(a.name)) for a in attrs.fields(Event)}
converter.register_unstructure_hook(
    Event, make_dict_unstructure_fn(Event, converter, **_renames)
)
converter.register_structure_hook(Event, make_dict_structure_fn(Event, converter, **_renames))

# wire name -> attribute name, for the fields a client may set
CLIENT_FIELDS = {
    "title": "title",
    "description": "description",
    "startDate": "start_date",
    "endDate": "end_date",
    "allDay": "all_day",
    "location": "location",
    "attendees": "attendees",
    "color": "color",
    "recurrence": "recurrence",
    "timeZone": "time_zone",
    "ical": "ical",
}
REQUIRED_ON_CREATE = ("title", "startDate", "endDate")


def event_to_wire(event: Event) -> dict[str, Any]:
    return converter.unstructure(event)


def event_from_wire(data: dict[str, Any]) -> Event:
    """Load an event this server stored (trusted, already valid)."""
    return converter.structure(data, Event)


def check_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    # Ids are parts of LMDB keys (at most 511 bytes): bounded in characters and bytes.
    if len(value) > MAX_ID_CHARS or len(value.encode()) > MAX_ID_BYTES:
        raise ValidationError(field, f"must be at most {MAX_ID_CHARS} characters ({MAX_ID_BYTES} bytes in UTF-8)")
    if "\0" in value:
        raise ValidationError(field, "must not contain NUL characters")
    return value


def _optional_text(value: Any, field: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string or null")
    if len(value) > limit:
        raise ValidationError(field, f"must be at most {limit} characters")
    return value


def _check_field(wire: str, value: Any) -> Any:
    if wire == "title":
        if not isinstance(value, str) or not value.strip():
            raise ValidationError("title", "is required: a non-empty string")
        if len(value) > MAX_TITLE_CHARS:
            raise ValidationError("title", f"must be at most {MAX_TITLE_CHARS} characters")
        return value
    if wire in ("description", "location"):
        return _optional_text(value, wire, MAX_TEXT_CHARS)
    if wire == "color":
        return _optional_text(value, wire, MAX_COLOR_CHARS)
    if wire in ("startDate", "endDate"):
        parse_instant(value, wire)
        return value
    if wire == "allDay":
        if not isinstance(value, bool):
            raise ValidationError("allDay", "must be true or false")
        return value
    if wire == "attendees":
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValidationError("attendees", "must be a list of strings")
        if len(value) > MAX_ATTENDEES:
            raise ValidationError("attendees", f"must have at most {MAX_ATTENDEES} entries")
        for item in value:
            if not isinstance(item, str) or not item or len(item) > MAX_ATTENDEE_CHARS:
                raise ValidationError(
                    "attendees", f"must be a list of non-empty strings of at most {MAX_ATTENDEE_CHARS} characters"
                )
        # Order kept, duplicates dropped: attendees behave as a set.
        return list(dict.fromkeys(value))
    if wire == "recurrence":
        return recurrence.check_recurrence(value)
    if wire == "timeZone":
        return recurrence.check_time_zone(value)
    if wire == "ical":
        return recurrence.check_ical(value)
    raise AssertionError(wire)


def new_event(payload: dict[str, Any], *, user_id: str, now_ms: int) -> Event:
    """Validate a client's `event:create` payload into a version-1 event."""
    event_id = check_id(payload["id"], "id") if payload.get("id") is not None else uuid.uuid4().hex
    project_id = check_id(payload.get("projectId"), "projectId")
    for wire in REQUIRED_ON_CREATE:
        if payload.get(wire) is None:
            raise ValidationError(wire, "is required")
    fields = {
        CLIENT_FIELDS[wire]: _check_field(wire, payload[wire])
        for wire in CLIENT_FIELDS
        if wire in payload and not (payload[wire] is None and wire in ("allDay",))
    }
    check_dates(fields["start_date"], fields["end_date"])
    recurrence.check_expandable(fields.get("recurrence"), fields["start_date"])
    return Event(
        id=event_id,
        project_id=project_id,
        version=1,
        created_at=now_ms,
        updated_at=now_ms,
        created_by=user_id,
        updated_by=user_id,
        **fields,
    )


def changed_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields an `event:update` changes (wire names -> checked values)."""
    changes = {}
    for wire in CLIENT_FIELDS:
        if wire in payload:
            value = payload[wire]
            if value is None and wire in REQUIRED_ON_CREATE:
                raise ValidationError(wire, "cannot be cleared")
            changes[wire] = _check_field(wire, value) if value is not None or wire == "attendees" else None
            if wire == "allDay" and value is None:
                changes[wire] = False
    return changes


def apply_changes(event: Event, changes: dict[str, Any], *, user_id: str, now_ms: int) -> Event:
    """The stored event with a client's checked changes applied, one version later."""
    updated = attrs.evolve(
        event,
        version=event.version + 1,
        updated_at=now_ms,
        updated_by=user_id,
        **{CLIENT_FIELDS[wire]: value for wire, value in changes.items()},
    )
    check_dates(updated.start_date, updated.end_date)
    if "recurrence" in changes or "startDate" in changes:
        recurrence.check_expandable(updated.recurrence, updated.start_date)
    return updated


def check_version(value: Any, field: str = "version") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(field, "must be a non-negative integer")
    return value
