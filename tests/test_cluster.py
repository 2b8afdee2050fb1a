"""Several nodes on one PostgreSQL log (docs/cluster.md): real `barosync serve`
subprocesses, a real PostgreSQL (tests/pg_helpers.py). What holds across nodes:
gap-free seqs in commit order, a retried envelope answered once on any node, nothing
acked lost when a node is killed or the database goes away."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import orjson
import pytest
import trio

from attack_helpers import WS, ServerProcess, barosync_cmd, write_config
from conftest import SECRET, token
from pg_helpers import Postgres, bindir

pytestmark = pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (as root: apt-get install postgresql)")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.close()


class Cluster:
    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp, self.url = tmp, url
        self.config = write_config(tmp / "node.toml", auth__secret=SECRET, cluster__postgres=url)
        self.nodes: list[ServerProcess] = []

    def node(self, name: str) -> ServerProcess:
        srv = ServerProcess(self.tmp / name, config=self.config, name=name)
        self.nodes.append(srv)
        return srv

    def stop(self) -> None:
        for n in self.nodes:
            if n.alive():
                n.stop()


@pytest.fixture
def cluster(tmp_path: Path, postgres: Postgres) -> Iterator[Cluster]:
    c = Cluster(tmp_path, postgres.new_database())
    yield c
    c.stop()


async def start(cluster: Cluster, name: str) -> ServerProcess:
    return await trio.to_thread.run_sync(lambda: cluster.node(name))


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


def test_an_unreachable_postgres_at_start_is_a_config_error_that_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", cluster__postgres="postgresql://barosync@127.0.0.1:9/nowhere")
    done = subprocess.run(barosync_cmd("serve", "--port", "0", "--data", str(tmp_path / "d"), "--config", str(config)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "[cluster] postgres" in done.stderr and "cannot connect to PostgreSQL" in done.stderr
    assert "Traceback" not in done.stderr


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
    assert done.returncode == 0 and "1 projects, 5 events, 5 changes, 5 idempotency records: ok" in done.stdout, done
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM barosync_changelog WHERE project = 'team' AND seq = 3")
    done = cli("check")
    assert done.returncode == 1 and "1 seqs missing between 1 and 5" in done.stdout
    done = cli("backup", str(tmp_path / "b"))
    assert done.returncode == 1 and "pg_dump" in done.stderr
