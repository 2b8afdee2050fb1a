"""The clients of the `snapshot` scenario (bench/scenarios.py), run as one process pinned
to the load CPU: fill a project with N events, then time

1. one subscriber's snapshot (in parts, every part parsed and checked),
2. J subscribers joining at once (each counts its parts and bytes; the last part is
   recognised by ``"more":false``),
3. a resume of M changes missed while a client was away (subscribe with ``since``),

and the server's memory (VmRSS, and VmHWM reset before each phase through
/proc/PID/clear_refs) around each. Prints one JSON object. asyncio + websockets: the
load here is big messages, not many small ones.

    python bench/snapshot_client.py URL TOKEN SERVER_PID EVENTS JOINERS RESUME
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import orjson
from websockets.asyncio.client import connect

PROJECT = "big"
WINDOW = 64  # creates in flight per filling connection
FILLERS = 8


def mem(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [snapshot] {msg}", file=sys.stderr, flush=True)


async def open_ws(url: str):
    ws = await connect(url, max_size=None, max_queue=None, compression=None, ping_interval=None)
    await ws.recv()  # hello
    return ws


async def create(url: str, n: int, tag: str) -> None:
    """n creates over FILLERS connections, WINDOW in flight each."""
    counts = [n // FILLERS + (1 if i < n % FILLERS else 0) for i in range(FILLERS)]

    async def one(k: int, count: int) -> None:
        ws = await open_ws(url)
        sent = acked = 0
        body = "x" * 200

        async def send_some() -> None:
            nonlocal sent
            while sent < count and sent - acked < WINDOW:
                await ws.send(orjson.dumps({"type": "event:create", "id": uuid.uuid4().hex, "payload": {
                    "projectId": PROJECT, "title": f"{tag} {k}-{sent}", "description": body,
                    "startDate": "2026-12-07T09:00:00Z", "endDate": "2026-12-07T10:00:00Z"}}).decode())
                sent += 1

        await send_some()
        while acked < count:
            msg = orjson.loads(await ws.recv())
            if msg["type"] == "ack":
                acked += 1
                await send_some()
            elif msg["type"] == "error":
                raise RuntimeError(f"create refused: {msg['payload']}")
        await ws.close()

    await asyncio.gather(*(one(k, c) for k, c in enumerate(counts)))


async def subscribe_full(url: str, parts_wanted: bool = True) -> dict:
    """One subscriber that parses every part: events, seq, parts, bytes, seconds."""
    ws = await open_ws(url)
    t0 = time.perf_counter()
    await ws.send(orjson.dumps({"type": "subscribe", "id": "s", "payload": {"projectId": PROJECT, "snapshotParts": parts_wanted}}).decode())
    parts = nbytes = 0
    ids: set[str] = set()
    seq = None
    while True:
        raw = await ws.recv()
        msg = orjson.loads(raw)
        if msg["type"] != "sync:snapshot":
            continue
        parts += 1
        nbytes += len(raw)
        p = msg["payload"]
        assert p.get("part", 0) == parts - 1, "parts out of order"
        seq = p["seq"]
        ids.update(e["id"] for e in p["events"])
        await ws.send('{"type":"ack","id":"%s"}' % msg["id"])
        if not p.get("more"):
            break
    took = time.perf_counter() - t0
    await ws.close()
    return {"seconds": took, "events": len(ids), "seq": seq, "parts": parts, "bytes": nbytes}


async def subscribe_counting(url: str, start: asyncio.Event) -> dict:
    ws = await open_ws(url)
    await start.wait()
    t0 = time.perf_counter()
    await ws.send(orjson.dumps({"type": "subscribe", "id": "s", "payload": {"projectId": PROJECT, "snapshotParts": True}}).decode())
    parts = nbytes = 0
    while True:
        raw = await ws.recv()
        if '"type":"sync:snapshot"' not in raw[:40]:
            continue
        parts += 1
        nbytes += len(raw)
        if '"more":false' in raw[:300]:
            break
    took = time.perf_counter() - t0
    await ws.close()
    return {"seconds": took, "parts": parts, "bytes": nbytes}


async def resume(url: str, changes: int) -> dict:
    """Subscribe (snapshot), leave, let ``changes`` happen, come back with since."""
    first = await subscribe_full(url)
    since = first["seq"]
    await create(url, changes, "missed")
    ws = await open_ws(url)
    t0 = time.perf_counter()
    await ws.send(orjson.dumps({"type": "subscribe", "id": "r", "payload": {"projectId": PROJECT, "since": since, "snapshotParts": True}}).decode())
    got = nbytes = 0
    last = since
    gaps = 0
    while got < changes:
        raw = await ws.recv()
        msg = orjson.loads(raw)
        if msg["type"] == "ack" and msg.get("id") == "r":
            if msg["payload"].get("mode") != "changes":
                raise RuntimeError(f"resume answered {msg['payload']}")
            continue
        if msg["type"] == "event:created":
            got += 1
            nbytes += len(raw)
            gaps += msg["seq"] != last + 1
            last = msg["seq"]
    took = time.perf_counter() - t0
    await ws.close()
    return {"seconds": took, "changes": got, "bytes": nbytes, "gaps": gaps}


async def main(url: str, token: str, pid: int, events: int, joiners: int, changes: int) -> dict:
    url = f"{url}/ws?token={token}"
    out: dict = {"events": events, "joiners": joiners, "resume_changes": changes}
    t0 = time.perf_counter()
    progress(f"filling project {PROJECT!r} with {events:,} events ...")
    await create(url, events, "event")
    out["fill_seconds"] = time.perf_counter() - t0
    progress(f"filled in {out['fill_seconds']:.1f} s; one subscriber ...")

    before = mem(pid)
    reset_peak(pid)
    one = await subscribe_full(url)
    after = mem(pid)
    out["one"] = {**one, "rss_before_kb": before["VmRSS"], "peak_rss_kb": after["VmHWM"], "rss_after_kb": after["VmRSS"]}
    progress(f"one subscriber: {one['events']:,} events in {one['parts']} parts, {one['bytes'] / 1e6:.1f} MB, "
             f"{one['seconds']:.2f} s; one that asks for it whole ...")
    before = mem(pid)
    reset_peak(pid)
    whole = await subscribe_full(url, parts_wanted=False)
    after = mem(pid)
    out["whole"] = {**whole, "rss_before_kb": before["VmRSS"], "peak_rss_kb": after["VmHWM"], "rss_after_kb": after["VmRSS"]}
    progress(f"whole: {whole['seconds']:.2f} s; {joiners} joining at once ...")

    start = asyncio.Event()
    tasks = [asyncio.create_task(subscribe_counting(url, start)) for _ in range(joiners)]
    await asyncio.sleep(0.5)  # all connected (hello read) before they subscribe together
    before = mem(pid)
    reset_peak(pid)
    t0 = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    after = mem(pid)
    secs = sorted(r["seconds"] for r in results)
    out["joiners_result"] = {"wall_seconds": wall, "p50_seconds": secs[len(secs) // 2], "max_seconds": secs[-1],
                             "bytes": sum(r["bytes"] for r in results), "complete": len(results),
                             "rss_before_kb": before["VmRSS"], "peak_rss_kb": after["VmHWM"], "rss_after_kb": after["VmRSS"]}
    progress(f"{joiners} joiners: all done in {wall:.2f} s; resume of {changes:,} missed changes ...")

    out["resume"] = await resume(url, changes)
    progress(f"resume: {out['resume']['changes']:,} changes in {out['resume']['seconds']:.2f} s")
    return out


if __name__ == "__main__":
    url, token, pid, events, joiners, changes = sys.argv[1:7]
    print(json.dumps(asyncio.run(main(url, token, int(pid), int(events), int(joiners), int(changes)))))
