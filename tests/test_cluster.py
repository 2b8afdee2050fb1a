"""Several nodes on one PostgreSQL log (docs/cluster.md): real `barosync serve`
subprocesses, a real PostgreSQL (tests/pg_helpers.py). What holds across nodes:
gap-free seqs in commit order, a retried envelope answered once on any node, nothing
acked lost when a node is killed or the database goes away."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest
import trio

from attack_helpers import WS, ServerProcess, barosync_cmd, write_config
from conftest import SECRET, token
from pg_helpers import Postgres, bindir
from redis_helpers import Redis, installed as redis_installed

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (as root: apt-get install postgresql)")]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.close()


class Cluster:
    def __init__(self, tmp: Path, url: str, redis: str | None = None) -> None:
        self.tmp, self.url = tmp, url
        extra = {"cluster__redis": redis} if redis else {}
        self.config = write_config(tmp / "node.toml", auth__secret=SECRET, cluster__postgres=url, **extra)
        self.nodes: list[ServerProcess] = []

    def node(self, name: str, env: dict[str, str] | None = None) -> ServerProcess:
        srv = ServerProcess(self.tmp / name, config=self.config, name=name, env=env)
        self.nodes.append(srv)
        return srv

    def stop(self) -> None:
        codes = [n.stop() for n in self.nodes if n.alive()]
        # SIGTERM ends a node cleanly, bus and all.
        assert all(code == 0 for code in codes), [(n.stderr_path, n.stderr[-2000:]) for n in self.nodes]


@pytest.fixture
def cluster(tmp_path: Path, postgres: Postgres) -> Iterator[Cluster]:
    c = Cluster(tmp_path, postgres.new_database())
    yield c
    c.stop()


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    if not redis_installed():
        pytest.skip("redis-server is not installed (as root: apt-get install redis-server)")
    r = Redis()
    yield r
    r.close()


@pytest.fixture
def live(tmp_path: Path, postgres: Postgres, redis: Redis) -> Iterator[Cluster]:
    """Nodes with the bus between them."""
    c = Cluster(tmp_path, postgres.new_database(), redis.url)
    yield c
    c.stop()


async def start(cluster: Cluster, name: str, env: dict[str, str] | None = None) -> ServerProcess:
    return await trio.to_thread.run_sync(lambda: cluster.node(name, env))


async def bus_of(node: ServerProcess) -> dict:
    from conftest import http_exchange

    status, _, found = await http_exchange(node.port, "GET", "/api/admin/summary", tok=token("root", "*", admin=True))
    assert status == 200, found
    return found["server"]["bus"]


class Watcher:
    """A subscriber that records the seqs it is sent (and acks, for its own writes)."""

    def __init__(self, ws: WS) -> None:
        self.ws = ws
        self.seqs: list[int] = []

    @classmethod
    async def on(cls, port: int, user: str = "watcher") -> "Watcher":
        ws = await WS.connect(port, token(user, ["team"]))
        await ws.request("subscribe", {"projectId": "team"})
        return cls(ws)

    async def until(self, n: int, timeout: float = 10) -> list[int]:
        with trio.fail_after(timeout):
            while len(self.seqs) < n:
                m = await self.ws.recv(None)
                if m["type"].startswith("event:"):
                    self.seqs.append(m["seq"])
                elif m["type"] == "ack" and "seq" in m.get("payload", {}) and "event" in m["payload"]:
                    self.seqs.append(m["payload"]["seq"])
        return self.seqs


def create(n: int, project: str = "team") -> dict:
    return {"id": f"ev-{n}", "projectId": project, "title": f"Event {n}", "startDate": "2026-12-07T09:00:00Z",
            "endDate": "2026-12-07T10:00:00Z"}


async def replay_all(port: int, project: str = "team") -> list[dict]:
    """Every change of a project from seq 1, as a client resuming from nothing gets them."""
    ws = await WS.connect(port, token("reader", [project]))
    await ws.send("subscribe", {"projectId": project, "since": 0})
    msgs = await ws.recv_until(lambda m: m["type"] == "ack" and m["payload"].get("projectId") == project)
    changes = [m for m in ws.others + msgs if m["type"].startswith("event:")]
    while True:  # the replay follows the subscribe ack
        with trio.move_on_after(0.5):
            m = await ws.recv()
            if m["type"].startswith("event:"):
                changes.append(m)
            continue
        break
    await ws.abort()
    return changes


async def test_writers_on_two_nodes_make_one_contiguous_sequence(cluster: Cluster) -> None:
    a, b = await start(cluster, "a"), await start(cluster, "b")
    acked: list[int] = []

    async def writer(port: int, user: str, first: int) -> None:
        ws = await WS.connect(port, token(user, ["team"]))
        for n in range(first, first + 40):
            ack = await ws.request("event:create", create(n), id=f"{user}-{n}")
            assert ack["type"] == "ack", ack
            acked.append(ack["payload"]["seq"])
        await ws.abort()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, a.port, "alice", 0)
        nursery.start_soon(writer, b.port, "bob", 1000)
        nursery.start_soon(writer, a.port, "carol", 2000)
    assert sorted(acked) == list(range(1, 121))  # every seq once, none skipped
    c = await start(cluster, "c")
    for port in (a.port, b.port, c.port):
        changes = await replay_all(port)
        assert [m["seq"] for m in changes] == list(range(1, 121)), port
        assert len({m["payload"]["id"] for m in changes}) == 120


async def test_a_retried_envelope_on_another_node_gets_the_original_answer(cluster: Cluster) -> None:
    a, b = await start(cluster, "a"), await start(cluster, "b")
    on_a = await WS.connect(a.port, token("alice", ["team"]))
    first = await on_a.request("event:create", create(1), id="offline-42")
    await on_a.abort()  # the answer was lost on the way; the client reconnects through the balancer to b
    on_b = await WS.connect(b.port, token("alice", ["team"]))
    again = await on_b.request("event:create", create(1), id="offline-42")
    assert again["type"] == "ack" and again["payload"] == first["payload"]
    other = await on_b.request("event:create", create(2), id="next")
    assert other["payload"]["seq"] == 2  # the retry took no seq
    await on_b.abort()
    assert [m["seq"] for m in await replay_all(a.port)] == [1, 2]


async def test_kill_9_of_a_node_under_write_load_loses_nothing_acked(cluster: Cluster) -> None:
    a, b = await start(cluster, "a"), await start(cluster, "b")
    acked: dict[str, int] = {}
    ws = await WS.connect(a.port, token("alice", ["team"]))
    window = 16
    sent = 0

    async def pump() -> None:
        nonlocal sent
        while True:
            for _ in range(window):
                await ws.send("event:create", create(sent), id=f"k-{sent}")
                sent += 1
            for _ in range(window):
                m = await ws.recv(timeout=10)
                if m["type"] == "ack":
                    acked[m["id"]] = m["payload"]["seq"]

    with trio.move_on_after(1.5):
        try:
            await pump()
        except Exception:
            pass
    await trio.to_thread.run_sync(a.kill9)
    assert len(acked) > 50
    changes = await replay_all(b.port)
    seqs = [m["seq"] for m in changes]
    assert seqs == list(range(1, len(seqs) + 1))  # no gaps
    stored = {m["payload"]["id"]: m["seq"] for m in changes}
    for envelope, seq in acked.items():
        assert stored[f"ev-{envelope[2:]}"] == seq  # every acked change is there, once, at its seq
    assert len(stored) == len(changes)


async def test_postgres_away_refuses_writes_then_they_resume(cluster: Cluster, postgres: Postgres) -> None:
    a = await start(cluster, "a")
    ws = await WS.connect(a.port, token("alice", ["team"]))
    assert (await ws.request("event:create", create(1), id="before"))["type"] == "ack"
    await trio.to_thread.run_sync(lambda: postgres.stop(immediate=True))
    try:
        refused = await ws.request("event:create", create(2), id="during", timeout=30)
        assert refused["type"] == "error" and refused["payload"]["code"] == "storage_full", refused
        assert "PostgreSQL" in refused["payload"]["message"] and refused["payload"]["retryAfter"] > 0
    finally:
        await trio.to_thread.run_sync(postgres.start)
    with trio.fail_after(30):
        while True:  # the writer's probe notices the database is back
            answer = await ws.request("event:create", create(2), id="during")
            if answer["type"] == "ack":
                break
            await trio.sleep(0.5)
    assert answer["payload"]["seq"] == 2
    await ws.abort()
    assert [m["payload"]["id"] for m in await replay_all(a.port)] == ["ev-1", "ev-2"]


def test_the_first_read_after_postgres_restarts_is_answered(postgres: Postgres, tmp_path: Path) -> None:
    """A pooled read connection PostgreSQL dropped is replaced at checkout: the first
    subscribe after a restart was once closed 4008 on the stale one."""
    from barosync.config import Config
    from barosync.domain.models import new_event
    from barosync.storage.pg_store import PgStore
    from barosync.hooks.plugins import build_plugin_manager
    from barosync.storage.store import Mutation, now_ms

    url = postgres.new_database()
    config = Config(data_dir=tmp_path, cluster_postgres=url)
    store = PgStore(url, hook=build_plugin_manager(config).hook, config=config)
    try:
        event = new_event({"projectId": "team", "title": "e", "startDate": "2026-01-05T09:00:00Z",
                           "endDate": "2026-01-05T10:00:00Z"}, user_id="alice", now_ms=now_ms())
        store.commit_batch([Mutation("create", user_id="alice", envelope_id="env-1", project_id="team",
                                     event_id=event.id, event=event, received_ms=now_ms())])
        assert len(store.snapshot("team")[1]) == 1  # the pool holds a connection now
        postgres.stop(immediate=True)
        postgres.start()
        assert len(store.snapshot("team")[1]) == 1
    finally:
        store.close()


def test_an_unreachable_engine_at_start_is_a_config_error_that_says_so(tmp_path: Path, postgres: Postgres) -> None:
    def serve(**cluster: str) -> subprocess.CompletedProcess[str]:
        config = write_config(tmp_path / "node.toml", **{f"cluster__{k}": v for k, v in cluster.items()})
        return subprocess.run(barosync_cmd("serve", "--port", "0", "--data", str(tmp_path / "d"), "--config", str(config)),
                              capture_output=True, text=True, timeout=60)

    done = serve(postgres="postgresql://barosync@127.0.0.1:9/nowhere")
    assert done.returncode == 2
    assert "[cluster] postgres" in done.stderr and "cannot connect to PostgreSQL" in done.stderr
    assert "Traceback" not in done.stderr
    done = serve(postgres=postgres.new_database(), redis="redis://127.0.0.1:9/0")
    assert done.returncode == 2
    assert "[cluster] redis" in done.stderr and "cannot connect to Redis" in done.stderr
    assert "Traceback" not in done.stderr
    done = serve(redis="redis://127.0.0.1:9/0")
    assert done.returncode == 2 and "needs [cluster] postgres too" in done.stderr


def test_the_changelog_tables_hold_the_invariants(postgres: Postgres, tmp_path: Path) -> None:
    """What an operator can check with psql: heads equal the last seq, seqs gap-free."""
    import psycopg

    url = postgres.new_database()
    config = write_config(tmp_path / "node.toml", auth__secret=SECRET, cluster__postgres=url)
    srv = ServerProcess(tmp_path / "n", config=config)
    try:
        async def fill() -> None:
            ws = await WS.connect(srv.port, token("alice", ["team", "ops"]))
            for n in range(10):
                await ws.request("event:create", create(n, "team" if n % 2 else "ops"))
            await ws.request("event:delete", {"id": "ev-1"})
            await ws.abort()
        trio.run(fill)
    finally:
        srv.stop()
    with psycopg.connect(url) as conn:
        heads = dict(conn.execute("SELECT project, seq FROM barosync_heads").fetchall())
        assert heads == {"ops": 5, "team": 6}
        for project, seq in heads.items():
            seqs = [s for (s,) in conn.execute("SELECT seq FROM barosync_changelog WHERE project = %s ORDER BY seq",
                                                 (project,))]
            assert seqs == list(range(1, seq + 1))
        change = conn.execute("SELECT change FROM barosync_changelog WHERE project = 'team' AND seq = 6").fetchone()[0]
        assert orjson.loads(change)["type"] == "event:deleted"


def test_check_reads_the_postgres_log_and_backup_points_to_pg_dump(postgres: Postgres, tmp_path: Path) -> None:
    import psycopg

    url = postgres.new_database()
    config = write_config(tmp_path / "node.toml", auth__secret=SECRET, cluster__postgres=url)
    srv = ServerProcess(tmp_path / "n", config=config)
    try:
        async def fill() -> None:
            ws = await WS.connect(srv.port, token("alice", ["team"]))
            for n in range(5):
                await ws.request("event:create", create(n))
            await ws.abort()
        trio.run(fill)
    finally:
        srv.stop()
    cli = lambda *a: subprocess.run(barosync_cmd(*a, "--config", str(config), "--data", str(tmp_path / "n")),  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    done = cli("check")
    assert done.returncode == 0 and "1 projects, 5 events, 5 changes, 5 idempotency records, 0 accounts: ok" in done.stdout, done
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM barosync_changelog WHERE project = 'team' AND seq = 3")
    done = cli("check")
    assert done.returncode == 1 and "1 seqs missing between 1 and 5" in done.stdout

    # barosync backup: pg_dump of the log, taken while a node serves.
    with psycopg.connect(url, autocommit=True) as conn:  # mend what the check found
        conn.execute("DELETE FROM barosync_changelog WHERE project = 'team' AND seq > 2")
        conn.execute("UPDATE barosync_heads SET seq = 2")
        conn.execute("DELETE FROM barosync_events WHERE id NOT IN ('ev-0', 'ev-1')")
        conn.execute("DELETE FROM barosync_index WHERE id NOT IN ('ev-0', 'ev-1')")
        conn.execute("DELETE FROM barosync_idem WHERE seq > 2")
        before = conn.execute("SELECT value FROM barosync_meta WHERE key = 'data_id'").fetchone()[0]
    done = cli("backup", str(tmp_path / "b"))
    assert done.returncode == 0 and (tmp_path / "b" / "barosync.pgdump").is_file(), done.stderr
    srv = ServerProcess(tmp_path / "n", config=config)
    try:
        async def more() -> None:
            ws = await WS.connect(srv.port, token("alice", ["team"]))
            for n in range(10, 13):
                await ws.request("event:create", create(n))
            await ws.abort()
        trio.run(more)
    finally:
        srv.stop()
    # barosync restore: back to the dump, with a new history id.
    done = cli("restore", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert cli("check").stdout.strip().endswith("1 projects, 2 events, 2 changes, 2 idempotency records, 0 accounts: ok")
    srv = ServerProcess(tmp_path / "n", config=config)
    try:
        async def resume() -> None:
            ws = await WS.connect(srv.port, token("alice", ["team"]))
            assert ws.hello["payload"]["dataId"] != before  # a client from after the dump starts over
            ack = await ws.request("subscribe", {"projectId": "team", "since": 5})
            assert ack["payload"]["mode"] == "snapshot" and ack["payload"]["seq"] == 2
            await ws.abort()
        trio.run(resume)
    finally:
        srv.stop()



# -- the live bus (Redis) between nodes ------------------------------------------------------


async def test_a_writer_on_one_node_reaches_subscribers_on_the_others_in_order(live: Cluster) -> None:
    a, b, c = [await start(live, n) for n in ("a", "b", "c")]
    on_b, on_c = await Watcher.on(b.port), await Watcher.on(c.port)
    writer = await WS.connect(a.port, token("alice", ["team"]))
    for n in range(50):
        assert (await writer.request("event:create", create(n)))["type"] == "ack"
    assert await on_b.until(50) == list(range(1, 51))
    assert await on_c.until(50) == list(range(1, 51))
    bus_b, bus_a = await bus_of(b), await bus_of(a)
    assert bus_a["published"] == 50 and bus_b["received"] >= 50 and bus_b["connected"]  # carried by Redis


async def test_writers_on_two_nodes_are_seen_identically_everywhere(live: Cluster) -> None:
    a, b, c = [await start(live, n) for n in ("a", "b", "c")]
    watchers = [await Watcher.on(port) for port in (a.port, b.port, c.port)]
    # A writer that is subscribed too: it gets acks for its own, the others' as changes.
    writer_a = await Watcher.on(a.port, "alice")

    async def write(ws: WS, first: int) -> None:
        for n in range(first, first + 40):
            await ws.send("event:create", create(n), id=f"w-{n}")
            await trio.sleep(0)

    writer_b = await WS.connect(b.port, token("bob", ["team"]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, writer_a.ws, 0)
        nursery.start_soon(write, writer_b, 1000)
    for w in watchers + [writer_a]:
        assert await w.until(80) == list(range(1, 81))


async def test_a_node_that_never_publishes_still_reaches_the_others(
        nursery: trio.Nursery, tmp_path: Path, postgres: Postgres, redis: Redis) -> None:
    """It died between commit and publish, as far as the others can tell: they find
    the change in the log within the check interval. (Two nodes in this process, so
    the test can make one drop its publishes.)"""
    from barosync.transports.server import serve
    from conftest import make_config, open_client

    dsn = postgres.new_database()
    a, b = [await nursery.start(serve, make_config(tmp_path / name, cluster_postgres=dsn, cluster_redis=redis.url))
            for name in ("a", "b")]
    try:
        a.bus.drop_publishes = True
        on_b = await open_client(nursery, b, token("watcher", ["team"]))
        await on_b.subscribe("team")
        writer = await open_client(nursery, a, token("alice", ["team"]))
        assert (await writer.create("team"))["type"] == "ack"
        assert (await on_b.recv_type("event:created", timeout=10))["seq"] == 1
        assert a.bus.published == 0 and b.hub.sequencer.filled == 1
    finally:
        a.stop()
        b.stop()


async def test_redis_killed_and_back_loses_nothing(live: Cluster, redis: Redis) -> None:
    a, b = await start(live, "a"), await start(live, "b")
    on_b = await Watcher.on(b.port)
    frank = await Watcher.on(a.port, "frank")  # present on a before Redis goes
    writer = await WS.connect(a.port, token("alice", ["team"]))
    await writer.request("event:create", create(0))
    assert await on_b.until(1) == [1]
    await trio.to_thread.run_sync(redis.kill)
    try:
        for n in range(1, 6):  # written while the bus is down: acked (the log has them)
            assert (await writer.request("event:create", create(n)))["type"] == "ack"
        assert await on_b.until(6, timeout=5) == list(range(1, 7))  # from the log, by the check
    finally:
        await trio.to_thread.run_sync(redis.start)
    with trio.fail_after(20):  # the nodes find Redis again (with backoff)
        while not ((await bus_of(a))["connected"] and (await bus_of(b))["connected"]):
            await trio.sleep(0.1)
    for n in range(6, 11):
        await writer.request("event:create", create(n))
    assert await on_b.until(11, timeout=10) == list(range(1, 12))
    # Presence is rebuilt in the new, empty Redis: someone joining on b now sees
    # frank, who subscribed on a before Redis died.
    erin = await WS.connect(b.port, token("erin", ["team"]))
    await erin.request("subscribe", {"projectId": "team"})
    await wait_presence(erin, lambda s: s.get("frank") is True)
    assert frank.ws.close_code is None


async def wait_presence(ws: WS, want: Callable[[dict[str, bool]], bool], timeout: float = 15) -> dict[str, bool]:
    """Reads user:joined / user:left (user id -> present) until ``want`` holds."""
    seen: dict[str, bool] = {}
    with trio.move_on_after(timeout):
        while not want(seen):
            m = await ws.recv(None)
            if m["type"] in ("user:joined", "user:left"):
                seen[m["payload"]["id"]] = m["type"] == "user:joined"
    assert want(seen), seen
    return seen


async def test_presence_and_cursors_cross_nodes(live: Cluster) -> None:
    """(A killed node's users leaving: tests/test_cluster_storm.py, in a storm.)"""
    a, b = await start(live, "a"), await start(live, "b")
    alice = await WS.connect(a.port, token("alice", ["team"]))
    await alice.request("subscribe", {"projectId": "team"})
    bob = await WS.connect(b.port, token("bob", ["team"]))
    await bob.request("subscribe", {"projectId": "team"})
    # Each hears of the other, though they are on different nodes.
    await wait_presence(bob, lambda s: s.get("alice") is True)
    await wait_presence(alice, lambda s: s.get("bob") is True)
    # A cursor moved on a reaches b.
    await alice.send("user:cursor", {"projectId": "team", "x": 0.25, "y": 0.5})
    with trio.fail_after(5):
        while True:
            m = await bob.recv(None)
            if m["type"] == "user:cursor":
                break
    assert (m["payload"]["userId"], m["payload"]["x"]) == ("alice", 0.25)
    # carol joins on b and leaves cleanly: alice (on a) sees both.
    carol = await WS.connect(b.port, token("carol", ["team"]))
    await carol.request("subscribe", {"projectId": "team"})
    await wait_presence(alice, lambda s: s.get("carol") is True)
    await carol.abort()
    await wait_presence(alice, lambda s: s.get("carol") is False)


async def test_a_cursor_reaches_a_subscriber_on_the_same_node_once(live: Cluster) -> None:
    """The node hears its own cursor publish back from Redis: it must not deliver it
    again (it did, before the node id went into the message)."""
    a = await start(live, "a")
    await start(live, "b")
    alice = await WS.connect(a.port, token("alice", ["team"]))
    await alice.request("subscribe", {"projectId": "team"})
    bob = await WS.connect(a.port, token("bob", ["team"]))
    await bob.request("subscribe", {"projectId": "team"})
    await bob.send("user:cursor", {"projectId": "team", "x": 1, "y": 2})
    cursors = []
    with trio.move_on_after(1.5):
        while True:
            m = await alice.recv(None)
            if m["type"] == "user:cursor":
                cursors.append(m)
    assert len(cursors) == 1, cursors


# The PostgreSQL schema of release 0.1.0 (an id unique on the whole log).
SCHEMA_1 = """
CREATE TABLE barosync_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE barosync_heads (project text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE barosync_events (project text NOT NULL, id text NOT NULL, body bytea NOT NULL, PRIMARY KEY (project, id));
CREATE TABLE barosync_index (id text PRIMARY KEY, project text NOT NULL);
CREATE TABLE barosync_changelog (project text NOT NULL, seq bigint NOT NULL, event_id text NOT NULL,
    version bigint NOT NULL, ts bigint NOT NULL, change bytea NOT NULL, PRIMARY KEY (project, seq));
CREATE INDEX barosync_changelog_versions ON barosync_changelog (event_id, version);
CREATE TABLE barosync_idem (user_id text NOT NULL, envelope_id text NOT NULL, project text NOT NULL,
    seq bigint, answer bytea NOT NULL, PRIMARY KEY (user_id, envelope_id));
INSERT INTO barosync_meta VALUES ('schema', '1'), ('data_id', 'release-0-1-0-log');
"""


def test_a_log_of_release_0_1_0_is_migrated_at_start_and_ids_are_per_project(tmp_path: Path, postgres: Postgres) -> None:
    import psycopg

    url = postgres.new_database()
    event = {"id": "standup", "projectId": "team", "title": "Standup", "startDate": "2026-12-07T09:00:00Z",
             "endDate": "2026-12-07T10:00:00Z", "allDay": False, "version": 1, "createdAt": 1, "updatedAt": 1,
             "createdBy": "alice", "updatedBy": "alice", "attendees": []}
    change = {"type": "event:created", "id": "team:1", "seq": 1, "projectId": "team", "version": 1, "userId": "alice",
              "timestamp": 1, "payload": event}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA_1)
        conn.execute("INSERT INTO barosync_heads VALUES ('team', 1)")
        conn.execute("INSERT INTO barosync_events VALUES ('team', 'standup', %s)", (orjson.dumps(event),))
        conn.execute("INSERT INTO barosync_index VALUES ('standup', 'team')")
        conn.execute("INSERT INTO barosync_changelog VALUES ('team', 1, 'standup', 1, 1, %s)", (orjson.dumps(change),))
    c = Cluster(tmp_path, url)
    try:
        node = c.node("a")
        assert "migrated the PostgreSQL log" in node.stderr

        async def main() -> None:
            ws = await WS.connect(node.port, token("alice", ["team", "ops"]))
            answer = await ws.request("event:update", {"id": "standup", "projectId": "team", "version": 1,
                                                      "title": "Daily standup"})
            assert answer["type"] == "ack", answer
            # The same id in another project is another event now.
            answer = await ws.request("event:create", {"id": "standup", "projectId": "ops", "title": "Ops standup",
                                                      "startDate": "2026-12-07T09:00:00Z", "endDate": "2026-12-07T09:15:00Z"})
            assert answer["type"] == "ack" and answer["payload"]["event"]["version"] == 1, answer
            await ws.abort()

        trio.run(main)
        done = subprocess.run(barosync_cmd("check", "--config", str(c.config), "--data", str(tmp_path / "a")),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        c.stop()
    second = Cluster(tmp_path, url).node("b")  # once: a second start migrates nothing
    try:
        assert "migrated" not in second.stderr
    finally:
        second.stop()


def test_retention_prunes_old_changes_and_their_idempotency_records(postgres: Postgres, tmp_path: Path) -> None:
    """As on one node: a change past history_retention goes with the record that
    answered its retries; newer ones and their records stay."""
    import psycopg

    from barosync.config import Config
    from barosync.domain.models import new_event
    from barosync.storage.pg_store import PgStore
    from barosync.hooks.plugins import build_plugin_manager
    from barosync.storage.store import Mutation, now_ms

    url = postgres.new_database()
    config = Config(data_dir=tmp_path, history_retention=60, cluster_postgres=url)
    store = PgStore(url, hook=build_plugin_manager(config).hook, config=config)
    try:
        def create(n: int, at: int) -> Mutation:
            event = new_event({"projectId": "team", "title": f"e{n}", "startDate": "2026-01-05T09:00:00Z",
                               "endDate": "2026-01-05T10:00:00Z"}, user_id="alice", now_ms=at)
            return Mutation("create", user_id="alice", envelope_id=f"env-{n}", project_id="team", event_id=event.id,
                            event=event, received_ms=at)

        old = now_ms() - 3_600_000
        store.commit_batch([create(n, old) for n in range(3)])
        store.commit_batch([create(n, now_ms()) for n in range(3, 5)])
        assert store.prune(now_ms=now_ms()) == 3
        with psycopg.connect(url) as conn:
            kept = sorted(e for (e,) in conn.execute("SELECT envelope_id FROM barosync_idem"))
        assert kept == ["env-3", "env-4"]
        assert store.previous_answer("alice", "env-0") is None and store.previous_answer("alice", "env-4") is not None
        assert len(store.snapshot("team")[1]) == 5  # the events stay; only history goes
    finally:
        store.close()
