"""vdirsyncer, a real two-way CalDAV syncer, against a project: a local folder of
.ics files and the server stay in step through changes on both sides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import icalendar
import pytest

from attack_helpers import ServerProcess, mint
from caldav_helpers import Http, app_password, event_ics, start

VDIRSYNCER = shutil.which("vdirsyncer") or str(Path(sys.executable).parent / "vdirsyncer")
pytestmark = pytest.mark.skipif(not os.path.exists(VDIRSYNCER), reason="vdirsyncer is not installed (pip install -e '.[test]')")


def discover(config: Path) -> None:
    # Asks whether to create the local folder of each calendar it finds: yes.
    result = subprocess.run([VDIRSYNCER, "-c", str(config), "discover"], input="y\n" * 10, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def sync(config: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([VDIRSYNCER, "-c", str(config), "sync"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def local_titles(folder: Path) -> dict[str, str]:
    out = {}
    for path in folder.glob("*.ics"):
        [v] = icalendar.Calendar.from_ical(path.read_bytes()).walk("VEVENT")
        out[str(v["uid"])] = str(v["summary"])
    return out


def server_titles(srv: ServerProcess) -> dict[str, str]:
    tok = mint(srv.data_dir, "reader", "--project", "team")
    _, _, body = Http(srv.port)("GET", "/api/projects/team/events", Authorization=f"Bearer {tok}")
    return {e["id"]: e["title"] for e in json.loads(body)["events"]}


def test_vdirsyncer_two_way_sync_with_a_folder(tmp_path: Path) -> None:
    srv = start(tmp_path / "data")
    try:
        password = app_password(srv.data_dir, "alice", "team")
        http = Http(srv.port, "alice", password)
        for i in range(3):
            assert http("PUT", f"/dav/calendars/alice/team/s{i}.ics", event_ics(f"s{i}", f"Server {i}"))[0] == 201
        root = tmp_path / "local"
        folder = root / "team"  # one folder per calendar vdirsyncer discovers
        folder.mkdir(parents=True)
        (folder / "l0.ics").write_text(event_ics("l0", "Local 0"))
        config = tmp_path / "vdirsyncer.conf"
        config.write_text(f"""
[general]
status_path = "{tmp_path / 'status'}"

[pair team]
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
        discover(config)  # from the server's root: /.well-known/caldav, the principal, its calendars
        sync(config)
        assert local_titles(folder) == server_titles(srv) == {
            "s0": "Server 0", "s1": "Server 1", "s2": "Server 2", "l0": "Local 0"}

        # Changes on both sides, to different events: no conflict.
        path = next(p for p in folder.glob("*.ics") if "s1" in p.read_text())
        path.write_text(event_ics("s1", "Server 1, edited locally"))
        next(p for p in folder.glob("*.ics") if "s2" in p.read_text()).unlink()
        (folder / "l1.ics").write_text(event_ics("l1", "Local 1"))
        etag = http("GET", "/dav/calendars/alice/team/s0.ics")[1]["etag"]
        assert http("PUT", "/dav/calendars/alice/team/s0.ics", event_ics("s0", "Server 0, edited on the server"),
                    If_Match=etag)[0] == 204
        tok = mint(srv.data_dir, "bob", "--project", "team")
        status, _, _ = Http(srv.port)("DELETE", "/api/events/l0", Authorization=f"Bearer {tok}")
        assert status == 200
        result = sync(config)
        assert "conflict" not in (result.stdout + result.stderr).lower()
        expected = {"s0": "Server 0, edited on the server", "s1": "Server 1, edited locally", "l1": "Local 1"}
        assert local_titles(folder) == server_titles(srv) == expected
        # Nothing left to do: a third sync changes nothing on either side.
        before = sorted(p.read_bytes() for p in folder.glob("*.ics"))
        sync(config)
        assert sorted(p.read_bytes() for p in folder.glob("*.ics")) == before
        assert server_titles(srv) == expected
    finally:
        srv.stop()
