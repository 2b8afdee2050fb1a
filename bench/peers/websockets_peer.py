"""The bench peer: a minimal asyncio + ``websockets`` broadcast server, no storage.

It is the yardstick barosync is compared with (see bench/README.md). It speaks the
same envelope shape as barosync's wire protocol, only as much as the bench needs:

* ``hello`` first, like barosync;
* ``subscribe`` -> joins the project's room, answered with ``ack``;
* ``event:create`` -> the next per-project ``seq``; an ``event:created`` with its own
  ``id`` goes to the rest of the room through ``websockets.broadcast()``, and the
  sender gets ``ack`` ``{event, seq}``;
* ``user:cursor`` -> ``{"type":"user:cursor","projectId":..,"payload":{userId,x,y,
  elementId,timestamp,projectId}}`` with no ``id`` to the rest of the room through
  ``broadcast()``, like barosync's shape but every one of them: no throttle, no
  coalescing (the bench's yardstick for what throttling saves);
* ``ping`` -> ``pong``; ``ack`` is accepted and ignored; anything else gets ``error``.

With ``--durable FILE`` a create is validated and inserted into SQLite (WAL,
``synchronous=FULL``: every COMMIT is fsynced), and acked and fanned out only after
its COMMIT. Commits run one at a time in one worker thread, and every create that
arrived while one ran goes into the next (group commit): what a Python developer
would write. It keeps no idempotency record and no history, so it does less per
create than barosync.

Usage: ``python bench/peers/websockets_peer.py --port 0 [--host 127.0.0.1] [--durable FILE]``; prints
``listening on http://HOST:PORT`` once it listens; SIGTERM stops it at once (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import os
import resource
import signal
import sqlite3
import sys
import time
from collections import defaultdict
from datetime import datetime

import orjson
from websockets.asyncio.server import broadcast, serve

loads = orjson.loads
dumps = orjson.dumps

rooms: dict[str, set] = defaultdict(set)
seqs: dict[str, int] = defaultdict(int)
ids = itertools.count(1)


def created(ws, mid, pid: str, event: dict, seq: int) -> None:
    msg = dumps({"type": "event:created", "id": f"s{next(ids)}", "seq": seq,
                 "projectId": pid, "userId": "peer", "payload": event})
    broadcast([c for c in rooms[pid] if c is not ws], msg, text=True)
    broadcast([ws], dumps({"type": "ack", "id": mid, "payload": {"event": event, "seq": seq}}), text=True)


def invalid(p: dict) -> str | None:
    """The field a create gets wrong, or None (what a developer would check)."""
    if not isinstance(p.get("projectId"), str) or not p["projectId"]:
        return "projectId"
    if not isinstance(p.get("title"), str) or not p["title"] or len(p["title"]) > 500:
        return "title"
    try:
        start = datetime.fromisoformat(p["startDate"])
    except (KeyError, TypeError, ValueError):
        return "startDate"
    try:
        if datetime.fromisoformat(p["endDate"]) < start:
            return "endDate"
    except (KeyError, TypeError, ValueError):
        return "endDate"
    return None


class Durable:
    """SQLite in one worker thread; a create waits in ``pending`` for the next commit."""

    def __init__(self, path: str) -> None:
        self.thread = concurrent.futures.ThreadPoolExecutor(1)
        self.db = self.thread.submit(self._open, path).result()
        self.pending: list = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None  # run(), started by main()

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS events (project TEXT NOT NULL, id TEXT NOT NULL, "
                   "seq INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (project, id))")
        return db

    def _commit(self, items: list) -> None:
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT INTO events (project, id, seq, body) VALUES (?, ?, ?, ?)",
                                [(pid, event["id"], seq, dumps(event)) for _, _, pid, event, seq in items])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def add(self, item: tuple) -> None:
        self.pending.append(item)
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            items, self.pending = self.pending, []
            try:
                await loop.run_in_executor(self.thread, self._commit, items)
            except sqlite3.Error as e:
                for ws, mid, *_ in items:
                    broadcast([ws], dumps({"type": "error", "id": f"s{next(ids)}",
                                           "payload": {"code": "internal", "message": str(e), "ref": mid}}), text=True)
                continue
            for item in items:
                created(*item)


durable: Durable | None = None


async def handler(ws) -> None:
    joined: set[str] = set()
    session = next(ids)
    await ws.send(dumps({"type": "hello", "id": f"s{next(ids)}",
                         "payload": {"sessionId": f"peer-{session}", "server": "websockets-peer"}}),
                  text=True)
    try:
        async for raw in ws:
            try:
                m = loads(raw)
                t = m["type"]
            except Exception:
                await ws.send(dumps({"type": "error", "id": f"s{next(ids)}",
                                     "payload": {"code": "bad_message", "message": "unparsable"}}),
                              text=True)
                continue
            if t == "ack":
                continue
            mid = m.get("id")
            payload = m.get("payload") or {}
            if t == "ping":
                await ws.send(dumps({"type": "pong", "timestamp": m.get("timestamp")}), text=True)
            elif t == "subscribe":
                pid = payload.get("projectId")
                rooms[pid].add(ws)
                joined.add(pid)
                await ws.send(dumps({"type": "ack", "id": mid, "payload": {"projectId": pid}}), text=True)
            elif t == "unsubscribe":
                pid = payload.get("projectId")
                rooms[pid].discard(ws)
                joined.discard(pid)
                await ws.send(dumps({"type": "ack", "id": mid, "payload": {"projectId": pid}}), text=True)
            elif t == "user:cursor":
                pid = payload.get("projectId")
                if pid is None and len(joined) == 1:
                    pid = next(iter(joined))
                if pid not in joined:
                    continue
                msg = dumps({"type": "user:cursor", "projectId": pid, "payload": {
                    "userId": f"peer-{session}", "x": payload.get("x"), "y": payload.get("y"),
                    "elementId": payload.get("elementId"), "timestamp": time.time_ns() // 1_000_000,
                    "projectId": pid}})
                broadcast([c for c in rooms[pid] if c is not ws], msg, text=True)
            elif t == "event:create":
                pid = payload.get("projectId")
                event = dict(payload)
                event.setdefault("id", f"ev{next(ids)}")
                event["version"] = 1
                if durable is None:
                    # seq assignment and broadcast in one step (no await in between), so
                    # every receiver sees seqs in order.
                    seqs[pid] += 1
                    created(ws, mid, pid, event, seqs[pid])
                    continue
                bad = invalid(event)
                if bad is not None:
                    await ws.send(dumps({"type": "error", "id": f"s{next(ids)}", "payload": {
                        "code": "invalid", "message": f"bad {bad}", "field": bad, "ref": mid}}), text=True)
                    continue
                # the seq is taken in arrival order; commits run in order, so the
                # change goes out in seq order after its COMMIT
                seqs[pid] += 1
                durable.add((ws, mid, pid, event, seqs[pid]))
            else:
                await ws.send(dumps({"type": "error", "id": f"s{next(ids)}",
                                     "payload": {"code": "unknown_type", "message": str(t), "ref": mid}}),
                              text=True)
    finally:
        for pid in joined:
            room = rooms.get(pid)
            if room is not None:
                room.discard(ws)


async def main(host: str, port: int, durable_file: str | None) -> None:
    global durable
    loop = asyncio.get_running_loop()
    if durable_file:
        durable = Durable(durable_file)
        durable.task = asyncio.create_task(durable.run())  # held here: the loop keeps only a weak reference
    stop = loop.create_future()
    # Exit at once: a peer still broadcasting a backlog (the cursors scenario has no
    # throttle) would otherwise take longer to close its 1,000 connections than the
    # harness waits. It stores nothing, so there is nothing to shut down cleanly.
    # (A plain signal handler: it runs at the next bytecode, not behind the loop's
    # backlog of ready callbacks as a loop.add_signal_handler callback would.)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    async with serve(handler, host, port, backlog=4096, compression=None) as server:
        bound = server.sockets[0].getsockname()
        print(f"listening on http://{bound[0]}:{bound[1]}", flush=True)
        await stop


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--data", help="ignored (accepted for symmetry with barosync serve)")
    ap.add_argument("--durable", metavar="FILE", help="store every create in this SQLite file before its ack")
    args = ap.parse_args()
    asyncio.run(main(args.host, args.port, args.durable))
    sys.exit(0)
