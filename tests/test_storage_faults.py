"""Storage faults: a full disk (or a map at its ceiling) degrades the server, a failed
sync stops it. Real LMDB throughout; a real tmpfs filled and grown under a real
`barosync serve` subprocess; a subprocess whose store fails like a broken disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from barosync.engine.writer import out_of_space
from barosync.client import ServerError, SyncClient

from attack_helpers import WS, Closed, ServerProcess, barosync_cmd, event_payload, mint, start_server, uid
from conftest import http_exchange, open_client, running, token

pytestmark = pytest.mark.slow  # full disks and failed syncs, on a real tmpfs

BIG = "x" * 4096  # a 4 KB description, as in the report that found the bug


def test_out_of_space_is_told_apart_from_errors_that_doubt_durability(tmp_path: Path) -> None:
    assert out_of_space(lmdb.DiskError("mdb_txn_commit: No space left on device"), tmp_path)
    assert out_of_space(lmdb.MapFullError("mdb_put: MDB_MAP_FULL"), tmp_path)
    assert out_of_space(OSError(122, "Disk quota exceeded"), tmp_path)
    # EIO on a disk with room is a real I/O error (fsync failed): durability in doubt.
    assert out_of_space(lmdb.Error("mdb_txn_commit: Input/output error"), tmp_path) is None
    assert out_of_space(lmdb.PanicError("mdb_txn_begin: MDB_PANIC"), tmp_path) is None


async def test_a_full_map_refuses_writes_and_keeps_everything_else(data_dir: Path) -> None:
    async with running(data_dir, map_size=1 << 20, max_map_size=1 << 20) as (app, nursery):
        writer = await open_client(nursery, app, token("alice"))
        watcher = await open_client(nursery, app, token("bob"))
        await watcher.subscribe()
        acked: list[str] = []
        refused: dict[str, Any] = {}
        while not refused:
            answer = await writer.create(description=BIG)
            if answer["type"] == "ack":
                acked.append(answer["payload"]["event"]["id"])
            else:
                refused[answer["payload"]["ref"]] = answer
            assert len(acked) < 500, "the map never filled"
        error = next(iter(refused.values()))
        assert error["type"] == "error" and error["payload"]["code"] == "storage_full"
        assert error["payload"]["retryAfter"] > 0 and "storage full" in error["payload"]["message"]
        # While degraded every write is answered at once, with its own ref.
        for _ in range(3):
            again = await writer.create(description=BIG)
            assert again["type"] == "error" and again["payload"]["code"] == "storage_full"
            assert again["payload"]["ref"] not in acked
        # A retry of a change stored before the map filled still gets its original answer.
        first = next(m for m in writer.seen if m["type"] == "ack" and "event" in m.get("payload", {}))
        replay = await writer.request("event:create", event_payload(description=BIG), id=first["id"])
        assert replay["type"] == "ack" and replay["payload"] == first["payload"]

        # Reads, subscriptions, presence and cursors go on.
        late = await open_client(nursery, app, token("carol"))
        sub = await late.subscribe()
        assert sub["type"] == "ack" and sub["payload"]["seq"] == len(acked)
        snapshot = await late.recv_type("sync:snapshot")
        assert len(snapshot["payload"]["events"]) == len(acked)
        joined = await watcher.recv_type("user:joined")
        assert joined["payload"]["id"] == "carol"
        await late.send("user:cursor", {"projectId": "p1", "x": 1, "y": 2})
        cursor = await watcher.recv_type("user:cursor")
        assert cursor["payload"]["userId"] == "carol"
        await late.send("ping", timestamp=7)
        assert (await late.recv_type("pong"))["timestamp"] == 7

        status, headers, body = await http_exchange(app.port, "GET", "/healthz")
        assert status == 503 and body["status"] == "degraded" and "storage full" in body["reason"]
        status, headers, body = await http_exchange(app.port, "POST", "/api/events", event_payload(description=BIG),
                                                    tok=token("alice"))
        assert status == 507 and body["error"] == "storage_full" and int(headers["retry-after"]) >= 1
        status, _, body = await http_exchange(app.port, "GET", "/api/projects/p1/events", tok=token("alice"))
        assert status == 200 and len(body["events"]) == len(acked)
        _, _, metrics = await http_exchange(app.port, "GET", "/metrics")
        assert b"barosync_storage_degraded 1.0" in metrics
        # Nothing refused was stored, and the server still holds exactly what it acked.
        assert app.store.current_seq("p1") == len(acked)
        assert {e["id"] for e in app.store.snapshot("p1")[1]} == set(acked)
        assert app.writer.failure is None


# -- a real small disk ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs (needs root and mount: skipped where either is missing)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def next_of(ws: WS, kind: str) -> dict[str, Any]:
    """The next message of ``kind``, including one that request() set aside."""
    for n, msg in enumerate(ws.others):
        if msg["type"] == kind:
            return ws.others.pop(n)
    return (await ws.recv_until(lambda m: m["type"] == kind))[-1]


class Filler:
    """A client that creates big events until the server refuses one for storage."""

    def __init__(self, ws: WS, project: str) -> None:
        self.ws = ws
        self.project = project
        self.acked: dict[str, dict[str, Any]] = {}  # envelope id -> ack payload
        self.refused: dict[str, dict[str, Any]] = {}  # envelope id -> error payload
        self.payloads: dict[str, dict[str, Any]] = {}

    async def fill(self) -> None:
        while not self.refused:
            await self.send(uid())
            assert len(self.acked) < 2000, "the disk never filled"

    async def send(self, envelope_id: str) -> dict[str, Any]:
        payload = self.payloads.setdefault(envelope_id, event_payload(self.project, id=envelope_id, description=BIG))
        msg = await self.ws.request("event:create", payload, id=envelope_id)
        if msg["type"] == "ack":
            self.acked[envelope_id] = msg["payload"]
            self.refused.pop(envelope_id, None)
        else:
            self.refused[envelope_id] = msg["payload"]
        return msg


async def test_a_full_disk_degrades_and_recovers_without_a_restart(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    server = await start_server(data)
    try:
        tok = await trio.to_thread.run_sync(lambda: mint(data, "alice", "--all-projects"))
        bob = await trio.to_thread.run_sync(lambda: mint(data, "bob", "--all-projects"))
        fillers = [Filler(await WS.connect(server.port, tok), f"p{n}") for n in range(3)]
        watcher = await WS.connect(server.port, bob)
        assert (await watcher.request("subscribe", {"projectId": "p0"}))["type"] == "ack"
        async with trio.open_nursery() as nursery:
            for f in fillers:
                nursery.start_soon(f.fill)
        refused = {k: v for f in fillers for k, v in f.refused.items()}
        assert refused and all(e["code"] == "storage_full" and e["ref"] == k for k, e in refused.items()), refused
        assert not set(refused) & {k for f in fillers for k in f.acked}
        assert server.alive()

        # Degraded: reads, subscriptions and presence go on; /healthz says so.
        status, health = await trio.to_thread.run_sync(_health, server.port)
        assert status == 503 and health["status"] == "degraded"
        late = await WS.connect(server.port, tok)
        assert (await late.request("subscribe", {"projectId": "p0"}))["payload"]["seq"] == len(fillers[0].acked)
        assert (await next_of(watcher, "user:joined"))["payload"]["id"] == "alice"
        code, headers, body = await http_exchange(server.port, "POST", "/api/events", event_payload("p0"), tok=tok)
        assert code == 507 and body["error"] == "storage_full" and "retry-after" in headers

        # A Python client's change made now stays queued through the full disk...
        async with SyncClient(f"ws://127.0.0.1:{server.port}/ws", token=tok, store=tmp_path / "client") as client:
            created: list[dict[str, Any]] = []
            told: list[ServerError] = []
            client.on(ServerError, told.append)

            async def create() -> None:
                created.append(await client.create("pc", id="queued-1", title="Queued", startDate="2026-01-05T09:00:00Z",
                                                   endDate="2026-01-05T09:15:00Z"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                with trio.fail_after(10):
                    while not any(e.code == "storage_full" for e in told):
                        await trio.sleep(0.05)
                assert not created and client.progress.pending == 1
                # ... until the disk grows: then writes are accepted again, no restart.
                done = await trio.to_thread.run_sync(lambda: subprocess.run(
                    ["mount", "-o", "remount,size=32m", str(small_disk)], capture_output=True, text=True))
                assert done.returncode == 0, done.stderr
            assert created[0]["id"] == "queued-1" and created[0]["version"] == 1

        with trio.fail_after(15):
            while True:
                msg = await fillers[0].send(next(iter(fillers[0].refused)) if fillers[0].refused else uid())
                if msg["type"] == "ack":
                    break
                await trio.sleep(0.5)
        # Every refused change, sent again with its envelope id, is stored exactly once.
        for f in fillers:
            for envelope_id in list(f.refused):
                assert (await f.send(envelope_id))["type"] == "ack"
        status, health = await trio.to_thread.run_sync(_health, server.port)
        assert status == 200 and health["status"] == "ok"
        assert "storage full" in server.stderr and "writable again" in server.stderr
        await trio.to_thread.run_sync(server.kill9)

        # Every acked write survived kill -9, once; the data checks clean.
        server = await start_server(data)
        reader = await WS.connect(server.port, tok)
        for f in fillers:
            answer = await reader.request("subscribe", {"projectId": f.project})
            snapshot = await next_of(reader, "sync:snapshot")
            ids = [e["id"] for e in snapshot["payload"]["events"]]
            assert sorted(ids) == sorted(f.acked) and answer["payload"]["seq"] == len(f.acked)
        await reader.request("subscribe", {"projectId": "pc"})
        snapshot = await next_of(reader, "sync:snapshot")
        assert [e["id"] for e in snapshot["payload"]["events"]] == ["queued-1"]
    finally:
        server.stop()
    check = await trio.to_thread.run_sync(lambda: subprocess.run(
        barosync_cmd("check", "--data", str(data)), capture_output=True, text=True, timeout=60))
    assert check.returncode == 0, check.stdout + check.stderr


# -- a disk whose sync fails: fail-stop -------------------------------------------------------

# The real server, with a store whose commits start failing like a broken disk: the
# commit writes, then its sync reports EIO (as fsync does when the device fails).
FAILING_SERVER = textwrap.dedent("""
    import os, sys
    import lmdb
    from barosync.storage import store
    from barosync.cli import main

    good = int(os.environ["GOOD_COMMITS"])
    commit_batch = store.Store.commit_batch

    def failing(self, batch):
        global good
        outcomes = commit_batch(self, batch)
        if good <= 0:
            raise lmdb.Error("mdb_env_sync: Input/output error")
        good -= 1
        return outcomes

    store.Store.commit_batch = failing
    sys.exit(main(sys.argv[1:]))
""")


async def test_a_failed_sync_stops_the_server_and_loses_nothing_acked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    script = tmp_path / "failing_server.py"
    script.write_text(FAILING_SERVER)
    tok = await trio.to_thread.run_sync(lambda: mint(data, "alice", "--all-projects"))
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--port", "0", "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "GOOD_COMMITS": "5"})
    try:
        line = await trio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        port = int(line.decode().rsplit(":", 1)[1])
        writer = await WS.connect(port, tok)
        watcher = await WS.connect(port, tok)
        await watcher.request("subscribe", {"projectId": "p1"})
        acked = []
        for _ in range(5):
            msg = await writer.request("event:create", event_payload("p1"))
            assert msg["type"] == "ack"
            acked.append(msg["payload"]["event"]["id"])
        failed_id = uid()
        msg = await writer.request("event:create", event_payload("p1"), id=failed_id)
        assert msg["type"] == "error" and msg["payload"]["code"] == "storage_failed"
        assert msg["payload"]["ref"] == failed_id and msg["payload"]["retryAfter"] > 0
        # Every connection gets a close frame saying to come back later, not a reset.
        for ws in (writer, watcher):
            with pytest.raises(Closed) as closed:
                while True:
                    await ws.recv()
            assert closed.value.code == 1011, closed.value
        code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        stderr = proc.stderr.read().decode()  # type: ignore[union-attr]
        assert code == 1, stderr
        assert "storage failed in" in stderr and "Input/output error" in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    server = await start_server(data)
    try:
        reader = await WS.connect(server.port, tok)
        await reader.request("subscribe", {"projectId": "p1"})
        snapshot = await next_of(reader, "sync:snapshot")
        stored = {e["id"] for e in snapshot["payload"]["events"]}
        assert set(acked) <= stored
    finally:
        server.stop()


# -- the browser client keeps a refused change ---------------------------------------------


def test_the_browser_client_keeps_changes_through_a_full_disk(small_disk: Path, chromium) -> None:
    from test_web_client import Tab, new_context

    data = small_disk / "data"
    server = ServerProcess(data)
    try:
        tok = mint(data, "alice", "--all-projects")

        n = 0
        while _post_big(server.port, tok, n) != 507:
            n += 1
            assert n < 3000, "the disk never filled"
        tab = Tab(new_context(chromium), server.port)
        tab.open_client(f"ws://127.0.0.1:{server.port}/ws", tok)
        tab.js("c.subscribe('p1')")
        tab.js("""() => { window.saved = null;
            c.create('p1', {title: 'kept', startDate: '2026-01-05T09:00:00Z', endDate: '2026-01-05T10:00:00Z'})
             .then((ev) => { window.saved = ev; }); }""")
        tab.wait("cLog.some(e => e.type === 'sync' && e.detail.error && e.detail.error.code === 'storage_full')")
        assert tab.js("c.syncStatus().pending") == 1 and tab.js("window.saved") is None
        assert [e["title"] for e in tab.js("c.events('p1')")] == ["kept"]  # still shown, pending
        grown = subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        tab.wait("window.saved !== null && c.syncStatus().status === 'synced'", timeout=20_000)
        assert tab.js("window.saved.version") == 1
        reader = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/projects/p1/events",
                                        headers={"Authorization": f"Bearer {tok}"})
        with urllib.request.urlopen(reader, timeout=5) as response:
            assert [e["title"] for e in json.loads(response.read())["events"]] == ["kept"]  # once
        assert tab.real_errors() == []
    finally:
        server.stop()


def test_the_web_calendar_says_the_server_storage_is_full(small_disk: Path, chromium) -> None:
    from test_web_app import App

    data = small_disk / "data"
    server = ServerProcess(data)
    try:
        tok = mint(data, "alice", "--all-projects")
        n = 0
        while _post_big(server.port, tok, n) != 507:
            n += 1
            assert n < 3000, "the disk never filled"
        app = App(chromium, f"http://127.0.0.1:{server.port}/#token={tok}")
        app.wait_connected()
        app.page.click("#new-event")
        app.fill_editor("Kept for later")
        app.page.wait_for_function("() => document.getElementById('sync').textContent.includes('server storage full')")
        assert "your changes are kept and will be sent" in app.text("#sync")
        app.shot("storage-full")
        grown = subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        app.page.wait_for_function("() => document.getElementById('sync').textContent.startsWith('all changes saved')",
                                   timeout=20_000)
        assert app.errors == []
    finally:
        server.stop()


def _post_big(port: int, tok: str, n: int) -> int:
    body = json.dumps(event_payload("fill", title=f"fill {n}", description=BIG)).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/events", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {tok}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
