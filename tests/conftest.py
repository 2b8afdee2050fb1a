"""Shared fixtures: a real server on 127.0.0.1 port 0 with real LMDB in a temp dir,
and real WebSocket clients (trio-websocket)."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from barosync.hooks.auth import create_token
from barosync.config import Config
from barosync.core.app import App
from barosync.transports.server import serve

from browser import chromium as _chromium

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
_ids = itertools.count(1)


# BAROSYNC_TEST_POSTGRES=1: every in-process server keeps its log in a real PostgreSQL
# (tests/pg_helpers.py), one database per data directory, so the same tests check the
# cluster's log store (`make test` runs the protocol suites that way too).
_PG: Any = None
_PG_DATABASES: dict[Path, str] = {}


# BAROSYNC_TEST_CLUSTER=1: the same, plus a Redis bus and a second node beside every
# in-process server; clients connect to the two nodes in turn (ws_url).
_REDIS: Any = None
IN_CLUSTER = os.environ.get("BAROSYNC_TEST_CLUSTER") == "1"
# For the few tests that look inside the one in-process node (its sessions, its
# metrics, a plugin module's state): in cluster mode half the clients are elsewhere.
one_node = pytest.mark.skipif(IN_CLUSTER, reason="inspects one node's in-process state")
_SECOND: dict[int, int] = {}  # first node's port -> the second node's
_turn = itertools.count()


def pytest_configure(config: Any) -> None:
    global _PG, _REDIS
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: its workers start what they need
    cluster = os.environ.get("BAROSYNC_TEST_CLUSTER") == "1"
    if cluster or os.environ.get("BAROSYNC_TEST_POSTGRES") == "1":
        from pg_helpers import Postgres

        _PG = Postgres()
    if cluster:
        from redis_helpers import Redis

        _REDIS = Redis()


# Fixtures that say what a test needs, and the marker each gives it.
_MARKING_FIXTURES = {"chromium": "browser", "postgres": "cluster", "redis": "cluster"}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Marks browser and cluster tests by the fixtures they use (`make test-quick`
    leaves them out). On two nodes only the tests that start an in-process server
    run (they are async: the cluster is what they talk to); pure and subprocess
    tests would run exactly as in the one-node pass."""
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & _MARKING_FIXTURES.keys():
            item.add_marker(_MARKING_FIXTURES[fixture])
    if not IN_CLUSTER:
        return
    keep = [item for item in items if inspect.iscoroutinefunction(getattr(item, "function", None))]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_unconfigure(config: Any) -> None:
    if _PG is not None:
        _PG.close()
    if _REDIS is not None:
        _REDIS.close()


def make_config(data_dir: Path, **overrides: Any) -> Config:
    if _PG is not None and "cluster_postgres" not in overrides:
        if data_dir not in _PG_DATABASES:
            _PG_DATABASES[data_dir] = _PG.new_database()
            if _REDIS is not None:
                _REDIS.flush()  # presence and channels of earlier tests' nodes
        overrides["cluster_postgres"] = _PG_DATABASES[data_dir]
        if _REDIS is not None:
            overrides.setdefault("cluster_redis", _REDIS.url)
    return Config(host="127.0.0.1", port=0, data_dir=data_dir, secret=SECRET, **overrides)


async def _start(nursery: trio.Nursery, data_dir: Path, **overrides: Any) -> App:
    """A server, and with BAROSYNC_TEST_CLUSTER=1 its second node on the same log."""
    app = await nursery.start(serve, make_config(data_dir, **overrides))
    if _REDIS is not None:
        config = make_config(data_dir, **overrides)
        second = await nursery.start(serve, config.with_overrides(data_dir=data_dir.parent / (data_dir.name + "-node2")))
        _SECOND[app.port] = second.port
        app.cluster_peer = second  # type: ignore[attr-defined]
    return app


def _stop(app: App) -> None:
    app.stop()
    peer = getattr(app, "cluster_peer", None)
    if peer is not None:
        peer.stop()


def token(user: str = "alice", projects: Any = ("p1",), **claims: Any) -> str:
    return create_token(SECRET, user_id=user, projects=projects, **claims)


def new_id() -> str:
    return f"m{next(_ids)}-{uuid.uuid4().hex[:8]}"


def event_payload(project: str = "p1", **fields: Any) -> dict[str, Any]:
    body = {"projectId": project, "title": "Standup", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}
    body.update(fields)
    return body


class Client:
    """A thin test client: JSON envelopes over a real trio-websocket connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] | None = None
        self.seen: list[dict[str, Any]] = []

    async def send(self, type: str, payload: Any = None, *, id: str | None = None, **extra: Any) -> str:
        msg_id = id or new_id()
        body = {"type": type, "id": msg_id, **extra}
        if payload is not None:
            body["payload"] = payload
        await self.ws.send_message(json.dumps(body))
        return msg_id

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        with trio.fail_after(timeout):
            msg = json.loads(await self.ws.get_message())
        self.seen.append(msg)
        return msg

    async def recv_type(self, *types: str, timeout: float = 5) -> dict[str, Any]:
        """The next message of one of ``types``, skipping presence and others."""
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(timeout=timeout)
                if msg["type"] in types:
                    return msg

    async def request(self, type: str, payload: Any = None, **kw: Any) -> dict[str, Any]:
        """Send and wait for the answer that refers to this message (ack, error or conflict)."""
        msg_id = await self.send(type, payload, **kw)
        while True:
            msg = await self.recv()
            if msg["type"] == "ack" and msg["id"] == msg_id:
                return msg
            if msg["type"] in ("error", "conflict:detected") and msg["payload"].get("ref") == msg_id:
                return msg

    async def subscribe(self, project: str = "p1", since: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"projectId": project}
        if since is not None:
            payload["since"] = since
        return await self.request("subscribe", payload)

    async def create(self, project: str = "p1", **fields: Any) -> dict[str, Any]:
        return await self.request("event:create", event_payload(project, **fields))


async def http_exchange(port: int, method: str, path: str, body: Any = None, *, tok: str | None = None,
                        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request on a fresh connection: (status, lower-cased headers, JSON body)."""
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    head = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close", f"Content-Length: {len(data)}"]
    if tok:
        head.append(f"Authorization: Bearer {tok}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        raw = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                raw += chunk
    head_bytes, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    is_json = found.get("content-type", "").startswith("application/json")
    return int(status_line.split()[1]), found, json.loads(content) if content and is_json else content


def ws_url(app: App, tok: str | None = None) -> str:
    port = app.port
    if app.port in _SECOND and next(_turn) % 2:
        port = _SECOND[app.port]  # a cluster: every other client on the second node
    url = f"ws://127.0.0.1:{port}/ws"
    return url + (f"?token={tok}" if tok else "")


async def open_client(nursery: trio.Nursery, app: App, tok: str) -> Client:
    """Open a client whose connection lives as long as ``nursery``."""
    send, receive = trio.open_memory_channel[Client](1)

    async def hold() -> None:
        async with open_websocket_url(ws_url(app, tok)) as ws:
            client = Client(ws)
            client.hello = json.loads(await ws.get_message())
            await send.send(client)
            await trio.sleep_forever()

    nursery.start_soon(hold)
    with trio.fail_after(5):
        return await receive.receive()


@asynccontextmanager
async def running(data_dir: Path, **overrides: Any) -> AsyncIterator[tuple[App, trio.Nursery]]:
    """A server on ``data_dir`` (config overrides as keywords) and a nursery for its
    clients, both gone when the block ends."""
    async with trio.open_nursery() as nursery:
        app = await _start(nursery, data_dir, **overrides)
        async with trio.open_nursery() as clients:
            yield app, clients
            clients.cancel_scope.cancel()
        _stop(app)


# Debian's Chromium through Playwright, for the browser tests (tests/browser.py).
chromium = pytest.fixture(scope="session")(_chromium)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def app(nursery: trio.Nursery, data_dir: Path) -> AsyncIterator[App]:
    app = await _start(nursery, data_dir)
    yield app
    _stop(app)


@pytest.fixture
async def client_factory(nursery: trio.Nursery, app: App):
    async def make(user: str = "alice", projects: Any = ("p1",), **claims: Any) -> Client:
        return await open_client(nursery, app, token(user, projects, **claims))

    return make
