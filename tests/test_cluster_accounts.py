"""Accounts on several nodes (storage/pg_tables.py): two `barosync serve` processes on
one PostgreSQL sign the same people in; the CLI makes a user there; a sign-out or a
project deleted on one node closes the connections on the other within a second."""

from __future__ import annotations

import subprocess

import pytest
import trio

from attack_helpers import WS, Closed, barosync_cmd
from conftest import http_exchange
from test_cluster import Cluster, cluster, postgres, start  # noqa: F401  (fixtures)
from pg_helpers import bindir

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (as root: apt-get install postgresql)")]

CSRF = {"X-Barosync-Request": "1"}


async def closed_within(ws: WS, seconds: float) -> int:
    """The close code the server sends within ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            try:
                await ws.recv(timeout=None)
            except Closed as e:
                return e.code


async def test_a_session_from_one_node_works_on_the_other_and_its_sign_out_reaches_it(cluster: Cluster) -> None:  # noqa: F811
    made = await trio.to_thread.run_sync(lambda: subprocess.run(
        barosync_cmd("user", "create", "olive", "--name", "Olive", "--all-projects", "--password-stdin",
                     "--config", str(cluster.config), "--data", str(cluster.tmp / "cli")),
        input="olive's long password\n", capture_output=True, text=True, timeout=60))
    assert made.returncode == 0, made.stderr
    a, b = await start(cluster, "a"), await start(cluster, "b")
    status, headers, _ = await http_exchange(a.port, "POST", "/auth/signin",
                                             {"user": "olive", "password": "olive's long password"}, headers=CSRF)
    assert status == 200, headers
    cookie = {"Cookie": headers["set-cookie"].split(";", 1)[0]}
    status, _, minted = await http_exchange(b.port, "POST", "/auth/token", headers={**CSRF, **cookie})
    assert status == 200  # node b knows node a's session
    ws = await WS.connect(b.port, minted["token"])
    assert (await ws.request("subscribe", {"projectId": "team"}))["type"] == "ack"

    # A project made on a, deleted on a: b's subscriber loses it within a second.
    status, _, project = await http_exchange(a.port, "POST", "/auth/projects", {"name": "Offsite"},
                                             headers={**CSRF, **cookie})
    assert status == 200 and project["project"]["id"] == "offsite"
    status, _, minted = await http_exchange(b.port, "POST", "/auth/token", headers={**CSRF, **cookie})
    offsite = await WS.connect(b.port, minted["token"])
    assert (await offsite.request("subscribe", {"projectId": "offsite"}))["type"] == "ack"
    assert (await http_exchange(a.port, "DELETE", "/auth/projects/offsite", headers={**CSRF, **cookie}))[0] == 200
    assert await closed_within(offsite, 2) == 4001
    status, _, _ = await http_exchange(b.port, "GET", "/api/projects/offsite/events", tok=minted["token"])
    assert status == 403

    # Signed out on a: the connection on b closes, and b mints nothing more for it.
    assert (await http_exchange(a.port, "POST", "/auth/signout", headers={**CSRF, **cookie}))[0] == 200
    assert await closed_within(ws, 2) == 4001
    assert (await http_exchange(b.port, "POST", "/auth/token", headers={**CSRF, **cookie}))[0] == 401
