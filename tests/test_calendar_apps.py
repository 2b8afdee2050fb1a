"""Calendar and task apps people run against a team's server, for real: vdirsyncer
moving an event between calendars, restoring a deleted one and syncing a task list
both ways; khal and todoman (through vdirsyncer's folders) and calendar-cli (CalDAV)
adding events and tasks. A real `barosync serve`, an account with its app password."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import icalendar
import pytest

from attack_helpers import ServerProcess, barosync_cmd, mint
from caldav_helpers import Http, app_password, event_ics, start
from test_vdirsyncer import VDIRSYNCER, discover, sync

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or str(BIN / name)
    if not os.path.exists(found):
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (make test does)")
    return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start(tmp_path / "data")
    done = subprocess.run(barosync_cmd("user", "create", "alice", "--admin", "--password-stdin", "--data",
                                       str(srv.data_dir)), input="alice's long password\n", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    yield srv
    srv.stop()


def on_server(srv: ServerProcess, project: str) -> dict[str, dict]:
    tok = mint(srv.data_dir, "reader", "--all-projects")
    status, _, body = Http(srv.port)("GET", f"/api/projects/{project}/events", Authorization=f"Bearer {tok}")
    assert status == 200, body
    return {e["id"]: e for e in json.loads(body)["events"]}


def component(path: Path) -> icalendar.Component:
    [c] = [c for c in icalendar.Calendar.from_ical(path.read_bytes()).subcomponents if c.name != "VTIMEZONE"]
    return c


def by_uid(folder: Path) -> dict[str, Path]:
    return {str(component(p)["uid"]): p for p in folder.glob("*.ics")}


TASK = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//tasks//EN\r\nBEGIN:VTODO\r\nUID:{uid}\r\n"
        "DTSTAMP:20261201T080000Z\r\nSUMMARY:{summary}\r\nSTATUS:{status}\r\nEND:VTODO\r\nEND:VCALENDAR\r\n")


def vdirsyncer_config(tmp_path: Path, srv: ServerProcess, password: str) -> tuple[Path, Path]:
    root = tmp_path / "local"
    root.mkdir()
    config = tmp_path / "vdirsyncer.conf"
    config.write_text(f"""
[general]
status_path = "{tmp_path / 'status'}"

[pair mine]
a = "local"
b = "server"
collections = ["from b"]
conflict_resolution = null

[storage local]
type = "filesystem"
path = "{root}"
fileext = ".ics"

[storage server]
type = "caldav"
url = "http://127.0.0.1:{srv.port}/"
username = "alice"
password = "{password}"
""")
    return config, root


def test_vdirsyncer_moves_an_event_restores_a_deleted_one_and_syncs_tasks_both_ways(
        tmp_path: Path, server: ServerProcess) -> None:
    assert os.path.exists(VDIRSYNCER), "vdirsyncer is not installed: pip install -e '.[test]'"
    password = app_password(server.data_dir, "alice")
    http = Http(server.port, "alice", password)
    for cal in ("home", "work", "chores"):
        assert http("MKCALENDAR", f"/dav/calendars/alice/{cal}/")[0] == 201
    for uid in ("dentist", "gym", "standup"):
        assert http("PUT", f"/dav/calendars/alice/home/{uid}.ics", event_ics(uid, uid.title()))[0] == 201
    config, root = vdirsyncer_config(tmp_path, server, password)
    discover(config)
    sync(config)
    assert set(by_uid(root / "home")) == {"dentist", "gym", "standup"} and not by_uid(root / "work")

    # Moved between calendars: the file from one folder to the other.
    shutil.move(by_uid(root / "home")["gym"], root / "work" / "gym.ics")
    sync(config)
    assert set(on_server(server, "home")) == {"dentist", "standup"} and set(on_server(server, "work")) == {"gym"}

    # Deleted by mistake, then put back from a backup: the same event again, its
    # history kept (one version past its deletion).
    kept = by_uid(root / "home")["dentist"].read_bytes()
    by_uid(root / "home")["dentist"].unlink()
    sync(config)
    assert set(on_server(server, "home")) == {"standup"}
    (root / "home" / "dentist-restored.ics").write_bytes(kept)
    sync(config)
    restored = on_server(server, "home")["dentist"]
    assert restored["title"] == "Dentist" and restored["version"] > 2

    # A task list, both ways: made in the folder, completed on the server.
    (root / "chores" / "milk.ics").write_text(TASK.format(uid="milk", summary="Buy milk", status="NEEDS-ACTION"))
    sync(config)
    assert on_server(server, "chores")["milk"]["title"] == "Buy milk"
    etag = http("GET", "/dav/calendars/alice/chores/milk.ics")[1]["etag"]
    done = TASK.format(uid="milk", summary="Buy milk", status="COMPLETED").replace(
        "STATUS:COMPLETED", "STATUS:COMPLETED\r\nCOMPLETED:20261207T120000Z")
    assert http("PUT", "/dav/calendars/alice/chores/milk.ics", done, If_Match=etag)[0] == 204
    sync(config)
    local = component(by_uid(root / "chores")["milk"])
    assert str(local["status"]) == "COMPLETED" and local.get("completed") is not None
    before = sorted(p.read_bytes() for p in root.rglob("*.ics"))
    sync(config)  # in step: nothing moves
    assert sorted(p.read_bytes() for p in root.rglob("*.ics")) == before


def test_khal_todoman_and_calendar_cli_add_events_and_tasks(tmp_path: Path, server: ServerProcess) -> None:
    password = app_password(server.data_dir, "alice")
    http = Http(server.port, "alice", password)
    for cal in ("home", "chores"):
        assert http("MKCALENDAR", f"/dav/calendars/alice/{cal}/")[0] == 201
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config"), "TZ": "UTC"}

    # khal writes into the folder vdirsyncer keeps in step with the server.
    config, root = vdirsyncer_config(tmp_path, server, password)
    discover(config)
    khal_config = tmp_path / "khal.conf"
    khal_config.write_text(f"""
[calendars]
[[home]]
path = {root / 'home'}
[locale]
timeformat = %H:%M
dateformat = %Y-%m-%d
longdateformat = %Y-%m-%d
datetimeformat = %Y-%m-%d %H:%M
longdatetimeformat = %Y-%m-%d %H:%M
local_timezone = UTC
default_timezone = UTC
""")
    made = subprocess.run([tool("khal"), "-c", str(khal_config), "new", "-a", "home", "2026-12-20 10:00", "11:00",
                           "Dentist"], capture_output=True, text=True, timeout=60, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    # todoman, khal's sibling for tasks, on the same folders.
    todo_config = tmp_path / "todoman.py"
    todo_config.write_text(f'path = "{root}/*"\ndate_format = "%Y-%m-%d"\ntime_format = "%H:%M"\n'
                           'default_list = "chores"\n')
    made = subprocess.run([tool("todo"), "--config", str(todo_config), "new", "-l", "chores", "--due",
                           "2026-12-22 10:00", "Water", "the", "plants"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    sync(config)
    [water] = on_server(server, "chores").values()
    assert (water["title"], water["startDate"]) == ("Water the plants", "2026-12-22T10:00:00Z")
    assert "BEGIN:VTODO" in water["ical"]
    [dentist] = on_server(server, "home").values()
    assert (dentist["title"], dentist["startDate"], dentist["endDate"]) == ("Dentist", "2026-12-20T10:00:00Z",
                                                                           "2026-12-20T11:00:00Z")

    # calendar-cli speaks CalDAV itself: an event, and a task in the task list.
    cli = [tool("calendar-cli"), "--caldav-url", f"http://127.0.0.1:{server.port}/dav/", "--caldav-user", "alice",
           "--caldav-pass", password, "--timezone", "UTC"]
    home_url = f"http://127.0.0.1:{server.port}/dav/calendars/alice/home/"
    chores_url = f"http://127.0.0.1:{server.port}/dav/calendars/alice/chores/"
    for args in ([*cli, "--calendar-url", home_url, "calendar", "add", "2026-12-21T12:00+1h", "Team", "lunch"],
                 [*cli, "--calendar-url", chores_url, "todo", "add", "Buy", "milk"]):
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    titles = {e["title"]: e for e in on_server(server, "home").values()}
    assert set(titles) == {"Dentist", "Team lunch"}
    assert (titles["Team lunch"]["startDate"], titles["Team lunch"]["endDate"]) == ("2026-12-21T12:00:00Z",
                                                                                   "2026-12-21T13:00:00Z")
    [milk] = [e for e in on_server(server, "chores").values() if e["title"] == "Buy milk"]
    assert "BEGIN:VTODO" in milk["ical"]
    listed = subprocess.run([*cli, "--calendar-url", chores_url, "todo", "list"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert listed.returncode == 0 and "Buy milk" in listed.stdout, listed.stdout + listed.stderr
    sync(config)  # and the task reaches the folders too, where todoman lists it
    assert {str(component(p)["summary"]) for p in (root / "chores").glob("*.ics")} == {"Buy milk", "Water the plants"}
    listed = subprocess.run([tool("todo"), "--config", str(todo_config), "--porcelain", "list", "chores"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0 and {t["summary"] for t in json.loads(listed.stdout)} == {
        "Buy milk", "Water the plants"}, listed.stdout + listed.stderr
