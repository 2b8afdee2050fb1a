"""The single-file binary, run for real: serve, WebSocket clients, a plugin loaded from
a plugin directory, SIGTERM, and the data-directory operations.

Building takes a while, so these tests use a binary that exists: $BAROSYNC_BINARY, or
dist/barosync when it is newer than the sources. `make test-binary` builds it first,
then runs this file with BAROSYNC_BINARY set. Without one, every test here is skipped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from barosync import __version__
from caldav_helpers import Http

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = ROOT / "dist" / "barosync"
START_TIMEOUT = 60  # unpacking the onefile archive comes first
RUN_TIMEOUT = 60
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


def _newest_source() -> tuple[float, Path]:
    sources = [*ROOT.joinpath("barosync").rglob("*"), *ROOT.joinpath("packaging").glob("*")]
    return max((p.stat().st_mtime, p) for p in sources if p.is_file() and "__pycache__" not in p.parts)


def _binary() -> Path:
    pointed = os.environ.get("BAROSYNC_BINARY")
    if pointed:
        path = Path(pointed)
        if not path.is_file() or not os.access(path, os.X_OK):
            pytest.fail(f"BAROSYNC_BINARY={pointed} is not an executable file")
        return path
    if not DEFAULT_BINARY.exists():
        pytest.skip("no binary to test: dist/barosync is not built (`make test-binary` builds it and runs "
                    "these tests; or set BAROSYNC_BINARY=/path/to/barosync)")
    mtime, newest = _newest_source()
    if DEFAULT_BINARY.stat().st_mtime < mtime:
        pytest.skip(f"dist/barosync is older than {newest.relative_to(ROOT)}: `make test-binary` rebuilds it "
                    "(or set BAROSYNC_BINARY to test it anyway)")
    return DEFAULT_BINARY


@pytest.fixture(scope="module")
def binary() -> Path:
    return _binary()


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> dict[str, str]:
    """The binary's environment, with its own TMPDIR: where it unpacks itself."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


def run(binary: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, cwd=cwd)


# Imports, in a plain Python, each module and submodule it is given the top-level
# names of (skipping test suites and __main__ modules); prints those that import.
IMPORT_PROBE = """
import contextlib, importlib, io, json, os, pkgutil, sys

def walk(directory, prefix):
    for info in pkgutil.iter_modules([directory]):
        if info.name in ("test", "tests", "idle_test", "__main__"):
            continue
        yield f"{prefix}.{info.name}"
        if info.ispkg:
            yield from walk(os.path.join(directory, info.name), f"{prefix}.{info.name}")

ok = []
for top in json.loads(sys.argv[1]):
    names = [top]
    while names:
        name = names.pop(0)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:
            continue
        ok.append(name)
        if name == top and getattr(module, "__path__", None):
            names.extend(n for path in module.__path__ for n in walk(path, top))
print(json.dumps(ok))
"""


def stdlib_modules_for_plugins() -> list[str]:
    """The stdlib modules the spec promises to bundle (all but its STDLIB_EXCLUDED),
    submodules included, as far as they import in this (not frozen) Python."""
    tree = ast.parse((ROOT / "packaging" / "barosync.spec").read_text())
    excluded = next(
        ast.literal_eval(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STDLIB_EXCLUDED" for t in node.targets)
    )
    tops = [n for n in sorted(sys.stdlib_module_names) if n not in excluded and not n.startswith(("_test", "_xx", "xx"))]
    probe = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_PROBE, json.dumps(tops)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True)
    return json.loads(probe.stdout)


# A plugin as a self-hoster would drop it into plugins/: stdlib imports only (and
# barosync's public names), refusing titles that contain "forbidden".
PLUGIN = '''
"""guard: refuses event titles that contain a forbidden word."""
import contextlib
import csv
import importlib
import importlib.resources
import io
import json
import sqlite3
import statistics
import sys
import xml.etree.ElementTree as ET
import zoneinfo
from decimal import Decimal
from email.message import EmailMessage

from barosync import Problem, hookimpl

# The validation hook runs in the store's writer thread.
_db = sqlite3.connect(":memory:", check_same_thread=False)
_db.execute("create table words (word text)")
_db.executemany("insert into words values (?)", list(csv.reader(io.StringIO("forbidden\\nverboten\\n"))))
MEAN = statistics.mean([1, 2, 3, 4])
assert ET.fromstring("<a><b/></a>").find("b") is not None
assert str(Decimal("1.10") + Decimal("2.20")) == "3.30"
msg = EmailMessage()
msg["Subject"] = "ok"


@hookimpl
def barosync_validate_mutation(operation, event):
    if event is None:
        return None
    title = event.get("title", "").lower()
    for (word,) in _db.execute("select word from words"):
        if word in title:
            return Problem(code="forbidden_title", message=f"titles may not contain {word!r}", field="title")
    return None


@hookimpl
def barosync_startup(config):
    options = config.plugin_options.get("guard", {})
    failed = {}
    for name in options.get("modules", []):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # stdout is the listening line's
                importlib.import_module(name)
        except BaseException as e:
            failed[name] = f"{type(e).__name__}: {e}"
    package = importlib.resources.files("barosync")
    # The bundle holds a barosync/ folder only when the package has data files.
    resources = sorted(p.name for p in package.iterdir()) if package.is_dir() else []
    report = {
        "frozen": bool(getattr(sys, "frozen", False)),
        "mean": MEAN,
        "tz": str(zoneinfo.ZoneInfo("UTC")),
        "failed_imports": failed,
        "resources": resources,
    }
    with open(options["report"], "w") as f:
        json.dump(report, f)
'''


def barosync_modules() -> list[str]:
    """Every module of the barosync package in the source tree."""
    names = []
    for path in sorted((ROOT / "barosync").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__main__":
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def write_site(tmp_path: Path, *, modules: list[str] | None = None) -> Path:
    """A config file, a plugin directory with the guard plugin, a data directory."""
    site = tmp_path / "site"
    (site / "plugins").mkdir(parents=True)
    (site / "plugins" / "guard.py").write_text(PLUGIN)
    (site / "barosync.toml").write_text(
        "[server]\nport = 0\n"
        "[storage]\npath = \"data\"\n"
        "[plugins]\npaths = [\"plugins\"]\n"
        "[plugins.guard]\n"
        f"report = {json.dumps(str(site / 'plugin-report.json'))}\n"
        f"modules = {json.dumps(modules or [])}\n"
    )
    return site / "barosync.toml"


class Served:
    def __init__(self, process: trio.Process, port: int, stderr_path: Path) -> None:
        self.process = process
        self.port = port
        self.stderr_path = stderr_path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def wait(self) -> int:
        with trio.fail_after(RUN_TIMEOUT):
            return await self.process.wait()


@asynccontextmanager
async def serving(binary: Path, config: Path, env: dict[str, str]) -> AsyncIterator[Served]:
    stderr_path = config.parent / "serve.stderr"
    async with trio.open_nursery() as nursery:
        with stderr_path.open("wb") as stderr:
            process = await nursery.start(lambda task_status: trio.run_process(
                [str(binary), "serve", "--config", str(config)], stdout=subprocess.PIPE, stderr=stderr,
                env=env, check=False, task_status=task_status))
        buffer = b""
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, f"the binary exited before listening: {stderr_path.read_text()}"
                buffer += chunk
        match = LISTENING.fullmatch(buffer.partition(b"\n")[0])
        assert match, buffer
        served = Served(process, int(match.group(1)), stderr_path)
        try:
            yield served
        finally:
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=RUN_TIMEOUT) as response:
        return json.loads(response.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=RUN_TIMEOUT) as response:
        return response.read().decode()


class Peer:
    """A WebSocket client that acks what it receives and files it by type."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.inbox: list[dict[str, Any]] = []
        self.arrived = trio.Event()
        self.close_code: int | None = None

    async def send(self, type: str, payload: dict[str, Any], id: str) -> None:
        await self.ws.send_message(json.dumps({"type": type, "id": id, "payload": payload}))

    async def read(self) -> None:
        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                self.inbox.append(msg)
                self.arrived.set()
                self.arrived = trio.Event()
                if msg.get("id") and msg["type"] not in ("ack", "pong", "error"):
                    await self.ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))
        except ConnectionClosed as closed:
            self.close_code = closed.reason.code

    async def expect(self, match: Any) -> dict[str, Any]:
        with trio.fail_after(RUN_TIMEOUT):
            while True:
                for msg in self.inbox:
                    if match(msg):
                        return msg
                await self.arrived.wait()


async def connect(nursery: trio.Nursery, port: int, token: str) -> Peer:
    ready = trio.Event()
    peer: list[Peer] = []

    async def hold() -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            peer.append(Peer(ws))
            ready.set()
            await peer[0].read()

    nursery.start_soon(hold)
    with trio.fail_after(RUN_TIMEOUT):
        await ready.wait()
    return peer[0]


def leftovers(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in Path(env["TMPDIR"]).glob("_MEI*"))


# -- the tests -----------------------------------------------------------------------------


def test_binary_version_and_commands(binary, tmpdir_env):
    result = run(binary, "--version", env=tmpdir_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"barosync {__version__}"
    # Every subcommand of the source tree's CLI is in the binary's.
    from barosync.cli import build_parser

    [commands] = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"serve", "token", "backup", "restore", "check"} <= set(commands)
    for command in commands:
        result = run(binary, command, "--help", env=tmpdir_env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: barosync {command}")
    assert leftovers(tmpdir_env) == []


async def test_binary_serves_two_clients_with_a_plugin_and_stops_on_sigterm(binary, tmp_path, tmpdir_env):
    modules = stdlib_modules_for_plugins()
    # barosync's own modules too: each must import inside the binary (a module that
    # needs a package the binary lacks means a command that fails there).
    config = write_site(tmp_path, modules=modules + barosync_modules())
    site = config.parent

    async with serving(binary, config, tmpdir_env) as server:
        health = await trio.to_thread.run_sync(get_json, f"http://127.0.0.1:{server.port}/healthz")
        assert health["status"] == "ok" and health["version"] == __version__
        metrics = await trio.to_thread.run_sync(get_text, f"http://127.0.0.1:{server.port}/metrics")
        assert "# TYPE" in metrics
        # The web calendar, its grid library and the browser client are inside the binary.
        for path, marker in (("/", "<title>barosync calendar</title>"), ("/client/barosync.js", "export class SyncClient"),
                             ("/app/vendor/fullcalendar/index.global.min.js", "FullCalendar"),
                             ("/app/vendor/qrcode-generator/qrcode.mjs", "export default qrcode")):
            body = await trio.to_thread.run_sync(get_text, f"http://127.0.0.1:{server.port}{path}")
            assert marker in body, path

        # A calendar app over CalDAV: an app password from the binary's CLI, a PUT in a
        # zone (zoneinfo data and icalendar inside the binary), the GET gives it back.
        made = await trio.to_thread.run_sync(lambda: run(binary, "token", "create", "--config", str(config), "--user",
                                                         "carol", "--project", "p2", "--app-password", env=tmpdir_env))
        assert made.returncode == 0, made.stderr
        password = re.search(r"password:\s+(\S+)", made.stdout).group(1)  # type: ignore[union-attr]
        dav = Http(server.port, "carol", password)
        ics = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//t//EN\r\nBEGIN:VEVENT\r\nUID:z-1\r\n"
               "DTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Europe/Berlin:20260706T090000\r\n"
               "DTEND;TZID=Europe/Berlin:20260706T100000\r\nSUMMARY:Zoned\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
        status, _, _ = await trio.to_thread.run_sync(lambda: dav("PUT", "/dav/calendars/carol/p2/z-1.ics", ics))
        assert status == 201
        status, _, got = await trio.to_thread.run_sync(lambda: dav("GET", "/dav/calendars/carol/p2/z-1.ics"))
        assert status == 200 and b"DTSTART;TZID=Europe/Berlin:20260706T090000" in got

        tokens = {}
        for user in ("alice", "bob"):
            minted = await trio.to_thread.run_sync(lambda: run(binary, "token", "create", "--config", str(config),
                                                               "--user", user, "--project", "p1", env=tmpdir_env))
            assert minted.returncode == 0, minted.stderr
            tokens[user] = minted.stdout.strip()

        async with trio.open_nursery() as nursery:
            alice = await connect(nursery, server.port, tokens["alice"])
            bob = await connect(nursery, server.port, tokens["bob"])
            for name, peer in (("alice", alice), ("bob", bob)):
                await peer.send("subscribe", {"projectId": "p1"}, id=f"sub-{name}")
                await peer.expect(lambda m, n=name: m["type"] == "ack" and m["id"] == f"sub-{n}")

            event = {"projectId": "p1", "title": "Standup", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}
            await alice.send("event:create", event, id="create-1")
            ack = await alice.expect(lambda m: m["type"] == "ack" and m["id"] == "create-1")
            created = await bob.expect(lambda m: m["type"] == "event:created")
            assert created["payload"] == ack["payload"]["event"]
            assert created["payload"]["title"] == "Standup" and created["seq"] == 1 and created["userId"] == "alice"

            # The plugin from the plugin directory is active inside the binary.
            await alice.send("event:create", {**event, "title": "A forbidden topic"}, id="create-2")
            refused = await alice.expect(lambda m: m["type"] == "error" and m["payload"].get("ref") == "create-2")
            assert refused["payload"]["code"] == "forbidden_title"
            await bob.send("event:create", {**event, "title": "Retro"}, id="create-3")
            await bob.expect(lambda m: m["type"] == "ack" and m["id"] == "create-3")
            second = await alice.expect(lambda m: m["type"] == "event:created" and m["payload"]["title"] == "Retro")
            assert second["seq"] == 2  # the refused one took no seq, and bob never saw it
            assert not any(m["type"] == "event:created" and "forbidden" in m["payload"]["title"] for m in bob.inbox)

            server.process.send_signal(signal.SIGTERM)  # to the launcher; it forwards to Python
        assert alice.close_code == bob.close_code == 1001
        assert await server.wait() == 0
        assert "Traceback" not in server.stderr

    # The launcher removed what it unpacked.
    assert leftovers(tmpdir_env) == []
    report = json.loads((site / "plugin-report.json").read_text())
    assert report["frozen"] is True
    assert report["mean"] == 2.5 and report["tz"] == "UTC"
    assert report["failed_imports"] == {}, report["failed_imports"]
    assert len(modules) > 500 and {"sqlite3", "xml.etree.ElementTree", "email.mime.text", "asyncio"} <= set(modules)
    # Data files inside the package (if any) are in the bundle where importlib.resources looks.
    package = ROOT / "barosync"
    shipped = {p.relative_to(package).parts[0] for p in package.rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert shipped <= set(report["resources"])

    checked = run(binary, "check", "--config", str(config), env=tmpdir_env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith("2 projects, 3 events, 3 changes, 3 idempotency records, 0 accounts: ok")


async def test_binary_kill_9_never_corrupts_the_data_directory(binary, tmp_path, tmpdir_env):
    """kill -9 on the launcher orphans the Python child (and its unpacked folder); kill
    -9 on the child too, mid-write: every acked change is still there, check passes."""
    config = write_site(tmp_path)
    acked: list[str] = []
    async with serving(binary, config, tmpdir_env) as server:
        minted = run(binary, "token", "create", "--config", str(config), "--user", "alice", "--project", "p1", env=tmpdir_env)
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        assert len(children) == 1, "the onefile launcher runs Python as one child process"
        child = int(children[0])
        async with trio.open_nursery() as nursery:
            alice = await connect(nursery, server.port, minted.stdout.strip())
            event = {"projectId": "p1", "title": "x", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}

            async def write() -> None:
                for n in range(10_000):  # one at a time, so as not to be rate limited
                    await alice.send("event:create", {**event, "title": f"e{n}"}, id=f"c{n}")
                    await alice.expect(lambda m: m["type"] in ("ack", "error") and (m.get("id") == f"c{n}" or m["payload"].get("ref") == f"c{n}"))

            nursery.start_soon(write)
            with trio.fail_after(RUN_TIMEOUT):
                while sum(1 for m in alice.inbox if m["type"] == "ack") < 50:
                    await alice.arrived.wait()
            os.kill(server.process.pid, signal.SIGKILL)
            await server.wait()
            # The orphaned server is still running (the launcher could not forward
            # anything); kill it too, as the OOM killer or systemd's final SIGKILL would.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            with trio.fail_after(RUN_TIMEOUT):
                while Path(f"/proc/{child}").exists() and "zombie" not in _state(child):
                    await trio.sleep(0.05)
            acked = [m["payload"]["event"]["title"] for m in alice.inbox if m["type"] == "ack" and m["id"].startswith("c")]
            nursery.cancel_scope.cancel()
    assert acked and all(t.startswith("e") for t in acked)
    # The orphan's unpacked folder stays behind (systemd's PrivateTmp= cleans it up).
    for name in leftovers(tmpdir_env):
        shutil.rmtree(Path(tmpdir_env["TMPDIR"]) / name)

    checked = run(binary, "check", "--config", str(config), env=tmpdir_env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    stored = int(re.search(r"(\d+) events", checked.stdout).group(1))
    assert stored >= len(acked) >= 50
    # A server starts on it again, with every acked change in place.
    async with serving(binary, config, tmpdir_env) as server:
        async with trio.open_nursery() as nursery:
            alice = await connect(nursery, server.port, minted.stdout.strip())
            await alice.send("subscribe", {"projectId": "p1"}, id="sub")
            snapshot = await alice.expect(lambda m: m["type"] == "sync:snapshot")
            assert set(acked) <= {e["title"] for e in snapshot["payload"]["events"]}
            server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "zombie"


async def test_binary_backup_restore_check(binary, tmp_path, tmpdir_env):
    config = write_site(tmp_path)
    data = config.parent / "data"

    def cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return run(binary, *args, env=tmpdir_env)

    minted = cmd("token", "create", "--config", str(config), "--user", "alice", "--project", "p1")
    assert minted.returncode == 0, minted.stderr
    # No store yet: backup says so.
    result = cmd("backup", str(tmp_path / "b0"), "--config", str(config))
    assert result.returncode == 1 and "no barosync data here" in result.stderr

    async with serving(binary, config, tmpdir_env) as server:
        async with trio.open_nursery() as nursery:
            alice = await connect(nursery, server.port, minted.stdout.strip())
            event = {"projectId": "p1", "title": "x", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T09:15:00Z"}
            await alice.send("event:create", event, id="one")
            await alice.expect(lambda m: m["type"] == "ack" and m["id"] == "one")
            backup = await trio.to_thread.run_sync(cmd, "backup", str(tmp_path / "b1"), "--config", str(config))
            assert backup.returncode == 0, backup.stderr
            assert "1 projects, 1 events, 1 changes, 1 idempotency records, 0 accounts, with the secret file" in backup.stdout
            server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0

    restored = cmd("restore", str(tmp_path / "b1"), "--data", str(tmp_path / "r"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "r" / "secret").read_text() == (data / "secret").read_text()
    checked = cmd("check", "--data", str(tmp_path / "r"))
    assert checked.returncode == 0 and checked.stdout.strip().endswith(": ok")
    again = cmd("restore", str(tmp_path / "b1"), "--data", str(tmp_path / "r"))
    assert again.returncode == 1 and "not empty" in again.stderr
