"""One readiness set for every connection's socket.

Most of what clients send is acks, one small frame per delivery. Waking a trio task
per ack (re-arm the descriptor, reschedule, switch) cost more than the delivery
itself. So sockets sit in one epoll set of our own; trio wakes a single task when
any of them is readable, and that task reads each ready socket and settles its acks
on the spot (``Session.on_readable``). Everything else a client sends still goes to
that connection's own reader task, in order.
"""

from __future__ import annotations

import logging
import select
from typing import Protocol

import trio

log = logging.getLogger("barosync.poller")

# Ready sockets handled per wake-up before yielding to other tasks.
MAX_EVENTS = 1024


class Readable(Protocol):
    def on_readable(self) -> None: ...

    def fail(self) -> None: ...


class ReadPoller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._owners: dict[int, Readable] = {}

    def register(self, fd: int, owner: Readable) -> None:
        # Level-triggered: a socket not fully read is reported again next round.
        self._epoll.register(fd, select.EPOLLIN)
        self._owners[fd] = owner

    def __contains__(self, fd: int) -> bool:
        return fd in self._owners

    def unregister(self, fd: int) -> None:
        if self._owners.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed

    def close(self) -> None:
        self._epoll.close()

    async def run(self) -> None:
        poll = self._epoll.poll
        owners = self._owners
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in poll(0, MAX_EVENTS):
                    owner = owners.get(fd)
                    if owner is None:
                        continue
                    try:
                        owner.on_readable()
                    except Exception:  # one connection's bug must not stop the others
                        log.exception("reading fd %d failed; closing that connection", fd)
                        self.unregister(fd)
                        owner.fail()
                await trio.lowlevel.checkpoint()
        finally:
            self.close()
