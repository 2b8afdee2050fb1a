"""Wire protocol v1: envelope parsing, validation and encoding. No IO, no trio.

Outgoing messages are encoded once into complete server frames (JSON plus the
unmasked WebSocket header); the same bytes then go to every recipient.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import attrs
import orjson
from websockets.frames import Frame, Opcode

from ..domain.models import MAX_ID_CHARS, ValidationError, check_id

PROTOCOL_VERSION = 1
# WebSocket subprotocols: a browser offers ["barosync.v1", "barosync.bearer." + token]
# to authenticate without the token in the URL; the server answers "barosync.v1".
SUBPROTOCOL = "barosync.v1"
BEARER_SUBPROTOCOL = "barosync.bearer."

# Client message types. Those in ACKED carry an `id` the answer refers to.
PING = "ping"
ACK = "ack"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
EVENT_CREATE = "event:create"
EVENT_UPDATE = "event:update"
EVENT_DELETE = "event:delete"
USER_CURSOR = "user:cursor"
AUTH_REFRESH = "auth:refresh"

CLIENT_TYPES = frozenset(
    {PING, ACK, SUBSCRIBE, UNSUBSCRIBE, EVENT_CREATE, EVENT_UPDATE, EVENT_DELETE, USER_CURSOR, AUTH_REFRESH}
)
MUTATIONS = frozenset({EVENT_CREATE, EVENT_UPDATE, EVENT_DELETE})
ACKED = frozenset({SUBSCRIBE, UNSUBSCRIBE, AUTH_REFRESH}) | MUTATIONS

# Server -> client change messages, by what happened to the event.
CHANGE_TYPES = {"create": "event:created", "update": "event:updated", "delete": "event:deleted"}

# Error codes carried in `error` envelopes.
E_BAD_JSON = "bad_json"
E_BAD_ENVELOPE = "bad_envelope"
E_UNKNOWN_TYPE = "unknown_type"
E_INVALID = "invalid"
E_FORBIDDEN = "forbidden"
E_NOT_FOUND = "not_found"
E_EXISTS = "exists"
E_NOT_SUBSCRIBED = "not_subscribed"
E_RATE_LIMITED = "rate_limited"
E_LIMIT = "limit"
E_INTERNAL = "internal"
# Retryable refusals of a write for the server's storage, with `retryAfter` seconds:
# the disk (or the map's ceiling) is full, or storage failed and the server is stopping.
E_STORAGE_FULL = "storage_full"
E_STORAGE_FAILED = "storage_failed"

# Each code's HTTP status (REST; CalDAV maps `invalid` to 403, RFC 4791's
# preconditions). Codes not here are validation plugins' refusals: 400.
HTTP_STATUS = {
    E_BAD_JSON: 400, E_BAD_ENVELOPE: 400, E_INVALID: 400, E_FORBIDDEN: 403, E_NOT_FOUND: 404, E_EXISTS: 409,
    E_LIMIT: 413, E_RATE_LIMITED: 429, E_INTERNAL: 500, E_STORAGE_FAILED: 503, E_STORAGE_FULL: 507,
}


def http_status(code: str, table: dict[str, int] = HTTP_STATUS) -> int:
    """The HTTP status of an error code: a server fault is 5xx (calendar apps drop
    an edit that got a 4xx), a plugin's refusal 400."""
    return table.get(code, 400)


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    return b"retry-after", str(max(1, math.ceil(seconds))).encode()


# Close codes of the contract.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOKEN_INVALID = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_HEARTBEAT = 4000


class ProtocolError(Exception):
    """A client message the server refuses; becomes an `error` envelope."""

    def __init__(self, code: str, message: str, *, ref: str | None = None, field: str | None = None,
                 retry_after: float | None = None) -> None:
        self.code = code
        self.message = message
        self.ref = ref
        self.field = field
        # Seconds after which the same message may succeed (sent as `retryAfter`).
        self.retry_after = retry_after
        super().__init__(message)

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "ref": self.ref}
        if self.field is not None:
            body["field"] = self.field
        if self.retry_after is not None:
            body["retryAfter"] = self.retry_after
        return body


@attrs.frozen(slots=True)
class Envelope:
    type: str
    id: str | None
    payload: dict[str, Any]
    timestamp: float | None = None


def decode_envelope(data: str | bytes) -> Envelope:
    """Parse one client frame. Raises ProtocolError with the best `ref` it can find."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(E_BAD_JSON, f"frame is not valid JSON: {e}") from None
    return envelope_from_obj(raw)


def ref_for(msg_id: Any) -> str | None:
    """What an `error` may name as its `ref`: the client's id when it is a usable one."""
    return msg_id if isinstance(msg_id, str) and len(msg_id) <= MAX_ID_CHARS else None


def envelope_from_obj(raw: Any) -> Envelope:
    """Check one parsed client envelope (a codec may carry several per frame)."""
    if not isinstance(raw, dict):
        raise ProtocolError(E_BAD_ENVELOPE, "frame must be a JSON object (an envelope)")
    msg_id = raw.get("id")
    ref = ref_for(msg_id)
    msg_type = raw.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError(E_BAD_ENVELOPE, "envelope needs a string `type`", ref=ref, field="type")
    if msg_type not in CLIENT_TYPES:
        raise ProtocolError(
            E_UNKNOWN_TYPE, f"unknown message type {msg_type[:64]!r}", ref=ref, field="type"
        )
    if msg_id is not None or msg_type in ACKED:
        try:
            msg_id = check_id(msg_id, "id")
        except ValidationError as e:
            if msg_type == ACK and msg_id is None:
                pass
            else:
                raise ProtocolError(
                    E_BAD_ENVELOPE, f"envelope `id` {e.message} (required for {msg_type})", ref=ref, field="id"
                ) from None
    payload = raw.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        if msg_type == PING:
            payload = {}
        else:
            raise ProtocolError(E_BAD_ENVELOPE, "`payload` must be a JSON object", ref=ref, field="payload")
    timestamp = raw.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        timestamp = None
    return Envelope(msg_type, msg_id, payload, timestamp)


@attrs.frozen(slots=True)
class Subscribe:
    project_id: str
    since: int | None
    # The client assembles a snapshot sent in parts (`more: true` on all but the last).
    snapshot_parts: bool = False


def parse_subscribe(payload: dict[str, Any], ref: str | None) -> Subscribe:
    project_id = parse_project(payload, ref)
    since = payload.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ProtocolError(E_INVALID, "`since` must be a non-negative integer seq", ref=ref, field="since")
    parts = payload.get("snapshotParts", False)
    if not isinstance(parts, bool):
        raise ProtocolError(E_INVALID, "`snapshotParts` must be true or false", ref=ref, field="snapshotParts")
    return Subscribe(project_id, since, parts)


def snapshot_message(msg_id: str, project_id: str, seq: int, events: list[bytes], since: int | None, *,
                     part: int | None = None, more: bool = False) -> bytes:
    """A `sync:snapshot` built from the stored events' JSON as it is (no decoding and
    encoding again: a 100,000-event project is ~35 MB of it). ``part`` numbers the
    pieces of a snapshot sent in parts, from 0; ``more`` says another follows."""
    head = orjson.dumps({"type": "sync:snapshot", "id": msg_id})[:-1]
    meta = {"projectId": project_id, "seq": seq, "since": since}
    if part is not None:
        meta["part"] = part
        meta["more"] = more
    return b"".join((head, b',"payload":', orjson.dumps(meta)[:-1], b',"events":[', b",".join(events), b"]}}"))


def parse_project(payload: dict[str, Any], ref: str | None) -> str:
    try:
        return check_id(payload.get("projectId"), "projectId")
    except ValidationError as e:
        raise ProtocolError(E_INVALID, f"`projectId` {e.message}", ref=ref, field="projectId") from None


# -- encoding -------------------------------------------------------------------

# Server-originated message ids: unique per process start, cheap to make.
_BOOT = os.urandom(4).hex()
_counter = itertools.count(1)


def next_id() -> str:
    return f"{_BOOT}-{next(_counter)}"


# Server frames are unmasked and carry no per-connection state, so a frame made once
# serves every recipient. websockets' serializer takes the UTF-8 bytes as they are
# (3x faster than wsproto's, which wants a str to encode again).


def text_frame(data: bytes) -> bytes:
    """A complete unmasked text frame of ``data`` (UTF-8 JSON)."""
    return Frame(Opcode.TEXT, data).serialize(mask=False)


def binary_frame(data: bytes) -> bytes:
    return Frame(Opcode.BINARY, data).serialize(mask=False)


class Outgoing:
    """One server message on its way to many connections: its JSON, and its frame
    per codec, each made once and shared by every recipient using that codec."""

    __slots__ = ("json", "text", "_frames", "project_id", "seq")

    def __init__(self, json: bytes, *, project_id: str = "", seq: int = 0) -> None:
        self.json = json
        # A change's project and seq (0: not a change), so a connection tracks its ack
        # as two numbers per project (transports/acks.py), not as a string.
        self.project_id = project_id
        self.seq = seq
        # Nearly every recipient speaks the default codec: make its frame up front.
        self.text = text_frame(json)
        self._frames: dict[str, bytes] = {}

    def frame_for(self, codec: Any) -> bytes:
        frame = self._frames.get(codec.name)
        if frame is None:
            frame = self._frames[codec.name] = codec.frame(self.json)
        return frame


def encode(
    msg_type: str,
    payload: Any = None,
    *,
    id: str | None = None,
    timestamp: int | None = None,
    **extra: Any,
) -> bytes:
    """One server message as JSON bytes. Extra keys (seq, projectId, userId,
    version) are included when not None."""
    body: dict[str, Any] = {"type": msg_type, "id": id if id is not None else next_id(), "payload": payload if payload is not None else {}}
    if timestamp is not None:
        body["timestamp"] = timestamp
    for key, value in extra.items():
        if value is not None:
            body[key] = value
    return orjson.dumps(body)


def frame(msg_type: str, payload: Any = None, **kw: Any) -> bytes:
    """encode() and wrap it in a complete server text frame."""
    return text_frame(encode(msg_type, payload, **kw))


def ack_up_to(payload: Any) -> tuple[str, int] | None:
    """A client's cumulative ack, ``{"projectId", "seq"}``: it settles every change of
    that project up to ``seq`` it was sent. None for an ack by ``id`` (no payload, or
    an empty one); ProtocolError for a malformed one."""
    if not payload:
        return None
    if type(payload) is not dict:
        raise ProtocolError(E_BAD_ENVELOPE, "`payload` of an ack must be a JSON object", field="payload")
    project_id, seq = payload.get("projectId"), payload.get("seq")
    if type(project_id) is not str or not project_id or len(project_id) > MAX_ID_CHARS:
        raise ProtocolError(E_INVALID, "a cumulative ack needs `projectId` (a string)", field="projectId")
    if type(seq) is not int or seq < 0:
        raise ProtocolError(E_INVALID, "a cumulative ack needs `seq` (an integer >= 0)", field="seq")
    return project_id, seq


def ack(ref: str, payload: Any = None) -> bytes:
    # An ack answers a client message and reuses its id, as the seed client expects.
    return encode(ACK, payload, id=ref)


def error(err: ProtocolError) -> bytes:
    return encode("error", err.payload())


def ack_frame(ref: str, payload: Any = None) -> bytes:
    return text_frame(ack(ref, payload))


def error_frame(err: ProtocolError) -> bytes:
    return text_frame(error(err))
