"""The shared read poller on every path it has: epoll (Linux), a selectors selector
(kqueue elsewhere) and one task per socket (anywhere). Real socket pairs, and the
server's own tests run on the portable paths in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from barosync.transports.poller import MODES, ReadPoller, choose_mode


class Owner:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[bytes] = []
        self.failed = False
        self.boom = False

    def on_readable(self) -> None:
        if self.boom:
            raise RuntimeError("a bug in one connection")
        self.got.append(self.sock.recv(1024))

    def fail(self) -> None:
        self.failed = True


@pytest.mark.parametrize("mode", MODES)
async def test_readable_sockets_reach_their_owner_until_unregistered(mode: str) -> None:
    poller = ReadPoller(mode)
    assert poller.mode == mode
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    for s in (a, c):
        s.setblocking(False)
    one, two = Owner(a), Owner(c)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        poller.register(a.fileno(), one)
        poller.register(c.fileno(), two)
        b.send(b"hello")
        d.send(b"there")
        with trio.fail_after(5):
            while not (one.got and two.got):
                await trio.sleep(0.001)
        assert one.got == [b"hello"] and two.got == [b"there"]
        poller.unregister(a.fileno())
        assert a.fileno() not in poller
        b.send(b"unseen")
        two.boom = True  # a failing owner is dropped and told, the others go on
        d.send(b"x")
        with trio.fail_after(5):
            while not two.failed:
                await trio.sleep(0.001)
        assert c.fileno() not in poller
        await trio.sleep(0.05)
        assert one.got == [b"hello"]
        nursery.cancel_scope.cancel()
    for s in (a, b, c, d):
        s.close()


def test_a_mode_is_chosen_or_refused_by_name(monkeypatch) -> None:
    monkeypatch.setenv("BAROSYNC_POLLER", "tasks")
    assert choose_mode() == "tasks"
    monkeypatch.setenv("BAROSYNC_POLLER", "kqueue2")
    with pytest.raises(ValueError, match="epoll, selector, tasks"):
        choose_mode()
    monkeypatch.delenv("BAROSYNC_POLLER")
    assert choose_mode() in MODES


@pytest.mark.slow  # the server tests again, in a subprocess per mode
@pytest.mark.parametrize("mode", ["selector", "tasks"])
def test_the_server_tests_pass_on_the_portable_paths(mode: str) -> None:
    """What macOS and the BSDs run (kqueue through selectors), and the fallback.
    (test_protocol.py is pure: no poller to vary, so it is not run again here.)"""
    tests = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_server.py")],
        env={**os.environ, "BAROSYNC_POLLER": mode}, capture_output=True, text=True, timeout=300, cwd=tests.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout.splitlines()[-1]
