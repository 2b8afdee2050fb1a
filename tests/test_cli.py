"""The `barosync` command as a self-hoster runs it: real subprocesses, real ports."""

from __future__ import annotations

import json
import re
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from barosync import __version__

# Generous bounds so that a broken server fails the test instead of hanging it.
START_TIMEOUT = 30
RUN_TIMEOUT = 60
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def barosync(*args: str) -> list[str]:
    return [sys.executable, "-m", "barosync", *args]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(barosync(*args), cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def read_secret(data_dir: Path) -> str:
    return (data_dir / "secret").read_text().strip()


def claims(tok: str, data_dir: Path) -> dict:
    return jwt.decode(tok, read_secret(data_dir), algorithms=["HS256"])


def assert_one_line_no_traceback(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


class Server:
    def __init__(self, process: trio.Process, port: int, line: str, stderr_path: Path) -> None:
        self.process = process
        self.port = port
        self.line = line
        self.stderr_path = stderr_path
        self.early = b""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return await self.wait()

    async def wait(self) -> int:
        with trio.fail_after(RUN_TIMEOUT):
            return await self.process.wait()

    async def rest_of_stdout(self) -> bytes:
        chunks = []
        with trio.fail_after(RUN_TIMEOUT):
            while chunk := await self.process.stdout.receive_some():
                chunks.append(chunk)
        return b"".join(chunks)


@asynccontextmanager
async def serving(cwd: Path, *args: str) -> AsyncIterator[Server]:
    """`barosync serve ARGS` in ``cwd``, once it has printed its listening line.

    Killed if the test leaves it running."""
    stderr_path = cwd / "serve.stderr"
    async with trio.open_nursery() as nursery:
        with stderr_path.open("wb") as stderr:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    barosync("serve", *args), cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, check=False, task_status=task_status
                )
            )
        buffer = b""
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, f"serve exited before listening: {stderr_path.read_text()}"
                buffer += chunk
        line, _, rest = buffer.partition(b"\n")
        # Only the owner's sign-in link (on loopback) may follow the listening line.
        assert rest[:12] == b"open http://"[:len(rest[:12])], rest
        match = LISTENING.fullmatch(line.decode())
        assert match, line
        server = Server(process, int(match.group(1)), line.decode(), stderr_path)
        server.early = rest  # stdout read past the listening line
        try:
            yield server
        finally:
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()


async def mint(cwd: Path, *args: str) -> str:
    result = await trio.run_process(barosync("token", "create", *args), cwd=cwd, capture_stdout=True, capture_stderr=True)
    return result.stdout.decode().strip()


def get_json(url: str) -> tuple[int, str, dict]:
    with urllib.request.urlopen(url, timeout=RUN_TIMEOUT) as response:
        return response.status, response.headers["content-type"], json.loads(response.read())


# -- version and tokens ---------------------------------------------------------------------


def test_version(tmp_path):
    result = run(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"barosync {__version__}"


def test_token_create_prints_a_jwt_signed_with_the_data_dir_secret(tmp_path):
    data = tmp_path / "data"
    result = run(tmp_path, "token", "create", "--data", str(data), "--user", "alice", "--name", "Alice A.", "--project", "p1", "--project", "p2", "--ttl", "600")
    assert result.returncode == 0, result.stderr
    [tok] = result.stdout.splitlines()
    body = claims(tok, data)
    assert body["sub"] == "alice"
    assert body["name"] == "Alice A."
    assert body["projects"] == ["p1", "p2"]
    assert body["exp"] - body["iat"] == 600
    assert stat.S_IMODE((data / "secret").stat().st_mode) == 0o600


def test_token_create_all_projects(tmp_path):
    data = tmp_path / "data"
    result = run(tmp_path, "token", "create", "--data", str(data), "--user", "bob", "--all-projects")
    assert result.returncode == 0, result.stderr
    body = claims(result.stdout.strip(), data)
    assert body["projects"] == "*"
    assert body["sub"] == "bob" and body["name"] == "bob"
    assert body["exp"] > body["iat"]


def test_tokens_minted_twice_share_the_generated_secret(tmp_path):
    first = run(tmp_path, "token", "create", "--user", "alice", "--project", "p1")
    second = run(tmp_path, "token", "create", "--user", "bob", "--project", "p1")
    assert first.returncode == second.returncode == 0
    data = tmp_path / "barosync-data"
    assert claims(first.stdout.strip(), data)["sub"] == "alice"
    assert claims(second.stdout.strip(), data)["sub"] == "bob"


def test_token_create_without_projects_is_a_usage_error(tmp_path):
    result = run(tmp_path, "token", "create", "--user", "alice")
    assert result.returncode == 2
    assert result.stdout == ""
    line = assert_one_line_no_traceback(result.stderr)
    assert "--project" in line and "--all-projects" in line
    assert not (tmp_path / "barosync-data").exists()


def test_token_create_without_user_is_a_usage_error(tmp_path):
    result = run(tmp_path, "token", "create", "--project", "p1")
    assert result.returncode == 2
    assert "--user" in result.stderr and "Traceback" not in result.stderr


def test_token_without_action_is_a_usage_error(tmp_path):
    result = run(tmp_path, "token")
    assert result.returncode == 2
    assert "create" in result.stderr and "Traceback" not in result.stderr


# -- serve ------------------------------------------------------------------------------------


async def test_serve_answers_health_then_closes_clients_with_1001_on_sigterm(tmp_path):
    data = tmp_path / "data"
    async with serving(tmp_path, "--port", "0", "--data", str(data)) as server:
        assert server.line == f"listening on http://127.0.0.1:{server.port}"
        status, content_type, health = await trio.to_thread.run_sync(get_json, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 200
        assert content_type.startswith("application/json")
        assert health["status"] == "ok" and health["version"] == __version__

        tokens = [await mint(tmp_path, "--data", str(data), "--user", user, "--project", "p1") for user in ("alice", "bob")]
        close_codes: dict[str, int] = {}
        subscribed = trio.Semaphore(0)

        async def client(user: str, tok: str) -> None:
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/ws?token={tok}") as ws:
                hello = json.loads(await ws.get_message())
                assert hello["type"] == "hello" and hello["payload"]["user"]["id"] == user
                await ws.send_message(json.dumps({"type": "subscribe", "id": f"sub-{user}", "payload": {"projectId": "p1"}}))
                try:
                    while True:
                        msg = json.loads(await ws.get_message())
                        if msg["type"] == "ack" and msg["id"] == f"sub-{user}":
                            subscribed.release()
                        elif msg.get("id") and msg["type"] not in ("ack", "pong"):
                            await ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))
                except ConnectionClosed as closed:
                    close_codes[user] = closed.reason.code

        with trio.fail_after(RUN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for user, tok in zip(("alice", "bob"), tokens):
                    nursery.start_soon(client, user, tok)
                await subscribed.acquire()
                await subscribed.acquire()
                server.process.send_signal(signal.SIGTERM)
        assert close_codes == {"alice": 1001, "bob": 1001}
        assert await server.wait() == 0
        # After the listening line stdout has the owner's sign-in link and nothing else.
        rest = server.early + await server.rest_of_stdout()
        assert rest.startswith(b"open http://127.0.0.1:") and rest.count(b"\n") == 1, rest
        assert "Traceback" not in server.stderr


async def test_clients_told_to_go_away_find_the_port_closed(tmp_path):
    """On SIGTERM the server stops listening before it tells anyone 1001: a client
    that reconnects the moment it reads its close frame is refused, never queued
    behind a listener that is about to close. (Such a connection is reset before its
    handshake, which trio-websocket, for one, only notices when its connect timeout
    runs out: 60 s by default.)"""
    from barosync.hooks.auth import create_token

    data = tmp_path / "data"
    async with serving(tmp_path, "--port", "0", "--data", str(data), "--log-level", "warning") as server:
        secret = (data / "secret").read_text().strip()
        # Enough connections that telling them all takes a while.
        tokens = [create_token(secret, user_id=f"u{i % 8}", projects=["p1"], ttl=600) for i in range(300)]
        ready = trio.Semaphore(0)
        reconnects: list[str] = []

        async def client(tok: str) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(
                f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some()
            assert buffer.startswith(b"HTTP/1.1 101"), buffer[:100]
            buffer = buffer.split(b"\r\n\r\n", 1)[1]
            ready.release()
            while True:  # the server's frames (unmasked) until its close frame
                while len(buffer) < 2 or len(buffer) < 2 + _payload_length(buffer)[1] + _payload_length(buffer)[0]:
                    chunk = await stream.receive_some()
                    assert chunk, "closed without a close frame"
                    buffer += chunk
                length, header = _payload_length(buffer)
                opcode, buffer = buffer[0] & 0x0F, buffer[2 + header + length:]
                if opcode == 0x8:
                    break
            try:  # as a client would, the moment it reads 1001
                again = await trio.open_tcp_stream("127.0.0.1", server.port)
            except OSError:
                reconnects.append("refused")
            else:
                reconnects.append("connected")
                await again.aclose()
            await stream.aclose()

        with trio.fail_after(RUN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for tok in tokens:
                    nursery.start_soon(client, tok)
                for _ in tokens:
                    await ready.acquire()
                server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
        assert reconnects.count("connected") == 0, f"{reconnects.count('connected')} of {len(tokens)} got in"
        assert len(reconnects) == len(tokens)


def _payload_length(frame: bytes) -> tuple[int, int]:
    """An unmasked frame's payload length and the extra header bytes that gave it."""
    length = frame[1] & 0x7F
    if length == 126:
        return (int.from_bytes(frame[2:4], "big"), 2) if len(frame) >= 4 else (1 << 30, 2)
    if length == 127:
        return (int.from_bytes(frame[2:10], "big"), 8) if len(frame) >= 10 else (1 << 30, 8)
    return length, 0


async def test_serve_exits_0_on_ctrl_c(tmp_path):
    async with serving(tmp_path, "--port", "0", "--data", str(tmp_path / "data")) as server:
        assert await server.stop(signal.SIGINT) == 0
        assert "Traceback" not in server.stderr


async def test_a_second_signal_during_shutdown_does_not_kill_the_server(tmp_path):
    data = tmp_path / "data"
    async with serving(tmp_path, "--port", "0", "--data", str(data)) as server:
        tok = await mint(tmp_path, "--data", str(data), "--user", "alice", "--project", "p1")
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/ws?token={tok}") as ws:
            await ws.get_message()  # hello: the connection is up, so shutdown has work to do
            server.process.send_signal(signal.SIGTERM)
            server.process.send_signal(signal.SIGTERM)  # systemd and the launcher both send one
            server.process.send_signal(signal.SIGINT)
            assert await server.wait() == 0
        assert "Traceback" not in server.stderr


async def test_serve_without_data_creates_barosync_data_in_the_working_directory(tmp_path):
    async with serving(tmp_path, "--port", "0") as server:
        secret = tmp_path / "barosync-data" / "secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        # A token minted next to the running server (README quick start) is accepted.
        tok = await mint(tmp_path, "--user", "alice", "--project", "demo")
        with trio.fail_after(RUN_TIMEOUT):
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/ws?token={tok}") as ws:
                hello = json.loads(await ws.get_message())
        assert hello["type"] == "hello" and hello["payload"]["user"]["id"] == "alice"
        assert await server.stop() == 0
    assert read_secret(tmp_path / "barosync-data")


async def test_serve_uses_the_config_file_with_paths_beside_it(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "barosync.toml").write_text('[server]\nport = 0\n[storage]\npath = "store"\n')
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    async with serving(cwd, "--config", str(etc / "barosync.toml")) as server:
        assert (etc / "store" / "secret").exists()
        assert not (cwd / "barosync-data").exists()
        assert await server.stop() == 0


async def test_serve_accepts_a_copy_of_config_example_toml(tmp_path):
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    (tmp_path / "barosync.toml").write_text(example.read_text())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    async with serving(cwd, "--config", str(tmp_path / "barosync.toml"), "--port", "0") as server:
        assert (tmp_path / "barosync-data" / "secret").exists()
        assert await server.stop() == 0
        assert "Traceback" not in server.stderr


@pytest.mark.parametrize(
    "text, key",
    [
        ('[server]\nport = "8080"\n', "[server] port"),
        ("[server]\nport = 99999\n", "[server] port"),
        ("[server]\nhots = '0.0.0.0'\n", "[server] hots"),
        ("[heartbeat]\ninterval = 60\ntimeout = 30\n", "[heartbeat] timeout"),
        ("[server\nport = 1\n", "line 1"),
    ],
)
def test_serve_with_a_bad_config_prints_one_line_naming_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run(tmp_path, "serve", "--config", str(path))
    assert result.returncode != 0
    assert result.stdout == ""
    line = assert_one_line_no_traceback(result.stderr)
    assert str(path) in line and key in line
    assert not (tmp_path / "barosync-data").exists()


def test_serve_with_a_missing_config_file_prints_one_line(tmp_path):
    path = tmp_path / "missing.toml"
    result = run(tmp_path, "serve", "--config", str(path))
    assert result.returncode != 0
    line = assert_one_line_no_traceback(result.stderr)
    assert str(path) in line and "not found" in line


def test_serve_on_a_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path, "serve", "--port", str(port), "--data", str(tmp_path / "data"))
    assert result.returncode == 1
    assert result.stdout == ""
    line = assert_one_line_no_traceback(result.stderr)
    assert str(port) in line and "in use" in line


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_serve_with_an_impossible_port_is_a_usage_error(tmp_path, port):
    result = run(tmp_path, "serve", "--port", port)
    assert result.returncode == 2
    line = assert_one_line_no_traceback(result.stderr)
    assert "--port" in line


async def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path):
    data = tmp_path / "data"
    async with serving(tmp_path, "--port", "0", "--data", str(data)) as first:
        second = await trio.run_process(
            [sys.executable, "-m", "barosync", "serve", "--port", "0", "--data", str(data)],
            capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path)
        err = second.stderr.decode()
        assert second.returncode == 2
        assert "in use by another barosync serve" in err and f"pid {first.process.pid}" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_serve_prints_the_owners_sign_in_link_on_loopback_only_when_wanted(tmp_path):
    data = tmp_path / "data"
    async with serving(tmp_path, "--port", "0", "--data", str(data)) as server:
        out = server.early
        with trio.fail_after(START_TIMEOUT):
            while not out.endswith(b"\n"):
                out += await server.process.stdout.receive_some()
        link = out.decode().strip()
        # No account yet: the one-time setup link that names the owner.
        assert link.startswith(f"open http://127.0.0.1:{server.port}/#setup=")
        assert await server.stop(signal.SIGTERM) == 0
    made = await trio.run_process(barosync("user", "create", "olive", "--all-projects", "--password-stdin",
                                           "--data", str(data)), stdin=b"a long enough password\n",
                                  capture_stderr=True, check=False)
    assert made.returncode == 0, made.stderr
    # With an account, nothing is printed (a link is a credential, and a service's
    # stdout is kept in its journal); a token link only on request.
    async with serving(tmp_path, "--port", "0", "--data", str(data)) as server:
        assert await server.stop(signal.SIGTERM) == 0
        assert server.early + await server.rest_of_stdout() == b""  # nothing after the listening line
        assert "--sign-in-link" in server.stderr
    async with serving(tmp_path, "--port", "0", "--data", str(data), "--sign-in-link") as server:
        out = server.early
        with trio.fail_after(START_TIMEOUT):
            while not out.endswith(b"\n"):
                out += await server.process.stdout.receive_some()
        link = out.decode().strip()
        assert link.startswith(f"open http://127.0.0.1:{server.port}/#token=")  # with accounts: on request
        me = await trio.to_thread.run_sync(_get_me, server.port, link.split("#token=", 1)[1])
        assert me["user"]["id"] == "owner" and me["projects"] == "*"
        assert await server.stop(signal.SIGTERM) == 0
    async with serving(tmp_path, "--port", "0", "--data", str(data), "--no-browser-link", "--sign-in-link") as server:
        assert await server.stop(signal.SIGTERM) == 0
        assert (server.early + await server.rest_of_stdout()).startswith(b"open http://127.0.0.1:")
    async with serving(tmp_path, "--port", "0", "--data", str(data), "--no-browser-link") as server:
        assert await server.stop(signal.SIGTERM) == 0
        assert server.early + await server.rest_of_stdout() == b""
    done = await trio.run_process(barosync("token", "create", "--data", str(data), "--user", "bob", "--project", "p1",
                                           "--link", "--url", "https://calendar.example.com/"),
                                  capture_stdout=True, check=False)
    assert done.returncode == 0
    assert done.stdout.decode().startswith("https://calendar.example.com/#token=ey")


def _get_me(port: int, token: str) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/me", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())
