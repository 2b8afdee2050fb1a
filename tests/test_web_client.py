"""The browser client (barosync/web/barosync.js) in real Chromium against a real
`barosync serve`: live changes between browsers, offline edits across a reload,
kill -9 of the server, token refresh, tabs sharing one queue, conflicts, presence and
cursors, and a close() that leaves nothing running.

Pages live on the server's own origin (http://127.0.0.1:PORT/test/…), fulfilled by
Playwright routes so that they load while the server or the network is down, the way
a service worker would serve them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import pytest

from attack_helpers import ServerProcess, barosync_cmd, write_config
from barosync.hooks.auth import create_token

CLIENT_JS = resources.files("barosync").joinpath("web", "barosync.js").read_text()
PAGE = """<!doctype html><meta charset=utf-8><title>barosync test</title>
<script type=module>
  window.mod = await import("/client/barosync.js");
  window.ready = true;
</script>"""
START = "2026-01-05T09:00:00Z"
END = "2026-01-05T10:00:00Z"
# What a page may log while the network is deliberately down (Chromium logs failed
# WebSocket handshakes and fetches itself).
NETWORK_NOISE = ("WebSocket connection to", "net::ERR_", "Failed to load resource")
# How long a test waits for a promise it evaluates in the page (see Tab.js).
JS_TIMEOUT_MS = 20_000


class Server:
    """A `barosync serve` subprocess for browser tests: tokens, links, and what it stored."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.data = tmp / "data"
        self.config = write_config(tmp / "barosync.toml", **config) if config else None
        self.proc = ServerProcess(self.data, config=self.config)
        self.port = self.proc.port
        self.secret = (self.data / "secret").read_text().strip()

    def token(self, user: str, projects: Any = "*", **claims: Any) -> str:
        return create_token(self.secret, user_id=user, projects=projects, **claims)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def link(self, user: str, name: str, project: str = "team", *, role: str = "project") -> str:
        """A sign-in link from the real CLI (`barosync token create --link`); ``role``
        "viewer" makes the project read-only for the user."""
        done = subprocess.run(barosync_cmd("token", "create", "--data", str(self.data), "--user", user, "--name", name,
                                           f"--{role}", project, "--link", "--url", self.url),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def events(self, project: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/projects/{project}/events",
                                         headers={"Authorization": f"Bearer {self.token('checker')}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["events"]

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


class Tab:
    """One page with the client module loaded, its console and errors recorded."""

    def __init__(self, context: Any, port: int) -> None:
        self.page = context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.sockets = 0  # WebSockets the page opened (or tried to)
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("websocket", self._watch)
        self.page.goto(f"http://127.0.0.1:{port}/test/index.html")
        self.page.wait_for_function("window.ready === true")

    def _watch(self, ws: Any) -> None:
        self.sockets += 1
        def sent(payload: Any) -> None:
            try:
                self.sent.append(json.loads(payload))
            except (TypeError, ValueError):
                pass
        ws.on("framesent", sent)

    def js(self, script: str, arg: Any = None, timeout: float = JS_TIMEOUT_MS) -> Any:
        """Evaluate ``script`` (an expression, or a function of ``arg``) and await its
        promise, at most ``timeout`` ms: Playwright's evaluate has no timeout of its own,
        so a promise that never settles would hang the suite. On timeout the error
        carries the client's state, for the test's failure message."""
        is_function = re.match(r"\s*(async\s+)?(\(|function\b|[A-Za-z_$][\w$]*\s*=>)", script) is not None
        call = f"({script})(arg)" if is_function else f"({script})"
        wrapped = f"""async (arg) => {{
            const value = {call};
            if (!value || typeof value.then !== "function") return value;  // no promise: no timer
            let timer;
            const late = new Promise((_, reject) => {{ timer = setTimeout(() => reject(new Error(
                "no answer within {timeout:g} ms; client state: " + JSON.stringify(Object.fromEntries(
                    Object.keys(window).filter((k) => window[k] && window[k].syncStatus).map((k) => [k, {{
                        state: window[k].state, leader: window[k]._leader, queued: window[k]._queue.size,
                        inflight: window[k]._inflight.size, sync: window[k].syncStatus()}}]))))), {timeout:g}); }});
            try {{ return await Promise.race([value, late]); }}
            finally {{ clearTimeout(timer); }}
        }}"""
        return self.page.evaluate(wrapped, arg)

    def wait(self, condition: str, arg: Any = None, timeout: float = 10_000) -> Any:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            return self.page.wait_for_function(condition, arg=arg, timeout=timeout)
        except PlaywrightTimeout:
            # Say where the clients were, so a failure in CI explains itself.
            where = self.page.evaluate("""() => JSON.stringify({online: navigator.onLine, clients: Object.fromEntries(
                Object.keys(window).filter((k) => window[k] && window[k].syncStatus).map((k) => [k, {
                    state: window[k].state, socket: window[k]._ws ? window[k]._ws.readyState : null,
                    closeCode: window[k].closeCode, sync: window[k].syncStatus()}]))})""")
            raise AssertionError(f"{condition!r} did not hold within {timeout:g} ms; {where}") from None

    def open_client(self, url: str, token: str, name: str = "c", **options: Any) -> None:
        self.js("""([url, token, name, options]) => {
            window[name] = new window.mod.SyncClient(url, {token, ...options});
            window[name + "Log"] = [];
            for (const type of ["state", "change", "presence", "cursor", "conflict", "sync", "error"]) {
              window[name].addEventListener(type, (e) => window[name + "Log"].push({type, detail: e.detail}));
            }
        }""", [url, token, name, options])

    def real_errors(self) -> list[str]:
        noise = [line for line in self.console if line.startswith("error:") and not any(n in line for n in NETWORK_NOISE)]
        return self.errors + noise


def new_context(browser: Any) -> Any:
    context = browser.new_context()
    context.route("**/test/index.html", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
    context.route("**/client/barosync.js", lambda route: route.fulfill(body=CLIENT_JS, content_type="text/javascript"))
    return context


CREATE = """([name, project, fields]) => window[name].create(project, fields)"""


def test_two_browsers_see_each_others_changes(chromium, server) -> None:
    one, two = new_context(chromium), new_context(chromium)
    a, b = Tab(one, server.port), Tab(two, server.port)
    a.open_client(server.ws, server.token("alice"))
    b.open_client(server.ws, server.token("bob"))
    for tab in (a, b):
        tab.js("c.subscribe('p1')")
    made = a.js(CREATE, ["c", "p1", {"title": "Standup", "startDate": START, "endDate": END}])
    assert made["version"] == 1 and made["createdBy"] == "alice"
    b.wait("(id) => c.get(id) && c.get(id).title === 'Standup'", made["id"])
    updated = b.js("(id) => c.update(id, {title: 'Standup (moved)', location: 'Room 2'})", made["id"])
    assert updated["version"] == 2
    a.wait("(id) => c.get(id).location === 'Room 2'", made["id"])
    b.js("(id) => c.delete(id)", made["id"])
    a.wait("(id) => c.get(id) === undefined", made["id"])
    # One change arrived once each, in seq order, and the server has it so.
    seqs = a.js("cLog.filter(e => e.type === 'change' && e.detail.seq).map(e => e.detail.seq)")
    assert seqs == sorted(set(seqs)) and seqs[-1] == 3
    # Changes are acked cumulatively (the hello offers it): one {projectId, seq} per
    # ~100 ms, rising to the last seq; no ack by id for a change.
    def upto_sent() -> list[dict[str, Any]]:
        return [m["payload"] for m in a.sent if m.get("type") == "ack" and "payload" in m]

    deadline = time.monotonic() + 10
    while not (upto_sent() and upto_sent()[-1]["seq"] == 3) and time.monotonic() < deadline:
        a.page.wait_for_timeout(50)  # pumps Playwright's frame events
    upto = upto_sent()
    assert upto and {u["projectId"] for u in upto} == {"p1"} and upto[-1]["seq"] == 3
    assert [u["seq"] for u in upto] == sorted({u["seq"] for u in upto})
    by_id = [m["id"] for m in a.sent if m.get("type") == "ack" and "payload" not in m]
    assert not [i for i in by_id if i.startswith("p1:")]
    assert server.events("p1") == []
    assert a.real_errors() == [] and b.real_errors() == []

    size = len(CLIENT_JS.encode())
    print(f"\nbarosync.js: {size} bytes, {len(gzip.compress(CLIENT_JS.encode()))} gzipped")


def test_cumulative_acks_follow_the_cadence_the_hello_asks_for(chromium, tmp_path) -> None:
    """A server that asks for cumulative acks every 30 s (hello.ackIntervalMs) gets
    none while changes arrive (the module's own cadence is 100 ms); close() sends the
    pending one."""
    server = Server(tmp_path, server__ack_interval=30.0)
    try:
        a, b = Tab(new_context(chromium), server.port), Tab(new_context(chromium), server.port)
        a.open_client(server.ws, server.token("alice"))
        b.open_client(server.ws, server.token("bob"))
        for tab in (a, b):
            tab.js("c.subscribe('p1')")
        assert a.js("c.hello.ackIntervalMs") == 30_000
        made = b.js(CREATE, ["c", "p1", {"title": "Standup", "startDate": START, "endDate": END}])
        a.wait("(id) => c.get(id) && c.get(id).title === 'Standup'", made["id"])
        a.page.wait_for_timeout(500)  # five of the module's own cadence

        def upto_sent() -> list[dict[str, Any]]:
            return [m["payload"] for m in a.sent if m.get("type") == "ack" and "payload" in m]

        assert upto_sent() == []
        a.js("c.close()")
        deadline = time.monotonic() + 10
        while not upto_sent() and time.monotonic() < deadline:
            a.page.wait_for_timeout(50)
        assert upto_sent() == [{"projectId": "p1", "seq": 1}]
        assert a.real_errors() == [] and b.real_errors() == []
    finally:
        server.stop()


def test_subscribing_again_to_a_live_project_resolves(chromium, server) -> None:
    """subscribe() answers at the next caught-up point even when the project is live
    already (as when the hello subscribed it while subscribe() was loading the stored
    copy): it used to wait for ever."""
    tab = Tab(new_context(chromium), server.port)
    tab.open_client(server.ws, server.token("alice"), storage="memory")
    tab.js("c.subscribe('p1')")
    tab.js(CREATE, ["c", "p1", {"title": "x", "startDate": START, "endDate": END}])
    tab.js("c.subscribe('p1')", timeout=5_000)
    assert tab.js("c.events('p1').length") == 1


def test_a_thousand_event_snapshot_loads_and_the_module_is_served(chromium, server) -> None:
    creator = Tab(new_context(chromium), server.port)
    creator.open_client(server.ws, server.token("alice"), storage="memory")
    creator.js("""async () => {
        const all = [];
        for (let i = 0; i < 1000; i++) all.push(c.create('big', {title: 'event ' + i, startDate: '2026-01-05T09:00:00Z', endDate: '2026-01-05T10:00:00Z'}));
        await Promise.all(all);
    }""")
    reader = Tab(new_context(chromium), server.port)
    reader.open_client(server.ws, server.token("bob"), storage="memory")
    took = reader.js("async () => { const t0 = performance.now(); await c.subscribe('big'); return performance.now() - t0; }")
    assert reader.js("c.events('big').length") == 1000
    # ~300 KB of events: asked for in parts (each within the server's message size)
    [sub] = [m for m in reader.sent if m.get("type") == "subscribe"]
    assert sub["payload"] == {"projectId": "big", "snapshotParts": True}
    print(f"\n1,000-event snapshot: subscribe to caught up in {took:.0f} ms")
    # The server ships the module with its type, an ETag and revalidation.
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/client/barosync.js", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/javascript")
        assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]
        assert response.read().decode() == CLIENT_JS
        etag = response.headers["etag"]
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/client/barosync.js", headers={"If-None-Match": etag})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(request, timeout=5)
    assert not_modified.value.code == 304


def test_offline_edits_survive_a_reload_and_are_stored_once(chromium, server) -> None:
    context = new_context(chromium)
    tab = Tab(context, server.port)
    token = server.token("alice")
    tab.open_client(server.ws, token)
    tab.js("c.subscribe('p1')")
    tab.js(CREATE, ["c", "p1", {"title": "online", "startDate": START, "endDate": END}])
    context.set_offline(True)
    tab.wait("c.state === 'offline'")
    # While the browser says it is offline, nothing is tried (each try would only fail
    # and print an error): no socket for a few backoff steps' time.
    tried = tab.sockets
    time.sleep(3)
    assert tab.sockets == tried and tab.js("c.state === 'offline' && c.retryAt === null")
    tab.js("""() => { void c.create('p1', {title: 'offline 1', startDate: '2026-01-05T11:00:00Z', endDate: '2026-01-05T12:00:00Z'});
                      void c.create('p1', {title: 'offline 2', startDate: '2026-01-05T13:00:00Z', endDate: '2026-01-05T14:00:00Z'}); }""")
    tab.wait("c.syncStatus().pending === 2 && c.syncStatus().status === 'offline'")
    assert sorted(e["title"] for e in tab.js("c.events('p1')")) == ["offline 1", "offline 2", "online"]
    tab.page.reload()  # still offline: the page comes from the route, the queue from IndexedDB
    tab.wait("window.ready === true")
    tab.open_client(server.ws, token)
    tab.js("void c.subscribe('p1')")
    # The queue is loaded with the client, the project's stored copy by subscribe():
    # wait for both (checking right after the queue raced the copy's read).
    tab.wait("c.syncStatus().pending === 2 && c.lastSeq('p1') === 1")
    assert sorted(e["title"] for e in tab.js("c.events('p1')")) == ["offline 1", "offline 2", "online"]
    assert tab.sockets == tried and tab.js("c.state") == "offline"  # opened offline: no try either
    context.set_offline(False)
    tab.wait("c.state === 'connected' && c.syncStatus().status === 'synced'")
    stored = sorted(e["title"] for e in server.events("p1"))
    assert stored == ["offline 1", "offline 2", "online"]  # each exactly once
    assert tab.real_errors() == []


def test_kill_9_and_restart_the_client_resumes_without_gaps(chromium, server) -> None:
    tab = Tab(new_context(chromium), server.port)
    tab.open_client(server.ws, server.token("alice"))
    tab.js("c.subscribe('p1')")
    for n in range(3):
        tab.js(CREATE, ["c", "p1", {"title": f"before {n}", "startDate": START, "endDate": END}])
    server.proc.kill9()
    tab.wait("c.state === 'reconnecting'")
    # Back on the same port (as systemd would restart it), and someone else writes
    # before the client is back.
    server.proc = ServerProcess(server.data, port=server.port)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/api/events", method="POST",
        data=json.dumps({"projectId": "p1", "title": "while away", "startDate": START, "endDate": END}).encode(),
        headers={"Authorization": f"Bearer {server.token('bob')}", "Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()
    tab.wait("c.state === 'connected' && c.events('p1').length === 4", timeout=40_000)
    seqs = tab.js("cLog.filter(e => e.type === 'change' && e.detail.seq).map(e => e.detail.seq)")
    assert seqs == [4], seqs  # resumed with since=3: exactly the one it missed, once
    assert tab.js("c.lastSeq('p1')") == 4


def test_an_expiring_token_is_refreshed_and_a_refused_one_needs_auth(chromium, server) -> None:
    tab = Tab(new_context(chromium), server.port)
    tokens = iter(server.token("alice", ttl=4) for _ in range(100))
    tab.page.expose_function("nextToken", lambda: next(tokens))
    tab.js("""(url) => { window.c = new window.mod.SyncClient(url, {token: () => window.nextToken()});
                         window.states = []; c.addEventListener('state', e => states.push(e.detail)); }""", server.ws)
    tab.js("c.subscribe('p1')")
    sent = lambda: [m for m in tab.sent if m.get("type") == "auth:refresh"]  # noqa: E731
    deadline = time.monotonic() + 10
    while not sent() and time.monotonic() < deadline:
        tab.page.wait_for_timeout(100)
    assert sent(), "no auth:refresh before the token expired"
    # Each refreshed token is refreshed in turn: past three 4 s lifetimes, still the
    # same connection (the client used to refresh once, then hit 4001 at the second
    # token's expiry).
    deadline = time.monotonic() + 20
    while len(sent()) < 3 and time.monotonic() < deadline:
        tab.page.wait_for_timeout(200)
    assert len(sent()) >= 3, sent()
    assert tab.js("c.state") == "connected"
    assert not [s for s in tab.js("states") if s["code"] == 4001]

    bad = Tab(new_context(chromium), server.port)
    bad.open_client(server.ws, "not-a-token")
    bad.wait("c.state === 'needs-auth'")
    attempts = len([m for m in bad.console if "WebSocket connection" in m])
    bad.page.wait_for_timeout(1500)
    assert len([m for m in bad.console if "WebSocket connection" in m]) == attempts  # no loop


def test_two_tabs_share_one_queue_and_one_flusher(chromium, server) -> None:
    context = new_context(chromium)
    a, b = Tab(context, server.port), Tab(context, server.port)
    token = server.token("alice")
    a.open_client(server.ws, token)
    a.wait("cLog !== undefined")
    a.page.wait_for_timeout(200)  # a takes the lock first
    b.open_client(server.ws, token)
    for tab in (a, b):
        tab.js("c.subscribe('p1')")
    made = b.js(CREATE, ["c", "p1", {"title": "from tab b", "startDate": START, "endDate": END}])
    assert made["version"] == 1
    a.wait("(id) => c.get(id) !== undefined", made["id"])
    creates = [m for tab in (a, b) for m in tab.sent if m.get("type") == "event:create"]
    assert len(creates) == 1 and creates[0] in a.sent  # the lock holder sent it, once
    assert [e["title"] for e in server.events("p1")] == ["from tab b"]
    # Tab a closes with a change queued while offline; tab b takes over and sends it.
    context.set_offline(True)
    a.wait("c.state === 'offline'")
    a.js("void c.create('p1', {title: 'left behind', startDate: '2026-01-05T11:00:00Z', endDate: '2026-01-05T12:00:00Z'})")
    b.wait("c.syncStatus().pending === 1")
    a.page.close()
    context.set_offline(False)
    b.wait("c.syncStatus().status === 'synced'", timeout=15_000)
    assert sorted(e["title"] for e in server.events("p1")) == ["from tab b", "left behind"]


def test_a_conflict_is_surfaced_and_resolved_each_way(chromium, tmp_path) -> None:
    server = Server(tmp_path, conflict__default="manual")
    try:
        context_b = new_context(chromium)
        a, b = Tab(new_context(chromium), server.port), Tab(context_b, server.port)
        a.open_client(server.ws, server.token("alice"))
        b.open_client(server.ws, server.token("bob"))
        for tab in (a, b):
            tab.js("c.subscribe('p1')")
        made = a.js(CREATE, ["c", "p1", {"title": "Plan", "startDate": START, "endDate": END}])
        event_id = made["id"]
        b.wait("(id) => c.get(id) !== undefined", event_id)
        for n, (choice, expected) in enumerate((("local", "bob's 0"), ("remote", "alice's 1"), ({"title": "by hand"}, "by hand"))):
            # b edits offline, from the version it has; a edits meanwhile.
            context_b.set_offline(True)
            b.wait("c.state === 'offline'")
            b.js("""([id, t]) => { window.result = c.update(id, {title: t}).then(
                       (ev) => ({ok: ev}), (e) => ({name: e.name, conflict: e.conflict})); }""", [event_id, f"bob's {n}"])
            a.js("([id, t]) => c.update(id, {title: t})", [event_id, f"alice's {n}"])
            context_b.set_offline(False)
            result = b.js("window.result")
            assert result["name"] == "ConflictError", result
            conflict = result["conflict"]
            assert conflict["strategy"] == "manual" and conflict["remoteVersion"]["title"] == f"alice's {n}"
            assert conflict["localVersion"]["title"] == f"bob's {n}" and "title" in conflict["fields"]
            assert b.js("cLog.filter(e => e.type === 'conflict').length") == n + 1
            b.js("([conflict, choice]) => c.resolve(conflict, choice)", [conflict, choice])
            a.wait("([id, t]) => c.get(id) && c.get(id).title === t", [event_id, expected])
            b.wait("([id, t]) => c.get(id) && c.get(id).title === t", [event_id, expected])
            assert [e["title"] for e in server.events("p1")] == [expected]
        assert a.real_errors() == [] and b.real_errors() == []
    finally:
        server.stop()


def test_presence_and_cursors_come_and_go(chromium, server) -> None:
    a, b = Tab(new_context(chromium), server.port), Tab(new_context(chromium), server.port)
    a.open_client(server.ws, server.token("alice", name="Alice"))
    a.js("c.subscribe('p1')")
    b.open_client(server.ws, server.token("bob", name="Bob"))
    b.js("c.subscribe('p1')")
    a.wait("c.presence('p1').some(u => u.id === 'bob' && u.name === 'Bob')")
    b.wait("c.presence('p1').some(u => u.id === 'alice')")
    for n in range(10):
        b.js("(n) => c.moveCursor('p1', n, 2 * n, 'grid')", n)
        b.page.wait_for_timeout(10)
    a.wait("cLog.some(e => e.type === 'cursor' && e.detail.userId === 'bob' && e.detail.x === 9)")
    cursors = a.js("cLog.filter(e => e.type === 'cursor').length")
    assert 1 <= cursors <= 10  # throttled: the latest always arrives
    b.js("c.close()")
    a.wait("!c.presence('p1').some(u => u.id === 'bob')")


def test_close_leaves_no_timer_lock_or_listener(chromium, server) -> None:
    context = new_context(chromium)
    context.add_init_script("""
        window.liveTimers = new Set();
        const set = window.setTimeout, clear = window.clearTimeout;
        window.setTimeout = (fn, ms, ...args) => { const t = set(() => { window.liveTimers.delete(t); fn(...args); }, ms); window.liveTimers.add(t); return t; };
        window.clearTimeout = (t) => { window.liveTimers.delete(t); clear(t); };
        window.liveListeners = 0;
        const add = EventTarget.prototype.addEventListener, remove = EventTarget.prototype.removeEventListener;
        EventTarget.prototype.addEventListener = function (...a) { if (this === window || this === document) window.liveListeners++; return add.apply(this, a); };
        EventTarget.prototype.removeEventListener = function (...a) { if (this === window || this === document) window.liveListeners--; return remove.apply(this, a); };
    """)
    tab = Tab(context, server.port)
    baseline = tab.js("window.liveListeners")
    tab.open_client(server.ws, server.token("alice"))
    tab.js("c.subscribe('p1')")
    tab.js(CREATE, ["c", "p1", {"title": "x", "startDate": START, "endDate": END}])
    tab.js("c.moveCursor('p1', 1, 1)")
    assert tab.js("window.liveTimers.size") > 0
    tab.js("c.close()")
    assert tab.js("c.state") == "closed"
    assert tab.js("window.liveTimers.size") == 0
    assert tab.js("window.liveListeners") == baseline
    held = tab.js("navigator.locks.query().then(q => [...q.held, ...q.pending].map(l => l.name))")
    assert not [name for name in held if name.startswith("barosync:")]
    assert tab.real_errors() == []


def test_the_typescript_declarations_match_the_module(tmp_path) -> None:
    tsc = shutil.which("tsc") or str(Path(os.environ.get("BAROSYNC_TSC", ".venv/node/node_modules/.bin/tsc")).resolve())
    if not Path(tsc).exists():
        pytest.skip("tsc is missing (`make test` installs typescript into .venv/node)")
    web = Path(resources.files("barosync").joinpath("web"))
    shutil.copy(web / "barosync.d.ts", tmp_path / "barosync.d.ts")
    (tmp_path / "usage.ts").write_text("""
import { SyncClient, ConflictError, type CalendarEvent, type Conflict } from "./barosync";
const client = new SyncClient("ws://127.0.0.1:8080/ws", { token: async () => "t", storage: "indexeddb" });
client.addEventListener("change", (e) => { const p: string = e.detail.projectId; console.log(p); });
client.addEventListener("state", (e) => { if (e.detail.state === "needs-auth") client.reconnect("new"); });
client.addEventListener("conflict", (e) => { const c: Conflict = e.detail.conflict; void client.resolve(c, "local"); });
async function main(): Promise<void> {
  await client.subscribe("demo");
  const ev: CalendarEvent = await client.create("demo", { title: "x", startDate: "a", endDate: "b" });
  await client.update(ev.id, { location: "Room 2" }).catch((e) => { if (e instanceof ConflictError) return client.resolve(e.conflict, { title: "y" }); });
  await client.delete(ev.id);
  client.moveCursor("demo", 1, 2, "grid");
  const n: number = client.syncStatus().pending + client.events("demo").length + client.presence("demo").length;
  console.log(n, client.get(ev.id)?.title, client.lastSeq("demo"), client.state);
  client.close();
}
void main();
""")
    done = subprocess.run([tsc, "--noEmit", "--strict", "--target", "es2022", "--module", "es2022", "--lib", "es2022,dom",
                           str(tmp_path / "usage.ts")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every export of the module is declared.
    exported = {line.split()[2].split("(")[0] for line in CLIENT_JS.splitlines() if line.startswith("export ")}
    declared = (web / "barosync.d.ts").read_text()
    assert all(f" {name}" in declared for name in exported), exported


def _serve(body: str):
    # A route handler of one argument: Playwright passes the request as a second one.
    return lambda route: route.fulfill(body=body, content_type="text/javascript")


def _hook_from_docs() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "web-client.md").read_text()
    block = text.split("## A React hook", 1)[1].split("```js\n", 1)[1].split("```", 1)[0]
    assert block.count("\n") <= 40, "the doc promises a short hook"
    return block


def test_the_react_hook_in_the_docs_renders_live_changes(chromium, server) -> None:
    node = Path(os.environ.get("BAROSYNC_NODE_MODULES", ".venv/node/node_modules")).resolve()
    react, react_dom = node / "react" / "umd" / "react.development.js", node / "react-dom" / "umd" / "react-dom.development.js"
    if not (react.exists() and react_dom.exists()):
        pytest.skip("react@18 is missing (`make test` installs it into .venv/node)")
    context = new_context(chromium)
    files = {
        "**/vendor/react.js": react.read_text(),
        "**/vendor/react-dom.js": react_dom.read_text(),
        # The hook imports "react" as an app would; an import map points it at the UMD build.
        "**/vendor/react.mjs": "const R = window.React; export default R; export const { useEffect, useState } = R;",
        "**/app/hook.js": _hook_from_docs(),
    }
    for pattern, body in files.items():
        context.route(pattern, _serve(body))
    page_html = """<!doctype html><meta charset=utf-8>
<script type=importmap>{"imports": {"react": "/vendor/react.mjs"}}</script>
<script src=/vendor/react.js></script><script src=/vendor/react-dom.js></script>
<div id=root></div>
<script type=module>
  import { SyncClient } from "/client/barosync.js";
  import { useRealtimeCalendar } from "/app/hook.js";
  const h = React.createElement;
  window.start = (url, token) => {
    const client = new SyncClient(url, { token, storage: "memory" });
    window.client = client;
    function Calendar() {
      const { events, users, status, create } = useRealtimeCalendar(client, "p1");
      window.createFromHook = create;
      return h("div", null,
        h("p", { id: "status" }, `${status.state} ${status.pending}`),
        h("ul", { id: "users" }, users.map((u) => h("li", { key: u.id }, u.name))),
        h("ul", { id: "events" }, events.map((e) => h("li", { key: e.id }, e.title))));
    }
    ReactDOM.createRoot(document.getElementById("root")).render(h(Calendar));
  };
  window.ready = true;
</script>"""
    context.route("**/test/react.html", lambda route: route.fulfill(body=page_html, content_type="text/html"))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/test/react.html")
    page.wait_for_function("window.ready === true")
    page.evaluate("([url, token]) => window.start(url, token)", [server.ws, server.token("alice", name="Alice")])
    page.wait_for_function("document.getElementById('status').textContent === 'connected 0'")
    page.evaluate("window.createFromHook({title: 'From the hook', startDate: '2026-01-05T09:00:00Z', endDate: '2026-01-05T10:00:00Z'})")
    other = Tab(new_context(chromium), server.port)
    other.open_client(server.ws, server.token("bob", name="Bob"), storage="memory")
    other.js("c.subscribe('p1')")
    other.js(CREATE, ["c", "p1", {"title": "From Bob", "startDate": START, "endDate": END}])
    page.wait_for_function("document.getElementById('events').textContent.includes('From Bob')")
    page.wait_for_function("document.getElementById('users').textContent.includes('Bob')")
    assert sorted(page.eval_on_selector_all("#events li", "els => els.map(e => e.textContent)")) == ["From Bob", "From the hook"]
    assert errors == []


def test_the_same_id_in_two_projects_is_read_and_changed_where_it_was_asked(chromium, server) -> None:
    """An event is (project, id): a calendar app's UID may be in two calendars, and the
    client reads and changes the one of the project it is asked for."""
    tab = Tab(new_context(chromium), server.port)
    tab.open_client(server.ws, server.token("alice"), storage="memory")
    for project in ("p1", "p2"):
        tab.js("c.subscribe(arg)", project)
        tab.js(CREATE, ["c", project, {"id": "shared", "title": f"in {project}", "startDate": START, "endDate": END}])
    assert tab.js("c.get('shared', 'p2').title") == "in p2"
    tab.js("c.update('shared', {title: 'p2 renamed'}, 'p2')")
    tab.js("c.delete('shared', 'p1')")
    assert [e["title"] for e in server.events("p2")] == ["p2 renamed"] and server.events("p1") == []
    sent = [m for m in tab.sent if m.get("type") in ("event:update", "event:delete")]
    assert [(m["type"], m["payload"]["projectId"]) for m in sent] == [("event:update", "p2"), ("event:delete", "p1")]
    assert tab.errors == []


def test_quick_successive_edits_of_one_event_never_conflict_with_each_other(chromium, server) -> None:
    """A create and two edits of it, all made before any is acked (offline here; a
    person typing fast, or an undo pressed at once, online): each edit is based on its
    predecessor's acked version, so all apply, in order, and no conflict comes back."""
    context = new_context(chromium)
    tab = Tab(context, server.port)
    tab.open_client(server.ws, server.token("alice"))
    tab.js("c.subscribe('p1')")
    context.set_offline(True)
    tab.wait("c.state === 'offline'")
    tab.js("""() => { window.made = c.create('p1', {id: 'quick', title: 'one', startDate: '2026-01-05T09:00:00Z',
                                                    endDate: '2026-01-05T10:00:00Z'}); }""")
    tab.wait("c.get('quick', 'p1') !== undefined")  # queued: the view has it, not acked
    tab.js("""() => { window.second = c.update('quick', {title: 'two'}, 'p1');
                      window.third = c.update('quick', {title: 'three', location: 'Room 3'}, 'p1'); }""")
    tab.wait("c.syncStatus().pending === 3")
    context.set_offline(False)
    outcome = tab.js("""async () => (await Promise.allSettled([window.made, window.second, window.third]))
        .map((s) => s.status === 'fulfilled' ? s.value.version : String(s.reason))""")
    assert outcome == [1, 2, 3], outcome
    [stored] = server.events("p1")
    assert (stored["title"], stored["location"], stored["version"]) == ("three", "Room 3", 3)
    assert tab.real_errors() == []


def test_an_edit_whose_predecessor_is_acked_while_it_is_stored_is_rebased(chromium, server) -> None:
    """The undo pressed as the ack of the change it undoes arrives: the ack came while
    the undo was still being stored, before it was queued (CI's web series test, once
    under load). The storage's put of the second edit waits here for the first's ack,
    so the race is certain: the second edit must still be based on the first's version."""
    tab = Tab(new_context(chromium), server.port)
    tab.open_client(server.ws, server.token("alice"))
    tab.js("c.subscribe('p1')")
    made = tab.js(CREATE, ["c", "p1", {"id": "raced", "title": "one", "startDate": START, "endDate": END}])
    assert made["version"] == 1
    outcome = tab.js("""async () => {
        const storage = c._storage, put = storage.putQueued.bind(storage);
        let puts = 0;
        storage.putQueued = async (item) => {
          if (++puts === 2) await window.first.catch(() => {});  // the second edit's put outlasts the first's ack
          return put(item);
        };
        window.first = c.update('raced', {title: 'two'}, 'p1');
        const second = c.update('raced', {title: 'three'}, 'p1');
        return (await Promise.allSettled([window.first, second]))
          .map((s) => s.status === 'fulfilled' ? s.value.version : String(s.reason));
    }""")
    assert outcome == [2, 3], outcome
    [stored] = server.events("p1")
    assert (stored["title"], stored["version"]) == ("three", 3)
    assert tab.real_errors() == []
