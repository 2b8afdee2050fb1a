"""The outbox alone (outbox.py): a real socket pair, no server. What is sent goes
straight to the socket while nothing waits; what waits goes out in one write; a
client that does not read is cut at the cap (4008, through its owner); cursors keep
the newest per user ahead of queued changes; acks by id and cumulative."""

from __future__ import annotations

import socket
from typing import Iterator

import orjson
import pytest
import trio
import trio.testing

from barosync.hooks.codecs import JsonCodec
from barosync.transports.outbox import Outbox
from barosync.wire.protocol import Outgoing


class Owner:
    """What a connection does for its outbox; with a nursery, it runs the writer task
    when the outbox asks (only while something waits for the socket)."""

    def __init__(self, nursery: trio.Nursery | None = None) -> None:
        self.too_slow = 0
        self.broken = 0
        self.nursery = nursery
        self.box: Outbox | None = None
        self.writers = 0  # writer tasks started

    def outbox_too_slow(self) -> None:
        self.too_slow += 1

    def outbox_broken(self) -> None:
        self.broken += 1

    def outbox_label(self) -> str:
        return "session=test user=test"

    def outbox_start_writer(self) -> bool:
        if self.nursery is None or self.box is None:
            return False
        self.writers += 1
        self.nursery.start_soon(self.box.drain)
        return True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    # Small buffers, so "the client does not read" is reached with little data.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield ours, theirs
    ours.close()
    theirs.close()


def change(seq: int, size: int = 10) -> Outgoing:
    return Outgoing(orjson.dumps({"type": "event:created", "id": f"p:{seq}", "seq": seq, "payload": {"x": "y" * size}}),
                    project_id="p", seq=seq)


def received(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def outbox(ours: socket.socket, owner: Owner, limit: int = 64 * 1024) -> Outbox:
    owner.box = Outbox(ours.fileno(), JsonCodec(), owner, limit=limit, max_message_bytes=64 * 1024)
    return owner.box


def test_an_idle_outbox_writes_at_once_and_tracks_what_needs_an_ack(pair) -> None:
    ours, theirs = pair
    box = outbox(ours, Owner())
    box.deliver(change(1), "p:1")
    box.deliver_many([(change(2), "p:2"), (change(3), "p:3")])
    data = received(theirs)
    assert data.count(b'"seq":') == 3 and box.idle
    assert list(box.unacked) == ["p:1", "p:2", "p:3"]
    box.settle_ack({"type": "ack", "id": "p:1"})
    box.settle_ack({"type": "ack", "payload": {"projectId": "p", "seq": 3}})  # cumulative
    assert list(box.unacked) == []


def test_a_client_that_does_not_read_is_cut_at_the_cap_through_its_owner(pair) -> None:
    ours, _theirs = pair  # never read
    owner = Owner()
    box = outbox(ours, owner, limit=64 * 1024)
    seq = 0
    while not owner.too_slow and seq < 10_000:
        seq += 1
        box.deliver(change(seq, size=4000), f"p:{seq}")
    assert owner.too_slow == 1 and owner.broken == 0
    assert box.outbox_bytes <= 64 * 1024 + 8192  # what waits was dropped (a half-sent frame may stay)


async def test_what_waits_goes_out_in_order_when_the_socket_drains(pair, nursery: trio.Nursery) -> None:
    ours, theirs = pair
    owner = Owner(nursery)
    box = outbox(ours, owner, limit=1 << 20)
    box.deliver(change(1), "p:1")
    assert owner.writers == 0  # written at once: no writer task for an idle connection
    for seq in range(2, 201):
        box.deliver(change(seq, size=500), f"p:{seq}")
    assert not box.idle and owner.writers == 1  # the socket's buffer is full: the rest waits for the writer
    got = b""
    with trio.fail_after(10):
        while got.count(b'"seq":') < 200:
            await trio.sleep(0.01)
            got += received(theirs)
    seqs = [int(part.split(b",", 1)[0]) for part in got.split(b'"seq":')[1:]]
    assert seqs == list(range(1, 201))


async def test_a_busy_outbox_keeps_the_newest_cursor_per_user_ahead_of_changes(pair, nursery: trio.Nursery) -> None:
    ours, theirs = pair
    owner = Owner()  # the writer waits until the cursors are in
    box = outbox(ours, owner, limit=1 << 20)
    for seq in range(1, 101):
        box.deliver(change(seq, size=500), f"p:{seq}")  # fills the socket: the rest waits
    assert not box.idle
    for x in range(5):
        box.send_cursors([("bob", Outgoing(orjson.dumps({"type": "user:cursor", "payload": {"userId": "bob", "x": x}})))])
    assert box.cursors_waiting == 1
    owner.nursery = nursery
    box.wake()
    got = b""
    with trio.fail_after(10):
        while got.count(b'"seq":') < 100:
            await trio.sleep(0.01)
            got += received(theirs)
    assert got.count(b"user:cursor") == 1 and b'"x":4' in got
    assert got.index(b"user:cursor") < got.rindex(b'"seq":100')  # it overtook queued changes


async def test_closing_stops_sending_but_the_protocols_close_frame_still_goes(pair, nursery: trio.Nursery) -> None:
    ours, theirs = pair
    box = outbox(ours, Owner())
    box.closing = True
    box.deliver(change(1), "p:1")
    box.send_protocol(b"\x88\x02\x03\xe8")  # a close frame, code 1000
    assert received(theirs) == b"\x88\x02\x03\xe8"
    with trio.fail_after(5):
        assert await box.drain() is True  # nothing waits and it is closing: the writer task ends, for good
