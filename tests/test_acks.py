"""transports/acks.py without sockets: what a client has yet to ack, two numbers per
project for changes, whatever it acks and in whatever order."""

from __future__ import annotations

from barosync.transports.acks import MAX_UNACKED, Unacked


def test_changes_are_settled_by_a_cumulative_ack_or_one_by_one_in_any_order() -> None:
    u = Unacked()
    for seq in range(5, 11):
        u.sent("p", seq)
    u.sent("q", 1)
    assert len(u) == 7 and u.oldest("p") == 5 and "p:7" in u and "p:4" not in u
    u.ack_through("p", 7)
    assert len(u) == 4 and u.oldest("p") == 8 and list(u) == ["p:8", "p:9", "p:10", "q:1"]
    u.ack_id("p:10")  # ahead of a gap: held
    u.ack_id("p:9")
    assert list(u) == ["p:8", "q:1"] and u.oldest("p") == 8
    u.ack_id("p:8")  # the gap closes: everything to 10
    assert u.oldest("p") is None and list(u) == ["q:1"]
    u.ack_through("q", 99)  # past what was sent: up to what was sent
    u.sent("q", 2)
    assert list(u) == ["q:2"] and len(u) == 1


def test_other_messages_by_id_are_bounded_and_acks_of_unknown_ids_are_harmless() -> None:
    u = Unacked()
    u.message("snap-1")
    assert "snap-1" in u
    u.ack_id("snap-1")
    u.ack_id("never-sent")
    u.ack_id("x:notanumber")
    u.ack_through("nowhere", 3)
    assert len(u) == 0 and list(u) == []
    for n in range(MAX_UNACKED + 10):
        u.message(f"m{n}")
    assert len(u) == MAX_UNACKED and "m0" not in u and f"m{MAX_UNACKED + 9}" in u


def test_a_catch_up_range_counts_every_change_in_it() -> None:
    u = Unacked()
    u.changes("p", 3, 2)  # empty
    assert len(u) == 0
    u.changes("p", 3, 7)
    assert list(u) == ["p:3", "p:4", "p:5", "p:6", "p:7"]
    u.ack_through("p", 5)
    assert len(u) == 2
