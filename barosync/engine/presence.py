"""Presence between nodes, in Redis (``[cluster] redis``): who is present where, apart
from the bus that carries changes and cursors (bus.py), as centrifuge keeps its
PresenceManager apart from its Broker.

Each node writes who is present on it in the project's hash
``barosync:{project}:presence`` (field ``node|user``) and renews its liveness key
``barosync:node:NODE`` (TTL ``NODE_TTL``). A node reconciles a room with that hash when
the room opens, when another node says the hash changed (bus.py hands that on), and
every ``CHECK_INTERVAL``: entries of a node whose liveness key expired (it was killed)
are removed, and its users leave. Each runs in its own task, so a slow Redis read for
one project holds up neither changes nor other projects' presence for long.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
import trio

from .redis_link import QUEUE, RedisLink, channel, quietly

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between comparisons of presence with the Redis hashes
NODE_TTL = 10  # seconds a node's liveness key lives without renewal
RENEW_INTERVAL = 3.0


class RedisPresence:
    def __init__(self, url: str, *, hub: "Hub", node_id: str) -> None:
        self.hub = hub
        self.node_id = node_id
        self._link = RedisLink(url, what="writing presence")
        # project -> users present here, as written to Redis (forget() removes them all)
        self._mine: dict[str, set[str]] = {}
        self._reconcile_send, self._reconcile_receive = trio.open_memory_channel[str](QUEUE)

    # -- the event loop's side (never awaits) ---------------------------------------------

    def present(self, project_id: str, user_id: str, info: dict[str, Any] | None) -> None:
        """This node's presence of a user in a project changed (None: gone)."""
        key, field = channel(project_id, "presence"), f"{self.node_id}|{user_id}"
        mine = self._mine.setdefault(project_id, set())
        if info is None:
            mine.discard(user_id)
            self._link.queue("hdel", key, [field])
        else:
            mine.add(user_id)
            self._link.queue("hset", key, {field: orjson.dumps(info)})
        self._link.queue("publish", channel(project_id, "presence"), self.node_id.encode())

    def room_opened(self, project_id: str) -> None:
        """A first local subscriber: learn who is present elsewhere now, not at the
        next check."""
        self.changed_elsewhere(project_id)

    def changed_elsewhere(self, project_id: str) -> None:
        """Another node said the project's presence changed (bus.py)."""
        if project_id not in self.hub.rooms:
            return
        try:
            self._reconcile_send.send_nowait(project_id)
        except trio.WouldBlock:
            pass  # a full queue: the next round (CHECK_INTERVAL) reconciles it

    # -- tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for task in (self._link.send_queued, self._rounds, self._liveness, self._reconciler):
                nursery.start_soon(quietly, task)
            task_status.started()

    async def _rounds(self) -> None:
        """Every CHECK_INTERVAL: presence against the hashes, on a Redis connection
        kept between rounds."""
        async def rounds(client: Any) -> None:
            while True:
                await trio.sleep(CHECK_INTERVAL)
                for project_id in list(self.hub.rooms):
                    await self._reconcile(client, project_id)

        await self._link.with_redis("the presence check", rounds)

    async def _reconciler(self) -> None:
        """Rooms just opened, and presence news from other nodes: who is present
        elsewhere, at once."""
        async def reconcile(client: Any) -> None:
            async for project_id in self._reconcile_receive:
                await self._reconcile(client, project_id)

        await self._link.with_redis("reading presence", reconcile)

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

        await self._link.with_redis("renewing the liveness key", renew)

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
            client = self._link.client()
            async with client:
                for project_id, users in self._mine.items():
                    # Every user this node ever announced: the leave()s queued at
                    # shutdown may not have reached Redis.
                    await client.hdel(channel(project_id, "presence"), [f"{self.node_id}|{u}" for u in users] or ["-"])
                    await client.publish(channel(project_id, "presence"), self.node_id.encode())
                await client.delete([f"barosync:node:{self.node_id}"])
