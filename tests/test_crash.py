"""Crash safety against a real `barosync serve` subprocess: kill -9 under write load,
and a disconnect storm (every connection dropped several times, the server killed
and restarted once) that every client must ride out with exactly the server's state.
"""

from __future__ import annotations
import pytest

import random
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from barosync.hooks.auth import create_token

from attack_helpers import WS, Closed, Rejected, ServerProcess, event_payload, mint, read_secret, start_server, uid

pytestmark = pytest.mark.slow  # kill -9 of real server processes

CHANGE_TYPES = ("event:created", "event:updated", "event:deleted")
EVENT_FIELDS = {"id", "projectId", "title", "startDate", "endDate", "version", "createdAt", "updatedAt", "createdBy", "updatedBy"}


# -- kill -9 while 50 clients write ----------------------------------------------------------

KILL_CLIENTS = 50
KILL_USERS = 5
KILL_PROJECTS = 5
WINDOW = 4
LOAD_SECONDS = 1.5


class Writer:
    """One client writing as fast as its window allows; remembers what it sent and
    every answer, so the test can tell acked, refused and in-doubt mutations apart."""

    def __init__(self, n: int, user: str, tok: str, project: str) -> None:
        self.n = n
        self.user = user
        self.tok = tok
        self.project = project
        self.sent: dict[str, dict[str, Any]] = {}  # envelope id -> {type, payload, base}
        self.acks: dict[str, dict[str, Any]] = {}  # envelope id -> ack payload
        self.refused: dict[str, dict[str, Any]] = {}  # envelope id -> error / conflict message
        self.idle: dict[str, int] = {}  # event id -> acked version, no mutation in flight
        self.count = 0

    async def run(self, port: int) -> None:
        try:
            ws = await WS.connect(port, self.tok)
        except (OSError, Closed, Rejected):
            return
        window = trio.Semaphore(WINDOW)
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                try:
                    while True:
                        msg = await ws.recv(None)
                        ref = msg["id"] if msg["type"] == "ack" else (msg.get("payload") or {}).get("ref")
                        if ref not in self.sent or ref in self.acks or ref in self.refused:
                            continue
                        if msg["type"] == "ack":
                            self.acks[ref] = msg["payload"]
                            sent = self.sent[ref]
                            if sent["type"] != "event:delete":
                                event = msg["payload"]["event"]
                                self.idle[event["id"]] = event["version"]
                        else:
                            self.refused[ref] = msg
                        window.release()
                except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            rng = random.Random(self.n)
            try:
                while True:
                    await window.acquire()
                    self.count += 1
                    env_id = f"w{self.n}-{self.count}-{uid()}"
                    roll = rng.random()
                    if self.idle and roll < 0.45:
                        event_id, version = self.idle.popitem()
                        if roll < 0.08:
                            kind, payload = "event:delete", {"id": event_id, "version": version}
                        else:
                            kind, payload = "event:update", {"id": event_id, "version": version,
                                                             "title": f"t{self.count}", "location": f"room {rng.randrange(99)}"}
                        base = version
                    else:
                        kind = "event:create"
                        payload = event_payload(self.project, id=f"ev-{self.n}-{self.count}", title=f"c{self.count}",
                                                description="d" * rng.randrange(0, 300), attendees=[self.user])
                        base = 0
                    self.sent[env_id] = {"type": kind, "payload": payload, "base": base}
                    await ws.send(kind, payload, id=env_id)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await ws.abort()


async def read_project(ws: WS, project: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(resume ack, the whole changelog via since=0, the snapshot via no since)."""
    ack = await ws.request("subscribe", {"projectId": project, "since": 0})
    assert ack["type"] == "ack", ack
    changes = []
    while len(changes) < ack["payload"]["count"]:
        msg = await ws.recv()
        if msg["type"] in CHANGE_TYPES:
            changes.append(msg)
    snap_ack = await ws.request("subscribe", {"projectId": project})
    assert snap_ack["type"] == "ack" and snap_ack["payload"]["mode"] == "snapshot", snap_ack
    while True:
        msg = await ws.recv()
        if msg["type"] == "sync:snapshot":
            return ack["payload"], changes, msg["payload"]


def check_change(change: dict[str, Any], project: str, users: set[str]) -> None:
    """A changelog entry is a whole change: every field, consistent with its payload."""
    assert change["projectId"] == project and change["userId"] in users, change
    assert change["id"] == f"{project}:{change['seq']}", change
    payload = change["payload"]
    assert payload["projectId"] == project and payload["version"] == change["version"], change
    if change["type"] == "event:deleted":
        assert set(payload) == {"id", "projectId", "version"}, change
    else:
        assert EVENT_FIELDS <= set(payload), change
        assert payload["updatedBy"] == change["userId"] and payload["createdBy"] in users, change
        assert payload["title"] and payload["attendees"], change


async def test_kill_9_under_write_load_loses_no_acked_mutation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    users = [f"u{i}" for i in range(KILL_USERS)]
    tokens = {u: mint(data, u, "--all-projects") for u in users}
    server = await start_server(data)
    writers = [Writer(n, users[n % KILL_USERS], tokens[users[n % KILL_USERS]], f"p{n % KILL_PROJECTS}") for n in range(KILL_CLIENTS)]
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for w in writers:
                    nursery.start_soon(w.run, server.port)
                await trio.sleep(LOAD_SECONDS)
                # Mid-flight: every client has up to WINDOW mutations waiting for an ack.
                await trio.to_thread.run_sync(server.kill9)
        server = await start_server(data)

        sent = {env: (w, s) for w in writers for env, s in w.sent.items()}
        acks = {env: (w, a) for w in writers for env, a in w.acks.items()}
        refused = [m for w in writers for m in w.refused.values()]
        in_doubt = {env: (w, s) for env, (w, s) in sent.items() if env not in acks and env not in {
            e for w2 in writers for e in w2.refused}}

        # Read back every project: the whole changelog and the snapshot.
        checker = await WS.connect(server.port, tokens[users[0]])
        changelog: dict[tuple[str, int], dict[str, Any]] = {}
        snapshots: dict[str, dict[str, Any]] = {}
        for p in range(KILL_PROJECTS):
            project = f"p{p}"
            resume, changes, snap = await read_project(checker, project)
            seqs = [c["seq"] for c in changes]
            assert seqs == list(range(1, len(changes) + 1)), "changelog has gaps or disorder"
            assert resume["seq"] == snap["seq"] == len(changes)
            state: dict[str, dict[str, Any]] = {}
            versions: dict[str, int] = {}
            for c in changes:
                check_change(c, project, set(users))
                changelog[(project, c["seq"])] = c
                eid = c["payload"]["id"]
                # Versions of one event go 1, 2, 3 ... with no hole: no half-applied change.
                assert c["version"] == versions.get(eid, 0) + 1, c
                versions[eid] = c["version"]
                if c["type"] == "event:deleted":
                    state.pop(eid)
                else:
                    assert (c["type"] == "event:created") == (eid not in state), c
                    state[eid] = c["payload"]
            # Every event in the snapshot equals the payload of its last change.
            assert {e["id"]: e for e in snap["events"]} == state
            snapshots[project] = {e["id"]: e for e in snap["events"]}

        by_version = {(c["payload"]["id"], c["version"]): c for c in changelog.values()}
        last_change = {c["payload"]["id"]: c for _, c in sorted(changelog.items(), key=lambda kv: kv[0][1])}
        # Every acked mutation is there: the change at its seq is exactly what was acked.
        found = 0
        for env, (w, answer) in acks.items():
            kind = sent[env][1]["type"]
            project = answer["projectId"]
            change = changelog.get((project, answer["seq"]))
            assert change is not None, f"acked {kind} {env} (seq {answer['seq']}) lost after kill -9"
            if kind == "event:delete":
                assert change["type"] == "event:deleted" and change["payload"] == {k: answer[k] for k in ("id", "projectId", "version")}
                assert answer["id"] not in snapshots[project]
            else:
                assert change["payload"] == answer["event"], env
                current = snapshots[project].get(answer["event"]["id"])
                if current is not None:
                    assert current["version"] >= answer["event"]["version"]
                else:
                    last = last_change[answer["event"]["id"]]
                    assert last["type"] == "event:deleted" and last["version"] > answer["event"]["version"]
            found += 1

        # In-doubt mutations (sent, no answer before the kill): applied whole or not at all.
        doubt_applied = {}
        for env, (w, s) in in_doubt.items():
            p = s["payload"]
            event_id = p["id"]
            change = by_version.get((event_id, s["base"] + 1))
            if change is not None:
                assert change["userId"] == w.user
                doubt_applied[env] = change

        # The idempotency table answers retries with the original payload: some acked
        # envelopes, and every in-doubt one (applied: its original seq; not: applied now).
        retried = replayed_ok = doubt_retry_ok = 0
        conns: dict[str, WS] = {}
        for u in users:
            conns[u] = await WS.connect(server.port, tokens[u])
        sample = random.Random(7).sample(sorted(acks), min(150, len(acks)))
        for env in sample:
            w, answer = acks[env]
            s = sent[env][1]
            again = await conns[w.user].request(s["type"], s["payload"], id=env)
            retried += 1
            assert again["type"] == "ack" and again["payload"] == answer, (env, answer, again)
            replayed_ok += 1
        new_seqs: Counter[str] = Counter()
        for env, (w, s) in sorted(in_doubt.items()):
            again = await conns[w.user].request(s["type"], s["payload"], id=env)
            assert again["type"] == "ack", (env, s, again)
            project = again["payload"]["projectId"]
            if env in doubt_applied:
                assert again["payload"]["seq"] == doubt_applied[env]["seq"], "retry of an applied change was applied again"
            else:
                new_seqs[project] += 1
                base = len([k for k in changelog if k[0] == project])
                assert again["payload"]["seq"] == base + new_seqs[project]
            doubt_retry_ok += 1
        for c in conns.values():
            await c.abort()
        await checker.abort()

        print(f"\n[kill -9] clients={KILL_CLIENTS} sent={len(sent)} acked={len(acks)} found_after_restart={found} "
              f"refused={len(refused)} in_doubt={len(in_doubt)} (applied {len(doubt_applied)}, not applied "
              f"{len(in_doubt) - len(doubt_applied)}) changelog_entries={len(changelog)} "
              f"idempotent_replays={replayed_ok}/{retried} in_doubt_retries_ok={doubt_retry_ok}")
        assert found == len(acks)
        assert not [m for m in refused if m["type"] == "error"], refused[:3]
        assert "Traceback" not in server.stderr
    finally:
        server.stop()


# -- disconnect storm ------------------------------------------------------------------------

STORM_CLIENTS = 200
STORM_USERS = 10
STORM_DROPS = 3
PHASE = 0.6
PROJECT = "storm"


class Port:
    value = 0


class Subscriber:
    def __init__(self, n: int, tok: str) -> None:
        self.n = n
        self.tok = tok
        self.ws: WS | None = None
        self.last = 0
        self.applied: Counter[int] = Counter()
        self.state: dict[str, dict[str, Any]] = {}
        self.gaps = 0
        self.duplicates = 0
        self.snapshots = 0
        self.connects = 0
        self.refused = 0
        self.subscribed = trio.Event()

    def apply(self, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        if seq <= self.last:
            self.duplicates += 1
            return
        if seq != self.last + 1:
            self.gaps += seq - self.last - 1
        self.last = seq
        self.applied[seq] += 1
        payload = msg["payload"]
        if msg["type"] == "event:deleted":
            self.state.pop(payload["id"], None)
        else:
            self.state[payload["id"]] = payload

    async def run(self) -> None:
        while True:
            try:
                ws = await WS.connect(Port.value, self.tok, timeout=5)
            except (OSError, Closed, Rejected, trio.TooSlowError):
                self.refused += 1
                await trio.sleep(0.05 + random.random() * 0.05)
                continue
            self.ws = ws
            self.connects += 1
            try:
                ack = await ws.request("subscribe", {"projectId": PROJECT, "since": self.last}, timeout=15)
                assert ack["type"] == "ack", ack
                if ack["payload"]["mode"] == "snapshot":
                    self.snapshots += 1
                self.subscribed.set()
                while True:
                    msg = await ws.recv(None)
                    if msg["type"] in CHANGE_TYPES:
                        self.apply(msg)
                    elif msg["type"] == "sync:snapshot":
                        self.state = {e["id"]: e for e in msg["payload"]["events"]}
                        self.last = msg["payload"]["seq"]
            except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await ws.abort()


class StormWriter:
    """Creates, updates and deletes its own events; after a drop it resends the
    mutation that was in flight with the same envelope id (an offline-queue retry)."""

    def __init__(self, n: int, tok: str) -> None:
        self.n = n
        self.tok = tok
        self.ws: WS | None = None
        self.stop = False
        self.done = trio.Event()
        self.acked = 0
        self.retries = 0
        self.events: dict[str, int] = {}

    async def run(self) -> None:
        rng = random.Random(100 + self.n)
        inflight: tuple[str, str, dict[str, Any]] | None = None
        count = 0
        try:
            while not self.stop or inflight is not None:
                try:
                    ws = await WS.connect(Port.value, self.tok, timeout=5)
                except (OSError, Closed, Rejected, trio.TooSlowError):
                    await trio.sleep(0.05)
                    continue
                self.ws = ws
                try:
                    while not self.stop or inflight is not None:
                        if inflight is None:
                            count += 1
                            roll = rng.random()
                            if self.events and roll < 0.3:
                                eid = rng.choice(sorted(self.events))
                                if roll < 0.07:
                                    inflight = (uid(), "event:delete", {"id": eid, "version": self.events[eid]})
                                else:
                                    inflight = (uid(), "event:update", {"id": eid, "version": self.events[eid], "title": f"u{count}"})
                            else:
                                inflight = (uid(), "event:create", event_payload(PROJECT, id=f"s{self.n}-{count}", title=f"c{count}"))
                        else:
                            self.retries += 1
                        env, kind, payload = inflight
                        answer = await ws.request(kind, payload, id=env, timeout=15)
                        assert answer["type"] == "ack", answer
                        if kind == "event:delete":
                            self.events.pop(payload["id"], None)
                        else:
                            self.events[answer["payload"]["event"]["id"]] = answer["payload"]["event"]["version"]
                        self.acked += 1
                        inflight = None
                        await trio.sleep(0.015)
                except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    await ws.abort()
        finally:
            self.done.set()


async def test_disconnect_storm_every_client_resumes_exactly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    writer_tokens = [mint(data, f"writer{i}", "--project", PROJECT) for i in range(2)]
    secret = read_secret(data)  # the one `token create` generated, as the CLI signs with it
    tokens = [create_token(secret, user_id=f"viewer{i % STORM_USERS}", projects=[PROJECT]) for i in range(STORM_CLIENTS)]
    server: ServerProcess = await start_server(data)
    Port.value = server.port
    subs = [Subscriber(i, t) for i, t in enumerate(tokens)]
    writers = [StormWriter(i, t) for i, t in enumerate(writer_tokens)]
    drops = 0
    try:
        with trio.fail_after(75):
            async with trio.open_nursery() as nursery:
                for s in subs:
                    nursery.start_soon(s.run)
                for s in subs:
                    await s.subscribed.wait()
                for w in writers:
                    nursery.start_soon(w.run)

                async def drop_all() -> None:
                    for i, c in enumerate([*subs, *writers]):
                        if c.ws is not None:
                            await c.ws.abort(rst=i % 2 == 0)

                async def all_back(connections: int) -> None:
                    # Every subscriber connected again since the last drop (a client
                    # still connecting when the next drop comes would miss it).
                    with trio.fail_after(30):
                        while any(s.connects < connections for s in subs):
                            await trio.sleep(0.02)

                for round in range(STORM_DROPS + 1):
                    await trio.sleep(PHASE)
                    await all_back(round + 1)
                    if round == 1:
                        # The server dies mid-stream and comes back on another port.
                        await trio.to_thread.run_sync(server.kill9)
                        server = await start_server(data)
                        Port.value = server.port
                    else:
                        await drop_all()
                        drops += 1
                await trio.sleep(PHASE)
                await all_back(STORM_DROPS + 2)
                for w in writers:
                    w.stop = True
                for w in writers:
                    await w.done.wait()
                # The server's final state, read by a fresh client.
                checker = await WS.connect(server.port, writer_tokens[0])
                snap_ack = await checker.request("subscribe", {"projectId": PROJECT})
                snap = await checker.recv_until(lambda m: m["type"] == "sync:snapshot")
                final = snap[-1]["payload"]
                final_seq = final["seq"]
                final_state = {e["id"]: e for e in final["events"]}
                assert snap_ack["payload"]["seq"] == final_seq
                with trio.move_on_after(30):
                    while any(s.last < final_seq for s in subs):
                        await trio.sleep(0.1)
                await checker.abort()
                nursery.cancel_scope.cancel()

        reconnects = sum(s.connects - 1 for s in subs)
        gaps = sum(s.gaps for s in subs)
        duplicates = sum(s.duplicates for s in subs)
        behind = [s.n for s in subs if s.last != final_seq]
        wrong_state = [s.n for s in subs if s.state != final_state]
        not_once = [s.n for s in subs if s.applied != Counter(range(1, final_seq + 1))]
        print(f"\n[storm] clients={STORM_CLIENTS} drops={drops} + 1 kill -9/restart, reconnects={reconnects} "
              f"(failed connect attempts {sum(s.refused for s in subs)}), final_seq={final_seq} "
              f"events={len(final_state)} writer_acks={sum(w.acked for w in writers)} writer_retries={sum(w.retries for w in writers)} "
              f"gaps={gaps} duplicates={duplicates} snapshots={sum(s.snapshots for s in subs)} "
              f"behind={len(behind)} wrong_state={len(wrong_state)} not_exactly_once={len(not_once)}")
        assert reconnects >= STORM_CLIENTS * (STORM_DROPS + 1)
        assert gaps == 0 and duplicates == 0
        assert not behind and not wrong_state and not not_once
        assert sum(s.snapshots for s in subs) == 0
        assert "Traceback" not in server.stderr
    finally:
        server.stop()
