"""A fault-injecting TCP proxy written with trio, for putting between a client and a
server in tests.

    proxy = await nursery.start(FaultProxy.run, upstream_port)
    proxy.port           # where clients connect
    proxy.refuse()       # stop listening: new connections are refused (existing ones live on)
    proxy.drop_all()     # every current connection is reset (RST), abruptly
    proxy.stall()        # silently stop forwarding, both ways (connections stay open)
    proxy.stall("down")  # only server -> client stops (requests arrive, answers do not)
    proxy.heal()         # forward and accept again; held bytes flow on
    proxy.upstream_port = new_port   # follow a restarted server

With ``record=True`` every connection keeps the bytes it carried each way, and
:func:`transcript` decodes them into the WebSocket messages of both sides.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import attrs
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer or a dropped network."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


@attrs.define(eq=False)
class ProxiedConnection:
    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    up_bytes: bytearray = attrs.field(factory=bytearray)  # client -> server
    down_bytes: bytearray = attrs.field(factory=bytearray)  # server -> client


class FaultProxy:
    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1", record: bool = False) -> None:
        self.host = host
        self.upstream_port = upstream_port
        self.record = record
        self.port = 0
        self.refusing = False
        self._stalled: set[str] = set()  # "up", "down"
        self._flow = trio.Event()
        self._flow.set()
        self.connections: list[ProxiedConnection] = []  # every connection ever made
        self.live: set[ProxiedConnection] = set()
        self.accepted = 0
        self._nursery: trio.Nursery
        self._accepting = trio.CancelScope()

    @classmethod
    async def run(cls, upstream_port: int, *, record: bool = False,
                  task_status: trio.TaskStatus["FaultProxy"] = trio.TASK_STATUS_IGNORED) -> None:
        proxy = cls(upstream_port, record=record)
        async with trio.open_nursery() as nursery:
            proxy._nursery = nursery
            proxy._listen()
            task_status.started(proxy)
            await trio.sleep_forever()

    def _listen(self) -> None:
        """Bind (the same port again after refuse()) and accept in the background."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listening = trio.socket.from_stdlib_socket(sock)
        listener = trio.SocketListener(self._listening)
        self._accepting = trio.CancelScope()
        self._nursery.start_soon(self._accept, listener, self._accepting)

    async def _accept(self, listener: trio.SocketListener, scope: trio.CancelScope) -> None:
        with scope:
            try:
                async with listener:
                    while True:
                        stream = await listener.accept()
                        self._nursery.start_soon(self._handle, stream)
            except (trio.ClosedResourceError, OSError):
                pass

    # -- faults --------------------------------------------------------------------

    def refuse(self) -> None:
        """Stop listening: connection attempts are refused by the kernel (RST to SYN)."""
        if not self.refusing:
            self.refusing = True
            self._accepting.cancel()
            self._listening.close()  # now, so that heal() can bind the port again at once

    def drop_all(self) -> None:
        for conn in list(self.live):
            self._drop(conn)

    def stall(self, direction: str = "both") -> None:
        self._stalled = {"up", "down"} if direction == "both" else {direction}
        if self._flow.is_set():  # already stalled: pumps wait on the current event
            self._flow = trio.Event()

    def heal(self) -> None:
        if self.refusing:
            self.refusing = False
            self._listen()
        self._stalled = set()
        self._flow.set()

    def down(self) -> None:
        """The network is gone: refuse new connections and drop the current ones."""
        self.refuse()
        self.drop_all()

    # -- forwarding ------------------------------------------------------------------

    def _drop(self, conn: ProxiedConnection) -> None:
        self.live.discard(conn)
        conn.scope.cancel()
        _reset(conn.client)
        if conn.upstream is not None:
            _reset(conn.upstream)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        conn = ProxiedConnection(client)
        self.connections.append(conn)
        self.live.add(conn)
        try:
            with conn.scope:
                try:
                    conn.upstream = await trio.open_tcp_stream(self.host, self.upstream_port)
                except OSError:
                    _reset(client)
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn, client, conn.upstream, "up", nursery)
                    nursery.start_soon(self._pump, conn, conn.upstream, client, "down", nursery)
        finally:
            if conn in self.live:
                self.live.discard(conn)
                for stream in (client, conn.upstream):
                    if stream is not None:
                        with trio.CancelScope(shield=True):
                            await trio.aclose_forcefully(stream)

    async def _pump(self, conn: ProxiedConnection, src: trio.SocketStream, dst: trio.SocketStream,
                    direction: str, nursery: trio.Nursery) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                while direction in self._stalled:
                    await self._flow.wait()
                if not data:
                    # Half-close: pass the EOF on, the other direction keeps going.
                    try:
                        await dst.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        nursery.cancel_scope.cancel()
                    return
                if self.record:
                    (conn.up_bytes if direction == "up" else conn.down_bytes).extend(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            nursery.cancel_scope.cancel()


# -- decoding a recorded connection ----------------------------------------------------


def _messages(data: bytes, *, from_client: bool) -> list[Any]:
    head, sep, rest = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return []
    # A client's frames are masked: decode them as the server does, and vice versa.
    proto = FrameProtocol(client=not from_client, extensions=[])
    proto.receive_bytes(rest)
    out: list[Any] = []
    parts: list[str] = []
    try:
        for frame in proto.received_frames():
            if frame.opcode in (Opcode.TEXT, Opcode.CONTINUATION) and isinstance(frame.payload, str):
                parts.append(frame.payload)
                if frame.message_finished:
                    out.append(json.loads("".join(parts)))
                    parts = []
            elif frame.opcode is Opcode.CLOSE:
                out.append({"__close__": frame.payload})
    except Exception:  # a connection cut in the middle of a frame
        pass
    return out


def transcript(conn: ProxiedConnection) -> tuple[list[Any], list[Any]]:
    """(messages the client sent, messages the server sent) on one recorded connection."""
    return _messages(conn.up_bytes, from_client=True), _messages(conn.down_bytes, from_client=False)
