"""Shared pieces of the attack tests (crash, fuzz, security, slow reader).

- ``ServerProcess``: a real ``barosync serve --port 0 --data DIR`` subprocess (optionally
  with a TOML config and extra environment), its port, pid, stderr and RSS.
- ``WS``: a minimal WebSocket client (wsproto on a bare trio stream). It is much cheaper
  than trio-websocket, so hundreds fit in one test process, and a test can stop reading
  or drop the TCP connection (optionally with a RST) without a close frame.
- ``SyncWS``: the same on a blocking socket, for hypothesis tests (sync, one example at
  a time, no event loop to rebuild per example).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

LISTENING = re.compile(r"listening on http://[0-9.]+:(\d+)")
START_TIMEOUT = 30
_ids = itertools.count(1)


def uid(prefix: str = "m") -> str:
    return f"{prefix}{next(_ids)}-{uuid.uuid4().hex[:10]}"


def event_payload(project: str = "p1", **fields: Any) -> dict[str, Any]:
    body = {"projectId": project, "title": "Standup", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}
    body.update(fields)
    return body


def barosync_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "barosync", *args]


def mint(data_dir: Path, user: str, *args: str) -> str:
    """A token from the real CLI: `barosync token create --data DIR --user U ARGS`."""
    result = subprocess.run(
        barosync_cmd("token", "create", "--data", str(data_dir), "--user", user, *(args or ("--all-projects",))),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def read_secret(data_dir: Path) -> str:
    return (data_dir / "secret").read_text().strip()


def write_config(path: Path, **server: Any) -> Path:
    """A TOML config with [server]/[storage]/[heartbeat] keys given as section__key."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in server.items():
        section, _, key = name.partition("__")
        sections.setdefault(section, {})[key] = value
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess:
    """`barosync serve --port 0 --data DIR [--config C] [--log-level L]` as a subprocess."""

    def __init__(self, data_dir: Path, *, config: Path | None = None, log_level: str = "info",
                 env: dict[str, str] | None = None, name: str = "serve", port: int = 0) -> None:
        self.data_dir = data_dir
        args = ["serve", "--port", str(port), "--data", str(data_dir), "--log-level", log_level]
        if config is not None:
            args += ["--config", str(config)]
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path = data_dir.parent / f"{name}-{next(_ids)}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            barosync_cmd(*args), stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, **(env or {})}, cwd=data_dir.parent,
        )
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        match = LISTENING.fullmatch(line.strip())
        if not match:
            self.proc.kill()
            self.proc.wait()
            self._close_files()
            raise AssertionError(f"serve did not start: {line!r} {self.stderr}")
        self.port = int(match.group(1))
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def next_line(self) -> str:
        """The next line the server printed after the listening one (the first run's
        setup link)."""
        return self.proc.stdout.readline().decode().strip()  # type: ignore[union-attr]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._close_files()

    def _close_files(self) -> None:
        self._stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_files()
        return self.proc.returncode

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM, RssAnon, RssFile in KiB from /proc/PID/status."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
        return out

    def health(self, timeout: float = 5) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=timeout) as response:
            assert response.status == 200
            return json.loads(response.read())


async def start_server(data_dir: Path, **kw: Any) -> ServerProcess:
    return await trio.to_thread.run_sync(lambda: ServerProcess(data_dir, **kw))


# -- WebSocket clients ----------------------------------------------------------------------


class Closed(Exception):
    """The connection ended: ``code`` is the server's close code, 1006 without one."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"closed {code} {reason}")


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"handshake rejected with HTTP {status}: {body[:200]!r}")


class _Core:
    """Frame parsing shared by the async and the sync client."""

    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: deque[Any] = deque()
        self._parts: list[Any] = []
        self.accepted = False
        self.reject: tuple[int, bytearray] | None = None
        self.reject_done = False
        self.close: tuple[int, str] | None = None
        self.outgoing = b""

    def request(self, port: int, target: str, headers: list[tuple[str, str]]) -> bytes:
        return self.ws.send(Request(host=f"127.0.0.1:{port}", target=target,
                                    extra_headers=[(k.encode(), v.encode()) for k, v in headers]))

    def feed(self, data: bytes) -> None:
        if not data:
            if self.close is None:
                self.close = (1006, "eof")
            return
        self.ws.receive_data(data)
        for e in self.ws.events():
            if isinstance(e, AcceptConnection):
                self.accepted = True
            elif isinstance(e, RejectConnection):
                self.reject = (e.status_code, bytearray())
                self.reject_done = not e.has_body
            elif isinstance(e, RejectData):
                assert self.reject is not None
                self.reject[1].extend(e.data)
                self.reject_done = e.body_finished
            elif isinstance(e, (TextMessage, BytesMessage)):
                self._parts.append(e.data)
                if e.message_finished:
                    joined = "".join(self._parts) if isinstance(e, TextMessage) else b"".join(self._parts)
                    self._parts.clear()
                    self.messages.append(orjson.loads(joined))
            elif isinstance(e, CloseConnection):
                if self.close is None:
                    self.close = (e.code, e.reason or "")
            elif isinstance(e, Ping):
                self.outgoing += self.ws.send(e.response())


class WS:
    """A minimal async WebSocket client on a bare trio stream."""

    def __init__(self, stream: trio.SocketStream, core: _Core, port: int) -> None:
        self.stream = stream
        self.core = core
        self.port = port
        self.hello: dict[str, Any] | None = None
        self.others: list[dict[str, Any]] = []  # what request() skipped

    @classmethod
    async def connect(cls, port: int, tok: str | None = None, *, headers: list[tuple[str, str]] | None = None,
                      query: str = "", rcvbuf: int | None = None, timeout: float = 10, hello: bool = True) -> "WS":
        if rcvbuf is not None:
            sock = trio.socket.socket()
            # Before connect, so the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        core = _Core()
        params = [p for p in (f"token={tok}" if tok else "", query) if p]
        target = "/ws" + ("?" + "&".join(params) if params else "")
        try:
            with trio.fail_after(timeout):
                try:
                    await stream.send_all(core.request(port, target, headers or []))
                except trio.BrokenResourceError:
                    raise Closed(1006, "reset during handshake") from None
                while not core.accepted:
                    if core.reject is not None and core.reject_done:
                        raise Rejected(core.reject[0], bytes(core.reject[1]))
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        if core.reject is not None:
                            raise Rejected(core.reject[0], bytes(core.reject[1]))
                        raise Closed(1006, "eof during handshake")
                    core.feed(data)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        client = cls(stream, core, port)
        if hello:
            client.hello = await client.recv(timeout)
            assert client.hello["type"] == "hello", client.hello
        return client

    @property
    def close_code(self) -> int | None:
        return self.core.close[0] if self.core.close else None

    async def recv(self, timeout: float | None = 10) -> dict[str, Any]:
        """The next message; raises Closed once the server's close frame or EOF comes."""
        core = self.core
        with trio.fail_after(timeout) if timeout is not None else _nullcontext():
            while not core.messages:
                if core.close is not None:
                    raise Closed(*core.close)
                try:
                    data = await self.stream.receive_some(262144)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                core.feed(data)
                if core.outgoing:
                    out, core.outgoing = core.outgoing, b""
                    await self.send_raw(out)
        return core.messages.popleft()

    async def send(self, type: str, payload: Any = None, *, id: str | None = None, **extra: Any) -> str:
        msg_id = id or uid()
        body: dict[str, Any] = {"type": type, "id": msg_id, **extra}
        if payload is not None:
            body["payload"] = payload
        await self.send_obj(body)
        return msg_id

    async def send_obj(self, body: Any) -> None:
        await self.send_raw(self.core.ws.send(TextMessage(data=orjson.dumps(body).decode())))

    async def send_text(self, text: str) -> None:
        await self.send_raw(self.core.ws.send(TextMessage(data=text)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, type: str, payload: Any = None, timeout: float = 10, **kw: Any) -> dict[str, Any]:
        """Send and return the answer that refers to it (ack, error or conflict)."""
        msg_id = await self.send(type, payload, **kw)
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(None)
                if refers_to(msg, msg_id):
                    return msg
                self.others.append(msg)

    async def recv_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> list[dict[str, Any]]:
        out = []
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv(None)
                out.append(msg)
                if predicate(msg):
                    return out

    async def abort(self, rst: bool = False) -> None:
        """Drop the TCP connection without a close frame (with a RST if ``rst``)."""
        if rst:
            try:
                self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        await trio.aclose_forcefully(self.stream)


def refers_to(msg: dict[str, Any], msg_id: str) -> bool:
    if msg.get("type") == "ack" and msg.get("id") == msg_id:
        return True
    return msg.get("type") in ("error", "conflict:detected") and isinstance(msg.get("payload"), dict) and msg["payload"].get("ref") == msg_id


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class SyncWS:
    """The same client on a blocking socket (for hypothesis examples)."""

    def __init__(self, port: int, tok: str | None, *, timeout: float = 5, headers: list[tuple[str, str]] | None = None) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.core = _Core()
        self.sock.sendall(self.core.request(port, "/ws" + (f"?token={tok}" if tok else ""), headers or []))
        while not self.core.accepted:
            data = self.sock.recv(65536)
            if self.core.reject is not None and (self.core.reject_done or not data):
                raise Rejected(self.core.reject[0], bytes(self.core.reject[1]))
            if not data:
                raise Closed(1006, "eof during handshake")
            self.core.feed(data)
        self.hello = self.recv()

    def recv(self, timeout: float = 5) -> dict[str, Any]:
        core = self.core
        deadline = time.monotonic() + timeout
        while not core.messages:
            if core.close is not None:
                raise Closed(*core.close)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except socket.timeout:
                raise TimeoutError("no message") from None
            except OSError:
                data = b""
            core.feed(data)
        return core.messages.popleft()

    def send_obj(self, body: Any) -> None:
        self.send_raw(self.core.ws.send(TextMessage(data=orjson.dumps(body).decode())))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, body: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        self.send_obj(body)
        while True:
            msg = self.recv(timeout)
            if refers_to(msg, body["id"]):
                return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True, declared: int | None = None,
                 mask: bytes = b"\x01\x02\x03\x04", rsv: int = 0) -> bytes:
    """A client frame built by hand, so a test can lie about its length or content."""
    length = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked
