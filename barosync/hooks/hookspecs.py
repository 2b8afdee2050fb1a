"""The hooks barosync calls. Plugins implement them with ``@barosync.hookimpl``.

Every hook may be implemented by any number of plugins; the built-in behaviour is
itself a set of ordinary plugins (see ``barosync.hooks.plugins.DEFAULT_PLUGINS``).
Hooks marked ``firstresult`` stop at the first plugin that returns something other
than None. Most hooks are called on the server's event loop and must not block;
the write-path hooks (``barosync_resolve_conflict``, ``barosync_validate_mutation``)
run in the writer's thread inside the write transaction: synchronous, quick, no IO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import pluggy

if TYPE_CHECKING:
    from ..config import Config
    from .plugin_types import Codec, Conflict, Resolution
    from ..domain.models import Identity, Problem

hookspec = pluggy.HookspecMarker("barosync")
hookimpl = pluggy.HookimplMarker("barosync")


# -- auth ---------------------------------------------------------------------------


@hookspec(firstresult=True)
def barosync_authenticate(token: str, config: "Config") -> "Identity | None":
    """Turn a bearer token into the identity of the user it was issued to.

    Called at the WebSocket handshake and for ``auth:refresh``. Return None when
    this plugin does not recognise the token, so that other plugins may try; when
    every plugin returns None the handshake is refused with HTTP 401 (or the
    refresh with ``error`` and close 4001). The first identity returned wins.
    """


@hookspec(firstresult=True)
def barosync_authorize(identity: "Identity", action: str, project_id: str) -> "bool | None":
    """Decide whether ``identity`` may do ``action`` in ``project_id``.

    ``action`` is ``"subscribe"``, ``"create"``, ``"update"`` or ``"delete"``.
    Return True to allow, False to refuse (the client gets ``error`` ``forbidden``),
    or None for no opinion, leaving the decision to the next plugin. The built-in
    rule allows the projects listed in the token, and writes only where the token's
    role there is not ``"viewer"``. A subscribe also asks ``"create"``: its answer is
    the ``writable`` the subscribe's ``ack`` tells the client (a read-only calendar).
    """


# -- conflicts and validation ------------------------------------------------------------


@hookspec
def barosync_conflict_strategies() -> "list[str]":
    """Name the conflict strategies this plugin provides.

    The names are what ``[conflict] default`` and ``[conflict.projects]`` may use; an
    unknown name there stops start-up with the list of available ones. Return None
    (or an empty list) to provide none.
    """


@hookspec(firstresult=True)
def barosync_resolve_conflict(strategy: str, conflict: "Conflict") -> "Resolution | None":
    """Decide a conflict for a project whose strategy is ``strategy``.

    ``conflict`` carries ``base`` (the event at the client's version, from history,
    or None), ``local`` (base plus the client's change), ``remote`` (what is stored,
    None when deleted), the client's ``changes`` and both edit times. Return None
    when ``strategy`` is not one of yours; otherwise a ``Resolution``: keep the
    stored version, store a resolved event, or delete. Runs inside the write
    transaction, in the writer's thread: it must be synchronous and quick, with no
    IO. When no plugin answers, the conflict is left to the sender (``manual``).
    """


@hookspec
def barosync_validate_mutation(
    operation: str,
    event: "dict[str, Any] | None",
    previous: "dict[str, Any] | None",
    project_events: "Callable[[], Iterator[dict[str, Any]]]",
    user_id: str,
    config: "Config",
) -> "list[Problem] | Problem | None":
    """Check a create, update or delete just before it is committed.

    ``event`` is the event as it would be stored (None for a delete), ``previous``
    what is stored now (None for a create). ``project_events()`` iterates the
    project's current events inside the same transaction, so checks that span
    events see every earlier mutation of the same group commit. Return None when all
    is well; a ``Problem`` with ``refuse=True`` refuses the mutation (the client gets
    ``error`` with the problem's code, nothing is stored); problems with
    ``refuse=False`` are attached to the ack as ``warnings``. Synchronous, in the
    writer's thread, like ``barosync_resolve_conflict``.
    """


# -- wire codecs --------------------------------------------------------------------------


@hookspec
def barosync_wire_codecs() -> "list[Codec]":
    """Provide wire codecs: objects that encode outgoing JSON envelopes into frames
    and decode incoming frames into envelopes (see ``barosync.Codec``).

    A client picks one by name at the handshake (``/ws?codec=NAME``). Codecs are
    looked up once per connection, never per message. Return None (or an empty
    list) to provide none. The built-in ``json``, ``batch`` and ``deflate`` codecs
    are provided this way.
    """


# -- lifecycle ----------------------------------------------------------------------


@hookspec
def barosync_startup(config: "Config") -> None:
    """The server has opened its storage and is about to accept connections.
    The return value is ignored."""


@hookspec
def barosync_shutdown(config: "Config") -> None:
    """The server has stopped accepting connections and closed them all; storage is
    still open. The return value is ignored."""


@hookspec
def barosync_connect(session_id: str, identity: "Identity") -> None:
    """A WebSocket connection was accepted for ``identity``. The return value is
    ignored."""


@hookspec
def barosync_disconnect(session_id: str, identity: "Identity", close_code: "int | None") -> None:
    """A WebSocket connection ended (``close_code`` is None when the peer vanished
    without a close frame). The return value is ignored."""


@hookspec
def barosync_change_committed(project_id: str, seq: int, change: "dict[str, Any]") -> None:
    """A change was durably committed as ``seq`` of ``project_id`` and is being
    fanned out. ``change`` is the server message every subscriber receives
    (``type``, ``payload``, ``seq``, ...). Called in seq order per project. The
    return value is ignored; the hook must be quick, it runs on the write path."""
