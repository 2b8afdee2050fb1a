"""Changes between nodes: Redis pub/sub for what may be lost, the PostgreSQL log for
what may not (``[cluster] redis``, with ``[cluster] postgres``).

After a commit a node publishes each change on its project's channel. Every node
hands what it hears to the room's sequencer (sequencer.py), which delivers in seq
order only: a change at ``last + 1`` goes out, one at or below ``last`` is dropped (it
was delivered already), and on a jump the missing seqs are read from the log first.
About once a second, and whenever the bus (re)subscribed, every room is compared with
the log's head. So a message Redis lost, or a node that died between its commit and
its publish, costs a short delay, never a gap.

Cursors are published at most once per tick per project per node and never stored.
Presence is presence.py's; the news that a project's presence changed arrives here
(one subscription for everything) and is handed to it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import orjson
import trio

from .redis_link import RedisLink, channel, quietly, split_channel

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger(__name__)

PATTERN = "barosync:*"


class RedisBus:
    def __init__(self, url: str, *, hub: "Hub", node_id: str,
                 presence_changed: Callable[[str], None] | None = None) -> None:
        self.hub = hub
        self.node_id = node_id
        self._link = RedisLink(url, what="publishing")
        # Another node changed a project's presence (presence.py reconciles it).
        self._presence_changed = presence_changed
        self.published = 0
        self.received = 0
        self.connected = False
        # Test hook: a node that "dies" between commit and publish (docs/cluster.md).
        self.drop_publishes = False

    # -- the event loop's side (never awaits) ---------------------------------------------

    def publish(self, project_id: str, change: bytes) -> None:
        if not self.drop_publishes:
            self._link.queue("publish", channel(project_id), change)

    def cursors(self, project_id: str, messages: list[bytes]) -> None:
        """One tick's cursors of this node's movers (their JSON), for the others."""
        self._link.queue("publish", channel(project_id, "cursors"),
                         self.node_id.encode() + b"|[" + b",".join(messages) + b"]")

    # -- tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(quietly, self._publisher)
            nursery.start_soon(quietly, self._subscriber)
            task_status.started()

    async def _publisher(self) -> None:
        def sent(command: str, args: tuple) -> None:
            if command == "publish" and args[0].endswith(":changes"):
                self.published += 1

        # Redis away: what is not published, the others' checks find in the log.
        await self._link.send_queued(sent=sent)

    async def _subscriber(self) -> None:
        """Other nodes' messages. Nothing here awaits per message: changes go to
        their room's sequencer (which orders them with this node's commits), presence
        news to presence.py's reconciler, so no project waits behind another."""
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
                    project_id, kind = split_channel(message["channel"].decode())
                    if kind == "changes":
                        self.received += 1
                        self.hub.sequencer.remote(project_id, message["data"])
                    elif kind == "presence" and message["data"] != self.node_id.encode():
                        if self._presence_changed is not None:
                            self._presence_changed(project_id)
                    elif kind == "cursors":
                        node, _, data = message["data"].partition(b"|")
                        if node != self.node_id.encode():  # our own came back: delivered already
                            self.hub.remote_cursors(project_id, orjson.loads(data))

        await self._link.with_redis("listening", listen, on_error=lost)
