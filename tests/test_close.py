"""A client that breaks the protocol learns why: its close code arrives every time,
even while it keeps writing after the bad frame (no reset that would eat the close
frame). Raw sockets against a real server."""

from __future__ import annotations

import pytest
import trio

from attack_helpers import WS, Closed, masked_frame
from conftest import running, token

ROUNDS = 50
AT_ONCE = 10
MAX_MESSAGE = 64 * 1024
# What a misbehaving client goes on sending after its bad frame.
TRAILING = 256 * 1024

BAD_FRAMES = {
    # Declares 2 MiB (over max_message_bytes); the rest of it keeps coming.
    "oversized": (lambda: masked_frame(0x1, b"x" * 1024, declared=2 * 1024 * 1024), 1009),
    "invalid UTF-8": (lambda: masked_frame(0x1, b'{"type":"ping","x":"\xff\xfe"}'), 1007),
    "reserved bit": (lambda: masked_frame(0x1, b'{"type":"ping"}', rsv=0b100), 1002),
}


async def _one_round(port: int, tok: str, frame: bytes, expected: int, codes: list[int]) -> None:
    ws = await WS.connect(port, tok)

    async def keep_writing() -> None:
        chunk = masked_frame(0x1, b"y" * 4096)
        try:
            for _ in range(TRAILING // len(chunk)):
                await ws.stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    try:
        async with trio.open_nursery() as nursery:
            await ws.send_raw(frame)
            nursery.start_soon(keep_writing)
            try:
                while True:
                    await ws.recv(timeout=10)
            except Closed as e:
                codes.append(e.code)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(ws.stream)


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
async def test_a_protocol_error_close_code_survives_a_client_that_keeps_writing(data_dir, kind) -> None:
    make_frame, expected = BAD_FRAMES[kind]
    async with running(data_dir, max_message_bytes=MAX_MESSAGE) as (app, _):
        tok = token()
        codes: list[int] = []
        for _ in range(ROUNDS // AT_ONCE):
            async with trio.open_nursery() as nursery:
                for _ in range(AT_ONCE):
                    nursery.start_soon(_one_round, app.port, tok, make_frame(), expected, codes)
        assert codes == [expected] * ROUNDS, f"{kind}: {sorted(set(codes))}"
        with trio.fail_after(10):  # and every connection ends once its client is gone
            while app.sessions:
                await trio.sleep(0.01)


async def test_a_server_initiated_close_half_closes_and_drains(data_dir) -> None:
    """4008-style closes (here: shutdown's 1001) also reach a client that is still
    writing: the server stops sending after its close frame and reads until the
    client is done."""
    async with running(data_dir) as (app, _):
        ws = await WS.connect(app.port, token())

        async def keep_writing() -> None:
            ping = masked_frame(0x1, b'{"type":"ping"}')
            try:
                for _ in range(2000):
                    await ws.stream.send_all(ping)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing)
            await trio.sleep(0.01)
            for session in list(app.sessions):
                session.close(1001, "server going away: reconnect")
            with pytest.raises(Closed) as closed:
                while True:
                    await ws.recv(timeout=10)
            nursery.cancel_scope.cancel()
        assert closed.value.code == 1001
        # After the close frame the server sent nothing more: a FIN, no reset.
        with trio.fail_after(10):
            assert await ws.stream.receive_some(65536) == b""
        await trio.aclose_forcefully(ws.stream)


# -- in a real browser ------------------------------------------------------------------------

OVERSIZED_FROM_A_PAGE = """
async ([url, size]) => {
  const ws = new WebSocket(url);
  return await new Promise((resolve) => {
    ws.onmessage = (m) => {
      if (JSON.parse(m.data).type === "hello") ws.send(JSON.stringify({type: "ping", pad: "x".repeat(size)}));
    };
    ws.onclose = (e) => resolve({code: e.code, reason: e.reason, clean: e.wasClean});
  });
}
"""


def test_a_too_big_message_from_chromium_reaches_onclose_as_1009(chromium, tmp_path) -> None:
    from attack_helpers import ServerProcess, mint

    server = ServerProcess(tmp_path / "data")
    try:
        tok = mint(tmp_path / "data", "alice", "--project", "p1")
        page = chromium.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        url = f"ws://127.0.0.1:{server.port}/ws?token={tok}"
        for _ in range(5):
            closed = page.evaluate(OVERSIZED_FROM_A_PAGE, [url, 2 * 1024 * 1024])
            # The close frame arrived (a reset would show as 1006, without a reason).
            assert closed["code"] == 1009, closed
            assert "exceeds limit" in closed["reason"]
        assert not errors
        page.close()
    finally:
        server.stop()
