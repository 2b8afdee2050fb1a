"""`barosync backup`, `restore` and `check` on data made by a real server.

The commands run as subprocesses, as a self-hoster runs them: LMDB forbids opening one
environment twice in one process, and "safe while the server runs" means "from
another process". Corruptions are made directly with py-lmdb on a stopped store.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import attrs
import lmdb
import orjson
import pytest
import trio

from barosync.storage import ops
from barosync.hooks.auth import create_token
from barosync.config import Config
from barosync.core.app import App
from barosync.transports.server import serve

from conftest import Client, event_payload, make_config, open_client, token

U64 = struct.Struct(">Q")
RUN_TIMEOUT = 60


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(RUN_TIMEOUT):
        return await trio.run_process([sys.executable, "-m", "barosync", *args], capture_stdout=True, capture_stderr=True, check=False)


def text(result: subprocess.CompletedProcess[bytes]) -> tuple[str, str]:
    return result.stdout.decode(), result.stderr.decode()


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[App, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        app = await nursery.start(serve, config)
        async with trio.open_nursery() as clients:
            yield app, clients
            clients.cancel_scope.cancel()
        app.stop()


def report(data_dir: Path) -> ops.Report:
    """check, in-process: only on a store no server in this process has open."""
    return ops._check_dir(data_dir, lock=True)


def changelog(data_dir: Path) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    with ops.open_readonly(data_dir) as env:
        db = env.open_db(b"changelog", create=False)
        out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        with env.begin() as txn:
            for key, value in txn.cursor(db=db):
                out.setdefault(key[:-9].decode(), []).append((U64.unpack(key[-8:])[0], orjson.loads(value)))
    return out


# -- backup while serving, restore, serve again ------------------------------------------


async def test_backup_while_serving_then_restore_and_serve_from_it(tmp_path):
    data, backup_dir, restored = tmp_path / "data", tmp_path / "backup", tmp_path / "restored"
    # No [auth] secret: the server generates data/secret, which the backup must carry.
    config = attrs.evolve(make_config(data), secret=None)
    async with running(config) as (app, nursery):
        secret = (data / "secret").read_text().strip()

        def tok(user: str) -> str:
            return create_token(secret, user_id=user, projects=["p1", "p2"])

        alice = await open_client(nursery, app, tok("alice"))
        bob = await open_client(nursery, app, tok("bob"))
        await bob.subscribe("p1")
        first = await alice.request("event:create", event_payload("p1", id="ev-a", title="Planning"), id="retry-me")
        assert first["type"] == "ack"
        await alice.create("p1", id="ev-b", title="Retro")
        moved = await alice.request("event:update", {"id": "ev-a", "version": 1, "title": "Planning (moved)"}, id="upd-1")
        assert moved["type"] == "ack"
        assert (await alice.request("event:delete", {"id": "ev-b"}, id="del-1"))["type"] == "ack"
        await alice.create("p2", id="ev-c", title="Offsite")
        assert (await bob.recv_type("event:deleted"))["seq"] == 4

        # Writes keep landing while the backup copies and the check reads.
        writer = await open_client(nursery, app, tok("carol"))
        stop = trio.Event()
        written = 0

        async def keep_writing() -> None:
            nonlocal written
            while not stop.is_set():
                answer = await writer.create("p2", title=f"bulk {written}")
                if answer["type"] == "error" and answer["payload"]["code"] == "rate_limited":
                    await trio.sleep(0.05)  # as fast as the server lets one client write
                    continue
                assert answer["type"] == "ack", answer
                written += 1

        nursery.start_soon(keep_writing)
        with trio.fail_after(RUN_TIMEOUT):
            while written < 5:
                await trio.sleep(0.01)
        backed = await cli("backup", str(backup_dir), "--data", str(data))
        checked = await cli("check", "--data", str(data))
        before = written
        with trio.fail_after(RUN_TIMEOUT):
            while written < before + 5:  # the server is still writing after both
                await trio.sleep(0.01)
        stop.set()

    out, err = text(backed)
    assert backed.returncode == 0, err
    assert f"backed up {data} to {backup_dir}" in out and "with the secret file" in out
    out, err = text(checked)
    assert checked.returncode == 0, out + err
    assert out.splitlines()[-1].startswith(f"checked {data}: 2 projects, ") and out.rstrip().endswith(": ok")

    assert stat.S_IMODE((backup_dir / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in backup_dir.iterdir()) == ["data.mdb", "secret"]
    # A consistent copy: what it holds is a prefix of what the server went on to write.
    original, copied = changelog(data), changelog(backup_dir)
    assert copied["p1"] == original["p1"]
    assert 5 < len(copied["p2"]) < len(original["p2"])
    assert copied["p2"] == original["p2"][: len(copied["p2"])]
    assert report(backup_dir).ok and report(data).ok

    restored_run = await cli("restore", str(backup_dir), "--data", str(restored))
    out, err = text(restored_run)
    assert restored_run.returncode == 0, err
    assert f"restored {backup_dir} into {restored}" in out
    assert (restored / "secret").read_text() == (data / "secret").read_text()
    assert stat.S_IMODE((restored / "secret").stat().st_mode) == 0o600

    async with running(attrs.evolve(config, data_dir=restored)) as (app, nursery):
        # Tokens minted before the backup still work: the secret came along.
        alice = await open_client(nursery, app, tok("alice"))
        assert app.store.current_seq("p1") == 4
        assert app.store.current_seq("p2") == len(copied["p2"])
        answer = await alice.subscribe("p1", since=0)
        assert answer["payload"]["mode"] == "changes" and answer["payload"]["seq"] == 4
        replayed = [await alice.recv() for _ in range(4)]
        assert [m["seq"] for m in replayed] == [1, 2, 3, 4]
        assert [(m["type"], m["payload"]["id"]) for m in replayed] == [
            ("event:created", "ev-a"), ("event:created", "ev-b"), ("event:updated", "ev-a"), ("event:deleted", "ev-b")]
        # Offline-queue retries are answered from the restored idempotency table.
        again = await alice.request("event:create", event_payload("p1", id="ev-a", title="Planning"), id="retry-me")
        assert again == first
        again = await alice.request("event:update", {"id": "ev-a", "version": 1, "title": "Planning (moved)"}, id="upd-1")
        assert again == moved
        assert app.store.current_seq("p1") == 4
        assert app.store.get_event("p1", "ev-a")["title"] == "Planning (moved)"
        assert app.store.get_event("p1", "ev-b") is None
        # ... and new changes continue the sequence.
        assert (await alice.create("p1", title="After restore"))["payload"]["seq"] == 5


# -- refusals ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> Path:
    """A stopped store with some history: p1 seq 1..5, p2 seq 1."""
    data = tmp_path / "data"
    async with running(make_config(data)) as (app, nursery):
        c: Client = await open_client(nursery, app, token("alice", ["p1", "p2"]))
        await c.create("p1", id="a", title="A")  # p1 seq 1
        await c.create("p1", id="b", title="B")  # 2
        await c.request("event:update", {"id": "a", "version": 1, "title": "A2"})  # 3
        await c.create("p1", id="c", title="C")  # 4
        await c.request("event:delete", {"id": "c"})  # 5
        await c.create("p2", id="d", title="D")  # p2 seq 1
    return data


async def test_backup_refuses_a_non_empty_destination(store, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    result = await cli("backup", str(dest), "--data", str(store))
    out, err = text(result)
    assert result.returncode == 1 and out == ""
    assert err.count("\n") == 1 and str(dest) in err and "not empty" in err and "Traceback" not in err
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


async def test_backup_into_an_existing_empty_directory_and_without_a_secret_file(store, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    result = await cli("backup", str(dest), "--data", str(store))
    out, err = text(result)
    assert result.returncode == 0, err
    assert "2 projects, 3 events, 6 changes, 6 idempotency records" in out
    assert "without a secret file" in out  # this store's secret is in the config, not on disk
    assert sorted(p.name for p in dest.iterdir()) == ["data.mdb"]


async def test_backup_of_a_missing_data_directory_says_so(tmp_path):
    result = await cli("backup", str(tmp_path / "b"), "--data", str(tmp_path / "nothing"))
    out, err = text(result)
    assert result.returncode == 1
    assert "no such directory" in err and str(tmp_path / "nothing") in err
    assert not (tmp_path / "b").exists()


async def test_restore_refuses_a_non_empty_data_directory(store, tmp_path):
    backup_dir = tmp_path / "backup"
    assert (await cli("backup", str(backup_dir), "--data", str(store))).returncode == 0
    result = await cli("restore", str(backup_dir), "--data", str(store))
    out, err = text(result)
    assert result.returncode == 1 and out == ""
    assert str(store) in err and "not empty" in err and "Traceback" not in err
    assert report(store).ok


async def test_restore_refuses_what_is_not_a_backup(tmp_path):
    (tmp_path / "src").mkdir()
    result = await cli("restore", str(tmp_path / "src"), "--data", str(tmp_path / "new"))
    assert result.returncode == 1
    assert "not a barosync backup" in result.stderr.decode()
    assert not (tmp_path / "new").exists()


async def test_restore_refuses_a_damaged_backup_unless_forced(store, tmp_path):
    backup_dir = tmp_path / "backup"
    assert (await cli("backup", str(backup_dir), "--data", str(store))).returncode == 0
    corrupt(backup_dir, lambda txn, db: txn.delete(b"p1\0" + U64.pack(3), db=db["changelog"]))
    result = await cli("restore", str(backup_dir), "--data", str(tmp_path / "new"))
    assert result.returncode == 1
    assert "changelog: project 'p1' is missing seq 3" in result.stderr.decode()
    assert not (tmp_path / "new").exists()
    forced = await cli("restore", str(backup_dir), "--data", str(tmp_path / "new"), "--force")
    assert forced.returncode == 0, forced.stderr.decode()
    assert (tmp_path / "new" / "data.mdb").exists()


# -- check ---------------------------------------------------------------------------------


async def test_check_passes_on_good_data_and_prints_a_summary(store):
    result = await cli("check", "--data", str(store))
    out, err = text(result)
    assert result.returncode == 0, out + err
    assert out == f"checked {store}: 2 projects, 3 events, 6 changes, 6 idempotency records, 0 accounts: ok\n"


async def test_check_while_the_server_runs(tmp_path):
    data = tmp_path / "data"
    async with running(make_config(data)) as (app, nursery):
        c = await open_client(nursery, app, token("alice", ["p1"]))
        for n in range(20):
            await c.create("p1", title=f"e{n}")
        result = await cli("check", "--data", str(data))
        # The server is unaffected by a reader in another process.
        assert (await c.create("p1", title="after"))["payload"]["seq"] == 21
    out, err = text(result)
    assert result.returncode == 0, out + err
    assert "1 projects, 20 events, 20 changes, 20 idempotency records, 0 accounts: ok" in out


def corrupt(data_dir: Path, change: Callable[[lmdb.Transaction, dict[str, Any]], Any]) -> None:
    env = lmdb.open(str(data_dir), max_dbs=8)
    try:
        dbs = {name: env.open_db(name.encode(), create=False) for name in ops.SUB_DATABASES}
        with env.begin(write=True) as txn:
            change(txn, dbs)
    finally:
        env.close()


def _put_event(txn: lmdb.Transaction, db: dict[str, Any], project: str, event_id: str, **changes: Any) -> None:
    key = f"{project}\0{event_id}".encode()
    event = orjson.loads(txn.get(key, db=db["events"]))
    txn.put(key, orjson.dumps({**event, **changes}), db=db["events"])


def _resurrect_c(txn: lmdb.Transaction, db: dict[str, Any]) -> None:
    change = orjson.loads(txn.get(b"p1\0" + U64.pack(4), db=db["changelog"]))
    txn.put(b"p1\0c", orjson.dumps(change["payload"]), db=db["events"])


CORRUPTIONS = {
    "changelog entry deleted (a gap)": (
        lambda txn, db: txn.delete(b"p1\0" + U64.pack(2), db=db["changelog"]),
        "changelog: project 'p1' is missing seq 2 (a gap between 1 and 3)",
    ),
    "last changelog entry deleted": (
        lambda txn, db: txn.delete(b"p1\0" + U64.pack(5), db=db["changelog"]),
        "changelog: project 'p1' ends at seq 4 but its seq counter is 5 (missing seq 5)",
    ),
    "first changelog entry deleted (not retention: its version still points at it)": (
        lambda txn, db: txn.delete(b"p1\0" + U64.pack(1), db=db["changelog"]),
        "versions: event 'a' of project 'p1' version 1 points at seq 1 of project 'p1', which is not in the changelog",
    ),
    "seq counter behind the changelog": (
        lambda txn, db: txn.put(b"p2", U64.pack(0), db=db["seqs"]),
        "changelog: project 'p2' has seq 1, beyond its seq counter 0",
    ),
    "event altered": (
        lambda txn, db: _put_event(txn, db, "p1", "a", title="Tampered"),
        "events: event 'a' of project 'p1' does not match its last change (seq 3): differs in title",
    ),
    "event lost": (
        lambda txn, db: txn.delete(b"p1\0b", db=db["events"]),
        "events: event 'b' of project 'p1' is missing, but its last change (seq 2, event:created) did not delete it",
    ),
    "deleted event back in events": (
        _resurrect_c,
        "events: event 'c' of project 'p1' was deleted at seq 5 but is still stored",
    ),
    "index entry in a project without history": (
        lambda txn, db: txn.put(b"a\0p7", b"", db=db["index"]),
        "index: knows event 'a' in project 'p7', which has no seq counter",
    ),
    "index entry missing": (
        lambda txn, db: txn.delete(b"d\0p2", db=db["index"]),
        "index: event 'd' of project 'p2' is not in the index",
    ),
    "dangling versions entry": (
        lambda txn, db: txn.put(b"a\0p1\0" + U64.pack(9), U64.pack(77), db=db["versions"]),
        "versions: event 'a' of project 'p1' version 9 points at seq 77 of project 'p1', which is not in the changelog",
    ),
    "dangling idempotency record": (
        lambda txn, db: txn.put(b"alice\0ghost", orjson.dumps({"event": {"id": "zz"}, "projectId": "p1", "seq": 99}), db=db["idem"]),
        "idem: record 'ghost' of user 'alice' is dangling: seq 99 is beyond project 'p1''s seq counter 5",
    ),
    "idempotency record for a project without history": (
        lambda txn, db: txn.put(b"bob\0lost", orjson.dumps({"id": "x", "projectId": "p9", "seq": 1}), db=db["idem"]),
        "idem: record 'lost' of user 'bob' is dangling: seq 1 is beyond project 'p9''s seq counter 0",
    ),
    "idempotency record lost, its change kept": (
        lambda txn, db: txn.delete(bytes(txn.get(b"p1\0" + U64.pack(2), db=db["idem_by_seq"])), db=db["idem"]),
        "idem_by_seq: seq 2 of project 'p1' names an idempotency record that is not there",
    ),
    "idem_by_seq naming another change's record": (
        lambda txn, db: txn.put(b"p1\0" + U64.pack(2), bytes(txn.get(b"p1\0" + U64.pack(3), db=db["idem_by_seq"])),
                                db=db["idem_by_seq"]),
        "idem_by_seq: seq 2 of project 'p1' names a record that answers for another change",
    ),
    "idem_by_seq beyond the seq counter": (
        lambda txn, db: txn.put(b"p1\0" + U64.pack(42), b"alice\0x", db=db["idem_by_seq"]),
        "idem_by_seq: seq 42 of project 'p1' is beyond the project's seq counter 5",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
async def test_check_names_what_was_corrupted(store, name):
    damage, expected = CORRUPTIONS[name]
    corrupt(store, damage)
    found = report(store)
    assert expected in found.problems, found.problems


async def test_check_cli_on_corrupt_data_exits_1_with_one_line_per_problem(store):
    def damage(txn: lmdb.Transaction, db: dict[str, Any]) -> None:
        txn.delete(b"p1\0" + U64.pack(2), db=db["changelog"])
        _put_event(txn, db, "p2", "d", title="Tampered")
        txn.put(b"alice\0ghost", orjson.dumps({"id": "c", "projectId": "p1", "seq": 6}), db=db["idem"])

    corrupt(store, damage)
    result = await cli("check", "--data", str(store))
    out, err = text(result)
    assert result.returncode == 1
    lines = out.splitlines()
    assert lines[-1] == f"checked {store}: 2 projects, 3 events, 5 changes, 7 idempotency records, 0 accounts: {len(lines) - 1} problems"
    assert "changelog: project 'p1' is missing seq 2 (a gap between 1 and 3)" in lines
    assert "events: event 'd' of project 'p2' does not match its last change (seq 1): differs in title" in lines
    assert any(line.startswith("idem: record 'ghost' of user 'alice' is dangling") for line in lines)
    assert "Traceback" not in err


async def test_check_accepts_history_pruned_like_retention_does(store):
    def prune(txn: lmdb.Transaction, db: dict[str, Any]) -> None:
        # What retention does: drop the oldest changes and the versions pointing at them.
        for seq, event_id, version in [(1, "a", 1), (2, "b", 1)]:
            txn.delete(b"p1\0" + U64.pack(seq), db=db["changelog"])
            txn.delete(f"{event_id}\0p1\0".encode() + U64.pack(version), db=db["versions"])

    corrupt(store, prune)
    found = report(store)
    assert found.ok, found.problems
    assert found.changes == 4


async def test_check_accepts_the_servers_own_retention(tmp_path):
    if "history_max_changes" not in attrs.fields_dict(Config):
        pytest.skip("this server has no history retention setting")
    data = tmp_path / "data"
    async with running(make_config(data, history_max_changes=3)) as (app, nursery):
        c = await open_client(nursery, app, token("alice", ["p1"]))
        for n in range(6):
            await c.create("p1", id=f"e{n}", title=f"e{n}")
        await c.request("event:update", {"id": "e0", "version": 1, "title": "again"})
    found = report(data)
    assert found.ok, found.problems
    assert found.changes == 3 and found.events == 6


async def test_check_of_a_missing_or_foreign_directory_says_so(tmp_path):
    result = await cli("check", "--data", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr.decode() == f"barosync check: {tmp_path / 'none'}: no such directory (check --data, --config or [storage] path)\n"
    (tmp_path / "empty").mkdir()
    result = await cli("check", "--data", str(tmp_path / "empty"))
    assert result.returncode == 1 and "no barosync data here" in result.stderr.decode()
    env = lmdb.open(str(tmp_path / "foreign"))
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    result = await cli("check", "--data", str(tmp_path / "foreign"))
    assert result.returncode == 1
    assert "meta: sub-database 'events' is missing" in result.stdout.decode()


async def test_check_uses_the_config_files_data_path(store, tmp_path):
    config = tmp_path / "barosync.toml"
    config.write_text(f'[storage]\npath = "{os.path.relpath(store, tmp_path)}"\n')
    result = await cli("check", "--config", str(config))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().startswith(f"checked {store}:")
