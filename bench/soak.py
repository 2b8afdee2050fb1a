"""barosync soak: steady mixed load for a long time, watching for leaks.

`make soak` (or `python bench/soak.py --minutes 60`) starts a real `barosync serve`
on a temp data directory with a short history retention, then load processes hold
500 WebSocket clients in 50 projects: creates, updates and deletes at ~200/s in all,
cursors, and clients dropping and resuming with `since` all the time. Every
`--report-every` seconds it prints the server's RSS, open descriptors, the LMDB file
size, mutations/s, ack latency p50/p99, gaps and duplicates seen by clients, and each
load process's CPU (so a saturated load generator is visible, not hidden). At the end
it says whether RSS and descriptors stayed flat after warm-up and whether the data
file stayed bounded by retention.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROJECTS = 50
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- one load process ----------------------------------------------------------------------


def load_process(n: int, port: int, secret: str, clients: int, rate: float, reconnect_rate: float,
                 cursor_clients: int, report: "mp.Queue[dict[str, Any]]", stop: Any) -> None:
    import trio

    from barosync.hooks.auth import create_token
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    random.seed(n)
    stats: dict[str, Any] = {"latencies": [], "mutations": 0, "errors": 0, "gaps": 0, "duplicates": 0,
                             "reconnects": 0, "deliveries": 0, "cursors": 0}

    class Member:
        def __init__(self, i: int) -> None:
            self.i = i
            self.user = f"soak{n}-{i}"
            self.project = f"p{(n * clients + i) % PROJECTS}"
            self.token = create_token(secret, user_id=self.user, projects=[self.project], ttl=7 * 24 * 3600)
            self.last_seq: int | None = None
            self.ws: Any = None
            self.mine: dict[str, int] = {}  # event id -> version (own events, none in flight)
            # Own events whose last change was in flight when the connection dropped:
            # deleted without a version, so the project's size stays steady.
            self.lost: list[str] = []
            self.sent: dict[str, tuple[float, str, str | None]] = {}  # envelope id -> (t0, kind, event id)
            self.drop = trio.Event()

        async def run(self) -> None:
            while not stop.is_set():
                try:
                    await self.session()
                except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
                    await trio.sleep(0.5)
                stats["reconnects"] += 1

        async def session(self) -> None:
            self.drop = trio.Event()
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={self.token}", max_message_size=64 << 20) as ws:
                payload: dict[str, Any] = {"projectId": self.project}
                if self.last_seq is not None:
                    payload["since"] = self.last_seq
                await ws.send_message(json.dumps({"type": "subscribe", "id": uuid.uuid4().hex, "payload": payload}))
                # Only now may changes go out: one sent before the subscribe would be
                # answered (with its seq) ahead of the replay of what was missed.
                self.ws = ws
                # What was in flight when the connection dropped is not resent (the
                # soak watches the server, not a client's queue); its events go.
                self.lost += [event_id for _, kind, event_id in self.sent.values() if event_id]
                self.sent.clear()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.read, ws, nursery)
                    await self.drop.wait()
                    nursery.cancel_scope.cancel()
                self.ws = None

        async def read(self, ws: Any, nursery: Any) -> None:
            while True:
                msg = json.loads(await ws.get_message())
                kind = msg["type"]
                if kind == "ack":
                    found = self.sent.pop(msg["id"], None)
                    if found is not None:
                        t0, what, event_id = found
                        stats["latencies"].append(time.monotonic() - t0)
                        stats["mutations"] += 1
                        body = msg["payload"]
                        if what != "delete" and "event" in body:
                            self.mine[body["event"]["id"]] = body["event"]["version"]
                        self.seen(body.get("seq"), own=True)
                    elif "mode" in msg.get("payload", {}):
                        if msg["payload"]["mode"] == "snapshot":
                            self.last_seq = msg["payload"]["seq"]
                    continue
                if kind == "error" or kind == "conflict:detected":
                    stats["errors"] += 1
                    self.sent.pop(msg["payload"].get("ref"), None)
                    continue
                if kind == "sync:snapshot":
                    # A snapshot replaces the copy (also mid-resume, when history was
                    # pruned between two pieces of a long replay).
                    self.last_seq = msg["payload"]["seq"]
                elif kind in ("event:created", "event:updated", "event:deleted"):
                    stats["deliveries"] += 1
                    self.seen(msg.get("seq"), own=False)
                elif kind == "user:cursor":
                    stats["cursors"] += 1
                if msg.get("id") and kind not in ("pong", "user:cursor"):
                    await ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))

        def seen(self, seq: Any, own: bool) -> None:
            if not isinstance(seq, int) or self.last_seq is None:
                return
            if seq <= self.last_seq:
                stats["duplicates"] += 1
            elif seq > self.last_seq + 1:
                stats["gaps"] += 1
                print(f"soak: gap in {self.project} for {self.user}: expected {self.last_seq + 1}, got {seq}"
                      f" ({'own ack' if own else 'delivery'})", file=sys.stderr, flush=True)
            self.last_seq = max(self.last_seq, seq)

        async def mutate(self) -> None:
            ws = self.ws
            if ws is None:
                return
            roll = random.random()
            envelope = uuid.uuid4().hex
            # About as many deletes as creates, so the live project stays near four
            # events per client while the changelog turns over with the retention.
            if self.lost:
                event_id = self.lost.pop()
                payload: dict[str, Any] = {"id": event_id}
                kind = "delete"
            elif roll < 0.3 or len(self.mine) < 4:
                event_id = uuid.uuid4().hex
                payload = {"projectId": self.project, "id": event_id, "title": f"soak {envelope[:6]}",
                           "startDate": "2026-12-01T09:00:00Z", "endDate": "2026-12-01T10:00:00Z",
                           "description": "x" * random.randint(0, 400)}
                kind = "create"
            else:
                event_id = random.choice(list(self.mine))
                version = self.mine.pop(event_id)
                if roll < 0.65:
                    payload = {"id": event_id, "version": version, "title": f"moved {envelope[:6]}"}
                    kind = "update"
                else:
                    payload = {"id": event_id, "version": version}
                    kind = "delete"
            self.sent[envelope] = (time.monotonic(), kind, event_id)
            try:
                await ws.send_message(json.dumps({"type": f"event:{kind}", "id": envelope, "payload": payload}))
            except Exception:
                self.sent.pop(envelope, None)

    members = [Member(i) for i in range(clients)]

    async def drive() -> None:
        interval = 1.0 / rate
        nxt = trio.current_time()
        while not stop.is_set():
            nxt += interval
            await random.choice(members).mutate()
            await trio.sleep_until(nxt)

    async def churn() -> None:
        while not stop.is_set():
            await trio.sleep(random.expovariate(reconnect_rate))
            random.choice(members).drop.set()

    async def cursors() -> None:
        movers = members[:cursor_clients]
        while not stop.is_set():
            for m in movers:
                if m.ws is not None:
                    try:
                        await m.ws.send_message(json.dumps({"type": "user:cursor", "payload": {
                            "projectId": m.project, "x": random.random() * 800, "y": random.random() * 600}}))
                    except Exception:
                        pass
            await trio.sleep(0.1)

    async def reporter() -> None:
        last_cpu = _cpu()
        last = time.monotonic()
        while not stop.is_set():
            await trio.sleep(1.0)
            now, cpu = time.monotonic(), _cpu()
            snapshot = dict(stats, latencies=list(stats["latencies"]), cpu=(cpu - last_cpu) / (now - last), proc=n)
            stats["latencies"].clear()
            for key in ("mutations", "errors", "gaps", "duplicates", "reconnects", "deliveries", "cursors"):
                stats[key] = 0
            last, last_cpu = now, cpu
            report.put(snapshot)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for m in members:
                nursery.start_soon(m.run)
                await trio.sleep(0.005)  # do not connect all at once
            nursery.start_soon(drive)
            nursery.start_soon(churn)
            nursery.start_soon(cursors)
            nursery.start_soon(reporter)
            while not stop.is_set():
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- the server and the report -----------------------------------------------------------


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Resident KiB: VmRSS in all, or RssAnon (the heap: what a leak grows; the
    rest is LMDB's file pages, which follow the data file)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="how long to run (default 60)")
    ap.add_argument("--report-every", type=float, default=60.0, help="seconds between report lines (default 60)")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--rate", type=float, default=200.0, help="mutations per second in all")
    ap.add_argument("--processes", type=int, default=2, help="load processes")
    ap.add_argument("--retention", type=float, default=120.0, help="[storage] history_retention in seconds")
    ap.add_argument("--reconnects", type=float, default=5.0, help="client drops per second in all")
    ap.add_argument("--cursor-clients", type=int, default=50, help="clients moving a cursor at 10 Hz")
    ap.add_argument("--json", type=Path, help="also write the report lines here")
    args = ap.parse_args(argv)

    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536)) if resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= 65536 else None
    work = Path(tempfile.mkdtemp(prefix="barosync-soak-"))
    data = work / "data"
    config = work / "soak.toml"
    config.write_text(f"[storage]\nhistory_retention = {args.retention}\n[server]\nmax_connections_per_user = 10\n")
    server = subprocess.Popen([sys.executable, "-m", "barosync", "serve", "--port", "0", "--data", str(data),
                               "--config", str(config), "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=(work / "server.log").open("wb"), cwd=HERE.parent)
    line = server.stdout.readline().decode()  # type: ignore[union-attr]
    match = LISTENING.search(line)
    if not match:
        log(f"soak: the server did not start: {line!r}; see {work / 'server.log'}")
        return 1
    port = int(match.group(1))
    secret = (data / "secret").read_text().strip()
    log(f"soak: server pid {server.pid} on port {port}, data in {data}; {args.clients} clients in "
        f"{args.processes} load processes, {args.rate:g} mutations/s, retention {args.retention:g} s, "
        f"{args.minutes:g} min")

    report: mp.Queue[dict[str, Any]] = mp.Queue()
    stop = mp.Event()
    per = [args.clients // args.processes + (1 if i < args.clients % args.processes else 0) for i in range(args.processes)]
    procs = [mp.Process(target=load_process, args=(i, port, secret, per[i], args.rate / args.processes,
                                                    args.reconnects / args.processes,
                                                    args.cursor_clients // args.processes, report, stop), daemon=True)
             for i in range(args.processes)]
    for p in procs:
        p.start()

    rows: list[dict[str, Any]] = []
    totals = {"mutations": 0, "errors": 0, "gaps": 0, "duplicates": 0, "reconnects": 0}
    started = time.monotonic()
    end = started + args.minutes * 60
    window: list[dict[str, Any]] = []
    next_report = started + args.report_every
    log(f"{'min':>6} {'rss MB':>7} {'anon MB':>7} {'fds':>5} {'data MB':>8} {'mut/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'gaps':>4} {'dups':>4} {'reconn':>6} {'load cpu %':>12}")
    try:
        while time.monotonic() < end:
            if server.poll() is not None:
                log(f"soak: the server exited with {server.returncode}; see {work / 'server.log'}")
                return 1
            try:
                window.append(report.get(timeout=1.0))
            except Exception:
                pass
            now = time.monotonic()
            if now < next_report:
                continue
            next_report += args.report_every
            lat = [x for w in window for x in w["latencies"]]
            cpu: dict[int, list[float]] = {}
            for w in window:
                cpu.setdefault(w["proc"], []).append(w["cpu"])
            row = {
                "minute": round((now - started) / 60, 2),
                "rss_mb": round(rss_kb(server.pid) / 1024, 1),
                "anon_mb": round(rss_kb(server.pid, "RssAnon") / 1024, 1),
                "fds": fds(server.pid),
                "data_mb": round((data / "data.mdb").stat().st_size / 2**20, 1),
                "mutations_per_s": round(sum(w["mutations"] for w in window) / args.report_every),
                "p50_ms": round(pct(lat, 0.50) * 1000, 1),
                "p99_ms": round(pct(lat, 0.99) * 1000, 1),
                "load_cpu_pct": [round(100 * max(v)) for _, v in sorted(cpu.items())],
            }
            for key in totals:
                row[key] = sum(w[key] for w in window)
                totals[key] += row[key]
            window.clear()
            rows.append(row)
            log(f"{row['minute']:>6} {row['rss_mb']:>7} {row['anon_mb']:>7} {row['fds']:>5} {row['data_mb']:>8} {row['mutations_per_s']:>6} "
                f"{row['p50_ms']:>7} {row['p99_ms']:>7} {row['errors']:>6} {row['gaps']:>4} {row['duplicates']:>4} "
                f"{row['reconnects']:>6} {'/'.join(map(str, row['load_cpu_pct'])):>12}")
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    if len(rows) < 3:
        log("soak: too short to judge flatness (fewer than 3 report lines)")
        shutil.rmtree(work, ignore_errors=True)
        return 0
    warm = rows[len(rows) // 3]  # the first third is warm-up
    last = rows[-1]
    rss_growth = last["rss_mb"] - warm["rss_mb"]
    anon_growth = last["anon_mb"] - warm["anon_mb"]
    fd_growth = last["fds"] - warm["fds"]
    data_growth = last["data_mb"] - warm["data_mb"]
    busiest = max(max(r["load_cpu_pct"]) for r in rows)
    log(f"soak: after warm-up (from minute {warm['minute']}): RSS {warm['rss_mb']} -> {last['rss_mb']} MB "
        f"({rss_growth:+.1f}; heap {warm['anon_mb']} -> {last['anon_mb']}, {anon_growth:+.1f}), fds {warm['fds']} -> {last['fds']} ({fd_growth:+d}), data file "
        f"{warm['data_mb']} -> {last['data_mb']} MB ({data_growth:+.1f}); totals: {totals}; busiest load process "
        f"{busiest}% of a core")
    ok = totals["gaps"] == 0 and totals["duplicates"] == 0 and server.returncode == 0
    log("soak: " + ("ok" if ok else "FAILED") + f" (server exit {server.returncode}, log {work / 'server.log'})")
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
