"""The sync inspector: JSON for scripts, the live page, closing one connection (it
resumes), `barosync status`, and admins only."""

from __future__ import annotations

import subprocess

import trio

from attack_helpers import barosync_cmd
from conftest import SECRET, http_exchange, open_client, running, token
from barosync.hooks.auth import create_token

ADMIN = create_token(SECRET, user_id="root", name="Root", projects="*", admin=True)


async def test_the_summary_shows_each_client_behind_or_not(data_dir) -> None:
    async with running(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", ["p1"], name="Alice"))
        await alice.subscribe()
        await alice.create(title="one")
        bob = await open_client(nursery, app, token("bob", ["p1"]))
        await bob.subscribe()
        await alice.create(title="two")
        await bob.recv_type("event:created")  # bob gets seq 2 and does not ack it (this test client never acks)
        status, _, found = await http_exchange(app.port, "GET", "/api/admin/summary", tok=ADMIN)
        assert status == 200
        server = found["server"]
        assert server["config"]["secret"] == "<hidden>" and server["health"] == "ok"
        assert {"name": "auth", "hooks": ["barosync_authenticate", "barosync_authorize"]} in server["plugins"]
        if server["storage"] == "lmdb":
            assert server["lmdb"]["usedBytes"] > 0
        else:  # BAROSYNC_TEST_POSTGRES=1
            assert server["storage"] == "postgresql" and server["lmdb"] is None
            assert server["config"]["cluster_postgres"] == "<hidden>"
        [project] = found["projects"]
        assert (project["id"], project["head"], project["subscribers"], project["present"]) == ("p1", 2, 2, ["alice", "bob"])
        by_user = {c["user"]: c for c in found["connections"]}
        assert by_user["alice"]["name"] == "Alice" and by_user["alice"]["codec"] == "json"
        [progress] = by_user["bob"]["projects"]
        assert (progress["head"], progress["delivered"], progress["acked"], progress["behind"]) == (2, 2, 1, 1)
        assert by_user["bob"]["unacked"] >= 1
        await bob.send("ack", id="p1:2")
        with trio.fail_after(5):
            while True:
                _, _, found = await http_exchange(app.port, "GET", "/api/admin/summary", tok=ADMIN)
                bob_now = next(c for c in found["connections"] if c["user"] == "bob")
                if bob_now["projects"][0]["acked"] == 2:
                    break
                await trio.sleep(0.02)


async def test_an_admin_closes_one_connection_and_others_are_refused(data_dir) -> None:
    async with running(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", ["p1"]))
        await alice.subscribe()
        session_id = next(iter(app.sessions)).id
        for tok in (token("alice", ["p1"]), token("alice", "*")):
            status, _, body = await http_exchange(app.port, "GET", "/api/admin/summary", tok=tok)
            assert status == 403 and "--admin" in body["message"]
        status, _, _ = await http_exchange(app.port, "GET", "/api/admin/summary")
        assert status == 401
        status, _, body = await http_exchange(app.port, "POST", f"/api/admin/connections/{session_id}/close", tok=ADMIN)
        assert status == 200 and body == {"closed": session_id}
        with trio.fail_after(5):
            while app.sessions:
                await trio.sleep(0.01)
        status, _, _ = await http_exchange(app.port, "POST", "/api/admin/connections/nope/close", tok=ADMIN)
        assert status == 404
        status, headers, page = await http_exchange(app.port, "GET", "/admin")
        assert status == 200 and b"sync inspector" in page and "script-src 'self'" in headers["content-security-policy"]


async def test_barosync_status_prints_the_summary(data_dir) -> None:
    async with running(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", ["p1"]))
        await alice.subscribe()
        await alice.create(title="one")
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            barosync_cmd("status", "--url", f"http://127.0.0.1:{app.port}", "--token", ADMIN),
            capture_output=True, text=True, timeout=60))
        assert done.returncode == 0, done.stderr
        assert "1 projects:" in done.stdout and "p1: seq 1" in done.stdout and "alice via json" in done.stdout
        refused = await trio.to_thread.run_sync(lambda: subprocess.run(
            barosync_cmd("status", "--url", f"http://127.0.0.1:{app.port}", "--token", token("alice", ["p1"])),
            capture_output=True, text=True, timeout=60))
        assert refused.returncode == 1 and "403" in refused.stderr and "--admin" in refused.stderr


def test_the_inspector_page_is_live_and_closes_a_connection(chromium, tmp_path) -> None:
    from test_web_client import CREATE, END, START, Server, Tab, new_context

    server = Server(tmp_path)
    try:
        admin_page = chromium.new_context().new_page()
        errors: list[str] = []
        admin_page.on("pageerror", lambda e: errors.append(str(e)))
        admin_page.goto(f"{server.url}/admin#token={server.token('root', admin=True)}")
        admin_page.wait_for_selector("#server-status:has-text('0 connections')")
        tab = Tab(new_context(chromium), server.port)
        tab.open_client(server.ws, server.token("alice", name="Alice"))
        tab.js("c.subscribe('team')")
        tab.js(CREATE, ["c", "team", {"title": "x", "startDate": START, "endDate": END}])
        admin_page.wait_for_selector("#connections tr:has-text('Alice (alice)')")  # without a reload
        admin_page.wait_for_selector("#projects tr:has-text('team')")
        admin_page.click("#connections button")
        tab.wait("cLog.some(e => e.type === 'state' && e.detail.code === 1001)")
        tab.wait("c.state === 'connected'")  # it reconnected and resumed
        assert errors == []
    finally:
        server.stop()
