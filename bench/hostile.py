"""100,000 hostile frames at a real `barosync serve`: 0 crashes, RSS bounded, still
serving afterwards.

    python bench/hostile.py [--frames 100000] [--conns 20] [--json PATH]

Raw WebSocket clients (trio, one task each) send a mix of what a broken or malicious
client sends: text that is not JSON, JSON that is not an envelope, unknown types, bad
ids, bad payloads (wrong types, impossible dates, other users' projects, unknown
events), malformed cumulative acks, deep nesting, binary garbage, pings and unsolicited
pongs, and — one frame in fifty — frames that must close the connection (too big:
1009, invalid UTF-8: 1007, reserved bits, a stray continuation, an unmasked frame, a
long control frame: 1002, a forged auth:refresh: 4001); a closed client reconnects. The server's RSS is sampled
every half second. At the end a well-behaved client must still subscribe, create and
see its change. Run by `bench/run.py --scenarios hostile` too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from storm import CONFIG, Server  # noqa: E402


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [hostile] {msg}", file=sys.stderr, flush=True)

BATCH = 25  # frames per write


def frame(payload: bytes, opcode: int = 1, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A client frame; masked with the all-zero key (payload unchanged)."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    mask = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", b0, mask | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mask | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mask | 127, n)
    return head + (b"\0\0\0\0" if masked else b"") + payload


def env(obj: object) -> bytes:
    return frame(json.dumps(obj).encode())


# Frames the connection survives (an `error` envelope, or nothing).
SURVIVABLE = [
    lambda: frame(b'{"type":'),
    lambda: frame(b"\x00\x01\x02 not json"),
    lambda: frame(b"[1, 2, 3]"),
    lambda: frame(b"null"),
    lambda: frame(b'"just a string"'),
    lambda: frame(b"1e999"),
    lambda: frame(b"[" * 3000 + b"]" * 3000),  # deep nesting
    lambda: env({"type": "hack", "id": "x1"}),
    lambda: env({"type": 42}),
    lambda: env({"type": "subscribe"}),  # no id
    lambda: env({"type": "subscribe", "id": "i" * 300, "payload": {"projectId": "p"}}),
    lambda: env({"type": "subscribe", "id": "a\u0000b", "payload": {"projectId": "p"}}),
    lambda: env({"type": "subscribe", "id": "s", "payload": {"projectId": "someone-elses"}}),
    lambda: env({"type": "subscribe", "id": "s", "payload": {"projectId": "p", "since": -5}}),
    lambda: env({"type": "event:create", "id": os.urandom(6).hex(), "payload": []}),
    lambda: env({"type": "event:create", "id": os.urandom(6).hex(), "payload": {"projectId": "p", "title": 7}}),
    lambda: env({"type": "event:create", "id": os.urandom(6).hex(), "payload": {
        "projectId": "p", "title": "x", "startDate": "2026-13-45T99:00:00Z", "endDate": "yesterday"}}),
    lambda: env({"type": "event:create", "id": os.urandom(6).hex(), "payload": {
        "projectId": "p", "title": "x", "startDate": "2026-01-02T10:00:00Z", "endDate": "2026-01-01T10:00:00Z"}}),
    lambda: env({"type": "event:create", "id": os.urandom(6).hex(), "payload": {
        "projectId": "not-mine", "title": "x", "startDate": "2026-01-01T10:00:00Z", "endDate": "2026-01-01T11:00:00Z"}}),
    lambda: env({"type": "event:update", "id": os.urandom(6).hex(), "payload": {"id": "nope", "version": 1, "title": "y"}}),
    lambda: env({"type": "event:delete", "id": os.urandom(6).hex(), "payload": {"id": "nope", "version": "one"}}),
    lambda: env({"type": "user:cursor", "payload": {"projectId": "p", "x": "NaN", "y": 1}}),
    lambda: env({"type": "user:cursor", "payload": {"projectId": "p", "x": 1, "y": 2, "elementId": "e" * 5000}}),
    lambda: env({"type": "ack", "payload": {"projectId": 1, "seq": "x"}}),
    lambda: env({"type": "ack", "id": "never-sent"}),
    lambda: frame(os.urandom(64), opcode=2),  # binary garbage
    lambda: frame(os.urandom(100), opcode=9),  # ping: answered with a pong
    lambda: frame(b"unsolicited", opcode=10),  # pong
    lambda: frame(b'{"type":"pi', fin=False) + frame(b'ng"}', opcode=0),  # fragmented, fine
]
# Frames after which the server must close the connection.
FATAL = [
    (1009, lambda: frame(b"x" * 70_000)),
    (1007, lambda: frame(b'{"type":"ping","x":"\xff\xfe"}')),
    (1002, lambda: frame(b'{"type":"ping"}', rsv=0x40)),
    (1002, lambda: frame(b"stray", opcode=0)),
    (1002, lambda: frame(b'{"type":"ping"}', masked=False)),
    (1002, lambda: frame(b"p" * 200, opcode=9)),
    (4001, lambda: env({"type": "auth:refresh", "id": "r", "payload": {"token": "forged"}})),
]


async def one_client(port: int, token: str, budget: list[int], stats: dict) -> None:
    rng = random.Random()
    while budget[0] > 0:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.1)
            continue
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        await stream.send_all((f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        closed = trio.Event()

        async def reader() -> None:
            buf = b""
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    stats["bytes_in"] += len(data)
                    buf = (buf + data)[-64:]
                    stats["error_answers"] += data.count(b'"type":"error"')
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            closed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            fatal = False
            try:
                while budget[0] > 0 and not closed.is_set() and not fatal:
                    batch = []
                    for _ in range(BATCH):
                        if rng.random() < 0.02:
                            code, make = rng.choice(FATAL)
                            batch.append(make())
                            stats["fatal_sent"][code] = stats["fatal_sent"].get(code, 0) + 1
                            budget[0] -= 1
                            stats["frames"] += 1
                            fatal = True
                            break
                        batch.append(rng.choice(SURVIVABLE)())
                        budget[0] -= 1
                        stats["frames"] += 1
                    await stream.send_all(b"".join(batch))
                    await trio.sleep(0)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(2 if fatal else 0.5):
                await closed.wait()  # the server's close (or its answers to the last batch)
            nursery.cancel_scope.cancel()
        stats["connections"] += 1
        await stream.aclose()


async def attack(port: int, token: str, frames: int, conns: int, server: Server) -> dict:
    stats: dict = {"frames": 0, "error_answers": 0, "bytes_in": 0, "connections": 0, "fatal_sent": {}, "rss_kb": []}
    budget = [frames]

    async def sample() -> None:
        while True:
            stats["rss_kb"].append(server.rss_kb())
            await trio.sleep(0.5)

    t0 = time.monotonic()
    async with trio.open_nursery() as outer:
        outer.start_soon(sample)
        async with trio.open_nursery() as nursery:
            for _ in range(conns):
                nursery.start_soon(one_client, port, token, budget, stats)
        outer.cancel_scope.cancel()
    stats["seconds"] = time.monotonic() - t0
    return stats


def well_behaved(port: int, token: str) -> bool:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=10) as ws:
        ws.recv(timeout=10)  # hello
        ws.send(json.dumps({"type": "subscribe", "id": "s", "payload": {"projectId": "p"}}))
        ws.send(json.dumps({"type": "event:create", "id": "c1", "payload": {
            "projectId": "p", "title": "still here", "startDate": "2026-01-01T10:00:00Z", "endDate": "2026-01-01T11:00:00Z"}}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv(timeout=10))
            if msg["type"] == "ack" and msg["id"] == "c1":
                return msg["payload"]["event"]["title"] == "still here"
    return False


def run(frames: int, conns: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="barosync-hostile-"))
    config = tmp / "hostile.toml"
    config.write_text(CONFIG)
    server = Server(tmp / "data", config)
    try:
        return _run(server, tmp, frames, conns)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(server: Server, tmp: Path, frames: int, conns: int) -> dict:
    from barosync.hooks.auth import create_token

    server.start()
    secret = (tmp / "data" / "secret").read_text().strip()
    token = create_token(secret, user_id="mallory", projects=["p"], ttl=3600)
    rss_start = server.rss_kb()
    log(f"{frames:,} hostile frames over {conns} connections ...")
    stats = trio.run(attack, server.port, token, frames, conns, server)
    alive = server.proc is not None and server.proc.poll() is None
    ok_after = alive and well_behaved(server.port, token)
    rss = stats.pop("rss_kb")
    out = {**stats, "server_alive": alive, "serves_afterwards": ok_after, "rss_start_kb": rss_start,
           "rss_max_kb": max(rss) if rss else None, "rss_end_kb": server.rss_kb() if alive else None,
           "frames_per_s": stats["frames"] / stats["seconds"]}
    out["exit_code"] = server.stop() if alive else server.proc.poll()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--json", help="write the result here (- for stdout)")
    a = ap.parse_args(argv)
    out = run(a.frames, a.conns)
    text = json.dumps(out)
    if a.json == "-":
        print(text)
    elif a.json:
        Path(a.json).write_text(text)
    ok = out["server_alive"] and out["serves_afterwards"] and out["exit_code"] == 0
    log(f"{'ok' if ok else 'FAILED'}: {out['frames']:,} frames in {out['seconds']:.1f} s, {out['error_answers']:,} error answers, "
        f"{out['connections']} connections ({out['fatal_sent']} closing frames), server alive {out['server_alive']}, "
        f"serves afterwards {out['serves_afterwards']}, RSS {out['rss_start_kb'] // 1024} -> max {(out['rss_max_kb'] or 0) // 1024} "
        f"-> {(out['rss_end_kb'] or 0) // 1024} MB, exit {out['exit_code']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
