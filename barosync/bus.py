"""Changes between nodes: Redis pub/sub for what may be lost, the PostgreSQL log for
what may not (``[cluster] redis``, with ``[cluster] postgres``).

After a commit a node publishes each change on its project's channel. Every node
hands what it hears to the room's sequencer (sequencer.py), which delivers in seq
order only: a change at ``last + 1`` goes out, one at or below ``last`` is dropped (it
was delivered already), and on a jump the missing seqs are read from the log first.
About once a second, and whenever the bus (re)subscribed, every room is compared with
the log's head. So a message Redis lost, or a node that died between its commit and
its publish, costs a short delay, never a gap.

Presence is kept in Redis too: each node writes who is present on it in the project's
hash ``barosync:{project}:presence`` (field ``node|user``) and renews its liveness key
``barosync:node:NODE`` (TTL ``NODE_TTL``). A node reconciles a room with that hash
whenever another node says it changed, and every ``CHECK_INTERVAL``: entries of a node
whose liveness key expired (it was killed) are removed, and its users leave. Cursors
are published at most once per tick per project per node and never stored.

Key and channel names carry the project as a Redis Cluster hash tag,
``barosync:{project}:…``, so sharded pub/sub can come later.
"""

from __future__ import annotations

import logging
import math
import socket
import uuid
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
import trio


if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between comparisons of presence with the Redis hashes
RECONNECT_MAX = 5.0  # seconds between attempts to reach Redis, at most
PUBLISH_QUEUE = 100_000  # commands waiting for Redis before new ones are dropped (the checks cover them)
NODE_TTL = 10  # seconds a node's liveness key lives without renewal
RENEW_INTERVAL = 3.0
PATTERN = "barosync:*"


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


def _split(name: str) -> tuple[str, str]:
    """barosync:{project}:kind -> (project, kind)"""
    head, _, kind = name.rpartition(":")
    return head[len("barosync:{"):-1], kind


class RedisBus:
    def __init__(self, url: str, *, hub: "Hub") -> None:
        self.url = url
        self.hub = hub
        self._send, self._receive = trio.open_memory_channel[tuple[str, tuple]](PUBLISH_QUEUE)
        self.node_id = uuid.uuid4().hex[:12]
        # project -> users present here, as written to Redis (forget() removes them all)
        self._mine: dict[str, set[str]] = {}
        self._reconcile_send, self._reconcile_receive = trio.open_memory_channel[str](PUBLISH_QUEUE)
        self.published = 0
        self.received = 0
        self.connected = False
        # Test hook: a node that "dies" between commit and publish (docs/cluster.md).
        self.drop_publishes = False

    # -- the event loop's side (never awaits) ---------------------------------------------

    def _queue(self, command: str, *args: Any) -> None:
        try:
            self._send.send_nowait((command, args))
        except trio.WouldBlock:
            pass  # Redis is away or slow: the other nodes' checks read the log and the hash

    def publish(self, project_id: str, change: bytes) -> None:
        if not self.drop_publishes:
            self._queue("publish", channel(project_id), change)

    def present(self, project_id: str, user_id: str, info: dict[str, Any] | None) -> None:
        """This node's presence of a user in a project changed (None: gone)."""
        key, field = channel(project_id, "presence"), f"{self.node_id}|{user_id}"
        mine = self._mine.setdefault(project_id, set())
        if info is None:
            mine.discard(user_id)
            self._queue("hdel", key, [field])
        else:
            mine.add(user_id)
            self._queue("hset", key, {field: orjson.dumps(info)})
        self._queue("publish", channel(project_id, "presence"), self.node_id.encode())

    def cursors(self, project_id: str, messages: list[bytes]) -> None:
        """One tick's cursors of this node's movers (their JSON), for the others."""
        self._queue("publish", channel(project_id, "cursors"),
                    self.node_id.encode() + b"|[" + b",".join(messages) + b"]")

    def room_opened(self, project_id: str) -> None:
        """A first local subscriber: learn who is present elsewhere now, not at the
        next check."""
        self._reconcile_soon(project_id)

    def _reconcile_soon(self, project_id: str) -> None:
        try:
            self._reconcile_send.send_nowait(project_id)
        except trio.WouldBlock:
            pass  # a full queue: the next round (CHECK_INTERVAL) reconciles it

    # -- tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for task in (self._publisher, self._subscriber, self._presence_rounds, self._liveness, self._reconciler):
                nursery.start_soon(self._quietly, task)
            task_status.started()

    async def _quietly(self, task: Any) -> None:
        try:
            await task()
        except BaseException:
            if trio.current_effective_deadline() != -math.inf:
                raise
            # Cancelled: the server is stopping. Closing a Redis connection mid-read
            # may raise on the way out; nothing of it matters now, and SIGTERM must
            # still end in a clean exit.

    def _client(self) -> Any:
        import coredis  # only a cluster needs it

        return coredis.Redis.from_url(self.url)

    async def _with_redis(self, what: str, body: "Callable[[Any], Awaitable[None]]", *,
                          on_error: "Callable[[], None] | None" = None) -> None:
        """Run ``body`` on a connected client, for ever: after a failure, reconnect
        with backoff (0.1 s doubling to RECONNECT_MAX). Every Redis task uses this."""
        delay = 0.1
        while True:
            try:
                client = self._client()
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

    async def _publisher(self) -> None:
        async def publish(client: Any) -> None:
            async for command, args in self._receive:
                await getattr(client, command)(*args)
                if command == "publish" and args[0].endswith(":changes"):
                    self.published += 1

        # Redis away: what is not published, the others' checks find in the log.
        await self._with_redis("publishing", publish)

    async def _subscriber(self) -> None:
        """Other nodes' messages. Nothing here awaits per message: changes go to
        their room's sequencer (which orders them with this node's commits), presence
        news to the reconciler's queue, so no project waits behind another."""
        def lost() -> None:
            self.connected = False

        async def listen(client: Any) -> None:
            async with client.pubsub(patterns=[PATTERN]) as pubsub:
                self.connected = True
                log.info("listening for other nodes' changes on Redis")
                # (Re)subscribed: whatever passed meanwhile comes from the log.
                self.hub.sequencer.check_all()
                async for message in pubsub:
                    if not message or message.get("type") != "pmessage":
                        continue
                    project_id, kind = _split(message["channel"].decode())
                    if kind == "changes":
                        self.received += 1
                        self.hub.sequencer.remote(project_id, message["data"])
                    elif kind == "presence" and message["data"] != self.node_id.encode():
                        if project_id in self.hub.rooms:
                            self._reconcile_soon(project_id)  # by the reconciler's task
                    elif kind == "cursors":
                        node, _, data = message["data"].partition(b"|")
                        if node != self.node_id.encode():  # our own came back: delivered already
                            self.hub.remote_cursors(project_id, orjson.loads(data))

        await self._with_redis("listening", listen, on_error=lost)

    async def _presence_rounds(self) -> None:
        """Every CHECK_INTERVAL: presence against the hashes, on a Redis connection
        kept between rounds."""
        async def rounds(client: Any) -> None:
            while True:
                await trio.sleep(CHECK_INTERVAL)
                for project_id in list(self.hub.rooms):
                    await self._reconcile(client, project_id)

        await self._with_redis("the presence check", rounds)

    async def _reconciler(self) -> None:
        """Rooms just opened, and presence news from other nodes: who is present
        elsewhere, at once."""
        async def reconcile(client: Any) -> None:
            async for project_id in self._reconcile_receive:
                await self._reconcile(client, project_id)

        await self._with_redis("reading presence", reconcile)

    async def _liveness(self) -> None:
        """This node's liveness key, renewed; its presence entries are rewritten after
        Redis came back empty."""
        async def renew(client: Any) -> None:
            while True:
                fresh = await client.set(f"barosync:node:{self.node_id}", b"1", ex=NODE_TTL, get=True)
                if fresh is None:  # new, or Redis lost it: say again who is here
                    for room in list(self.hub.rooms.values()):
                        for presence in room.users.values():
                            self.present(room.project_id, presence.user_id, presence.info)
                await trio.sleep(RENEW_INTERVAL)

        await self._with_redis("renewing the liveness key", renew)

    async def _reconcile(self, client: Any, project_id: str) -> None:
        """Other nodes' users present in a project, from its hash; entries of nodes
        whose liveness key is gone are removed (and their users leave)."""
        entries = await client.hgetall(channel(project_id, "presence"))
        others: dict[str, dict[str, Any]] = {}
        nodes: dict[str, bool] = {}
        dead = []
        for field, value in entries.items():
            node, _, user = field.decode().partition("|")
            if node == self.node_id:
                continue
            if node not in nodes:
                nodes[node] = bool(await client.exists([f"barosync:node:{node}"]))
            if not nodes[node]:
                dead.append(field)
                continue
            others.setdefault(user, orjson.loads(value))
        if dead:
            await client.hdel(channel(project_id, "presence"), dead)
        self.hub.remote_presence(project_id, others)

    async def forget(self) -> None:
        """At shutdown: this node's presence entries and liveness key go at once."""
        with trio.move_on_after(2):
            client = self._client()
            async with client:
                for project_id, users in self._mine.items():
                    # Every user this node ever announced: the leave()s queued at
                    # shutdown may not have reached Redis.
                    await client.hdel(channel(project_id, "presence"), [f"{self.node_id}|{u}" for u in users] or ["-"])
                    await client.publish(channel(project_id, "presence"), self.node_id.encode())
                await client.delete([f"barosync:node:{self.node_id}"])
