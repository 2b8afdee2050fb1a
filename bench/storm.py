"""Load held, nothing lost: 1,000 clients through a disconnect storm and two server
restarts (one SIGTERM, one kill -9), then a check that nothing was lost, doubled or
left behind.

    python bench/storm.py [--clients 1000] [--procs 4] [--json PATH]

A real `barosync serve` on a temp data dir; load processes (trio-websocket) hold the
clients in 20 projects. A tenth of them write (creates and updates of their own
events, ~200/s in all) and keep every mutation until it is acked, resending it with the
same envelope id after a reconnect, as the real clients' offline queues do. Every
client keeps its copy of its project from the snapshot and the changes (counting gaps
and duplicate seqs) and resumes with ``since`` after every disconnect. The timeline:
all subscribed; every connection dropped at once; a SIGTERM restart; a kill -9
restart; writes stop; everyone catches up. Then, per project:

- the server's head seq equals the number of distinct mutations acked (each applied
  exactly once, retries included),
- every acked create is stored, with the version of its last acked update,
- every client's copy equals the server's (converged).

Run by `bench/run.py --scenarios storm`; prints one JSON line at the end with --json -.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PROJECTS = 20
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
CONFIG = """\
[server]
max_connections_per_user = 1000000
rate_limit = 1000000.0
rate_burst = 10000000
"""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [storm] {msg}", file=sys.stderr, flush=True)


# -- one load process -----------------------------------------------------------------


def load_process(n: int, procs: int, ports: list[int], secret: str, clients: int, rate: float,
                 commands: "mp.Queue[str]", results: "mp.Queue[dict[str, Any]]", lose: float = 0.0) -> None:
    """Clients of one load process. With several ``ports`` (nodes of one cluster) each
    client starts on one and moves to the next at every reconnect, so its offline
    queue is resent through another node than the one that took it. ``lose``: the
    share of mutations after which the writer drops its connection at once, as if
    the answer were lost on the way (it resends through the next node)."""
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    from barosync.hooks.auth import create_token

    random.seed(n)
    stats = {"gaps": 0, "duplicates": 0, "own_echoes": 0, "reconnects": 0, "resent": 0, "errors": 0,
             "refused": 0, "snapshots": 0, "answers_lost": 0}
    mode = {"writing": True}

    class Member:
        def __init__(self, i: int) -> None:
            k = n + i * procs  # spread over processes and projects
            self.user = f"storm{k}"
            self.project = f"p{k % PROJECTS}"
            self.writer = k % 10 == 0
            self.token = create_token(secret, user_id=self.user, projects=[self.project], ttl=86400)
            self.last_seq: int | None = None
            self.copy: dict[str, int] = {}  # event id -> version, as this client knows the project
            self.snap_parts: dict[str, int] = {}
            self.pending: dict[str, dict[str, Any]] = {}  # envelope id -> message, until acked
            self.acked: dict[str, int] = {}  # envelope id -> seq
            self.mine: dict[str, int] = {}  # own event id -> version of its last acked change
            self.resent: set[str] = set()  # envelope ids sent on more than one connection
            self.node = k  # which of `ports` it connects to next
            self.hang_up: Any = None  # a trio.Event: end this connection now
            self.hung_up = False  # away because it hung up on purpose (not counted as behind)
            self.ws: Any = None
            self.live = False  # caught up with the head its last subscribe ack named
            self.target: int | None = None

        async def run(self) -> None:
            while True:
                try:
                    await self.session()
                except* (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                    pass
                self.ws = None
                self.live = False
                self.node += 1
                stats["reconnects"] += 1
                await trio.sleep(random.uniform(0.05, 1.0))  # jittered, as real clients back off

        async def session(self) -> None:
            self.hang_up = trio.Event()
            port = ports[self.node % len(ports)]
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={self.token}",
                                          max_message_size=64 << 20) as ws:
                payload: dict[str, Any] = {"projectId": self.project, "snapshotParts": True}
                if self.last_seq is not None:
                    payload["since"] = self.last_seq
                await ws.send_message(json.dumps({"type": "subscribe", "id": "sub-" + uuid.uuid4().hex,
                                                  "payload": payload}))
                self.ws = ws
                self.hung_up = False
                for envelope, msg in list(self.pending.items()):  # the offline queue, same envelope ids
                    stats["resent"] += 1
                    self.resent.add(envelope)
                    await ws.send_message(json.dumps(msg))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.read, ws, nursery)
                    await self.hang_up.wait()  # every connection dropped, or an answer "lost"
                    nursery.cancel_scope.cancel()

        async def resend(self, ws: Any, envelope: str, after: float) -> None:
            await trio.sleep(min(after, 5.0))
            if envelope in self.pending and ws is self.ws:
                stats["resent"] += 1
                await ws.send_message(json.dumps(self.pending[envelope]))

        async def read(self, ws: Any, nursery: trio.Nursery) -> None:
            parts: list[dict[str, Any]] = []
            while True:
                msg = json.loads(await ws.get_message())
                kind, p = msg["type"], msg.get("payload") or {}
                if kind == "ack":
                    if msg["id"] in self.pending:
                        self.pending.pop(msg["id"])
                        self.acked[msg["id"]] = p["seq"]
                        if "event" in p:
                            self.mine[p["event"]["id"]] = p["event"]["version"]
                            if self.last_seq is None or p["seq"] > self.last_seq:
                                self.apply(p["seq"], p["event"]["id"], p["event"]["version"], own=True)
                            elif msg["id"] not in self.resent:
                                # Sent once, on this connection: the ack is its only copy
                                # of the change (protocol.md), so it came as a change too.
                                stats["own_echoes"] += 1
                                print(f"storm: {self.user} in {self.project} was sent its own seq {p['seq']} "
                                      f"before its ack", file=sys.stderr, flush=True)
                            # A resent mutation's original answer may name a seq the
                            # resume already replayed: that is the retry, not a duplicate.
                    elif p.get("mode") == "changes":
                        self.target = p["seq"]
                        self.live = (self.last_seq or 0) >= self.target
                    elif p.get("mode") == "snapshot":
                        self.target = p["seq"]
                    continue
                if kind == "error":
                    ref = p.get("ref")
                    if p.get("code") in ("storage_full", "rate_limited") and ref in self.pending:
                        # Not applied now (the log is away): kept, sent again after
                        # retryAfter with the same envelope id, as clients do.
                        stats["refused"] += 1
                        self.resent.add(ref)
                        nursery.start_soon(self.resend, ws, ref, float(p.get("retryAfter") or 1.0))
                        continue
                    stats["errors"] += 1
                    print(f"storm: error {p}", file=sys.stderr, flush=True)
                    continue
                if kind == "sync:snapshot":
                    parts.append(p)
                    if not p.get("more"):
                        self.copy = {e["id"]: e["version"] for part in parts for e in part["events"]}
                        self.last_seq = p["seq"]
                        parts = []
                        stats["snapshots"] += 1
                        self.live = True
                elif kind in ("event:created", "event:updated"):
                    self.apply(msg["seq"], p["id"], p["version"], own=False)
                if msg.get("id") and kind not in ("pong", "user:cursor"):
                    await ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))

        def apply(self, seq: int, event_id: str, version: int, *, own: bool) -> None:
            if self.last_seq is None:
                return
            if seq <= self.last_seq:
                stats["duplicates"] += 1
                return
            if seq > self.last_seq + 1:
                stats["gaps"] += 1
                print(f"storm: gap in {self.project} for {self.user}: expected {self.last_seq + 1}, got {seq}"
                      f" ({'own ack' if own else 'delivery'})", file=sys.stderr, flush=True)
            self.last_seq = seq
            self.copy[event_id] = version
            if not self.live and self.target is not None and seq >= self.target:
                self.live = True

        async def mutate(self) -> None:
            if self.ws is None or len(self.pending) >= 4:
                return
            envelope = uuid.uuid4().hex
            waiting = {m["payload"]["id"] for m in self.pending.values()}
            editable = [e for e in self.mine if e not in waiting]
            if editable and random.random() < 0.5:
                event_id = random.choice(editable)
                msg = {"type": "event:update", "id": envelope,
                       "payload": {"id": event_id, "version": self.mine[event_id], "title": f"moved {envelope[:6]}"}}
            else:
                msg = {"type": "event:create", "id": envelope, "payload": {
                    "projectId": self.project, "id": uuid.uuid4().hex, "title": f"storm {envelope[:6]}",
                    "startDate": "2026-12-07T09:00:00Z", "endDate": "2026-12-07T10:00:00Z"}}
            self.pending[envelope] = msg
            try:
                await self.ws.send_message(json.dumps(msg))
            except Exception:
                pass  # resent after the reconnect
            if lose and random.random() < lose:
                stats["answers_lost"] += 1
                self.hung_up = True
                self.hang_up.set()

    members = [Member(i) for i in range(clients)]
    writers = [m for m in members if m.writer]

    async def drive() -> None:
        interval = 1.0 / rate
        nxt = trio.current_time()
        while True:
            nxt += interval
            if mode["writing"] and writers:
                await random.choice(writers).mutate()
            await trio.sleep_until(nxt)

    async def control() -> None:
        while True:
            try:
                command = commands.get_nowait()
            except Exception:
                await trio.sleep(0.05)
                continue
            if command == "drop":
                for m in members:
                    if m.hang_up is not None:
                        m.hang_up.set()
            elif command == "stop-writing":
                mode["writing"] = False
            elif command == "status":
                results.put({"proc": n, "status": True, "live": sum(m.live or m.hung_up for m in members),
                             "pending": sum(len(m.pending) for m in members), **stats})
            elif command == "report":
                results.put({"proc": n, "report": True, **stats, "clients": [
                    {"project": m.project, "last_seq": m.last_seq, "copy": m.copy, "acked": len(m.acked),
                     "acked_ids": list(m.acked), "mine": m.mine, "pending": len(m.pending)} for m in members]})
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for m in members:
                nursery.start_soon(m.run)
                await trio.sleep(0.002)
            nursery.start_soon(drive)
            await control()
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- the server and the timeline ----------------------------------------------------------


class Server:
    def __init__(self, data: Path, config: Path) -> None:
        self.data, self.config = data, config
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "barosync", "serve", "--data", str(self.data), "--config", str(self.config),
               "--port", str(self.port), "--no-browser-link", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = LISTENING.search(line)
            if found:
                self.port = int(found.group(1))
                return
        raise RuntimeError(f"barosync serve exited {self.proc.wait()} before listening")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        """Whatever happened: no server left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def events(self, project: str, token: str) -> dict[str, int]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/projects/{project}/events",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return {e["id"]: e["version"] for e in json.loads(r.read())["events"]}


STAT_KEYS = ("gaps", "duplicates", "own_echoes", "reconnects", "resent", "refused", "errors", "snapshots",
             "answers_lost")


def summarize(reports: list[dict[str, Any]], stored: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The load processes' reports against what the server stores (project -> event
    id -> version): nothing lost, nothing applied twice, every copy converged."""
    members = [c for r in reports for c in r["clients"]]
    out: dict[str, Any] = {key: sum(r[key] for r in reports) for key in STAT_KEYS}
    converged = lost = doubled = wrong_version = 0
    for project, events in stored.items():
        mine = [c for c in members if c["project"] == project]
        acked = {e for c in mine for e in c["acked_ids"]}
        head = max((c["last_seq"] or 0) for c in mine)
        # Each acked mutation (retries included) is one seq: nothing applied twice.
        doubled += max(0, head - len(acked))
        for c in mine:
            for event_id, version in c["mine"].items():
                if event_id not in events:
                    lost += 1
                elif events[event_id] != version:
                    wrong_version += 1
            converged += c["copy"] == events and c["last_seq"] == head
    out.update(converged=converged, lost=lost, applied_twice=doubled, stale_versions=wrong_version,
               still_pending=sum(c["pending"] for c in members), acked_mutations=sum(c["acked"] for c in members))
    return out


def sound(out: dict[str, Any]) -> bool:
    """Every promise held: no gap, no duplicate (nor a writer sent its own change),
    nothing lost or applied twice, every client converged."""
    return (out["gaps"] == 0 and out["duplicates"] == 0 and out["own_echoes"] == 0 and out["lost"] == 0
            and out["applied_twice"] == 0 and out["stale_versions"] == 0 and out["converged"] == out["clients"])


def run(clients: int, procs: int, rate: float, steady: float = 3.0) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="barosync-storm-"))
    config = tmp / "storm.toml"
    config.write_text(CONFIG)
    server = Server(tmp / "data", config)
    try:
        return _run(server, tmp, clients, procs, rate, steady)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(server: Server, tmp: Path, clients: int, procs: int, rate: float, steady: float) -> dict[str, Any]:
    """``steady``: seconds of steady writing before each disruption and after it."""
    from barosync.hooks.auth import create_token

    server.start()
    secret = (tmp / "data" / "secret").read_text().strip()
    checker = create_token(secret, user_id="checker", projects="*", ttl=3600)
    commands = [mp.Queue() for _ in range(procs)]
    results: mp.Queue = mp.Queue()
    workers = [mp.Process(target=load_process, args=(n, procs, [server.port], secret, clients // procs + (n < clients % procs),
                                                     rate / procs, commands[n], results), daemon=True)
               for n in range(procs)]
    for w in workers:
        w.start()
    out: dict[str, Any] = {"clients": clients, "load_procs": procs, "rate_per_s": rate, "restarts": []}

    def status() -> list[dict[str, Any]]:
        for q in commands:
            q.put("status")
        return [results.get(timeout=30) for _ in commands]

    def wait_live(what: str, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = status()
            live = sum(s["live"] for s in st)
            if live == clients:
                log(f"{what}: all {clients} clients live again in {time.monotonic() - t0:.1f} s")
                return time.monotonic() - t0
            time.sleep(0.5)
        log(f"{what}: only {live}/{clients} clients live after {timeout:.0f} s")
        return float("inf")

    out["connect_s"] = wait_live("start", 120)
    out["rss_start_kb"] = server.rss_kb()
    time.sleep(steady)
    log("storm: every connection dropped at once")
    for q in commands:
        q.put("drop")
    time.sleep(0.5)  # every session has ended (they look every 50 ms)
    out["storm_recover_s"] = wait_live("disconnect storm", 120)
    time.sleep(steady)
    for how, sig in (("SIGTERM", signal.SIGTERM), ("kill -9", signal.SIGKILL)):
        log(f"restart: {how}")
        code = server.stop(sig)
        time.sleep(0.5)
        server.start()  # same port, same data directory
        time.sleep(0.5)
        out["restarts"].append({"how": how, "exit_code": code, "recover_s": wait_live(f"after {how}", 120)})
        time.sleep(steady)
    for q in commands:
        q.put("stop-writing")
    log("writes stopped; waiting for every client to catch up")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        st = status()
        if sum(s["pending"] for s in st) == 0 and sum(s["live"] for s in st) == clients:
            break
        time.sleep(1)
    time.sleep(min(2.0, steady))  # the last changes' fan-out
    for q in commands:
        q.put("report")
    reports = [results.get(timeout=60) for _ in commands]
    out["rss_end_kb"] = server.rss_kb()
    out.update(summarize(reports, {f"p{p}": server.events(f"p{p}", checker) for p in range(PROJECTS)}))
    server.stop()
    for w in workers:
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rate", type=float, default=200.0, help="mutations/s in all")
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of steady writing around each disruption")
    ap.add_argument("--json", help="write the result here (- for stdout)")
    a = ap.parse_args(argv)
    out = run(a.clients, a.procs, a.rate, a.steady)
    text = json.dumps(out)
    if a.json == "-":
        print(text)
    elif a.json:
        Path(a.json).write_text(text)
    ok = sound(out)
    log(f"{'ok' if ok else 'FAILED'}: {out['converged']}/{out['clients']} converged, {out['gaps']} gaps, "
        f"{out['duplicates']} duplicates, {out['lost']} lost, {out['applied_twice']} applied twice, "
        f"{out['acked_mutations']} mutations acked, {out['reconnects']} reconnects, {out['resent']} resent")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
