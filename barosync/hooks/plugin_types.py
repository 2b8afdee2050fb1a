"""The value types that hooks take and return, shared by the hook specifications
(hookspecs.py) and their implementations (codecs.py, conflicts.py, plugins).

This module imports nothing of barosync, so the specifications never import the
plugins they specify.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import attrs

# What a merge does with a field both sides changed differently, unless configured.
DEFAULT_TIEBREAK = "manual"


class Codec:
    """The interface a codec plugin implements."""

    name = ""
    #: True when queued messages should be combined into one frame at write time.
    batching = False

    def frame(self, message: bytes) -> bytes:
        """One JSON envelope -> the complete frame bytes for the wire."""
        raise NotImplementedError

    def frames(self, messages: list[bytes]) -> bytes:
        """Several JSON envelopes waiting for one connection -> bytes for one write."""
        return b"".join(self.frame(m) for m in messages)

    def decode(self, data: bytes, *, text: bool, max_bytes: int) -> list[Any]:
        """One incoming message (``text``: it came in a text frame, UTF-8; else a
        binary one) -> the parsed envelopes it carries (JSON values, checked by the
        protocol layer). Raise ``barosync.ProtocolError`` for what cannot be read."""
        raise NotImplementedError


@attrs.frozen
class Conflict:
    """What a strategy is asked to decide."""

    operation: Literal["update", "delete"]
    base: dict[str, Any] | None
    local: dict[str, Any] | None  # None for a delete
    remote: dict[str, Any] | None  # None when the stored event was deleted
    changes: dict[str, Any]  # the wire fields the client's update set
    client_time: int  # when the client made the edit (ms), never later than received
    remote_time: int  # when the stored version was written (ms)
    user_id: str
    merge_tiebreak: str = DEFAULT_TIEBREAK
    project_id: str = ""  # the project the event is in
    event_id: str = ""  # the event's id
    # How the server asks the tie-break strategy (any plugin's) about clashing fields;
    # without it the built-in of that name decides.
    tiebreak: "Callable[[Conflict], Resolution | None] | None" = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Resolution:
    """A strategy's answer.

    ``action``: ``"keep"`` stores nothing (the remote version stays, or stays
    deleted); ``"store"`` stores ``event`` (fields of the client's editable set);
    ``"delete"`` deletes the event. ``fields`` lists the fields in conflict, for the
    sender's ``conflict:detected``.
    """

    action: Literal["keep", "store", "delete"]
    event: dict[str, Any] | None = None
    fields: tuple[str, ...] = ()
    # True when the server did not decide: the sender must resolve and resubmit.
    manual: bool = False
