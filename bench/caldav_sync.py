"""CalDAV sync, barosync beside Radicale on the same data in the same run.

    python bench/caldav_sync.py [--events 10000] [--changes 100] [--json PATH]

Both servers get the same N events (barosync by CalDAV PUT from 8 connections;
Radicale, whose PUT path is far slower to seed, by writing its file storage
directly). Then one client, pinned apart from the servers, does what a calendar
app does:

- first full sync: ``sync-collection`` with no token (hrefs and ETags), then
  ``calendar-multiget`` of every event in batches of 500, with the data;
- the same again, with the servers' caches warm;
- incremental sync: 100 events changed by PUT (timed too), then ``sync-collection``
  with the token from before and a ``calendar-multiget`` of what changed;
- the first full sync after a restart of the server on the same data (its caches
  cold, the data read from disk);
- a second calendar of 1,000 events PUT one by one (timed), then its first full sync:
  what an app that just uploaded a calendar reads back.

Each figure is printed for both servers with the ratio; the result is one JSON line
(``--json -``) that `bench/run.py --scenarios caldav` reads.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from xml.etree import ElementTree as ET

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DAV = "{DAV:}"
BATCH = 500
SEED_CONNECTIONS = 8
# The calendar PUT one event at a time, then read back whole: a tenth of the big one,
# 1,000 at most.
FRESH_EVENTS = 1_000
LISTENING = re.compile(r"listening on http://[0-9.]+:(\d+)")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [caldav] {msg}", file=sys.stderr, flush=True)


def event(i: int, summary: str | None = None) -> bytes:
    day, hour = divmod(i, 10)
    start = f"2026{1 + day // 28 % 12:02d}{1 + day % 28:02d}T{8 + hour:02d}0000Z"
    end = start[:9] + f"{8 + hour:02d}4500Z"
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//barosync//bench//EN\r\nBEGIN:VEVENT\r\nUID:ev-{i}\r\n"
            f"DTSTAMP:20260101T000000Z\r\nDTSTART:{start}\r\nDTEND:{end}\r\nSUMMARY:{summary or f'Event {i}'}\r\n"
            f"LOCATION:Room {i % 20}\r\nDESCRIPTION:Bench event number {i}\\, with a description.\r\n"
            "BEGIN:VALARM\r\nACTION:DISPLAY\r\nTRIGGER:-PT10M\r\nDESCRIPTION:Reminder\r\nEND:VALARM\r\n"
            "END:VEVENT\r\nEND:VCALENDAR\r\n").encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


class Client:
    """One keep-alive HTTP connection with Basic auth."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.bytes = 0

    def __call__(self, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, dict[str, str], bytes]:
        sent = {"Authorization": self.auth, "Content-Type": "application/xml; charset=utf-8",
                **{k.replace("_", "-"): v for k, v in headers.items()}}
        self.conn.request(method, path, body=body, headers=sent)
        r = self.conn.getresponse()
        data = r.read()
        self.bytes += len(data)
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data


SYNC = ('<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token>{}</d:sync-token>'
        '<d:sync-level>1</d:sync-level><d:prop><d:getetag/></d:prop></d:sync-collection>')
MULTIGET = ('<?xml version="1.0"?><c:calendar-multiget xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">'
            '<d:prop><d:getetag/><c:calendar-data/></d:prop>{}</c:calendar-multiget>')


def sync(client: Client, collection: str, token: str = "") -> dict:
    """What an app does: the changed hrefs by sync token, then their data."""
    t0 = time.perf_counter()
    status, _, body = client("REPORT", collection, SYNC.format(token).encode(), Depth="1")
    assert status == 207, (status, body[:300])
    root = ET.fromstring(body)
    changed, gone = [], 0
    for r in root.findall(f"{DAV}response"):
        href = r.findtext(f"{DAV}href")
        if r.find(f"{DAV}propstat") is None:
            gone += 1
        elif href and href.endswith(".ics"):
            changed.append(href)
    new_token = root.findtext(f"{DAV}sync-token") or ""
    items = 0
    for i in range(0, len(changed), BATCH):
        hrefs = "".join(f"<d:href>{h}</d:href>" for h in changed[i:i + BATCH])
        status, _, body = client("REPORT", collection, MULTIGET.format(hrefs).encode(), Depth="1")
        assert status == 207, (status, body[:300])
        items += sum(1 for d in ET.fromstring(body).iter("{urn:ietf:params:xml:ns:caldav}calendar-data") if d.text)
    return {"seconds": time.perf_counter() - t0, "items": items, "deleted": gone, "token": new_token}


class Target:
    def __init__(self, name: str, tmp: Path, cpus: set[int] | None) -> None:
        self.name, self.tmp, self.cpus = name, tmp / name, cpus
        self.tmp.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the server on its data (again, for a restart)."""
        raise NotImplementedError

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Barosync(Target):
    user = "alice"

    def start(self) -> None:
        self.launch()
        out = subprocess.run([sys.executable, "-m", "barosync", "token", "create", "--data", str(self.tmp / "data"),
                              "--user", self.user, "--project", "bench", "--project", "fresh", "--app-password"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        self.password = re.search(r"password:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        self.collection = f"/dav/calendars/{self.user}/bench/"

    def launch(self) -> None:
        data = self.tmp / "data"
        # One user seeds 10,000 events as fast as it can: the per-user HTTP limit (a
        # protection, not a cost; Radicale has none) would make the seed wait.
        config = self.tmp / "barosync.toml"
        config.write_text("[server]\nhttp_rate_limit = 1000000\nhttp_rate_burst = 1000000\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "barosync", "serve", "--data", str(data), "--port", "0",
                                      "--config", str(config), "--no-browser-link", "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, preexec_fn=pin(self.cpus))
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if found := LISTENING.search(line):
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError("barosync serve exited before listening")

    def seed(self, n: int) -> float:
        t0 = time.perf_counter()
        errors: list[str] = []

        def put(lo: int) -> None:
            c = Client(self.port, self.user, self.password)
            for i in range(lo, n, SEED_CONNECTIONS):
                status, _, body = c("PUT", f"{self.collection}ev-{i}.ics", event(i), Content_Type="text/calendar")
                if status != 201:
                    errors.append(f"{status} {body[:200]!r}")
                    return
        threads = [threading.Thread(target=put, args=(k,)) for k in range(SEED_CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"seeding barosync failed: {errors[0]}")
        return time.perf_counter() - t0


class Radicale(Target):
    user = "alice"
    password = "anything"  # --auth-type none

    def start(self) -> None:
        self.port = free_port()
        self.launch()

    def launch(self) -> None:
        self.storage = self.tmp / "collections"
        self.proc = subprocess.Popen([sys.executable, "-m", "radicale", "--config", "", "--server-hosts",
                                      f"127.0.0.1:{self.port}", "--storage-filesystem-folder", str(self.storage),
                                      "--auth-type", "none", "--logging-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin(self.cpus))
        self.collection = f"/{self.user}/bench/"
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("radicale did not start") from None
                time.sleep(0.1)

    def seed(self, n: int) -> float:
        """Its own file layout, written directly (its PUT path would take minutes)."""
        t0 = time.perf_counter()
        folder = self.storage / "collection-root" / self.user / "bench"
        folder.mkdir(parents=True)
        (self.storage / "collection-root" / self.user / ".Radicale.props").write_text("{}")
        (folder / ".Radicale.props").write_text(json.dumps({"tag": "VCALENDAR", "D:displayname": "bench",
                                                            "C:supported-calendar-component-set": "VEVENT"}))
        for i in range(n):
            (folder / f"ev-{i}.ics").write_bytes(event(i))
        return time.perf_counter() - t0


def measure(target: Target, n: int, changes: int) -> dict:
    c = Client(target.port, target.user, target.password)
    rss0, cpu0 = target.rss_kb(), target.cpu_s()
    first = sync(c, target.collection)
    assert first["items"] == n, (target.name, first["items"], n)
    first_cpu = target.cpu_s() - cpu0
    warm = sync(c, target.collection)
    t0 = time.perf_counter()
    for i in range(changes):
        k = (i * 97) % n
        status, headers, _ = c("GET", f"{target.collection}ev-{k}.ics")
        assert status == 200, status
        status, _, body = c("PUT", f"{target.collection}ev-{k}.ics", event(k, f"Event {k} (changed)"),
                            Content_Type="text/calendar", If_Match=headers["etag"])
        assert status in (201, 204), (target.name, status, body[:200])
    put_seconds = time.perf_counter() - t0
    inc = sync(c, target.collection, first["token"])
    assert inc["items"] == changes, (target.name, inc)
    c2 = Client(target.port, target.user, target.password)
    fresh = target.collection.replace("/bench/", "/fresh/")
    if isinstance(target, Radicale):
        status, _, body = c2("MKCALENDAR", fresh)
        assert status == 201, (status, body[:200])
    fresh_n = min(FRESH_EVENTS, max(1, n // 10))
    t0 = time.perf_counter()
    for i in range(fresh_n):
        status, _, body = c2("PUT", f"{fresh}ev-{i}.ics", event(i), Content_Type="text/calendar")
        assert status == 201, (target.name, status, body[:200])
    fresh_put_seconds = time.perf_counter() - t0
    after_puts = sync(c2, fresh)
    assert after_puts["items"] == fresh_n, (target.name, after_puts["items"])
    rss = target.rss_kb()
    target.stop()
    target.launch()
    restarted = sync(Client(target.port, target.user, target.password), target.collection)
    assert restarted["items"] == n, (target.name, restarted["items"], n)
    return {"full_seconds": first["seconds"], "full_server_cpu_s": first_cpu, "warm_full_seconds": warm["seconds"],
            "edit_seconds": put_seconds, "incremental_seconds": inc["seconds"], "incremental_items": inc["items"],
            "restart_full_seconds": restarted["seconds"], "fresh_put_seconds": fresh_put_seconds,
            "after_puts_full_seconds": after_puts["seconds"], "fresh_events": fresh_n, "rss_growth_mb": (rss - rss0) / 1024, "bytes_read": c.bytes}


def run(n: int, changes: int, server_cpus: set[int] | None, load_cpus: set[int] | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="barosync-caldav-"))
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    out: dict = {"events": n, "changes": changes}
    try:
        for target in (Barosync("barosync", tmp, server_cpus), Radicale("radicale", tmp, server_cpus)):
            try:
                target.start()
                log(f"{target.name}: seeding {n:,} events")
                seeded = target.seed(n)
                log(f"{target.name}: seeded in {seeded:.1f} s; syncing")
                r = measure(target, n, changes)
                r["seed_seconds"] = seeded
                out[target.name] = r
                log(f"{target.name}: full sync {r['full_seconds']:.2f} s (warm {r['warm_full_seconds']:.2f}), "
                    f"{changes} edits {r['edit_seconds']:.2f} s, incremental {r['incremental_seconds']:.3f} s, "
                    f"after a restart {r['restart_full_seconds']:.2f} s, {r['fresh_events']:,} PUTs "
                    f"{r['fresh_put_seconds']:.1f} s then read {r['after_puts_full_seconds']:.2f} s")
            finally:
                target.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b, p = out["barosync"], out["radicale"]
    for key in ("full_seconds", "warm_full_seconds", "edit_seconds", "incremental_seconds", "restart_full_seconds",
                "fresh_put_seconds", "after_puts_full_seconds"):
        out[f"{key}_ratio"] = b[key] / p[key] if p[key] else None  # < 1: barosync is faster
    out["seed_puts_per_s"] = n / b["seed_seconds"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': one line on stdout)")
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, load_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (None, None)
    r = run(a.events, a.changes, server_cpus, load_cpus)
    text = json.dumps(r)
    if a.json == "-":
        print(text)
    elif a.json:
        Path(a.json).write_text(text)
    else:
        print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
