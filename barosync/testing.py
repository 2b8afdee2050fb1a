"""Test a plugin against a real barosync in a few lines of pytest (with pytest-trio).

``serve_for_test`` runs a real server in the test's process (real sockets on
127.0.0.1, a real LMDB data directory under the test's ``tmp_path``) with your plugin
files loaded the way the server loads them; ``server.client`` opens a real WebSocket
connection; ``make_conflict`` builds a ``Conflict`` for testing a strategy function
without a server::

    from barosync.testing import serve_for_test

    async def test_always_remote_keeps_what_is_stored(tmp_path):
        async with serve_for_test(tmp_path, plugins=["plugins/always_remote.py"],
                                  conflict_default="always_remote") as server:
            alice = await server.client("alice")
            made = await alice.create(title="Standup")
            ...

docs/plugins.md ("Testing a plugin") walks through a whole strategy with its tests.
"""

from __future__ import annotations

import itertools
import json
import shutil
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from .core.app import App
from .hooks.auth import create_token
from .config import Config
from .hooks.plugin_types import Conflict
from .hooks.plugins import build_plugin_manager, load_plugin_file
from .transports.server import serve

__all__ = ["TestClient", "TestServer", "build_plugin_manager", "load_plugin_file", "make_conflict", "serve_for_test"]

SECRET = "barosync-testing-secret-0123456789-abcdef"  # HS256 wants 32 bytes or more
TIMEOUT = 10.0  # seconds any one wait of a test client may take
_ids = itertools.count(1)


class TestClient:
    """One WebSocket connection, speaking JSON envelopes (docs/protocol.md). Every
    wait ends after ``TIMEOUT`` seconds with ``trio.TooSlowError``."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, ws: WebSocketConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.seen: list[dict[str, Any]] = []  # every message received, in order

    async def send(self, type: str, payload: Any = None, *, id: str | None = None) -> str:
        """Send one envelope; returns its id."""
        msg_id = id or f"t{next(_ids)}-{uuid.uuid4().hex[:8]}"
        body: dict[str, Any] = {"type": type, "id": msg_id}
        if payload is not None:
            body["payload"] = payload
        await self.ws.send_message(json.dumps(body))
        return msg_id

    async def recv(self, *types: str) -> dict[str, Any]:
        """The next message (of one of ``types``, when given: others are skipped)."""
        with trio.fail_after(TIMEOUT):
            while True:
                msg = json.loads(await self.ws.get_message())
                self.seen.append(msg)
                if not types or msg["type"] in types:
                    return msg

    async def request(self, type: str, payload: Any = None, *, id: str | None = None) -> dict[str, Any]:
        """Send and return the answer to it: its ``ack``, ``error`` or ``conflict:detected``."""
        msg_id = await self.send(type, payload, id=id)
        with trio.fail_after(TIMEOUT):
            while True:
                msg = await self.recv()
                if msg["type"] == "ack" and msg.get("id") == msg_id:
                    return msg
                if msg["type"] in ("error", "conflict:detected") and (msg.get("payload") or {}).get("ref") == msg_id:
                    return msg

    async def subscribe(self, project: str = "p1", since: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"projectId": project}
        if since is not None:
            payload["since"] = since
        return await self.request("subscribe", payload)

    async def create(self, project: str = "p1", **fields: Any) -> dict[str, Any]:
        """``event:create`` with a title and a 09:00–10:00 slot unless ``fields`` say
        otherwise; returns the answer."""
        payload = {"projectId": project, "title": "Standup", "startDate": "2026-01-05T09:00:00Z",
                   "endDate": "2026-01-05T10:00:00Z", **fields}
        return await self.request("event:create", payload)

    async def update(self, event_id: str, version: int, project: str = "p1", **fields: Any) -> dict[str, Any]:
        return await self.request("event:update", {"id": event_id, "projectId": project, "version": version, **fields})

    async def delete(self, event_id: str, version: int | None = None, project: str = "p1") -> dict[str, Any]:
        payload: dict[str, Any] = {"id": event_id, "projectId": project}
        if version is not None:
            payload["version"] = version
        return await self.request("event:delete", payload)


class TestServer:
    """A running server: ``app`` is barosync's ``App`` (``app.store``, ``app.pm``)."""

    __test__ = False

    def __init__(self, app: App, nursery: trio.Nursery) -> None:
        self.app = app
        self.port = app.port
        self._nursery = nursery

    def token(self, user: str = "alice", projects: Iterable[str] | str = ("p1",), **claims: Any) -> str:
        """A signed token, as `barosync token create` makes (``projects="*"``: all)."""
        return create_token(SECRET, user_id=user, projects=projects, **claims)

    async def client(self, user: str = "alice", projects: Iterable[str] | str = ("p1",)) -> TestClient:
        """A connected client of ``user``, open until the server stops."""
        url = f"ws://127.0.0.1:{self.port}/ws?token={self.token(user, projects)}"
        ready: trio.MemorySendChannel[TestClient]
        ready, opened = trio.open_memory_channel(1)

        async def hold() -> None:
            async with open_websocket_url(url) as ws:
                await ready.send(TestClient(ws, json.loads(await ws.get_message())))
                await trio.sleep_forever()

        self._nursery.start_soon(hold)
        with trio.fail_after(TIMEOUT):
            return await opened.receive()


@asynccontextmanager
async def serve_for_test(tmp_path: Path, *, plugins: Iterable[str | Path] = (), **config: Any) -> AsyncIterator[TestServer]:
    """A barosync on a free port of 127.0.0.1, its data under ``tmp_path``, with
    ``plugins`` (plugin files, or directories of them) loaded as from `[plugins]
    paths`. ``config``: any other ``Config`` field, e.g. ``conflict_default="mine"``
    or ``plugin_options={"mine": {...}}``."""
    tmp_path = Path(tmp_path)
    directories, files = [], []
    for plugin in plugins:
        path = Path(plugin)
        if not path.exists():
            raise FileNotFoundError(f"plugin {path} does not exist (a path to a .py file or a directory)")
        (directories if path.is_dir() else files).append(path)
    if files:  # one directory of the named files, as a deployment's plugin directory
        chosen = tmp_path / "plugins"
        chosen.mkdir(exist_ok=True)
        for path in files:
            shutil.copyfile(path, chosen / path.name)
        directories.append(chosen)
    settings = Config(host="127.0.0.1", port=0, data_dir=tmp_path / "data", secret=SECRET,
                      plugin_paths=tuple(directories)).with_overrides(**config)
    async with trio.open_nursery() as nursery:
        app: App = await nursery.start(serve, settings)
        try:
            yield TestServer(app, nursery)
        finally:
            app.stop()
            nursery.cancel_scope.deadline = trio.current_time() + TIMEOUT  # the clients close with it


def make_conflict(*, base: dict[str, Any] | None, changes: dict[str, Any] | None = None,
                  remote: dict[str, Any] | None, operation: str = "update", user_id: str = "alice",
                  client_time: int = 2_000, remote_time: int = 1_000, project_id: str = "p1",
                  event_id: str | None = None) -> Conflict:
    """The ``Conflict`` the server would give a strategy: ``base`` (the event the
    client edited), ``changes`` (the fields its update set; none for a delete),
    ``remote`` (what is stored now; None when it was deleted meanwhile)."""
    changes = dict(changes or {})
    local = {**base, **changes} if base is not None and operation == "update" else None
    known = base or remote or {}
    return Conflict(operation=operation, base=base, local=local, remote=remote, changes=changes,  # type: ignore[arg-type]
                    client_time=client_time, remote_time=remote_time, user_id=user_id,
                    project_id=project_id, event_id=event_id or known.get("id", ""))
