"""The sync inspector's data: why a client is behind, what the server holds.

``GET /api/admin/summary`` (and the page at ``/admin`` that polls it) for tokens with
the ``admin`` claim (``barosync token create --admin``); ``POST
/api/admin/connections/{id}/close`` closes one connection with 1001, after which the
client reconnects and resumes with ``since``. Everything is read from state the
server keeps anyway, when asked: nothing is counted on the delivery path for this.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import __version__
from ..wire import protocol

if TYPE_CHECKING:
    from .app import App

HIDDEN = "<hidden>"
# Config keys whose values never leave the server.
SECRET_KEYS = frozenset({"secret", "cluster_postgres", "cluster_redis"})


async def summary(app: "App") -> dict[str, Any]:
    # The log's side in one read (one thread hop and pooled connection on PostgreSQL).
    heads, kept = await app.queries.log_view(set(app.hub.rooms))
    return {"server": _server(app), "projects": _projects(app, heads, kept),
            "connections": [_connection(app, s, heads) for s in app.sessions]}


def _server(app: "App") -> dict[str, Any]:
    usage = app.queries.map_usage()
    plugins = []
    for name, plugin in app.pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in (app.pm.get_hookcallers(plugin) or []))
        plugins.append({"name": name, "hooks": hooks})
    config = {k: (HIDDEN if k in SECRET_KEYS and v else _plain(v)) for k, v in attrs.asdict(app.config, recurse=False).items()}
    # A plugin's options may hold credentials (an API key, a webhook's token): the
    # inspector names them and hides every value.
    config["plugin_options"] = {name: {key: HIDDEN for key in options}
                                for name, options in app.config.plugin_options.items()}
    return {
        "version": __version__,
        "uptime": round(time.time() - app.started_at, 1),
        "dataId": app.queries.history_id,
        "health": app.health()["status"],
        "storage": app.queries.storage,
        "bus": ({"connected": app.bus.connected, "published": app.bus.published, "received": app.bus.received,
                 "filledFromLog": app.hub.sequencer.filled} if app.bus is not None else None),
        "lmdb": ({"usedBytes": usage[0], "mapBytes": usage[1],
                  "usedShare": round(usage[0] / usage[1], 4) if usage[1] else None} if usage is not None else None),
        "plugins": plugins,
        "config": config,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _projects(app: "App", heads: dict[str, int], kept: dict[str, int | None]) -> list[dict[str, Any]]:
    now = trio.current_time()
    previous_at, previous = app.admin_sample
    app.admin_sample = (now, dict(app.hub.committed))
    elapsed = now - previous_at
    out = []
    for project_id in sorted(set(heads) | set(app.hub.rooms)):
        room = app.hub.rooms.get(project_id)
        count = app.hub.committed.get(project_id, 0)
        rate = (count - previous.get(project_id, 0)) / elapsed if 0 < elapsed <= 60 else None
        out.append({
            "id": project_id,
            "head": heads.get(project_id, 0),
            "historyFrom": kept.get(project_id),
            "subscribers": len(room.subscribers) if room else 0,
            "present": sorted(room.users) if room else [],
            "changes": count,
            "changesPerSecond": round(rate, 2) if rate is not None else None,
        })
    return out


def _connection(app: "App", session: Any, heads: dict[str, int]) -> dict[str, Any]:
    ident = session.identity
    now = trio.current_time()
    return {
        "id": session.id,
        "user": ident.user_id,
        "name": ident.name,
        "origin": session.origin,
        "connectedAt": int(session.connected_at * 1000),
        "codec": session.codec.name,
        "projects": [_progress(session, p, heads.get(p, 0)) for p in sorted(session.subscriptions)],
        "outboxBytes": session.outbox_bytes,
        "unacked": len(session.unacked),
        "tokenExpiresAt": ident.expires_ms,
        "lastHeard": round(now - session.last_recv, 1),  # seconds since the client last sent anything
        "closing": session.close_code is not None,
    }


def _progress(session: Any, project_id: str, head: int) -> dict[str, Any]:
    """Delivered: every change the room fanned out since the client joined it, so the
    head as far as the hub is concerned. Acked: below the oldest change it has not
    acked (transports/acks.py keeps what is sent and acked per project)."""
    oldest = session.unacked.oldest(project_id)
    delivered = head
    acked = oldest - 1 if oldest is not None else delivered
    return {"id": project_id, "head": head, "delivered": delivered, "acked": acked, "behind": head - acked}


def close_connection(app: "App", session_id: str) -> bool:
    for session in list(app.sessions):
        if session.id == session_id:
            session.close(protocol.CLOSE_GOING_AWAY, "closed by an administrator: reconnect")
            return True
    return False
