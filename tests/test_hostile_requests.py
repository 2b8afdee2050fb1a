"""One request must never take the server down: hostile recurrences over CalDAV and
import while /healthz keeps answering, malformed bodies answered 4xx, a handler bug
answered 500 with one log line, absurd identities refused, writes stopped with an
expired token, one request limiter per identity, failed CalDAV sign-ins throttled,
catch-ups and the inbox bounded, private data files, hidden plugin options.

Real servers (a subprocess where timing or its log matter, else in-process), real
HTTP and WebSocket clients."""

from __future__ import annotations

import http.client
import json
import logging
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from barosync.calendars import app_passwords
from barosync.hooks.auth import create_token
from barosync.storage.commit import Mutation
from barosync.config import Config
from barosync.transports.connection import INBOX_BYTES, RECEIVE_BYTES
from barosync.domain.models import Event
from barosync.core.app import open_log

from attack_helpers import WS, Closed, Rejected, ServerProcess
from caldav_helpers import Http, app_password, event_ics
from ical_helpers import calendar
from conftest import SECRET, event_payload, make_config, one_node, running, token

QUERY = ('<c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><d:getetag/>{data}</d:prop>'
         '<c:filter><c:comp-filter name="VCALENDAR"><c:comp-filter name="VEVENT">'
         '<c:time-range start="{start}" end="{end}"/></c:comp-filter></c:comp-filter></c:filter></c:calendar-query>')


def query(start: str, end: str, *, expand: bool = False) -> str:
    """A calendar-query for a time range (with ``expand``: every occurrence in it)."""
    data = f'<c:calendar-data><c:expand start="{start}" end="{end}"/></c:calendar-data>' if expand else ""
    return QUERY.format(start=start, end=end, data=data)


def store_legacy_rule(data_dir: Path, rrule: str) -> None:
    """A recurring event as an older release stored it, before rules were bounded at
    write time (a rule whose BY* parts never meet)."""
    config = Config(data_dir=data_dir)
    store = open_log(config)
    try:
        event = Event(id="legacy", project_id="team", title="Stored long ago", start_date="2026-01-05T09:00:00Z",
                      end_date="2026-01-05T10:00:00Z", version=1, created_at=1, updated_at=1,
                      recurrence={"rrule": rrule, "rdates": [], "exdates": [], "overrides": []})
        [outcome] = store.commit_batch([Mutation("create", user_id="alice", envelope_id="legacy-1", project_id="team",
                                                 event_id="legacy", received_ms=1,
                                                 event=event)])
        assert outcome.status == "applied", outcome
    finally:
        store.close()


class HealthWatch:
    """Polls /healthz from a thread of its own and keeps the slowest answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.slowest = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
            finally:
                conn.close()
            self.slowest = max(self.slowest, time.perf_counter() - began)
            self.answers += 1
            time.sleep(0.01)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_healthz_keeps_answering_while_hostile_expansions_are_asked_for(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Stored by an older release: dateutil would step day by day to 9999 for it.
    store_legacy_rule(data, "FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=30")
    server = ServerProcess(data)
    try:
        password = app_password(data, "alice", "team")
        dav = Http(server.port, "alice", password)
        tok = create_token((data / "secret").read_text().strip(), user_id="alice", projects=["team"])
        rest = Http(server.port)
        with HealthWatch(server.port) as watch:
            # The stored rule is set aside (the event counts as its first occurrence),
            # so the calendar's queries keep working, quickly.
            for start, end, hits in (("20260301T000000Z", "20260302T000000Z", 0),
                                     ("20260105T000000Z", "20260106T000000Z", 1)):
                status, _, body = dav("REPORT", "/dav/calendars/alice/team/", query(start, end, expand=True),
                                      Depth="1")
                assert status == 207 and body.count(b"legacy.ics") == hits, body
            # The two imports: INTERVAL=0 (froze the loop for good) and a
            # 199-byte SECONDLY rule (86,400 events for one day).
            for rule, words in (("FREQ=DAILY;INTERVAL=0", b"INTERVAL"), ("FREQ=SECONDLY", b"COUNT or an UNTIL")):
                status, _, body = rest("POST", "/api/projects/team/import?from=2026-01-05T00:00:00Z&to=2026-01-06T00:00:00Z",
                                       calendar(f"UID:x\r\nDTSTART:20260105T000000Z\r\nRRULE:{rule}"),
                                       Authorization=f"Bearer {tok}")
                assert status == 400 and words in body, body
            # A rule that passes the write-time checks but is dense: an expanded
            # answer is capped (max-instances), never a list of a hundred thousand.
            status, _, body = dav("PUT", "/dav/calendars/alice/team/dense.ics", event_ics(
                "dense", "Every minute", "20260105T000000Z", "20260105T000100Z",
                extra="RRULE:FREQ=MINUTELY;COUNT=150000\r\n"), Content_Type="text/calendar")
            assert status == 201, body
            dense = query("20260105T000000Z", "20260301T000000Z", expand=True)
            status, _, body = dav("REPORT", "/dav/calendars/alice/team/", dense, Depth="1")
            assert status == 403 and b"max-instances" in body, body
        assert watch.answers > 10
        # The bound: /healthz within 100 ms while all of that ran.
        assert watch.slowest < 0.1, f"slowest /healthz: {watch.slowest * 1000:.0f} ms"
        assert server.alive() and "Traceback" not in server.stderr
        assert server.stderr.count("expanded as its first occurrence only") == 1
    finally:
        server.stop()


MALFORMED = ["DTSTART:notadate", "DTSTART:00000101T000000Z", "DTSTART:20260105T090000Z\r\nDURATION:PXYZ",
             "DTSTART:20260105T090000Z\r\nDURATION:P99999999999W", "DTSTART:20260105T090000Z\r\nEXDATE:garbage",
             "DTSTART:20260105T090000Z\r\nRDATE:xx", "DTSTART;TZID=:20260105T090000",
             "DTSTART;TZID=../../etc/passwd:20260105T090000", "DTSTART:20260105T090000Z\r\nRRULE:FREQ=NEVER;COUNT=x",
             "DTSTART:20260105T090000Z\r\nRRULE:FREQ=MONTHLY;BYSETPOS=999999;BYDAY=MO"]


def test_malformed_icalendar_gets_an_answer_naming_it_never_a_dropped_connection(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data)
    try:
        dav = Http(server.port, "alice", app_password(data, "alice", "team"))
        tok = create_token((data / "secret").read_text().strip(), user_id="alice", projects=["team"])
        rest = Http(server.port)
        for n, lines in enumerate(MALFORMED):
            body = calendar(f"UID:bad-{n}\r\n{lines}")
            status, _, answer = dav("PUT", f"/dav/calendars/alice/team/bad-{n}.ics", body, Content_Type="text/calendar")
            # Stored only when it is sound (a TZID the server cannot resolve is kept as
            # a name, the times taken as floating); refused with a reason otherwise.
            assert status in (201, 403), (lines, status, answer)
            assert status == 201 or answer.strip(), lines
            status, _, answer = rest("POST", "/api/projects/team/import", body, Authorization=f"Bearer {tok}")
            assert status in (200, 400), (lines, status, answer)
            assert json.loads(answer).get("message") or status == 200, answer
            # Whatever was stored is served back, and time-range queries still work.
            status, _, answer = dav("REPORT", "/dav/calendars/alice/team/",
                                    query("20260101T000000Z", "20270101T000000Z", expand=True), Depth="1")
            assert status == 207, (lines, answer)
        assert server.alive() and "Traceback" not in server.stderr
    finally:
        server.stop()


BUGGY_AUTH = '''
from barosync import Identity, hookimpl

@hookimpl
def barosync_authenticate(token, config):
    if token == "buggy":
        return Identity(user_id="bob", name="Bob", projects=42)  # not a set: /api/me fails on it
'''


@one_node
async def test_a_handler_bug_answers_500_and_logs_one_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "buggy_auth.py").write_text(BUGGY_AUTH)
    caplog.set_level(logging.ERROR, logger="barosync.transports.server")
    async with running(tmp_path / "data", plugin_paths=(str(plugins),)) as (app, _):
        http = Http(app.port)
        for _ in range(3):
            status, _, body = await trio.to_thread.run_sync(lambda: http("GET", "/api/me", Authorization="Bearer buggy"))
            assert status == 500 and json.loads(body)["error"] == "internal", body
        # The connection lives on after a 500: the next request on it is answered.
        status, _, _ = await trio.to_thread.run_sync(lambda: http("GET", "/healthz"))
        assert status == 200
    failures = [r for r in caplog.records if "failed" in r.getMessage() and "/api/me" in r.getMessage()]
    # One line each; a traceback at most once a minute (tests/test_buglog.py).
    assert len(failures) == 3 and sum(r.exc_info is not None for r in failures) <= 1


@pytest.mark.parametrize("claims, why", [
    ({"exp": 10**30}, "expiry"),
    ({"sub": "mallory\nINFO forged log line"}, "control"),
    ({"sub": "admin\u202egnp.exe"}, "bidirectional"),
    ({"name": "Bob\r\nSet-Cookie: x"}, "control"),
])
async def test_identities_with_absurd_expiry_or_control_characters_are_refused(
        tmp_path: Path, claims: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture) -> None:
    import jwt

    body = {"sub": "alice", "projects": ["p1"], "exp": int(time.time()) + 3600, **claims}
    tok = jwt.encode(body, SECRET, algorithm="HS256")
    caplog.set_level(logging.WARNING, logger="barosync.core.app")
    async with running(tmp_path / "data") as (app, _):
        with pytest.raises(Rejected) as refused:
            await WS.connect(app.port, tok)
        assert refused.value.status == 401
        status, _, _ = await trio.to_thread.run_sync(lambda: Http(app.port)("GET", "/api/me", Authorization=f"Bearer {tok}"))
        assert status == 401
    assert any(why in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records)


async def test_writes_stop_once_a_refreshed_shorter_token_expires(tmp_path: Path) -> None:
    async with running(tmp_path / "data") as (app, _):
        ws = await WS.connect(app.port, token("alice", ["p1"]))
        short = create_token(SECRET, user_id="alice", projects=["p1"], ttl=1)
        answer = await ws.request("auth:refresh", {"token": short})
        assert answer["type"] == "ack"
        expires = answer["payload"]["expiresAt"] / 1000
        with trio.fail_after(10):
            while time.time() < expires + 0.05:
                await trio.sleep(0.05)
        # The refreshed token's expiry is the connection's now: it is closed with 4001
        # at that moment, and a write that races the close is refused as expired.
        with pytest.raises(Closed) as closed:
            answer = await ws.request("event:create", event_payload("p1"))
            assert answer["type"] == "error" and "expired" in answer["payload"]["message"], answer
            await ws.recv()
        assert closed.value.code == 4001
        await ws.abort()
        assert app.store.snapshot("p1")[1] == []


@one_node
async def test_rest_caldav_and_the_feed_share_one_request_limit_per_identity(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # One request per 10 s after a burst of 4: however slow the machine, no token
    # comes back during the test.
    async with running(data, http_rate_limit=0.1, http_rate_burst=4) as (app, _):
        password = await trio.to_thread.run_sync(lambda: app_passwords.create(data, user_id="alice", projects=["p1"])[0])
        rest, dav = Http(app.port), Http(app.port, "alice", password)
        me = token("alice", ["p1"])
        answers = []
        for _ in range(3):
            answers.append(await trio.to_thread.run_sync(lambda: rest("GET", "/api/me", Authorization=f"Bearer {me}")))
        for _ in range(2):
            answers.append(await trio.to_thread.run_sync(lambda: dav("PROPFIND", "/dav/calendars/alice/", Depth="0")))
        statuses = [status for status, _, _ in answers]
        assert statuses[:4] == [200, 200, 200, 207] and statuses[4] == 429, statuses
        assert int(answers[4][1]["retry-after"]) >= 1
        status, headers, body = await trio.to_thread.run_sync(lambda: rest("GET", "/api/me", Authorization=f"Bearer {me}"))
        assert status == 429 and json.loads(body)["error"] == "rate_limited" and "retry-after" in headers
        # Another identity has its own allowance.
        status, _, _ = await trio.to_thread.run_sync(lambda: rest("GET", "/api/me", Authorization=f"Bearer {token('bob')}"))
        assert status == 200


@one_node
async def test_failed_caldav_sign_ins_are_throttled_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    caplog.set_level(logging.WARNING, logger="barosync.calendars.caldav")
    async with running(data) as (app, _):
        password = await trio.to_thread.run_sync(lambda: app_passwords.create(data, user_id="alice", projects=["p1"])[0])
        wrong = Http(app.port, "alice", "not-the-password")
        statuses = [(await trio.to_thread.run_sync(lambda: wrong("PROPFIND", "/dav/", Depth="0")))[0] for _ in range(11)]
        assert statuses == [401] * 10 + [429], statuses
        # Until the bucket refills, not even the right password is checked (no scrypt).
        status, headers, _ = await trio.to_thread.run_sync(lambda: Http(app.port, "alice", password)("PROPFIND", "/dav/", Depth="0"))
        assert status == 429 and int(headers["retry-after"]) >= 1
        status, _, _ = await trio.to_thread.run_sync(lambda: Http(app.port, "bob", "guess")("PROPFIND", "/dav/", Depth="0"))
        assert status == 401  # another name is not held back
    failed = [r for r in caplog.records if "sign-in failed" in r.getMessage()]
    assert len(failed) == 11 and "'alice'" in failed[0].getMessage()


async def fill(app: Any, project: str, n: int, size: int) -> None:
    """n events of about ``size`` bytes each in ``project``, through one client."""
    writer = await WS.connect(app.port, token("writer", [project]))
    for i in range(n):
        answer = await writer.request("event:create", event_payload(project, title=f"e{i}", description="x" * size))
        assert answer["type"] == "ack", answer
    await writer.abort()


async def test_re_subscribing_without_reading_is_closed_past_the_cap_plus_one_catch_up(tmp_path: Path) -> None:
    """Each catch-up used to add to the allowance over the outbox cap: a client that
    never reads could queue hundreds of MB by sending subscribe again and again."""
    async with running(tmp_path / "data", outbox_bytes=64 * 1024) as (app, _):
        await fill(app, "p1", 40, 1000)  # a catch-up of about 50 KB
        reader = await WS.connect(app.port, token("reader", ["p1"]), rcvbuf=4096)
        for _ in range(60):
            await reader.send("subscribe", {"projectId": "p1", "since": 0})
        with pytest.raises(Closed) as closed:
            with trio.fail_after(20):
                while True:
                    await reader.recv(None)
        assert closed.value.code == 4008
        await reader.abort()


@one_node
async def test_a_stalled_connection_holds_at_most_about_a_mebibyte_of_inbox(tmp_path: Path) -> None:
    async with running(tmp_path / "data", outbox_bytes=64 * 1024) as (app, _):
        # A snapshot in parts larger than the outbox cap: the reader task waits in
        # it for the client, which reads nothing and sends pings meanwhile.
        await fill(app, "p1", 60, 8000)
        reader = await WS.connect(app.port, token("reader", ["p1"]), rcvbuf=4096)
        await reader.send("subscribe", {"projectId": "p1", "snapshotParts": True})
        [session] = [s for s in app.sessions if s.identity.user_id == "reader"]
        big = "y" * 60_000

        async def flood() -> None:
            for _ in range(200):  # 12 MB of pings while the reader task waits in the snapshot
                await reader.send("ping", {"pad": big})

        async with trio.open_nursery() as flooding:
            flooding.start_soon(flood)
            with trio.fail_after(20):
                while session.transport._inbox_bytes < INBOX_BYTES:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # what the kernel held is read now, if the server reads on
            # The read that crosses the limit is the last: at most one read (64 KiB)
            # past it, which may also complete a message begun in earlier reads (at
            # most the message size, 64 KiB here). Reading on would add megabytes.
            slack = RECEIVE_BYTES + app.config.max_message_bytes
            assert session.transport._inbox_bytes <= INBOX_BYTES + slack, session.transport._inbox_bytes
            flooding.cancel_scope.cancel()
        await reader.abort()


async def test_data_files_are_private_to_the_server_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running(data) as (app, _):
        await trio.to_thread.run_sync(lambda: app_passwords.create(data, user_id="alice", projects=["p1"]))
        ws = await WS.connect(app.port, token("alice", ["p1"]))
        assert (await ws.request("event:create", event_payload("p1")))["type"] == "ack"
        await ws.abort()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path.name, oct(path.stat().st_mode))


@one_node
async def test_the_inspector_names_plugin_options_but_hides_their_values(tmp_path: Path) -> None:
    async with running(tmp_path / "data", plugin_options={"webhook": {"url": "https://x", "token": "s3cret-value"}}) as (app, _):
        admin = token("root", "*", admin=True)
        status, _, body = await trio.to_thread.run_sync(
            lambda: Http(app.port)("GET", "/api/admin/summary", Authorization=f"Bearer {admin}"))
        assert status == 200 and b"s3cret-value" not in body
        assert json.loads(body)["server"]["config"]["plugin_options"] == {"webhook": {"url": "<hidden>", "token": "<hidden>"}}


FAILING_VALIDATOR = '''
from barosync import hookimpl

@hookimpl
def barosync_validate_mutation(operation, event):
    if event is not None and event.get("title") == "trip the bug":
        raise RuntimeError("a validation plugin's bug")
'''


@one_node
async def test_a_server_fault_on_a_caldav_put_is_a_5xx_never_a_4xx_an_app_would_drop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Calendar apps treat a 4xx as final and may drop the user's edit: a fault of the
    server's (here a validation plugin that raises) must be a 500."""
    data, plugins = tmp_path / "data", tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "failing_validator.py").write_text(FAILING_VALIDATOR)
    caplog.set_level(logging.ERROR)
    async with running(data, plugin_paths=(str(plugins),)) as (app, _):
        password = await trio.to_thread.run_sync(lambda: app_passwords.create(data, user_id="alice", projects=["p1"])[0])
        dav = Http(app.port, "alice", password)
        for n in range(2):
            status, _, body = await trio.to_thread.run_sync(lambda: dav(
                "PUT", f"/dav/calendars/alice/p1/bug-{n}.ics", event_ics(f"bug-{n}", "trip the bug"),
                Content_Type="text/calendar"))
            assert status == 500, (status, body)
        status, _, _ = await trio.to_thread.run_sync(lambda: dav(
            "PUT", "/dav/calendars/alice/p1/fine.ics", event_ics("fine", "Fine"), Content_Type="text/calendar"))
        assert status == 201
    failures = [r for r in caplog.records if "a validation plugin's bug" in r.getMessage()]
    assert len(failures) == 2 and sum(r.exc_info is not None for r in failures) <= 1


@one_node
async def test_the_map_never_grows_under_a_paused_snapshot_reader(tmp_path: Path) -> None:
    """LMDB's set_mapsize is undefined while any read transaction of the process is
    open, and a streamed snapshot holds one while its client is slow. A grow the map
    needs waits for it; snapshots that start meanwhile read their pages at once."""
    if make_config(tmp_path).cluster_postgres:
        pytest.skip("LMDB only")
    async with running(tmp_path / "data", map_size=8 * 1024 * 1024, rate_limit=100_000.0) as (app, _):
        await fill(app, "p1", 560, 8000)  # a snapshot over the 4 MiB outbox cap: its reader pauses in it
        size = app.store.env.info()["map_size"]
        reader = await WS.connect(app.port, token("reader", ["p1"]), rcvbuf=4096)
        await reader.send("subscribe", {"projectId": "p1", "snapshotParts": True})
        with trio.fail_after(10):
            while app.store.readers_open == 0:
                await trio.sleep(0.01)
        writer = await WS.connect(app.port, token("writer", ["p2"]))
        acked: set[str] = set()

        async def collect() -> None:
            while True:
                msg = await writer.recv(None)
                if msg["type"] == "ack":
                    acked.add(msg["id"])

        used, mapped = app.store.map_usage()
        # More than the map has room for (each create stores its event and its change).
        total = (mapped - used) // 16_000 + 50
        sent: list[str] = []

        async def write() -> None:
            # At most 20 in flight: the acks (8 KB each) never pile up to the outbox cap.
            for i in range(total):
                while len(sent) - len(acked) >= 20:
                    await trio.sleep(0.005)
                sent.append(await writer.send("event:create", event_payload("p2", title=f"w{i}",
                                                                            description="z" * 8000)))

        async with trio.open_nursery() as acks:
            acks.start_soon(collect)
            acks.start_soon(write)
            with trio.fail_after(30):
                while not app.store.resize_waiting:
                    await trio.sleep(0.01)
            assert app.store.readers_open == 1 and app.store.env.info()["map_size"] == size
            assert len(acked) < total  # the one that needs the room waits, unacked
            # Another subscriber meanwhile reads its snapshot at once instead of holding one.
            other = await WS.connect(app.port, token("other", ["p1"]))
            answer = await other.request("subscribe", {"projectId": "p1", "snapshotParts": True})
            assert answer["type"] == "ack" and app.store.readers_open == 1
            await reader.abort()
            with trio.fail_after(30):
                while len(acked) < total:
                    await trio.sleep(0.01)
            acks.cancel_scope.cancel()
        assert app.store.env.info()["map_size"] > size and app.store.readers_open == 0
        assert len(app.store.snapshot("p2")[1]) == total
        await writer.abort()
        await other.abort()


async def test_a_whole_calendar_export_imports_in_group_commits_and_bad_events_are_named(tmp_path: Path) -> None:
    """10,000 events, several MB, in one POST: all stored but the one the server
    refuses, which the answer names; committed in groups, not one fsync per event."""
    good = [f"UID:ev-{i}\r\nDTSTART:2026{1 + i % 12:02d}{1 + i % 28:02d}T{i % 24:02d}0000Z\r\nDURATION:PT1H\r\n"
            f"SUMMARY:Event {i}\r\nDESCRIPTION:{'d' * 200}" for i in range(10_000)]
    bad = "UID:too-long\r\nDTSTART:20260105T090000Z\r\nSUMMARY:Where?\r\nLOCATION:" + "x" * 20_000
    body = calendar(*good[:5000], bad, *good[5000:])
    assert len(body) > 64 * 1024 * 30  # far over max_message_bytes
    async with running(tmp_path / "data") as (app, _):
        tok = token("alice", ["p1"])
        batches = app.writer.batches
        url = "/api/projects/p1/import?from=2025-12-01T00:00:00Z&to=2027-01-01T00:00:00Z"
        status, _, answer = await trio.to_thread.run_sync(
            lambda: Http(app.port)("POST", url, body, Authorization=f"Bearer {tok}"))
        assert status == 200, answer[:300]
        result = json.loads(answer)
        assert (result["created"], result["events"]) == (10_000, 10_001), {k: v for k, v in result.items() if k != "refused"}
        assert [(r["id"], r["field"]) for r in result["refused"]] == [("too-long", "location")]
        assert len(app.store.snapshot("p1")[1]) == 10_000
        assert app.writer.batches - batches <= 10_000 // 100, app.writer.batches - batches
        # Without a token the body is held to max_message_bytes.
        status, _, answer = await trio.to_thread.run_sync(lambda: Http(app.port)("POST", url, body))
        assert status == 413 and b"max_message_bytes" in answer
        # Importing the same file again changes nothing.
        status, _, answer = await trio.to_thread.run_sync(
            lambda: Http(app.port)("POST", url, body, Authorization=f"Bearer {tok}"))
        assert json.loads(answer)["unchanged"] == 10_000
