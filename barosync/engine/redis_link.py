"""What the bus (bus.py) and cluster presence (presence.py) share of Redis: the key and
channel names, the reachability check at start, and ``RedisLink`` — commands queued
from the event loop without awaiting, and the one reconnect-with-backoff loop every
Redis task runs in.

Key and channel names carry the project as a Redis Cluster hash tag,
``barosync:{project}:…``, so sharded pub/sub can come later.
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import trio

log = logging.getLogger(__name__)

RECONNECT_MAX = 5.0  # seconds between attempts to reach Redis, at most
QUEUE = 100_000  # commands waiting for Redis before new ones are dropped (the checks cover them)


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise OSError (with why) unless a Redis answers PING at ``url``; at start, so a
    node with a wrong URL says so instead of serving without its bus."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise OSError(f"not a redis:// URL: {url!r}")
    if parts.scheme == "unix":
        return
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    with socket.create_connection((host, port), timeout=timeout) as conn:
        if parts.scheme == "rediss":
            return  # TLS: the handshake is coredis's; reaching the port is what we check
        conn.settimeout(timeout)
        conn.sendall(b"PING\r\n")
        reply = conn.recv(64)
    if not reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR AUTH")):
        raise OSError(f"{host}:{port} does not answer like Redis ({reply[:40]!r})")


def channel(project_id: str, kind: str = "changes") -> str:
    return f"barosync:{{{project_id}}}:{kind}"


def split_channel(name: str) -> tuple[str, str]:
    """barosync:{project}:kind -> (project, kind)"""
    head, _, kind = name.rpartition(":")
    return head[len("barosync:{"):-1], kind


class RedisLink:
    """One user's way to Redis: ``queue`` commands from the event loop (never
    awaits; dropped when Redis is away long enough to fill the queue), ``with_redis``
    to run a task on a connected client for ever."""

    def __init__(self, url: str, *, what: str) -> None:
        self.url = url
        self.what = what  # for the log: "publishing", "presence"
        self._send, self._receive = trio.open_memory_channel[tuple[str, tuple]](QUEUE)

    def queue(self, command: str, *args: Any) -> None:
        try:
            self._send.send_nowait((command, args))
        except trio.WouldBlock:
            pass  # Redis is away or slow: the other nodes' checks read the log and the hash

    def client(self) -> Any:
        import coredis  # only a cluster needs it

        return coredis.Redis.from_url(self.url)

    async def send_queued(self, *, sent: Callable[[str, tuple], None] | None = None) -> None:
        """The queued commands, in order, for ever; ``sent`` hears of each one Redis took."""
        async def send(client: Any) -> None:
            async for command, args in self._receive:
                await getattr(client, command)(*args)
                if sent is not None:
                    sent(command, args)

        await self.with_redis(self.what, send)

    async def with_redis(self, what: str, body: Callable[[Any], Awaitable[None]], *,
                         on_error: Callable[[], None] | None = None) -> None:
        """Run ``body`` on a connected client, for ever: after a failure, reconnect
        with backoff (0.1 s doubling to RECONNECT_MAX)."""
        delay = 0.1
        while True:
            try:
                client = self.client()
                async with client:
                    await client.ping()
                    delay = 0.1
                    await body(client)
            except Exception as e:
                if on_error is not None:
                    on_error()
                log.warning("%s on Redis failed (%s); retrying in %.1f s", what, e, delay)
                await trio.sleep(delay)
                delay = min(RECONNECT_MAX, delay * 2)


async def quietly(task: Callable[[], Awaitable[None]]) -> None:
    """Run a Redis task; once the server is stopping, whatever closing a connection
    mid-read raises on the way out does not matter (SIGTERM must end cleanly)."""
    try:
        await task()
    except BaseException:
        if trio.current_effective_deadline() != -math.inf:
            raise
