"""The WebSocket protocol layer without a socket (session.py): a `Session` is driven
through its handler calls (`on_message`, `on_closing`) over a recording stand-in for
its connection (session.Transport and its Outlet). The core under it is real: an
`App` on LMDB in a temporary directory, its writer and hub running."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import orjson
import pytest
import trio

from barosync.wire import protocol
from barosync.core.app import App
from barosync.hooks.auth import create_token
from barosync.config import Config
from barosync.domain.models import Identity
from barosync.wire.protocol import Outgoing
from barosync.core.session import Session

SECRET = "s" * 32
_ids = itertools.count(1)


class Outlet:
    """A connection's outbox as the session sees it: every message it is given,
    decoded, in order."""

    def __init__(self, app: App) -> None:
        self.codec = app.codecs["json"]
        self.limit = 1 << 20
        self.unacked: dict[str, None] = {}
        self.closing = False
        self.sent: list[dict[str, Any]] = []
        self.settled: list[dict[str, Any]] = []
        self._arrived = trio.Event()

    @property
    def outbox_bytes(self) -> int:
        return 0

    def _got(self, data: bytes) -> None:
        self.sent.append(orjson.loads(data))
        self._arrived.set()
        self._arrived = trio.Event()

    def deliver(self, out: Outgoing, msg_id: str) -> None:
        self.unacked[msg_id] = None
        self._got(out.json)

    def deliver_many(self, items: list[tuple[Outgoing, str]]) -> None:
        for out, msg_id in items:
            self.deliver(out, msg_id)

    def send_out(self, out: Outgoing) -> None:
        self._got(out.json)

    def send_many(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self.send_out(out)

    def send_cursors(self, items: list[tuple[str, Outgoing]], blob: bytes | None = None) -> None:
        for _, out in items:
            self.send_out(out)

    def send_json(self, data: bytes) -> None:
        self._got(data)

    def send_frame(self, frame: bytes) -> None:
        raise AssertionError("a session sends messages, not frames")

    def settle_ack(self, item: dict[str, Any]) -> None:
        self.settled.append(item)

    def track(self, msg_ids: Iterable[str]) -> None:
        self.unacked.update(dict.fromkeys(msg_ids))

    def track_changes(self, project_id: str, first: int, last: int) -> None:
        self.track(f"{project_id}:{seq}" for seq in range(first, last + 1))

    def backlogged(self) -> bool:
        return False

    async def wait_drained(self) -> None:
        await trio.lowlevel.checkpoint()

    def send_catch_up(self, messages: list[bytes]) -> None:
        for data in messages:
            self._got(data)

    async def next(self, *types: str) -> dict[str, Any]:
        """The first message of one of ``types`` not taken yet (they are taken in order)."""
        with trio.fail_after(5):
            while True:
                for i, msg in enumerate(self.sent):
                    if msg["type"] in types:
                        return self.sent.pop(i)
                await self._arrived.wait()


class Transport:
    """A connection as the session holds it: closes are recorded, not sent."""

    def __init__(self, app: App) -> None:
        self.out = Outlet(app)
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_recv = trio.current_time()
        self.expires_at: float | None = None

    def close(self, code: int, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.out.closing = True

    async def run(self, handler: Any) -> None:
        raise AssertionError("these tests call the handler themselves")


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = App(Config(data_dir=tmp_path, secret=SECRET, rate_limit=5, rate_burst=5))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            yield app
            await app.drain()
            nursery.cancel_scope.cancel()
    finally:
        app.store.close()


async def session_for(app: App, user: str = "alice", projects: Any = ("p1",)) -> tuple[Session, Transport]:
    identity = await app.authenticate(create_token(SECRET, user_id=user, projects=projects))
    assert isinstance(identity, Identity)
    transport = Transport(app)
    transport.expires_at = identity.expires_at
    return Session(app, transport, identity, session_id=f"s{next(_ids)}"), transport


async def send(session: Session, type: str, payload: Any = None, **fields: Any) -> str:
    envelope = {"type": type, "id": f"m{next(_ids)}", "payload": payload if payload is not None else {}, **fields}
    data = orjson.dumps(envelope)
    await session.on_message(data, True, [envelope])
    return envelope["id"]


def event(title: str = "Standup") -> dict[str, Any]:
    return {"projectId": "p1", "title": title, "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}


async def test_a_create_is_acked_with_its_seq_and_reaches_another_subscriber(app: App) -> None:
    alice, alice_link = await session_for(app, "alice")
    bob, bob_link = await session_for(app, "bob")
    ref = await send(bob, protocol.SUBSCRIBE, {"projectId": "p1"})
    ack = await bob_link.out.next("ack")
    assert ack["id"] == ref and ack["payload"]["mode"] == "snapshot"
    assert (await bob_link.out.next("sync:snapshot"))["payload"]["events"] == []
    ref = await send(alice, protocol.EVENT_CREATE, event())
    ack = await alice_link.out.next("ack")
    assert ack["id"] == ref and ack["payload"]["seq"] == 1
    change = await bob_link.out.next(protocol.CHANGE_TYPES["create"])
    assert change["seq"] == 1 and change["payload"]["title"] == "Standup"
    assert "p1:1" in bob_link.out.unacked


async def test_acks_go_to_the_outlet_and_nowhere_else(app: App) -> None:
    session, link = await session_for(app)
    await session.on_message(b"", True, [{"type": "ack", "id": "p1:1"}])
    assert link.out.settled == [{"type": "ack", "id": "p1:1"}] and link.out.sent == []


async def test_an_invalid_event_is_an_error_naming_the_field_and_the_session_goes_on(app: App) -> None:
    session, link = await session_for(app)
    ref = await send(session, protocol.EVENT_CREATE, {**event(), "endDate": "2026-01-05T08:00:00Z"})
    error = await link.out.next("error")
    assert error["payload"]["code"] == protocol.E_INVALID and error["payload"]["ref"] == ref
    assert error["payload"]["field"] == "endDate"
    await send(session, protocol.EVENT_CREATE, event())
    assert (await link.out.next("ack"))["payload"]["seq"] == 1
    assert link.close_code is None


async def test_a_project_outside_the_token_is_forbidden(app: App) -> None:
    session, link = await session_for(app, projects=["p1"])
    ref = await send(session, protocol.SUBSCRIBE, {"projectId": "p2"})
    error = await link.out.next("error")
    assert error["payload"]["code"] == protocol.E_FORBIDDEN and error["payload"]["ref"] == ref
    assert session.subscriptions == set()


async def test_over_the_rate_a_message_is_refused_and_a_flood_is_closed_with_1008(app: App) -> None:
    session, link = await session_for(app)
    for _ in range(5):  # the burst
        await send(session, protocol.SUBSCRIBE, {"projectId": "p1"})
    await send(session, protocol.SUBSCRIBE, {"projectId": "p1"})
    assert (await link.out.next("error"))["payload"]["code"] == protocol.E_RATE_LIMITED
    for sent in range(1, 200):  # no time passes: the bucket never refills
        await send(session, protocol.SUBSCRIBE, {"projectId": "p1"})
        if link.close_code is not None:
            break
    assert link.close_code == protocol.CLOSE_POLICY
    assert sent > 5 * 5  # more than a whole window's allowance was refused first (FLOOD_GRACE = 5 s)


async def test_a_text_frame_that_is_not_utf8_closes_with_1007(app: App) -> None:
    session, link = await session_for(app)
    await session.on_message(b"\xff\xfe", True, None)
    assert link.close_code == protocol.CLOSE_INVALID_DATA


async def test_undecodable_bytes_get_an_error_not_a_close(app: App) -> None:
    session, link = await session_for(app)
    await session.on_message(b"{not json", True, None)
    assert (await link.out.next("error"))["payload"]["code"] == protocol.E_BAD_JSON
    assert link.close_code is None


async def test_a_closing_session_leaves_its_rooms_at_once(app: App) -> None:
    alice, _ = await session_for(app, "alice")
    bob, bob_link = await session_for(app, "bob")
    await send(bob, protocol.SUBSCRIBE, {"projectId": "p1"})
    await send(alice, protocol.SUBSCRIBE, {"projectId": "p1"})
    assert (await bob_link.out.next("user:joined"))["payload"]["id"] == "alice"
    alice.on_closing()
    assert (await bob_link.out.next("user:left"))["payload"]["id"] == "alice"
    assert alice.subscriptions == set()


async def test_auth_refresh_moves_the_expiry_and_another_users_token_closes_with_4003(app: App) -> None:
    session, link = await session_for(app)
    fresh = create_token(SECRET, user_id="alice", projects=["p1"], ttl=7 * 86400)
    before = link.expires_at
    ref = await send(session, protocol.AUTH_REFRESH, {"token": fresh})
    ack = await link.out.next("ack")
    assert ack["id"] == ref and ack["payload"]["expiresAt"] == session.identity.expires_ms
    assert before is not None and link.expires_at == session.identity.expires_at > before
    await send(session, protocol.AUTH_REFRESH, {"token": create_token(SECRET, user_id="mallory", projects="*")})
    assert (await link.out.next("error"))["payload"]["code"] == protocol.E_FORBIDDEN
    assert link.close_code == protocol.CLOSE_TOKEN_INVALID


async def test_a_refreshed_token_without_a_project_unsubscribes_from_it(app: App) -> None:
    session, link = await session_for(app, projects=["p1", "p2"])
    await send(session, protocol.SUBSCRIBE, {"projectId": "p1"})
    await send(session, protocol.SUBSCRIBE, {"projectId": "p2"})
    await send(session, protocol.AUTH_REFRESH, {"token": create_token(SECRET, user_id="alice", projects=["p1"])})
    error = await link.out.next("error")
    assert error["payload"]["code"] == protocol.E_FORBIDDEN and "p2" in error["payload"]["message"]
    assert session.subscriptions == {"p1"}
