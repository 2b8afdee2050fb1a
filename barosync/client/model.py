"""Public value types of the Python client: connection states, policies, the
notifications it publishes, the conflict it surfaces, and its errors.

Nothing here does IO.
"""

from __future__ import annotations

import enum
import math
import random
from typing import Any, Callable, Literal

import attrs

# Fields of an event a client may set (wire names), with the value a missing one has.
CLIENT_FIELD_DEFAULTS: dict[str, Any] = {
    "title": None,
    "description": None,
    "startDate": None,
    "endDate": None,
    "allDay": False,
    "location": None,
    "attendees": [],
    "color": None,
}
EDITABLE_FIELDS: tuple[str, ...] = tuple(CLIENT_FIELD_DEFAULTS)

MutationKind = Literal["create", "update", "delete"]


class ConnectionState(str, enum.Enum):
    """Where the client's connection is. Observable as ``client.state`` and as
    :class:`StateChanged` notifications."""

    CONNECTING = "connecting"  # first attempt (or after reconnect_now) in progress
    CONNECTED = "connected"  # handshake done, hello received, subscriptions sent
    DISCONNECTED = "disconnected"  # the connection ended (or the client is closed)
    RECONNECTING = "reconnecting"  # waiting out a backoff delay, then trying again
    ERROR = "error"  # gave up: no fresh token, or max_attempts reached


# -- policies -------------------------------------------------------------------------


@attrs.frozen
class ReconnectPolicy:
    """Exponential backoff with full jitter: before attempt ``n`` (0-based) the client
    sleeps a uniformly random time in ``[0, min(max_delay, initial * factor**n)]``.
    ``max_attempts=None`` retries forever. The attempt count starts over once a
    connection got as far as the server's ``hello``."""

    initial: float = 1.0
    factor: float = 1.5
    max_delay: float = 30.0
    max_attempts: int | None = None

    def __attrs_post_init__(self) -> None:
        if not (self.initial >= 0 and self.factor >= 1 and self.max_delay >= 0):
            raise ValueError("ReconnectPolicy needs initial >= 0, factor >= 1, max_delay >= 0")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError("max_attempts must be None or >= 0")


def backoff_ceiling(attempt: int, policy: ReconnectPolicy = ReconnectPolicy()) -> float:
    """The upper bound of the delay before attempt ``attempt`` (0-based)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    try:
        grown = policy.initial * policy.factor**attempt
    except OverflowError:
        return policy.max_delay
    return min(policy.max_delay, grown) if math.isfinite(grown) else policy.max_delay


def backoff_delay(
    attempt: int, policy: ReconnectPolicy = ReconnectPolicy(), rng: Callable[[], float] = random.random
) -> float:
    """Full jitter: a uniformly random delay in ``[0, backoff_ceiling(attempt)]``.
    ``rng`` returns a float in ``[0, 1)`` (``random.random`` by default)."""
    return backoff_ceiling(attempt, policy) * rng()


@attrs.frozen
class HeartbeatPolicy:
    """Send a ``ping`` every ``interval`` seconds; if no ``pong`` arrives within
    ``timeout`` seconds the connection is treated as dead and replaced.
    ``interval=None`` uses the server's ``hello.heartbeat.interval`` (at most half
    its ``timeout``)."""

    interval: float | None = None
    timeout: float = 10.0


# -- notifications ---------------------------------------------------------------------


@attrs.frozen
class StateChanged:
    """The connection state changed. ``attempt``/``delay`` describe the coming retry
    (RECONNECTING); ``close_code``/``reason`` why a connection ended."""

    state: ConnectionState
    previous: ConnectionState
    attempt: int = 0
    delay: float | None = None
    close_code: int | None = None
    reason: str | None = None


@attrs.frozen
class RemoteChange:
    """A durable change by someone else (another user, or this user's other
    connection) was applied to the local view. ``event`` is the whole event
    (None for a delete)."""

    project_id: str
    seq: int
    kind: Literal["created", "updated", "deleted"]
    event_id: str
    event: dict[str, Any] | None
    version: int
    user_id: str | None


@attrs.frozen
class SnapshotApplied:
    """A ``sync:snapshot`` replaced the local copy of a project."""

    project_id: str
    seq: int
    count: int


@attrs.frozen
class PresenceChanged:
    """``user`` (``{id, name, avatar, color, lastSeen}``) joined or left a project."""

    project_id: str
    user: dict[str, Any]
    joined: bool


@attrs.frozen
class CursorMoved:
    project_id: str
    user_id: str
    x: float
    y: float
    element_id: str | None


@attrs.frozen
class MutationSettled:
    """The server acked a mutation of this client (durable). ``result`` is the ack
    payload: ``{event, projectId, seq}`` or, for a delete, ``{id, projectId, version, seq}``."""

    envelope_id: str
    kind: MutationKind
    project_id: str
    event_id: str
    result: dict[str, Any]


@attrs.frozen
class MutationFailed:
    """The server refused a mutation (``error``, or a conflict that stored nothing);
    it left the queue and the local view no longer shows it."""

    envelope_id: str
    kind: MutationKind
    project_id: str
    event_id: str
    error: "ClientError"


@attrs.frozen
class QueueProgress:
    """The offline queue: ``pending`` mutations not yet acked (persisted),
    ``completed`` finished since this client opened (acked or refused), of which
    ``failed`` were refused; ``total = pending + completed``."""

    pending: int
    completed: int
    failed: int
    total: int


@attrs.frozen
class ServerError:
    """An ``error`` from the server that refers to no pending request of this client."""

    code: str
    message: str
    ref: str | None
    field: str | None = None


@attrs.frozen
class Conflict:
    """A ``conflict:detected`` from the server.

    ``local`` is the event as this client meant it (None for a delete), ``remote``
    what the server has stored (None when it was deleted), ``base`` the version the
    edit was based on (None when unknown). ``manual`` is True when the server stored
    nothing and waits for the client to decide (:meth:`SyncClient.resolve`);
    otherwise ``resolved`` is what the server's strategy kept or stored."""

    ref: str
    event_id: str
    project_id: str
    operation: Literal["update", "delete"]
    local: dict[str, Any] | None
    remote: dict[str, Any] | None
    base: dict[str, Any] | None
    strategy: str
    fields: tuple[str, ...]
    manual: bool
    resolved: dict[str, Any] | None
    raw: dict[str, Any] = attrs.field(eq=False, repr=False, factory=dict)

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> "Conflict":
        return cls(
            ref=str(p.get("ref")),
            event_id=str(p.get("id")),
            project_id=str(p.get("projectId")),
            operation="delete" if p.get("operation") == "delete" else "update",
            local=p.get("localVersion"),
            remote=p.get("remoteVersion"),
            base=p.get("base"),
            strategy=str(p.get("strategy")),
            fields=tuple(p.get("fields") or ()),
            manual="resolved" not in p,
            resolved=p.get("resolved"),
            raw=p,
        )

    def local_changes(self) -> dict[str, Any]:
        """The fields this client's edit changed relative to ``base``."""
        if self.local is None:
            return {}
        if self.base is None:
            return {f: self.local.get(f) for f in self.fields}
        return {f: self.local.get(f) for f in EDITABLE_FIELDS if self.local.get(f) != self.base.get(f)}


@attrs.frozen
class ConflictDetected:
    conflict: Conflict


Notification = (
    StateChanged | RemoteChange | SnapshotApplied | PresenceChanged | CursorMoved | MutationSettled
    | MutationFailed | QueueProgress | ServerError | ConflictDetected
)


# -- errors ----------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of the client's errors."""


class MutationRefused(ClientError):
    """The server answered a mutation with ``error`` (or the client refused to send
    it, code ``too_big``). The local view was reverted."""

    def __init__(self, code: str, message: str, *, envelope_id: str, field: str | None = None) -> None:
        self.code = code
        self.message = message
        self.envelope_id = envelope_id
        self.field = field
        super().__init__(f"{code}: {message}")


class ConflictError(ClientError):
    """An update or delete met a newer stored version and the server stored nothing.
    The local view shows the server's version; ``conflict`` has all three versions.
    Resolve with ``await client.resolve(err.conflict, ...)``."""

    def __init__(self, conflict: Conflict) -> None:
        self.conflict = conflict
        super().__init__(
            f"conflict on event {conflict.event_id!r} ({conflict.strategy}, fields {', '.join(conflict.fields) or '-'})"
        )


class SubscriptionRefused(ClientError):
    def __init__(self, project_id: str, code: str, message: str) -> None:
        self.project_id = project_id
        self.code = code
        super().__init__(f"subscribe {project_id!r} refused: {code}: {message}")


class ClientClosed(ClientError):
    """The client was closed while a call waited; queued mutations stay in the store."""


class ClientGaveUp(ClientError):
    """The client stopped reconnecting (no fresh token, or max_attempts reached).
    Queued mutations stay in the store and are sent by the next client on it."""


class StoreLocked(ClientError):
    """Another SyncClient (in this or another process) has the store open."""
