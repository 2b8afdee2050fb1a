"""The rooms' sequencer without PostgreSQL (sequencer.py): a change log in a dict and
recording subscribers (tests/core_fakes.py), with reads that yield as PostgreSQL's do.
What the scenario tests in tests/test_sequencer.py show with real nodes, here step by
step: every member gets every seq once and in order, and a sender gets its answer in
its change's place, however that change reached the room."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from barosync.config import Config
from barosync.engine.hub import Hub
from barosync.hooks.plugins import build_plugin_manager
from barosync.engine.sequencer import Sequencer

from core_fakes import FakeLog, FakeSubscriber, applied, change, mutation, read, replayed, sent


class Setup:
    def __init__(self, nursery: trio.Nursery, answered: Any = None) -> None:
        self.log = FakeLog()
        self.hub = Hub(build_plugin_manager(Config()).hook)
        self.sequencer = Sequencer(hub=self.hub, store=self.log, read=read, answered=answered)  # type: ignore[arg-type]
        self.hub.sequencer = self.sequencer
        self.nursery = nursery

    async def start(self) -> None:
        await self.nursery.start(self.sequencer.run)

    async def join(self, who: FakeSubscriber, at: int, project: str = "p") -> None:
        await self.sequencer.join(who, project, at)

    def commit_here(self, sender: FakeSubscriber | None, envelope: str, project: str = "p") -> None:
        """This node's writer commits one change and hands it to the hub."""
        m = mutation(sender, project, envelope)
        seq = self.log.append(project, m.user_id)
        self.hub.on_batch([sent(sender, m, applied(m, seq))])

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()


async def test_this_nodes_commits_reach_members_in_order_with_the_ack_in_place(nursery: trio.Nursery) -> None:
    s = Setup(nursery)
    await s.start()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    await s.join(alice, 0)
    await s.join(bob, 0)
    s.commit_here(alice, "a1")
    s.commit_here(None, "r2")
    await s.settle()
    assert alice.seqs() == [("ack", 1), ("change", 2)]
    assert bob.seqs() == [("change", 1), ("change", 2)]


async def test_another_nodes_change_after_a_gap_brings_what_is_missing_from_the_log(nursery: trio.Nursery) -> None:
    s = Setup(nursery)
    await s.start()
    bob = FakeSubscriber("bob")
    await s.join(bob, 0)
    for _ in range(3):
        s.log.append("p")  # another node's commits; only the third's message arrives
    s.sequencer.remote("p", change("p", 3))
    await s.settle()
    assert bob.seqs() == [("change", 1), ("change", 2), ("change", 3)]
    s.sequencer.remote("p", change("p", 2))  # late and already delivered: dropped
    await s.settle()
    assert bob.seqs() == [("change", 1), ("change", 2), ("change", 3)]


async def test_a_retrys_answer_waits_for_every_earlier_seq_and_takes_its_changes_place(nursery: trio.Nursery) -> None:
    """The first send went through another node (seq 2) and its answer was lost;
    the resend here is answered from the idempotency record before this room heard
    of seqs 1 and 2."""
    s = Setup(nursery)
    await s.start()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    await s.join(alice, 0)
    await s.join(bob, 0)
    s.log.append("p", "bob")
    s.log.append("p", "alice")
    m = mutation(alice, "p", "lost")
    s.hub.on_batch([sent(alice, m, replayed(m, 2))])
    await s.settle()
    assert alice.seqs() == [("change", 1), ("ack", 2)]
    assert bob.seqs() == [("change", 1), ("change", 2)]
    s.sequencer.remote("p", change("p", 2, "alice"))  # the other node's publish, late
    await s.settle()
    assert alice.seqs() == [("change", 1), ("ack", 2)]


async def test_a_retry_of_a_change_the_room_has_is_answered_at_once(nursery: trio.Nursery) -> None:
    s = Setup(nursery)
    await s.start()
    alice = FakeSubscriber("alice")
    await s.join(alice, 0)
    s.commit_here(None, "r1")
    await s.settle()
    m = mutation(alice, "p", "r1-again")
    s.hub.on_batch([sent(alice, m, replayed(m, 1))])
    await s.settle()
    assert alice.seqs() == [("change", 1), ("ack", 1)]  # its old seq, after what it has


async def test_a_fill_waits_until_this_nodes_commits_are_handed_over(nursery: trio.Nursery) -> None:
    """A newcomer's read found alice's commit before the writer handed it to the hub:
    the room is brought up to it only then, so alice gets her ack, not the change."""
    handed = trio.Event()
    s = Setup(nursery, answered=handed.wait)
    await s.start()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    await s.join(alice, 0)
    m = mutation(alice, "p", "a1")
    seq = s.log.append("p", "alice")  # durable, not yet answered
    nursery.start_soon(s.join, bob, seq)  # bob's read has seq 1 already
    await s.settle()
    assert alice.seqs() == [] and bob not in s.hub.rooms["p"].subscribers  # the fill waits
    s.hub.on_batch([sent(alice, m, applied(m, seq))])
    handed.set()
    await s.settle()
    assert alice.seqs() == [("ack", 1)]
    assert bob.seqs() == [] and bob in s.hub.rooms["p"].subscribers  # it had seq 1 from its own read


async def test_a_newcomer_behind_the_room_is_sent_what_it_missed_before_it_is_a_member(nursery: trio.Nursery) -> None:
    s = Setup(nursery)
    await s.start()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    await s.join(alice, 0)
    s.commit_here(None, "r1")
    s.commit_here(None, "r2")
    await s.settle()
    await s.join(bob, 1)  # its read ended at seq 1; seq 2 went out meanwhile
    s.commit_here(None, "r3")
    await s.settle()
    assert bob.seqs() == [("change", 2), ("change", 3)]
    assert alice.seqs() == [("change", 1), ("change", 2), ("change", 3)]


async def test_an_unreachable_log_answers_the_senders_and_closes_a_newcomer_to_resume(nursery: trio.Nursery) -> None:
    s = Setup(nursery)
    await s.start()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    await s.join(alice, 0)
    s.log.append("p")  # another node's seq 1, not yet heard of here

    def away(*args: Any, **kwargs: Any) -> Any:
        raise OSError("connection refused (test)")

    s.log.replay = away  # type: ignore[method-assign]
    m = mutation(alice, "p", "a2")
    s.log.changes["p"].append(change("p", 2, "alice"))
    s.hub.on_batch([sent(alice, m, applied(m, 2))])  # a gap before it, which cannot be read now
    nursery.start_soon(s.join, bob, 2)
    await s.settle()
    assert ("ack", 2) in alice.seqs()  # answered: the change is durable
    assert bob.closed is not None and bob.closed[0] == 4008
