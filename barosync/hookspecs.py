"""The hooks barosync calls. Plugins implement them with ``@barosync.hookimpl``.

Every hook may be implemented by any number of plugins; the built-in behaviour is
itself a set of ordinary plugins (see ``barosync.plugins.DEFAULT_PLUGINS``).
Hooks marked ``firstresult`` stop at the first plugin that returns something other
than None. Hooks are called on the server's event loop and must not block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .config import Config
    from .models import Identity

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
    rule allows exactly the projects listed in the token.
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
