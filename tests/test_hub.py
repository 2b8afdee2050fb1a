"""The hub without sockets (hub.py): fan-out, the sender's ack in place of its own
change, one write per member per group commit, presence per user. Subscribers are
tests/core_fakes.py's recorders; nothing here opens a socket or a store."""

from __future__ import annotations

from barosync.config import Config
from barosync.engine.hub import Hub
from barosync.hooks.plugins import build_plugin_manager

from core_fakes import FakeSubscriber, applied, mutation, sent


def hub() -> Hub:
    return Hub(build_plugin_manager(Config()).hook)


def test_the_sender_gets_its_ack_in_place_of_its_change_and_the_others_the_change() -> None:
    h = hub()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    h.join(alice, "p")
    h.join(bob, "p")
    m = mutation(alice, "p", "e1")
    h.on_batch([sent(alice, m, applied(m, 1))])
    assert alice.seqs() == [("ack", 1)]
    assert bob.seqs() == [("change", 1)]


def test_a_group_commit_reaches_each_member_in_one_write_and_in_seq_order() -> None:
    h = hub()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    h.join(alice, "p")
    h.join(bob, "p")
    senders = [None, alice, None]  # REST, alice, REST
    ms = [mutation(who, "p", f"m{n}") for n, who in enumerate(senders, 1)]
    h.on_batch([sent(who, m, applied(m, seq)) for seq, (who, m) in enumerate(zip(senders, ms), 1)])
    assert bob.seqs() == [("change", 1), ("change", 2), ("change", 3)] and bob.writes == 1
    assert alice.seqs() == [("change", 1), ("ack", 2), ("change", 3)]
    assert h.committed == {"p": 3}


def test_a_sender_outside_the_project_is_answered_and_the_members_get_the_change() -> None:
    h = hub()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    h.join(bob, "p")
    m = mutation(alice, "p", "e1")  # alice did not subscribe to p
    h.on_batch([sent(alice, m, applied(m, 1))])
    assert alice.seqs() == [("ack", 1)] and bob.seqs() == [("change", 1)]
    q = mutation(alice, "q", "e2")
    h.on_batch([sent(alice, q, applied(q, 1))])  # nobody in q
    assert alice.seqs()[-1] == ("ack", 1) and bob.seqs() == [("change", 1)]


def test_presence_is_per_user_not_per_connection() -> None:
    h = hub()
    tab1, tab2, bob = FakeSubscriber("alice"), FakeSubscriber("alice"), FakeSubscriber("bob")
    h.join(bob, "p")
    h.join(tab1, "p")
    h.join(tab2, "p")  # alice's second tab: nobody hears of it
    assert bob.got == [("presence", "user:joined", "alice")]
    assert tab1.got == tab2.got == [("presence", "user:joined", "bob")]  # who is here, as each joins
    h.leave(tab1, "p")
    assert bob.got == [("presence", "user:joined", "alice")]  # still here through tab2
    h.leave(tab2, "p")
    assert bob.got[-1] == ("presence", "user:left", "alice")
    h.leave(bob, "p")
    assert "p" not in h.rooms  # the last one out closes the room


def test_subscribing_again_changes_nothing() -> None:
    h = hub()
    alice, bob = FakeSubscriber("alice"), FakeSubscriber("bob")
    h.join(alice, "p")
    h.join(bob, "p")
    h.join(bob, "p")
    assert alice.got == [("presence", "user:joined", "bob")]
    m = mutation(None, "p", "r1")
    h.on_batch([sent(None, m, applied(m, 1))])
    assert bob.seqs() == [("change", 1)]  # once, not once per subscribe
