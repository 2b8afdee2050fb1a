"""The server: one trio nursery, one port for HTTP (h11) and WebSocket.

``serve()`` binds, calls ``task_status.started(app)`` (so tests can bind port 0 and
read ``app.port``), and runs until ``app.stop()``: then it stops accepting, closes
every WebSocket with 1001, lets the writer commit what it has, and returns.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
import orjson
import trio
from websockets.utils import accept_key

from .. import __version__
from ..calendars import caldav
from ..wire import protocol
from . import rest, signin, static
from ..core.app import App
from ..buglog import BugLog
from ..hooks.codecs import DEFAULT_CODEC
from ..config import Config, ConfigError, ensure_secret, private_dir
from .metrics import Metrics
from ..hooks.plugins import call_each
from .poller import ReadPoller
from .deadlines import Deadlines
from .connection import Connection
from ..core.session import Session
from ..engine.writer import StorageError

log = logging.getLogger(__name__)
_bugs = BugLog(log)

MAX_REQUEST_HEAD = 16 * 1024
# How long, and how much, a refused request's unread body is read and dropped before
# the connection closes (_linger).
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024 * 1024
# After SIGTERM, how long connections get to take their 1001 close.
SHUTDOWN_GRACE = 5.0
LOCK_FILE = "serve.lock"
# accept() failing for lack of descriptors or memory: wait this long and accept again
# (what trio.serve_listeners does).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1


class Front:
    """What the HTTP and WebSocket front holds beside the app: the read poller and the
    deadlines' task its connections share, the CalDAV front and the metrics registry
    /metrics serves."""

    def __init__(self, app: App) -> None:
        self.poller = ReadPoller()
        self.deadlines = Deadlines()
        self.caldav = caldav.CalDav(app)
        self.signin = signin.SignIn(app)
        self.metrics = CollectorRegistry()
        self.metrics.register(Metrics(app))


async def serve(config: Config, *, task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:
    config = config.with_overrides(secret=ensure_secret(config))
    # One server per data directory: the single writer and seq order depend on it.
    lock = _lock_data_dir(config)
    try:
        app = App(config)
        front = Front(app)
    except BaseException:
        os.close(lock)
        raise
    try:
        async with trio.open_nursery() as root:
            await root.start(app.run)
            await root.start(front.poller.run)
            await root.start(front.deadlines.run)
            await root.start(front.caldav.rendered.run)
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
            app.port = listeners[0].socket.getsockname()[1]
            app.config = config = config.with_overrides(port=app.port)
            await call_each(app.pm.hook.barosync_startup, config=config)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                not_listening = trio.Event()
                connections.start_soon(_accept, app, front, listeners, connections, accepting, not_listening)
                task_status.started(app)
                await app.wait_stopped()
                # The port is closed before anyone hears 1001: a client that comes
                # straight back is refused, not queued behind a listener about to
                # close (its connection would be reset before the handshake).
                accepting.cancel()
                await not_listening.wait()
                if app.failure is not None:
                    await _close_sessions(app, protocol.CLOSE_INTERNAL_ERROR, "server storage failed: reconnect later")
                else:
                    await _close_sessions(app, protocol.CLOSE_GOING_AWAY, "server going away: reconnect")
                connections.cancel_scope.cancel()
            if app.presence is not None:
                await app.presence.forget()  # this node's users leave the others' rooms now
            await call_each(app.pm.hook.barosync_shutdown, config=config)
            await app.drain()
            root.cancel_scope.cancel()
    finally:
        front.caldav.rendered.close()
        app.close()
        os.close(lock)
    if app.failure is not None:
        raise StorageError(app.failure)


def _lock_data_dir(config: Config) -> int:
    private_dir(config.data_dir)
    fd = os.open(config.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(str(config.data_dir), "[storage] path",
                          f"is in use by another barosync serve (pid {holder}); stop it, or give this one another --data") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


async def _accept(app: App, front: Front, listeners: list[trio.SocketListener], nursery: trio.Nursery,
                  scope: trio.CancelScope, not_listening: trio.Event) -> None:
    try:
        with scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(_accept_from, app, front, listener, nursery)
    finally:
        not_listening.set()  # each listener closed on its way out


async def _accept_from(app: App, front: Front, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
    """trio.serve_listeners' loop, but each connection's task is _serve_connection
    itself (which closes its stream) rather than a wrapper awaiting it: one frame
    less per connection, ten thousand times."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed: %s (%s); retrying in %g s (raise the open-file limit: ulimit -n)",
                          errno.errorcode[e.errno], os.strerror(e.errno), ACCEPT_RETRY)
                await trio.sleep(ACCEPT_RETRY)
            else:
                nursery.start_soon(_serve_connection, app, front, stream)


async def _close_sessions(app: App, code: int, reason: str) -> None:
    for session in list(app.sessions):
        session.close(code, reason)
    await app.wait_disconnected(SHUTDOWN_GRACE)


# -- HTTP -----------------------------------------------------------------------------


def _response(conn: h11.Connection, status: int, body: Any, content_type: bytes = b"application/json",
              extra: list[tuple[bytes, bytes]] | None = None, *, head: bool = False) -> bytes:
    """The whole response; for a HEAD request, the headers of the GET (its length
    included) and no body, as h11 insists."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    # The usual capitals: header names are case-insensitive, but a proxy or test tool
    # that edits responses as text may look for "Content-Type" (python-caldav's does).
    headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(data)).encode()),
               (b"Server", b"barosync/" + __version__.encode())]
    headers += extra or []
    out = conn.send(h11.Response(status_code=status, headers=headers))
    if not head and data:
        out += conn.send(h11.Data(data=data))
    return out + conn.send(h11.EndOfMessage())


def _json_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


async def _read_request(conn: h11.Connection, stream: trio.SocketStream, timeout: float) -> h11.Request | None:
    # The whole request head must arrive within the timeout: a client dribbling it
    # byte by byte (slow-loris) is dropped, however steadily it sends.
    with trio.move_on_after(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                # Never buffer more than one byte past the limit: then a head that is
                # too large cannot complete, and h11 answers it with 431.
                buffered = len(conn.trailing_data[0])
                data = await stream.receive_some(max(1, MAX_REQUEST_HEAD + 1 - buffered))
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None
    return None


async def _serve_connection(app: App, front: Front, stream: trio.SocketStream) -> None:
    """One accepted connection: its HTTP requests, and its WebSocket session if it
    upgrades. While a session is idle this frame, the connection's and trio's wait
    are all its task holds (ten thousand of them: each frame counts)."""
    try:
        session = await _http(app, front, stream)
        if session is None:
            return
        app.connected(session)
        ident = session.identity
        log.info("session=%s user=%s connected", session.id, ident.user_id)
        try:
            await call_each(app.pm.hook.barosync_connect, session_id=session.id, identity=ident)
            await session.run()
        finally:
            app.disconnected(session)
            log.info("session=%s user=%s disconnected code=%s unacked=%d", session.id, ident.user_id,
                     session.close_code, len(session.unacked))
            with trio.CancelScope(shield=True):
                await call_each(app.pm.hook.barosync_disconnect, session_id=session.id, identity=ident,
                                close_code=session.close_code)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    except Exception:
        # One connection's failure must never take the server down with it.
        log.exception("connection handler failed")
    finally:
        await trio.aclose_forcefully(stream)


async def _http(app: App, front: Front, stream: trio.SocketStream) -> Session | None:
    """Answer HTTP requests until the connection closes (None) or upgrades to a
    WebSocket (its session, hello queued)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    while True:
        try:
            request = await _read_request(conn, stream, app.config.handshake_timeout)
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await stream.send_all(_response(conn, e.error_status_hint, _json_error(e.error_status_hint, "bad_request", f"malformed HTTP request: {e}")))
            return None
        if request is None:
            return None
        if request.http_version not in (b"1.0", b"1.1"):
            await stream.send_all(_response(conn, 505, _json_error(
                505, "http_version_not_supported", "this server speaks HTTP/1.1 (and WebSocket over it)")))
            return None
        target = urlsplit(request.target.decode("latin-1"))
        if target.path == "/ws":
            session = await _upgrade(app, front, conn, stream, request, target.query)
            if session is not None:
                return session
        else:
            limit, key = await _body_limit(app, request, target.path)
            try:
                body = await _read_body(conn, stream, limit, app.config.handshake_timeout)
            except h11.RemoteProtocolError as e:
                await stream.send_all(_response(conn, e.error_status_hint, _json_error(
                    e.error_status_hint, "bad_request", f"malformed request body: {e}")))
                return None
            if body is None:
                await stream.send_all(_response(conn, 413, _json_error(
                    413, "too_large", f"request body larger than {limit} bytes ([server] {key})")))
                await _linger(stream)
                return None
            await stream.send_all(await _route(app, front, conn, request, target.path, target.query, body,
                                               _peer(stream)))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return None
        if conn.our_state is h11.SWITCHED_PROTOCOL:
            return None
        conn.start_next_cycle()


async def _body_limit(app: App, request: h11.Request, path: str) -> tuple[int, str]:
    """How large a body this request may send, and the config key that says so: an
    import with a valid token may send a whole calendar export, the rest a message."""
    config = app.config
    if request.method == b"POST" and rest.is_import(path):
        token = _token(_headers(request), "")
        if token and await app.authenticate(token) is not None:
            return config.max_import_bytes, "max_import_bytes"
    return config.max_message_bytes, "max_message_bytes"


async def _linger(stream: trio.SocketStream) -> None:
    """After answering a request whose body we did not read, read the rest for a while
    before closing: closing with unread bytes makes the kernel reset the connection,
    and a client still sending would lose the answer to the reset."""
    try:
        await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            drained = 0
            while drained < LINGER_BYTES and (data := await stream.receive_some(65536)):
                drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_body(conn: h11.Connection, stream: trio.SocketStream, limit: int, timeout: float) -> bytes | None:
    """The request body (h11 insists it is read before the answer), or None when it
    is over ``limit``. Like the head, it must arrive within ``timeout``."""
    body = bytearray()
    with trio.move_on_after(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(MAX_REQUEST_HEAD))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise trio.BrokenResourceError("connection closed mid-request")
    raise trio.BrokenResourceError("request body too slow")


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return "?"


async def _route(app: App, front: Front, conn: h11.Connection, request: h11.Request, path: str, query: str,
                 body: bytes, peer: str) -> bytes:
    """The answer to one HTTP request. A bug in a handler costs that request a 500,
    never the connection without an answer (nor a traceback per request in the log)."""
    try:
        return await _answer(app, front, conn, request, path, query, body, peer)
    except Exception as e:
        _bugs.report(f"{request.method.decode(errors='replace')} {path!r}", e)
        return _response(conn, 500, _json_error(500, protocol.E_INTERNAL, "internal server error: the request was not "
                                                "completed (the server's log says why); try again later"),
                         head=request.method == b"HEAD")


async def _answer(app: App, front: Front, conn: h11.Connection, request: h11.Request, path: str, query: str,
                  body: bytes, peer: str) -> bytes:
    method = request.method
    respond = functools.partial(_response, conn, head=method == b"HEAD")
    if path.startswith(caldav.ROOT) or path in ("/dav", caldav.WELL_KNOWN, caldav.WELL_KNOWN + "/") or (
            path == "/" and method in (b"PROPFIND", b"REPORT", b"OPTIONS")):
        # Some apps (DAVx⁵, GNOME) probe the server's root before the well-known URL.
        status, data, content_type, headers = await front.caldav.handle(method, path, _headers(request), body)
        return respond(status, data, content_type=content_type, extra=headers)
    if path.startswith("/api/"):
        status, answer, headers = await rest.handle(app, method, path, query, _headers(request), body)
        return respond(status, answer, extra=headers)
    if path.startswith("/auth/"):
        status, answer, headers = await front.signin.handle(method, path, _headers(request), body, peer=peer,
                                                            query=query)
        return respond(status, answer, extra=headers)
    if path.startswith("/ics/"):
        status, data, content_type, headers = await rest.feed(app, method, path, query, _headers(request))
        return respond(status, data, content_type=content_type, extra=headers)
    if path == "/healthz":
        if method not in (b"GET", b"HEAD"):
            return respond(405, _json_error(405, "method_not_allowed", "use GET /healthz"), extra=[(b"allow", b"GET, HEAD")])
        health = app.health()
        return respond(200 if health["status"] == "ok" else 503, health)
    if path == "/metrics":
        if method not in (b"GET", b"HEAD"):
            return respond(405, _json_error(405, "method_not_allowed", "use GET /metrics"), extra=[(b"allow", b"GET, HEAD")])
        return respond(200, generate_latest(front.metrics), content_type=CONTENT_TYPE_LATEST.encode())
    if (shipped := static.load(path)) is not None:
        if method not in (b"GET", b"HEAD"):
            return respond(405, _json_error(405, "method_not_allowed", f"use GET {path}"), extra=[(b"allow", b"GET, HEAD")])
        body, content_type, headers = shipped
        if _headers(request).get(b"if-none-match") == headers[0][1]:
            return respond(304, b"", content_type=content_type, extra=headers)
        return respond(200, body, content_type=content_type, extra=headers)
    return respond(404, _json_error(404, "not_found", f"no such resource {path!r}; the WebSocket endpoint is /ws"))


def _headers(request: h11.Request) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in request.headers}


async def _upgrade(app: App, front: Front, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, query: str) -> Session | None:
    headers = _headers(request)
    if request.method != b"GET":
        await stream.send_all(_response(conn, 405, _json_error(405, "method_not_allowed", "/ws takes a GET WebSocket upgrade"), extra=[(b"allow", b"GET")]))
        return None
    key = headers.get(b"sec-websocket-key")
    upgrade = headers.get(b"upgrade", b"").lower()
    if upgrade != b"websocket" or key is None or headers.get(b"sec-websocket-version") != b"13":
        await stream.send_all(_response(conn, 426, _json_error(426, "upgrade_required", "/ws is a WebSocket endpoint (RFC 6455, version 13)"), extra=[(b"upgrade", b"websocket")]))
        return None
    codec_name = (parse_qs(query).get("codec") or [DEFAULT_CODEC])[0]
    codec = app.codecs.get(codec_name)
    if codec is None:
        await stream.send_all(_response(conn, 400, _json_error(400, "unknown_codec", f"unknown codec {codec_name!r} (available: {', '.join(sorted(app.codecs))})")))
        return None
    origin = headers.get(b"origin")
    if app.config.allowed_origins and origin is not None and origin.decode("latin-1") not in app.config.allowed_origins:
        await stream.send_all(_response(conn, 403, _json_error(403, "origin_not_allowed", "this Origin may not open /ws (see [server] allowed_origins)")))
        return None
    token = _token(headers, query)
    identity = await app.authenticate(token) if token else None
    if identity is None:
        message = ("missing token: pass an Authorization: Bearer header, the subprotocol barosync.bearer.TOKEN or "
                   "?token=..." if not token else "token invalid or expired")
        await stream.send_all(_response(conn, 401, _json_error(401, "unauthorized", message), extra=[(b"www-authenticate", b"Bearer")]))
        return None
    if app.connections_of(identity.user_id) >= app.config.max_connections_per_user:
        await stream.send_all(_response(conn, 429, _json_error(
            429, "too_many_connections", f"user has {app.config.max_connections_per_user} connections open already; close one first")))
        return None
    upgraded = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_key(key.decode("latin-1")).encode()),
    ]
    if protocol.SUBPROTOCOL.encode() in _subprotocols(headers):
        # A browser that offered subprotocols fails a handshake that picks none.
        upgraded.append((b"sec-websocket-protocol", protocol.SUBPROTOCOL.encode()))
    response = conn.send(h11.InformationalResponse(status_code=101, headers=upgraded))
    trailing, _closed = conn.trailing_data
    session_id = protocol.next_id()
    connection = Connection(front.poller, front.deadlines, stream, bytes(trailing), codec,
                            max_message_bytes=app.config.max_message_bytes, outbox_limit=app.config.outbox_bytes,
                            heartbeat_timeout=app.config.heartbeat_timeout, expires_at=identity.expires_at)
    session = Session(app, connection, identity, session_id=session_id)
    session.origin = origin.decode("latin-1") if origin is not None else None
    # The 101 must be the first bytes of the connection's outbox, then hello.
    session.send_frame(response)
    config = app.config
    session.send_json(protocol.encode("hello", {
        "sessionId": session.id,
        "codec": codec.name,
        "protocol": protocol.PROTOCOL_VERSION,
        "serverVersion": __version__,
        "user": {"id": identity.user_id, "name": identity.name, "avatar": identity.avatar, "color": identity.color},
        "heartbeat": {"interval": int(config.heartbeat_interval * 1000), "timeout": int(config.heartbeat_timeout * 1000)},
        "maxMessageBytes": config.max_message_bytes,
        # So a client can size its window of messages in flight.
        "rateLimit": {"perSecond": config.rate_limit, "burst": config.rate_burst},
        # Cursors fanned out per user per second: a client need not send more.
        "cursorRate": config.cursor_rate,
        # Acks may be cumulative, {"projectId", "seq"}: one every ~100 ms instead of
        # one per change (docs/protocol.md, "Acks").
        "cumulativeAcks": True,
        # How often this server asks them to (our clients follow it).
        "ackIntervalMs": max(1, round(config.ack_interval * 1000)),
        # Changes when the data directory is replaced: a client whose `since` came
        # from another history must start from a snapshot.
        "dataId": app.queries.history_id,
        "tokenExpiresAt": identity.expires_ms,
    }))
    return session


def _token(headers: dict[bytes, bytes], query: str) -> str | None:
    """The bearer token: an Authorization header, a ``barosync.bearer.TOKEN``
    subprotocol (how a browser sends one without putting it in the URL, which proxies
    and consoles log), or ``?token=``."""
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1") or None
    for offered in _subprotocols(headers):
        if offered.startswith(protocol.BEARER_SUBPROTOCOL.encode()):
            return offered[len(protocol.BEARER_SUBPROTOCOL):].decode("latin-1") or None
    values = parse_qs(query).get("token")
    return values[0] if values else None


def _subprotocols(headers: dict[bytes, bytes]) -> list[bytes]:
    return [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",") if p.strip()]
