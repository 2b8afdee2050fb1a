"""Plugins end to end: the no_double_booking example against a real server, loading
from plugin directories and entry points, the disable list, third-party strategies,
lifecycle hooks, BAROSYNC_TRACE_PLUGINS, and docs/plugins.md covering every hook."""

from __future__ import annotations

import ast
import inspect
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

import barosync
from barosync.hooks import conflicts, hookspecs
from barosync.core.app import App, open_log
from barosync.config import Config, ConfigError
from barosync.domain.models import new_event
from barosync.hooks.plugins import PluginError, build_plugin_manager, load_plugin_file, strategy_names
from barosync.storage.store import Mutation

from conftest import SECRET, event_payload, open_client, running, token


REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
DOCS = REPO / "docs" / "plugins.md"
NDB = "no_double_booking"


def with_ndb(**overrides: Any) -> dict[str, Any]:
    return {"plugin_paths": (PLUGINS,), **overrides}


def flag_mode() -> dict[str, Any]:
    return with_ndb(plugin_options={NDB: {"mode": "flag"}})


def write_plugin(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def meeting(start: str, end: str, attendees: list[str], **fields: Any) -> dict[str, Any]:
    return {"startDate": start, "endDate": end, "attendees": attendees, **fields}


NINE_TO_TEN = meeting("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z", ["alice", "bob"], title="Planning", id="plan")


# -- the no_double_booking example, against a real server -----------------------------------


async def test_double_booking_is_refused_and_nothing_is_stored(data_dir):
    async with running(data_dir, **with_ndb()) as (app, nursery):
        alice = await open_client(nursery, app, token("alice"))
        bob = await open_client(nursery, app, token("bob"))
        await alice.subscribe()
        await bob.subscribe()
        assert (await alice.create(**NINE_TO_TEN))["type"] == "ack"
        await bob.recv_type("event:created")

        refused = await alice.create(**meeting("2026-01-05T09:30:00Z", "2026-01-05T10:30:00Z", ["carol", "Bob"], id="clash"))
        assert refused["type"] == "error"
        p = refused["payload"]
        assert p["code"] == "double_booked" and p["field"] == "attendees"
        assert "Bob" in p["message"] and "'plan'" in p["message"] and "Planning" in p["message"]
        assert app.store.get_event("p1", "clash") is None
        assert app.store.current_seq("p1") == 1
        assert [e["id"] for e in app.store.snapshot("p1")[1]] == ["plan"]

        # Nobody saw a change for it; the next change is seq 2.
        ok = await alice.create(**meeting("2026-01-05T10:00:00Z", "2026-01-05T11:00:00Z", ["bob"], id="after"))
        assert ok["type"] == "ack" and ok["payload"]["seq"] == 2 and "warnings" not in ok["payload"]
        assert (await bob.recv_type("event:created"))["payload"]["id"] == "after"


async def test_what_is_not_a_double_booking(data_dir):
    async with running(data_dir, **with_ndb()) as (app, nursery):
        c = await open_client(nursery, app, token("alice", projects=["p1", "p2"]))
        assert (await c.create(**NINE_TO_TEN))["type"] == "ack"
        cases = {
            "touching": meeting("2026-01-05T10:00:00Z", "2026-01-05T10:30:00Z", ["alice"]),
            "touching in another offset": meeting("2026-01-05T12:00:00+02:00", "2026-01-05T13:00:00+02:00", ["bob"]),
            "other people": meeting("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z", ["carol"]),
            "no attendees": meeting("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z", []),
            "next day, all day": meeting("2026-01-06", "2026-01-06", ["alice"], allDay=True),
        }
        for name, fields in cases.items():
            answer = await c.create(**fields)
            assert answer["type"] == "ack", (name, answer)
        other_project = await c.create("p2", **meeting("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z", ["alice"]))
        assert other_project["type"] == "ack"
        # Deleting never double-books anyone.
        assert (await c.request("event:delete", {"id": "plan"}))["type"] == "ack"


async def test_overlap_in_another_offset_and_all_day_events_are_double_bookings(data_dir):
    async with running(data_dir, **with_ndb()) as (app, nursery):
        c = await open_client(nursery, app, token("alice"))
        assert (await c.create(**NINE_TO_TEN))["type"] == "ack"
        for fields in (
            meeting("2026-01-05T10:59:00+02:00", "2026-01-05T11:30:00+02:00", ["alice"]),  # 08:59Z-09:30Z
            meeting("2026-01-05", "2026-01-05", ["bob"], allDay=True),  # the whole day
            meeting("2026-01-04", "2026-01-06", ["bob"], allDay=True),  # end exclusive: the 4th and 5th
            meeting("2026-01-05T09:10:00Z", "2026-01-05T09:10:00Z", ["alice"]),  # an instant inside
        ):
            answer = await c.create(**fields)
            assert answer["type"] == "error" and answer["payload"]["code"] == "double_booked", (fields, answer)
        assert app.store.current_seq("p1") == 1


async def test_update_into_a_double_booking_is_refused_but_unrelated_edits_pass(data_dir):
    async with running(data_dir, **with_ndb()) as (app, nursery):
        c = await open_client(nursery, app, token("alice"))
        await c.create(**NINE_TO_TEN)
        later = (await c.create(**meeting("2026-01-05T11:00:00Z", "2026-01-05T12:00:00Z", ["bob"], id="later")))["payload"]["event"]
        moved = await c.request("event:update", {"id": "later", "version": later["version"], "startDate": "2026-01-05T09:45:00Z"})
        assert moved["type"] == "error" and moved["payload"]["code"] == "double_booked"
        added = await c.request("event:update", {"id": "plan", "version": 1, "attendees": ["alice", "bob", "dave"]})
        assert added["type"] == "ack"  # dave is free; alice and bob were already there
        # Moving an event within its own time never clashes with itself.
        shifted = await c.request("event:update", {"id": "plan", "version": 2, "endDate": "2026-01-05T10:15:00Z"})
        assert shifted["type"] == "ack"
        assert app.store.get_event("p1", "later")["startDate"] == "2026-01-05T11:00:00Z"


async def test_flag_mode_stores_it_and_the_ack_carries_warnings(data_dir):
    async with running(data_dir, **flag_mode()) as (app, nursery):
        c = await open_client(nursery, app, token("alice"))
        await c.create(**NINE_TO_TEN)
        ack = await c.create(**meeting("2026-01-05T09:30:00Z", "2026-01-05T10:30:00Z", ["alice", "bob"], id="clash"))
        assert ack["type"] == "ack"
        warnings = ack["payload"]["warnings"]
        assert [(w["code"], w["field"]) for w in warnings] == [("double_booked", "attendees")] * 2
        assert "alice" in warnings[0]["message"] and "bob" in warnings[1]["message"]
        assert all("'plan'" in w["message"] for w in warnings)
        assert app.store.get_event("p1", "clash") is not None
        # In flag mode an existing double booking never blocks an unrelated edit.
        retitled = await c.request("event:update", {"id": "clash", "version": 1, "title": "Renamed"})
        assert retitled["type"] == "ack" and "warnings" not in retitled["payload"]


async def test_concurrent_creates_booking_the_same_attendee_exactly_one_succeeds(data_dir):
    async with running(data_dir, **with_ndb()) as (app, nursery):
        for round_ in range(5):
            a = await open_client(nursery, app, token("alice"))
            b = await open_client(nursery, app, token("bob"))
            answers: list[dict[str, Any]] = []
            hour = f"2026-02-0{round_ + 1}T09:00:00Z"

            async def book(client, title: str) -> None:
                answers.append(await client.create(**meeting(hour, hour.replace("09:", "10:"), ["carol"], title=title)))

            async with trio.open_nursery() as both:
                both.start_soon(book, a, "From Alice")
                both.start_soon(book, b, "From Bob")
            assert sorted(x["type"] for x in answers) == ["ack", "error"], answers
            refused = next(x for x in answers if x["type"] == "error")
            assert refused["payload"]["code"] == "double_booked" and "carol" in refused["payload"]["message"]
            booked = [e for e in app.store.snapshot("p1")[1] if e["startDate"] == hour]
            assert len(booked) == 1


def test_two_creates_in_one_group_commit_see_each_other(tmp_path):
    """The same-transaction case made deterministic: one batch, one transaction."""
    config = Config(data_dir=tmp_path / "data", plugin_paths=(PLUGINS,))
    store = open_log(config)
    try:
        batch = [
            Mutation("create", user_id=user, envelope_id=f"env-{user}", project_id="p1", event_id=f"ev-{user}",
                     received_ms=1,
                     event=new_event(event_payload(id=f"ev-{user}", attendees=["carol"]), user_id=user, now_ms=1))
            for user in ("alice", "bob")
        ]
        first, second = store.commit_batch(batch)
        assert first.status == "applied"
        assert second.status == "error" and second.error.code == "double_booked"
        assert second.error.field == "attendees" and "'ev-alice'" in second.error.message
        assert [e["id"] for e in store.snapshot("p1")[1]] == ["ev-alice"]
    finally:
        store.close()


def test_unknown_mode_refuses_rather_than_failing(tmp_path, caplog):
    plugin = load_plugin_file(PLUGINS / f"{NDB}.py")
    config = Config(plugin_options={NDB: {"mode": "warn"}})
    stored = {"id": "a", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T10:00:00Z", "attendees": ["x"]}
    new = {**stored, "id": "b"}
    with caplog.at_level(logging.WARNING):
        problems = plugin.barosync_validate_mutation(operation="create", event=new, previous=None,
                                                     project_events=lambda: iter([stored]), config=config)
    assert [p.refuse for p in problems] == [True]
    assert "'warn'" in caplog.text


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"), ("2026-01-05T10:00:00Z", "2026-01-05T11:00:00Z"), False),
        (("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"), ("2026-01-05T09:59:59Z", "2026-01-05T11:00:00Z"), True),
        (("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"), ("2026-01-05T11:00:00+01:00", "2026-01-05T12:00:00+01:00"), False),
        (("2026-01-05T09:00:00", "2026-01-05T10:00:00"), ("2026-01-05T09:30:00Z", "2026-01-05T09:45:00Z"), True),
        (("2026-01-05", "2026-01-05"), ("2026-01-05T23:00:00Z", "2026-01-06T01:00:00Z"), True),
        (("2026-01-05", "2026-01-05"), ("2026-01-06", "2026-01-06"), False),
        (("2026-01-05", "2026-01-06"), ("2026-01-06", "2026-01-07"), False),
        (("2026-01-05", "2026-01-07"), ("2026-01-06", "2026-01-06"), True),
        (("2026-01-05T09:00:00Z", "2026-01-05T09:00:00Z"), ("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"), False),
        (("2026-01-05T09:30:00Z", "2026-01-05T09:30:00Z"), ("2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"), True),
    ],
)
def test_overlap_rules(a, b, expected):
    plugin = load_plugin_file(PLUGINS / f"{NDB}.py")
    first = plugin.interval({"startDate": a[0], "endDate": a[1]})
    second = plugin.interval({"startDate": b[0], "endDate": b[1]})
    assert plugin.overlaps(first, second) is expected
    assert plugin.overlaps(second, first) is expected


def test_example_plugin_imports_only_the_stdlib_and_barosyncs_public_names():
    tree = ast.parse((PLUGINS / f"{NDB}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in sys.stdlib_module_names, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.module == "barosync":
                assert {a.name for a in node.names} <= set(barosync.__all__)
            else:
                assert node.module is not None and node.module.split(".")[0] in sys.stdlib_module_names, node.module


def test_public_api_for_plugin_authors():
    from barosync import Config as C, Conflict, Event, Identity, Problem, Resolution, hookimpl
    from barosync.hooks import conflicts
    from barosync import config
    from barosync.domain import models

    assert hookimpl is hookspecs.hookimpl
    assert (Event, Identity, Problem) == (models.Event, models.Identity, models.Problem)
    assert (Conflict, Resolution, C) == (conflicts.Conflict, conflicts.Resolution, config.Config)
    assert isinstance(barosync.__version__, str)


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["raise RuntimeError('no database configured')\n", "def broken(:\n"])
def test_a_plugin_file_that_fails_to_import_stops_start_up_naming_the_file(tmp_path, source):
    path = write_plugin(tmp_path / "plugins", "broken", source)
    with pytest.raises(PluginError) as info:
        build_plugin_manager(Config(plugin_paths=(path.parent,)))
    assert str(path) in str(info.value)
    assert "barosync_plugin_broken" not in sys.modules


def test_serve_with_a_broken_plugin_exits_non_zero_with_one_line_naming_the_file(tmp_path):
    path = write_plugin(tmp_path / "plugins", "broken", "raise RuntimeError('no database configured')\n")
    config = tmp_path / "barosync.toml"
    config.write_text(f'[storage]\npath = "data"\n[auth]\nsecret = "{SECRET}"\n[plugins]\npaths = ["plugins"]\n')
    done = subprocess.run([sys.executable, "-m", "barosync", "serve", "--config", str(config), "--port", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(path) in lines[0] and "no database configured" in lines[0]


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("merge", "from barosync import hookimpl\n"),  # the name of a built-in
        ("badarg", "from barosync import hookimpl\n@hookimpl\ndef barosync_startup(cfg):\n    pass\n"),
        ("typo", "from barosync import hookimpl\n@hookimpl\ndef barosync_on_connect(session_id):\n    pass\n"),
    ],
)
def test_a_plugin_file_that_does_not_fit_stops_start_up_naming_the_file(tmp_path, name, source):
    path = write_plugin(tmp_path / "plugins", name, source)
    with pytest.raises(PluginError, match=re.escape(str(path))):
        build_plugin_manager(Config(plugin_paths=(path.parent,)))


def test_plugin_dir_files_starting_with_underscore_are_not_loaded(tmp_path):
    write_plugin(tmp_path, "_helpers", "raise RuntimeError('not a plugin')\n")
    write_plugin(tmp_path, "fine", "from barosync import hookimpl\n")
    pm = build_plugin_manager(Config(plugin_paths=(tmp_path,)))
    assert pm.get_plugin("fine") is not None and pm.get_plugin("_helpers") is None


def test_disable_removes_a_built_in(tmp_path):
    pm = build_plugin_manager(Config(plugins_disable=("merge",)))
    assert pm.get_plugin("merge") is None
    assert "merge" not in strategy_names(pm)
    assert {"last_write_wins", "first_write_wins", "manual"} <= set(strategy_names(pm))


async def test_a_disabled_built_in_strategy_cannot_be_configured(data_dir):
    with pytest.raises(BaseException) as info:
        async with running(data_dir, plugins_disable=("merge",)):
            pass  # pragma: no cover
    found = _leaf(info.value, ConfigError)
    assert found is not None and "'merge'" in str(found) and "last_write_wins" in str(found)


async def test_disable_skips_a_plugin_dir_file(data_dir):
    async with running(data_dir, **with_ndb(plugins_disable=(NDB,))) as (app, nursery):
        assert app.pm.get_plugin(NDB) is None
        c = await open_client(nursery, app, token("alice"))
        await c.create(**NINE_TO_TEN)
        again = await c.create(**{**NINE_TO_TEN, "id": "again"})
        assert again["type"] == "ack"


ALWAYS_REMOTE = """
    from barosync import Conflict, Resolution, hookimpl

    @hookimpl
    def barosync_conflict_strategies():
        return ["always_remote"]

    @hookimpl
    def barosync_resolve_conflict(strategy: str, conflict: Conflict):
        if strategy != "always_remote":
            return None
        changed = tuple(f for f in conflict.changes if conflict.changes[f] != (conflict.base or {}).get(f))
        return Resolution("keep", fields=changed)
"""


async def test_a_third_party_strategy_in_a_plugin_dir_can_be_the_default(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "always_remote", ALWAYS_REMOTE)
    dirs = (tmp_path / "plugins",)
    async with running(data_dir, plugin_paths=dirs, conflict_default="always_remote") as (app, nursery):
        assert "always_remote" in strategy_names(app.pm)
        a = await open_client(nursery, app, token("alice"))
        b = await open_client(nursery, app, token("bob"))
        await a.create(id="ev", title="Base")
        assert (await a.request("event:update", {"id": "ev", "version": 1, "title": "Alice's"}))["type"] == "ack"
        conflict = await b.request("event:update", {"id": "ev", "version": 1, "title": "Bob's", "location": "Room 1"})
        assert conflict["type"] == "conflict:detected"
        p = conflict["payload"]
        assert p["strategy"] == "always_remote"
        assert p["resolved"]["title"] == "Alice's" and p["resolved"]["version"] == 2
        assert p["fields"] == ["title", "location"]
        assert app.store.get_event("p1", "ev")["location"] is None
    # Without the plugin the name is unknown, and start-up says what is available.
    with pytest.raises(BaseException) as info:
        async with running(data_dir, conflict_default="always_remote"):
            pass  # pragma: no cover
    found = _leaf(info.value, ConfigError)
    assert found is not None and "'always_remote'" in str(found) and "merge" in str(found)


def test_entry_point_plugins_load_and_can_be_disabled(tmp_path, monkeypatch):
    """What `pip install` of a plugin package produces: a module and an entry point
    in the `barosync` group (here a hand-made dist-info on sys.path)."""
    site = tmp_path / "site"
    write_plugin(site, "ep_strategy_pkg", ALWAYS_REMOTE.replace("always_remote", "from_entry_point"))
    info = site / "ep_strategy_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-strategy-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[barosync]\nfrom_entry_point = ep_strategy_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    pm = build_plugin_manager(Config())
    assert pm.get_plugin("from_entry_point") is not None
    assert "from_entry_point" in strategy_names(pm)
    pm = build_plugin_manager(Config(plugins_disable=("from_entry_point",)))
    assert "from_entry_point" not in strategy_names(pm)


def test_a_broken_entry_point_stops_start_up_naming_the_group(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_plugin(site, "ep_broken_pkg", "raise ImportError('needs libfoo')\n")
    info = site / "ep_broken_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-broken-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[barosync]\nbroken_ep = ep_broken_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="'barosync'.*needs libfoo"):
        build_plugin_manager(Config())


# -- lifecycle --------------------------------------------------------------------------------

LIFECYCLE = """
    from barosync import hookimpl

    CALLS = []

    @hookimpl
    def barosync_startup(config):
        CALLS.append(("startup", config.port))

    @hookimpl
    def barosync_connect(session_id, identity):
        CALLS.append(("connect", session_id, identity.user_id))

    @hookimpl
    def barosync_change_committed(project_id, seq, change):
        CALLS.append(("change_committed", project_id, seq, change["type"], change["payload"]["id"]))

    @hookimpl
    def barosync_disconnect(session_id, identity, close_code):
        CALLS.append(("disconnect", session_id, identity.user_id, close_code))

    @hookimpl
    def barosync_shutdown(config):
        CALLS.append(("shutdown",))
"""


async def wait_for(predicate, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_lifecycle_plugin_sees_startup_connect_changes_disconnect_and_shutdown(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "lifecycle", LIFECYCLE)
    async with running(data_dir, plugin_paths=(tmp_path / "plugins",)) as (app, nursery):
        calls = app.pm.get_plugin("lifecycle").CALLS
        assert calls == [("startup", app.port)]  # the bound port, even with --port 0
        async with trio.open_nursery() as one:
            c = await open_client(one, app, token("alice"))
            session_id = c.hello["payload"]["sessionId"]
            await c.create(id="e1")
            await c.request("event:update", {"id": "e1", "version": 1, "title": "Moved"})
            await c.request("event:delete", {"id": "e1"})
            await c.ws.aclose()  # a clean close: 1000
            one.cancel_scope.cancel()
        await wait_for(lambda: calls[-1][0] == "disconnect")
    assert calls == [
        ("startup", app.port),
        ("connect", session_id, "alice"),
        ("change_committed", "p1", 1, "event:created", "e1"),
        ("change_committed", "p1", 2, "event:updated", "e1"),
        ("change_committed", "p1", 3, "event:deleted", "e1"),
        ("disconnect", session_id, "alice", 1000),
        ("shutdown",),
    ]


ASYNC_HOOKS = """
    import trio
    from barosync import hookimpl

    RAN = []

    @hookimpl
    async def barosync_connect(session_id, identity):
        await trio.sleep(0)
        RAN.append("async connect")

    @hookimpl
    async def barosync_authorize(identity, action, project_id):
        await trio.sleep(0)
        RAN.append(f"async authorize {action} {project_id}")
        return None if project_id != "blocked" else False

    @hookimpl
    def barosync_disconnect(session_id, identity, close_code):
        RAN.append("sync disconnect")
"""


async def test_event_loop_hooks_may_be_async_and_are_awaited(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "asynchooks", ASYNC_HOOKS)
    async with running(data_dir, plugin_paths=(tmp_path / "plugins",)) as (app, nursery):
        ran = app.pm.get_plugin("asynchooks").RAN
        async with trio.open_nursery() as one:
            c = await open_client(one, app, token("alice", projects="*"))
            assert (await c.subscribe())["type"] == "ack"
            refused = await c.subscribe("blocked")
            assert refused["type"] == "error" and refused["payload"]["code"] == "forbidden"
            await c.ws.aclose()
            one.cancel_scope.cancel()
        await wait_for(lambda: "sync disconnect" in ran)
    assert ran == ["async connect", "async authorize subscribe p1",
                   "async authorize create p1",  # the ack says whether p1 is writable
                   "async authorize subscribe blocked", "sync disconnect"]


def test_an_async_hook_on_the_write_path_is_refused_at_load(tmp_path):
    path = write_plugin(tmp_path / "plugins", "asyncvalidate", """
        from barosync import hookimpl

        @hookimpl
        async def barosync_validate_mutation(operation):
            return None
    """)
    with pytest.raises(PluginError, match="must be a plain def"):
        build_plugin_manager(Config(plugin_paths=(path.parent,)))


RAISES_IN_VALIDATION = """
    from barosync import hookimpl

    @hookimpl
    def barosync_validate_mutation(operation):
        raise RuntimeError("bug in a validation plugin")
"""


async def test_a_validation_plugin_that_raises_refuses_with_internal_and_the_server_carries_on(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "buggy", RAISES_IN_VALIDATION)
    async with running(data_dir, plugin_paths=(tmp_path / "plugins",)) as (app, nursery):
        c = await open_client(nursery, app, token("alice"))
        answer = await c.create()
        assert answer["type"] == "error" and answer["payload"]["code"] == "internal"
        assert app.store.current_seq("p1") == 0
        assert (await c.subscribe())["type"] == "ack"  # still serving


RAISES_IN_CONNECT = """
    from barosync import hookimpl

    GONE = []

    @hookimpl
    def barosync_connect(session_id):
        raise RuntimeError("bug in a connect hook")

    @hookimpl
    def barosync_disconnect(session_id):
        GONE.append(session_id)
"""


async def test_a_connect_hook_that_raises_does_not_break_the_connection(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "buggy", RAISES_IN_CONNECT)
    async with running(data_dir, plugin_paths=(tmp_path / "plugins",)) as (app, nursery):
        gone = app.pm.get_plugin("buggy").GONE
        async with trio.open_nursery() as one:
            c = await open_client(one, app, token("alice"))
            with trio.fail_after(1):
                assert (await c.subscribe())["type"] == "ack"
            await c.ws.aclose()
            one.cancel_scope.cancel()
        await wait_for(lambda: not app.sessions and gone, timeout=2)


# -- tracing ------------------------------------------------------------------------------------


async def test_trace_logs_hook_calls_and_never_a_token(data_dir, monkeypatch, caplog):
    monkeypatch.setenv("BAROSYNC_TRACE_PLUGINS", "1")
    caplog.set_level(logging.INFO, logger="barosync.hooks.plugins")
    first, second = token("alice"), token("alice", name="Alice again")
    async with running(data_dir, **with_ndb()) as (app, nursery):
        c = await open_client(nursery, app, first)
        await c.create(**NINE_TO_TEN)
        assert (await c.request("auth:refresh", {"token": second}))["type"] == "ack"
    traced = [r.getMessage() for r in caplog.records if r.name == "barosync.hooks.plugins"]
    for hook in ("barosync_authenticate", "barosync_authorize", "barosync_connect", "barosync_validate_mutation",
                 "barosync_startup", "barosync_shutdown"):
        assert any(m.startswith(f"hook {hook}(") for m in traced), hook
        assert any(m.startswith(f"hook {hook} returned") for m in traced), hook
    assert any("<redacted>" in m for m in traced)
    for secret in (first, second):
        assert secret not in caplog.text
        assert secret.split(".")[2] not in caplog.text  # not even the signature


async def test_without_the_variable_nothing_is_traced(data_dir, monkeypatch, caplog):
    monkeypatch.delenv("BAROSYNC_TRACE_PLUGINS", raising=False)
    caplog.set_level(logging.INFO, logger="barosync.hooks.plugins")
    async with running(data_dir) as (app, nursery):
        c = await open_client(nursery, app, token("alice"))
        await c.create()
    assert not [r for r in caplog.records if r.name == "barosync.hooks.plugins" and r.getMessage().startswith("hook ")]


async def test_trace_never_logs_the_signing_secret(data_dir, monkeypatch, caplog):
    monkeypatch.setenv("BAROSYNC_TRACE_PLUGINS", "1")
    caplog.set_level(logging.INFO, logger="barosync.hooks.plugins")
    async with running(data_dir) as (app, nursery):
        await open_client(nursery, app, token("alice"))
    assert SECRET not in caplog.text


# -- docs -----------------------------------------------------------------------------------------


def hook_names() -> list[str]:
    return [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("barosync_")]


def undocumented_hooks(markdown: str, names: list[str]) -> list[str]:
    """Hooks that no Markdown heading of ``markdown`` names (comments in code blocks
    are not headings)."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    headings = [m.group(1) for m in re.finditer(r"^#{1,6}[ \t]+(.+)$", prose, re.MULTILINE)]
    return [n for n in names if not any(re.search(rf"(?<!\w){n}(?!\w)", h) for h in headings)]


def test_every_hook_has_a_heading_in_docs_plugins_md():
    names = hook_names()
    assert len(names) >= 10
    assert undocumented_hooks(DOCS.read_text(), names) == []


def test_the_docs_check_notices_a_missing_hook():
    text = DOCS.read_text()
    without = re.sub(r"^#+[ \t]+.*\bbarosync_connect\b.*$", "", text, flags=re.MULTILINE)
    assert undocumented_hooks(without, hook_names()) == ["barosync_connect"]
    # Mentioned in prose, or in a comment inside a code block, is not documented.
    assert undocumented_hooks(without + "\nsee barosync_connect\n", ["barosync_connect"]) == ["barosync_connect"]
    fenced = without + "\n```python\n# barosync_connect\n```\n"
    assert undocumented_hooks(fenced, ["barosync_connect"]) == ["barosync_connect"]


def _leaf(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _leaf(inner, kind)) is not None:
                return found
    return None


# -- the plugin author's kit: @strategy, one provider per name, barosync.testing ----------


UNGUARDED = """
    from barosync import Resolution, hookimpl

    @hookimpl
    def barosync_conflict_strategies():
        return ["greedy"]

    @hookimpl
    def barosync_resolve_conflict(strategy, conflict):  # forgot to look at `strategy`
        return Resolution("keep", fields=("hijacked",))
"""


async def test_a_strategy_is_asked_only_about_its_own_name(tmp_path, data_dir):
    """A plugin that answers every conflict, whatever the strategy, is not asked about
    projects configured with another strategy (it would have decided all of them)."""
    write_plugin(tmp_path / "plugins", "greedy", UNGUARDED)
    async with running(data_dir, plugin_paths=(tmp_path / "plugins",), conflict_default="last_write_wins",
                       conflict_projects={"p2": "greedy"}) as (app, nursery):
        a = await open_client(nursery, app, token("alice", ["p1", "p2"]))
        for project in ("p1", "p2"):
            made = (await a.create(project, title="Base"))["payload"]["event"]
            await a.request("event:update", {"id": made["id"], "projectId": project, "version": 1, "title": "One"})
            stale = await a.request("event:update", {"id": made["id"], "projectId": project, "version": 1,
                                                     "title": "Two"})
            if project == "p1":  # last_write_wins: the stale edit is stored
                assert stale["type"] == "ack" and stale["payload"]["event"]["title"] == "Two"
            else:
                assert stale["type"] == "conflict:detected" and stale["payload"]["fields"] == ["hijacked"]


def test_a_strategy_name_provided_twice_stops_start_up_naming_both(tmp_path):
    write_plugin(tmp_path / "plugins", "mine", """
        from barosync import Resolution, strategy

        @strategy("merge")
        def my_merge(conflict):
            return Resolution("keep")
    """)
    with pytest.raises(PluginError) as info:
        App(Config(plugin_paths=(tmp_path / "plugins",), data_dir=tmp_path / "data", secret="s" * 32))
    message = str(info.value)
    # Both providers are named: the built-in plugin "merge" and the file's "mine.merge".
    assert "provided by both 'merge' and 'mine.merge'" in message and "disable" in message


def test_a_strategy_decorator_is_a_plugin_with_both_hooks(tmp_path):
    write_plugin(tmp_path / "plugins", "two", """
        from barosync import Resolution, strategy

        @strategy("keep_all")
        def keep_all(conflict):
            return Resolution("keep", fields=("x",))

        @strategy("delete_all")
        def delete_all(conflict):
            return Resolution("delete")
    """)
    pm = build_plugin_manager(Config(plugin_paths=(tmp_path / "plugins",)))
    assert {"keep_all", "delete_all"} <= set(strategy_names(pm))
    assert pm.get_plugin("two.keep_all") is not None and pm.get_plugin("two.delete_all") is not None
    with pytest.raises(TypeError):
        barosync.strategy(lambda c: None)  # type: ignore[arg-type]  # the name is missing


def test_the_strategy_walkthrough_in_the_docs_runs(tmp_path):
    """docs/plugins.md, "A conflict strategy in 15 minutes": its plugin file and its
    tests, as written there, pass under pytest (a fresh process, as an author runs them)."""
    text = DOCS.read_text()
    section = text[text.index("## A conflict strategy in 15 minutes"):text.index("## Packaging a plugin")]
    blocks = re.findall(r"```python\n(# (\S+).*?\n.*?)```", section, re.DOTALL)
    written = {}
    for code, path in blocks:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
        written[path] = target
    assert set(written) == {"plugins/owner_wins.py", "tests/test_owner_wins.py"}
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntrio_mode = true\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_owner_wins.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


def test_make_conflict_gives_what_the_server_gives_a_strategy():
    from barosync.testing import make_conflict

    stored = {"id": "e1", "title": "Theirs", "startDate": "2026-01-05T09:00:00Z", "endDate": "2026-01-05T10:00:00Z"}
    c = make_conflict(base={**stored, "title": "Base"}, changes={"title": "Mine"}, remote=stored, user_id="bob")
    assert (c.operation, c.local["title"], c.remote["title"], c.user_id) == ("update", "Mine", "Theirs", "bob")
    assert (c.project_id, c.event_id) == ("p1", "e1")
    # Both sides changed the title: merge's default tie-break leaves it to the sender.
    decided = conflicts.merge(c)
    assert (decided.action, decided.manual, decided.fields) == ("keep", True, ("title",))
    gone = make_conflict(base=stored, remote=None, operation="delete")
    assert gone.local is None and gone.changes == {}
