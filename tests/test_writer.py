"""The writer without a disk (writer.py): a store in memory that counts its commits,
mutations from senders that record their answers. Group commit, answers in commit
order, refusals while degraded (and a retry's stored answer then), and ``answered``,
which the rooms' sequencer waits on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing

from barosync.storage.store import Mutation, Outcome
from barosync.engine.writer import Writer


class MemoryStore:
    kind = "postgresql"  # degraded by an unreachable database, not a full disk
    faults = (OSError,)
    path = Path("/nonexistent")

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.answers: dict[tuple[str, str], dict[str, Any]] = {}
        self.seq = 0
        self.hold: threading.Event | None = None  # set: a commit waits for it (in its thread)
        self.failing = False

    def grow_if_needed(self, *, force: bool = False) -> bool:
        return False

    def commit_batch(self, batch: list[Mutation]) -> list[Outcome]:
        if self.hold is not None:
            self.hold.wait(timeout=10)
        if self.failing:
            raise OSError("connection refused (test)")
        self.batches.append([m.envelope_id for m in batch])
        out = []
        for m in batch:
            self.seq += 1
            answer = {"projectId": m.project_id, "seq": self.seq}
            self.answers[(m.user_id, m.envelope_id)] = answer
            out.append(Outcome("applied", m.project_id, answer=answer, seq=self.seq, change=b"{}"))
        return out

    def previous_answer(self, user_id: str, envelope_id: str) -> dict[str, Any] | None:
        return self.answers.get((user_id, envelope_id))

    def degraded_reason(self, e: BaseException) -> str | None:
        return "PostgreSQL unreachable (test)"

    def probe_space(self, nbytes: int) -> None:
        raise OSError("still away (test)")


class Heard:
    """A Sender: what it was answered, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, int]] = []  # (envelope, status, seq)

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        self.got.append((m.envelope_id, outcome.status, outcome.seq))


def mutation(envelope: str) -> Mutation:
    return Mutation("create", user_id="alice", envelope_id=envelope, project_id="p", event_id=envelope)


def writer_for(store: MemoryStore) -> Writer:
    return Writer(store, lambda batch: [sender.answer(m, o) for m, sender, o in batch])  # type: ignore[arg-type]


async def test_what_waits_together_is_one_commit_answered_in_order(nursery: trio.Nursery) -> None:
    store = MemoryStore()
    writer = writer_for(store)
    heard = Heard()
    store.hold = threading.Event()
    await nursery.start(writer.run)
    await writer.submit(mutation("first"), heard)
    await trio.testing.wait_all_tasks_blocked()  # "first" is committing, held in its thread
    for n in range(5):
        await writer.submit(mutation(f"m{n}"), heard)  # these wait for the next commit
    store.hold.set()
    with trio.fail_after(10):
        while len(heard.got) < 6:
            await trio.sleep(0.01)
    assert store.batches == [["first"], ["m0", "m1", "m2", "m3", "m4"]]
    assert heard.got == [("first", "applied", 1)] + [(f"m{n}", "applied", n + 2) for n in range(5)]


async def test_answered_returns_once_the_commit_in_flight_is_handed_over(nursery: trio.Nursery) -> None:
    store = MemoryStore()
    writer = writer_for(store)
    heard = Heard()
    store.hold = threading.Event()
    await nursery.start(writer.run)
    await writer.submit(mutation("a"), heard)
    await trio.testing.wait_all_tasks_blocked()
    waited: list[list[tuple[str, str, int]]] = []

    async def wait() -> None:
        await writer.answered()
        waited.append(list(heard.got))

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    assert waited == []  # the commit is durable maybe, not answered yet
    store.hold.set()
    with trio.fail_after(10):
        while not waited:
            await trio.sleep(0.01)
    assert waited == [[("a", "applied", 1)]]  # by then its sender had its answer
    with trio.fail_after(1):
        await writer.answered()  # nothing in flight: at once


async def test_while_degraded_a_write_is_refused_but_a_retry_of_a_stored_one_gets_its_answer(
        nursery: trio.Nursery) -> None:
    store = MemoryStore()
    writer = writer_for(store)
    heard = Heard()
    await nursery.start(writer.run)
    await writer.submit(mutation("stored"), heard)
    with trio.fail_after(10):
        while not heard.got:
            await trio.sleep(0.01)
    store.failing = True
    await writer.submit(mutation("lost"), heard)  # fails: the writer degrades
    with trio.fail_after(10):
        while len(heard.got) < 2:
            await trio.sleep(0.01)
    assert heard.got[1] == ("lost", "error", 0) and writer.degraded is not None
    await writer.submit(mutation("stored"), heard)  # the retry of an applied one
    await writer.submit(mutation("new"), heard)
    assert heard.got[2:] == [("stored", "replayed", 1), ("new", "error", 0)]
    assert store.batches == [["stored"]]
