"""The client's connection (`Link`): connect, run a session (reader, writer,
heartbeat, acks, token refresh), and when it ends for any reason other than the
application closing the client, back off (full jitter) and connect again. What
arrives goes to its `Receiver` (the replica, sync.py), which sends through the link
as its `Wire`; SyncClient (core.py) holds both.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from typing import Any, Callable, Protocol

import orjson
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection, connect_websocket_url

from .model import (ClientError, ClientGaveUp, ConnectionState, HeartbeatPolicy, ReconnectPolicy, StateChanged,
                    backoff_delay)
from .state import new_id, now_ms, End, Observers, TokenSource, WatchedNursery, AUTH_CLOSE_CODES, AUTH_HTTP_STATUSES, leaves

log = logging.getLogger(__name__)

# How long an applied change may wait for its ack: the acks of everything applied
# meanwhile go out together, one cumulative ack per project (docs/protocol.md, "Acks").
ACK_INTERVAL = 0.1  # seconds, when the server's hello gives no ackIntervalMs
_CHANGES = frozenset({"event:created", "event:updated", "event:deleted"})


class Receiver(Protocol):
    """What the link hands what arrives to (sync.py's `Replica`)."""

    def on_connected(self) -> None:
        """A session is up: say again what the last one was told (subscriptions, queue)."""

    def receive(self, msg: dict[str, Any]) -> None:
        """One server message (not pongs, hello or the link's own acks)."""

    def on_disconnected(self) -> None:
        """The session ended: nothing sent on it will be answered."""

    def give_up(self, error: ClientGaveUp) -> None:
        """The link stopped trying (state ERROR)."""


def _decode(raw: str | bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        log.warning("server sent a frame that is not JSON: %.100r", raw)
        return None


class Link:
    """One server, reached again and again: the client's connection."""

    def __init__(self, url: str, *, token: TokenSource, observers: Observers, reconnect: ReconnectPolicy,
                 heartbeat: HeartbeatPolicy, connect_timeout: float, close_timeout: float,
                 refresh_before_expiry: bool, max_message_size: int, rng: Callable[[], float]) -> None:
        self.url = url
        self._token_source = token
        self._observers = observers
        self.reconnect_policy = reconnect
        self.heartbeat_policy = heartbeat
        self._connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._refresh_before_expiry = refresh_before_expiry
        self._max_message_size = max_message_size
        self._rng = rng
        self._receiver: Receiver | None = None
        self.state = ConnectionState.DISCONNECTED
        self._token: str | None = None
        self.closing = False  # the application is closing the client
        self.aborting = False  # ... on an error: skip the close handshake
        self._nursery: trio.Nursery | None = None
        self._run_scope: trio.CancelScope | None = None
        self.runner_done = trio.Event()
        self._session_scope: trio.CancelScope | None = None
        self._skip_backoff = False
        self._backoff_scope = trio.CancelScope()
        self.gave_up: ClientGaveUp | None = None
        self._ws: WebSocketConnection | None = None
        self._outbox: deque[str] | None = None
        self._outbox_lot = trio.lowlevel.ParkingLot()
        # Changes applied but not acked yet, newest seq per project: sent as one
        # cumulative ack per project every ACK_INTERVAL (when the server offers it).
        self._ack_up_to: dict[str, int] = {}
        self._ack_lot = trio.lowlevel.ParkingLot()
        self.connected = False
        self.hello: dict[str, Any] | None = None
        self._pong = trio.Event()
        self._refresh: tuple[str, str, trio.Event, list[Any]] | None = None
        self._session_nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery, receiver: Receiver) -> None:
        """Start connecting (in ``nursery``), handing what arrives to ``receiver``."""
        self._nursery = nursery
        self._receiver = receiver
        self._start_runner()

    def _start_runner(self) -> None:
        assert self._nursery is not None
        self.gave_up = None
        self._run_scope = trio.CancelScope()
        self.runner_done = trio.Event()
        self._nursery.start_soon(self._run, self._run_scope)

    def reconnect(self) -> None:
        """Drop the current connection (if any) and connect again at once; after the
        link gave up (state ERROR), start trying again."""
        if self.runner_done.is_set():
            self._start_runner()
        elif self._session_scope is not None:
            self._skip_backoff = True
            self._session_scope.cancel()
        else:
            self._backoff_scope.cancel()  # waiting out a backoff delay: try now

    async def _run(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._connect_forever()
        finally:
            self.runner_done.set()

    async def _connect_forever(self) -> None:
        policy = self.reconnect_policy
        attempt = 0
        fresh_token = False
        failed_token: str | None = None
        while not self.closing:
            token = await self._token_for(fresh_token)
            if token is None or (fresh_token and token == failed_token):
                self._give_up("the server refused the token and no fresh token came" if fresh_token
                              else "no token to connect with")
                return
            self._token = token
            self._set_state(ConnectionState.CONNECTING, attempt=attempt)
            end = await self._connect_once(token)
            if self.closing:
                return
            if end.connected:
                attempt = 0
            fresh_token = end.auth
            failed_token = token if end.auth else None
            self._set_state(ConnectionState.DISCONNECTED, close_code=end.code, reason=end.reason)
            if self._skip_backoff:
                self._skip_backoff = False
                continue
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                self._give_up(f"gave up after {attempt} reconnect attempts (last: {end.reason or end.code})")
                return
            delay = backoff_delay(attempt, policy, self._rng)
            attempt += 1
            self._set_state(ConnectionState.RECONNECTING, attempt=attempt, delay=delay, close_code=end.code, reason=end.reason)
            with trio.CancelScope() as self._backoff_scope:
                await trio.sleep(delay)

    def _give_up(self, reason: str) -> None:
        self.gave_up = ClientGaveUp(reason)
        self._set_state(ConnectionState.ERROR, reason=reason)
        assert self._receiver is not None
        self._receiver.give_up(self.gave_up)

    def _set_state(self, state: ConnectionState, *, attempt: int = 0, delay: float | None = None,
                   close_code: int | None = None, reason: str | None = None) -> None:
        previous = self.state
        if previous is state and state is not ConnectionState.RECONNECTING:
            return
        self.state = state
        self._observers.notify(StateChanged(state, previous, attempt, delay, close_code, reason))
        self._observers.changed()

    async def _token_for(self, fresh: bool) -> str | None:
        source = self._token_source
        if isinstance(source, str):
            return None if fresh else source
        if not fresh and self._token is not None:
            return self._token
        try:
            value = source()
            if inspect.isawaitable(value):
                value = await value
        except Exception:
            log.exception("the token callable failed")
            return None
        return value if isinstance(value, str) and value else None

    async def _connect_once(self, token: str) -> End:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    return await self._connect_and_run(nursery, token)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # trio-websocket's own reader task can raise a handshake failure (an HTTP
            # rejection) into the nursery as well as into connect().
            failures, rest = group.split((HandshakeError, ConnectionClosed, OSError))
            if rest is not None or failures is None:
                raise
            rejected = [e for e in leaves(failures) if isinstance(e, ConnectionRejected)]
            if rejected:
                status = rejected[0].status_code
                return End("rejected", code=status, reason=f"HTTP {status}", auth=status in AUTH_HTTP_STATUSES)
            return End("failed", reason=f"{leaves(failures)[0]!r}")

    async def _connect_and_run(self, nursery: trio.Nursery, token: str) -> End:
        ws: WebSocketConnection | None = None
        end: End | None = None
        # trio-websocket (0.12) waits for the opening handshake without noticing that
        # its reader task ended (connection reset or closed before the 101): without
        # this watch, such an attempt would cost the whole connect_timeout.
        handshake = trio.CancelScope()
        watched = WatchedNursery(nursery, handshake.cancel)
        try:
            try:
                with trio.fail_after(self._connect_timeout), handshake:
                    ws = await connect_websocket_url(
                        watched, self.url,  # type: ignore[arg-type]
                        extra_headers=[(b"authorization", b"Bearer " + token.encode())],
                        message_queue_size=256,
                        max_message_size=self._max_message_size,
                        receive_buffer_size=64 * 1024,
                    )
                    hello = _decode(await ws.get_message())
                if handshake.cancelled_caught:
                    end = End("failed", reason="the connection closed during the handshake")
                    return end
            except ConnectionRejected as e:
                body = (e.body or b"")[:200].decode("utf-8", "replace")
                end = End("rejected", code=e.status_code, reason=f"HTTP {e.status_code} {body}".strip(),
                           auth=e.status_code in AUTH_HTTP_STATUSES)
                return end
            except trio.TooSlowError:
                end = End("failed", reason="connect timeout")
                return end
            except ConnectionClosed as e:
                code = int(e.reason.code) if e.reason is not None else None
                end = End("failed", code=code, reason=e.reason.reason if e.reason else "closed", auth=code in AUTH_CLOSE_CODES)
                return end
            except (HandshakeError, OSError) as e:
                end = End("failed", reason=f"{type(e).__name__}: {e.__cause__ or e}")
                return end
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                end = End("failed", reason="the server did not start with hello")
                return end
            end = await self._session(ws, hello)
            return end
        finally:
            if ws is not None:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(self.close_timeout) as cs:
                        if self.aborting or (end is not None and end.kind == "heartbeat"):
                            cs.cancel()  # the peer is gone: close the socket, skip the handshake
                        await ws.aclose(1000, "client closing" if self.closing else "reconnecting")

    async def _session(self, ws: WebSocketConnection, hello: dict[str, Any]) -> End:
        self._ws = ws
        self._outbox = deque()
        self.hello = hello.get("payload") or {}
        self._pong = trio.Event()
        self._ack_up_to.clear()
        self.connected = True
        self._send_ack(hello)
        self._set_state(ConnectionState.CONNECTED)
        assert self._receiver is not None
        self._receiver.on_connected()
        end: End | None = None
        try:
            async with trio.open_nursery() as n:
                self._session_scope = n.cancel_scope
                self._session_nursery = n

                async def read() -> None:
                    nonlocal end
                    end = await self._reader(ws)
                    n.cancel_scope.cancel()

                async def beat() -> None:
                    nonlocal end
                    await self._heartbeat(self.hello or {})
                    end = End("heartbeat", reason="heartbeat: no pong within timeout", connected=True)
                    log.info("heartbeat timeout: treating the connection as dead")
                    n.cancel_scope.cancel()

                n.start_soon(read)
                n.start_soon(beat)
                n.start_soon(self._writer, ws, self._outbox)
                n.start_soon(self._refresh_loop, self.hello or {})
                if (self.hello or {}).get("cumulativeAcks"):
                    n.start_soon(self._acker)
        finally:
            self._session_scope = None
            self._ws = None
            self._outbox = None
            self.connected = False
            self._session_nursery = None
            self._refresh = None
            assert self._receiver is not None
            self._receiver.on_disconnected()
            self._observers.changed()
        return end or End("client", reason="reconnect requested", connected=True)

    async def _reader(self, ws: WebSocketConnection) -> End:
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as e:
                code = int(e.reason.code) if e.reason is not None else None
                return End("closed", code=code, reason=(e.reason.reason if e.reason else None) or str(code),
                            connected=True, auth=code in AUTH_CLOSE_CODES)
            data = _decode(raw)
            for msg in data if isinstance(data, list) else [data]:
                if isinstance(msg, dict):
                    try:
                        self._on_message(msg)
                    except ClientError:
                        raise
                    except (KeyError, TypeError, ValueError, AttributeError):
                        log.exception("could not handle a server message: %.200r", msg)
            self._observers.changed()

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "pong":
            self._pong.set()
        elif kind == "hello":
            payload = msg.get("payload")
            self.hello = payload if isinstance(payload, dict) else {}
        elif kind == "ack" and self._refresh is not None and self._refresh[0] == msg.get("id"):
            payload = msg.get("payload")
            self._refresh[3].append(payload if isinstance(payload, dict) else {})
            self._refresh[2].set()
        else:
            assert self._receiver is not None
            self._receiver.receive(msg)
        self._send_ack(msg)

    async def _writer(self, ws: WebSocketConnection, outbox: deque[str]) -> None:
        while True:
            while not outbox:
                await self._outbox_lot.park()
            text = outbox.popleft()
            try:
                await ws.send_message(text)
            except ConnectionClosed:
                return
            if not outbox:
                self._observers.changed()

    async def _heartbeat(self, hello: dict[str, Any]) -> None:
        """Returns when a ping went unanswered for ``timeout`` seconds."""
        interval = self.heartbeat_policy.interval
        if interval is None:
            hb = hello.get("heartbeat") or {}
            interval = min(hb.get("interval", 30000) / 1000, hb.get("timeout", 60000) / 2000)
        timeout = self.heartbeat_policy.timeout
        while True:
            await trio.sleep(interval)
            self._pong = trio.Event()
            self.send({"type": "ping", "timestamp": now_ms()})
            with trio.move_on_after(timeout):
                await self._pong.wait()
                continue
            return

    async def _refresh_loop(self, hello: dict[str, Any]) -> None:
        """Before the token expires, ask the token callable for a new one and send
        ``auth:refresh``. Without a new token the server closes with 4001 at expiry
        and the reconnect path asks again (and gives up if nothing comes)."""
        if not self._refresh_before_expiry or isinstance(self._token_source, str):
            return
        expires_ms = hello.get("tokenExpiresAt")
        while isinstance(expires_ms, (int, float)):
            remaining = expires_ms / 1000 - time.time()
            # A minute before expiry; a short-lived token at half its remaining life.
            await trio.sleep(max(0.0, remaining - min(60.0, max(0.0, remaining) / 2)))
            token = await self._token_for(fresh=True)
            if not token or token == self._token:
                return
            ref = "auth-" + new_id()
            answer: list[Any] = []
            done = trio.Event()
            self._refresh = (ref, token, done, answer)
            self.send({"type": "auth:refresh", "id": ref, "payload": {"token": token}, "timestamp": now_ms()})
            await done.wait()
            if not answer or not isinstance(answer[0], dict):
                return
            self._token = token
            expires_ms = answer[0].get("expiresAt")
            if isinstance(expires_ms, (int, float)) and expires_ms < 1e11:
                expires_ms *= 1000  # seconds (as an earlier docs/protocol.md said), not ms

    def send(self, obj: dict[str, Any]) -> None:
        if self._outbox is None:
            return
        self._outbox.append(orjson.dumps(obj).decode())
        self._outbox_lot.unpark_all()

    def _send_ack(self, msg: dict[str, Any]) -> None:
        msg_id = msg.get("id")
        if not isinstance(msg_id, str) or msg.get("type") in ("ack", "pong"):
            return
        project_id, seq = msg.get("projectId"), msg.get("seq")
        if (msg.get("type") in _CHANGES and isinstance(project_id, str) and type(seq) is int
                and (self.hello or {}).get("cumulativeAcks")):
            if seq > self._ack_up_to.get(project_id, -1):
                self._ack_up_to[project_id] = seq
                self._ack_lot.unpark_all()
            return
        self.send({"type": "ack", "id": msg_id})

    async def _acker(self) -> None:
        """Acks applied changes at the cadence the server's hello asks for
        (``ackIntervalMs``; ACK_INTERVAL without one): one message per project
        instead of one per change."""
        while True:
            while not self._ack_up_to:
                await self._ack_lot.park()
            await trio.sleep(self.ack_interval)
            self.flush_acks()

    @property
    def ack_interval(self) -> float:
        """Seconds between cumulative acks: the server's ``ackIntervalMs``, kept
        between 10 ms and 10 s."""
        ms = (self.hello or {}).get("ackIntervalMs")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms == ms:
            return min(10.0, max(0.01, ms / 1000))
        return ACK_INTERVAL

    def flush_acks(self) -> None:
        for project_id, seq in self._ack_up_to.items():
            self.send({"type": "ack", "payload": {"projectId": project_id, "seq": seq}})
        self._ack_up_to.clear()

    # -- what the replica sends through (sync.Wire) ------------------------------------

    @property
    def max_message_bytes(self) -> int | None:
        limit = (self.hello or {}).get("maxMessageBytes")
        return limit if isinstance(limit, int) else None

    def send_text(self, text: str) -> None:
        if self._outbox is None:
            return
        self._outbox.append(text)
        self._outbox_lot.unpark_all()

    def at(self, deadline: float, fn: Callable[[], None]) -> None:
        if self._session_nursery is None:
            return

        async def call() -> None:
            await trio.sleep_until(deadline)
            fn()

        # The session's nursery: when the session ends, so does the call.
        self._session_nursery.start_soon(call)

    # -- what the client asks of its link (core.py) --------------------------------------

    def outbox_empty(self) -> bool:
        return not self._outbox

    def end_session(self) -> None:
        """Close the current session (1000) and stop: the client is closing."""
        if self._session_scope is not None:
            self._session_scope.cancel()

    def stop(self) -> None:
        if self._run_scope is not None:
            self._run_scope.cancel()

    def closed(self) -> None:
        """The client closed: the state says so once more."""
        self._set_state(ConnectionState.DISCONNECTED, reason="client closed")

    @property
    def in_session(self) -> bool:
        return self._session_scope is not None
