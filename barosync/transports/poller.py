"""One readiness set for every connection's socket.

Most of what clients send is acks, one small frame per delivery. Waking a trio task
per ack (re-arm the descriptor, reschedule, switch) cost more than the delivery
itself. So sockets sit in one readiness set of our own; trio wakes a single task when
any of them is readable, and that task reads each ready socket and settles its acks
on the spot (``Connection.on_readable``). Everything else a client sends still goes
to that connection's own task, in order.

The set is ``select.epoll`` on Linux (the fast path: no per-event objects), else the
platform's ``selectors`` selector when it can be waited on as one descriptor (kqueue
on macOS and the BSDs). Where neither exists, each socket gets a task of its own that
waits with trio (slower, but it runs anywhere). ``BAROSYNC_POLLER=epoll|selector|tasks``
forces one, which is how the tests run the server on every path.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
from typing import Protocol

import trio

log = logging.getLogger(__name__)

# Ready sockets handled per wake-up before yielding to other tasks.
MAX_EVENTS = 1024
MODES = ("epoll", "selector", "tasks")


class Readable(Protocol):
    def on_readable(self) -> None: ...

    def fail(self) -> None: ...


def choose_mode(wanted: str | None = None) -> str:
    """The fastest readiness mechanism this platform has, unless one is asked for."""
    wanted = wanted or os.environ.get("BAROSYNC_POLLER") or None
    if wanted is not None and wanted not in MODES:
        raise ValueError(f"BAROSYNC_POLLER={wanted!r}: use one of {', '.join(MODES)}")
    if wanted == "epoll" or (wanted is None and hasattr(select, "epoll")):
        return "epoll"
    if wanted != "tasks" and hasattr(selectors.DefaultSelector, "fileno"):
        return "selector"
    return "tasks"


class ReadPoller:
    def __init__(self, mode: str | None = None) -> None:
        self.mode = choose_mode(mode)
        self._owners: dict[int, Readable] = {}
        self._epoll = select.epoll() if self.mode == "epoll" else None
        self._selector = selectors.DefaultSelector() if self.mode == "selector" else None
        # tasks mode: one watcher task per socket, cancelled by unregister().
        self._watchers: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def register(self, fd: int, owner: Readable) -> None:
        self._owners[fd] = owner
        if self._epoll is not None:
            # Level-triggered: a socket not fully read is reported again next round.
            self._epoll.register(fd, select.EPOLLIN)
        elif self._selector is not None:
            self._selector.register(fd, selectors.EVENT_READ)
        else:
            assert self._nursery is not None, "run() first"
            scope = self._watchers[fd] = trio.CancelScope()
            self._nursery.start_soon(self._watch, fd, owner, scope)

    def __contains__(self, fd: int) -> bool:
        return fd in self._owners

    def unregister(self, fd: int) -> None:
        if self._owners.pop(fd, None) is None:
            return
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            elif self._selector is not None:
                self._selector.unregister(fd)
            else:
                self._watchers.pop(fd).cancel()
        except (OSError, ValueError, KeyError):
            pass  # already closed

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        if self._selector is not None:
            self._selector.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve readiness until cancelled; sockets may be registered once started."""
        try:
            if self._epoll is not None:
                task_status.started()
                await self._run_epoll(self._epoll)
            elif self._selector is not None:
                task_status.started()
                await self._run_selector(self._selector)
            else:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self.close()

    async def _run_epoll(self, epoll: "select.epoll") -> None:
        # The hot path: one wake-up reads every ready socket (mostly acks); kept
        # free of per-event allocations and calls beyond the owner's own.
        poll, owners, set_fd = epoll.poll, self._owners, epoll.fileno()
        while True:
            await trio.lowlevel.wait_readable(set_fd)
            for fd, _ in poll(0, MAX_EVENTS):
                owner = owners.get(fd)
                if owner is None:
                    continue
                try:
                    owner.on_readable()
                except Exception:
                    self._failed(fd, owner)
            owner = None  # not kept alive by this frame while we wait
            await trio.lowlevel.checkpoint()

    async def _run_selector(self, selector: selectors.BaseSelector) -> None:
        owners, set_fd = self._owners, selector.fileno()  # type: ignore[attr-defined]
        while True:
            await trio.lowlevel.wait_readable(set_fd)
            for key, _ in selector.select(0)[:MAX_EVENTS]:
                owner = owners.get(key.fd)
                if owner is not None:
                    self._read(key.fd, owner)
            owner = None
            await trio.lowlevel.checkpoint()

    def _read(self, fd: int, owner: Readable) -> None:
        try:
            owner.on_readable()
        except Exception:
            self._failed(fd, owner)

    def _failed(self, fd: int, owner: Readable) -> None:
        # One connection's bug must not stop the others.
        log.exception("reading fd %d failed; closing that connection", fd)
        self.unregister(fd)
        owner.fail()

    async def _watch(self, fd: int, owner: Readable, scope: trio.CancelScope) -> None:
        with scope:
            # unregister() cancels this scope, maybe from inside _read(); a later
            # register() of the same socket starts a new watcher.
            while not scope.cancel_called:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    return
                self._read(fd, owner)
