"""Conflicts: the pure strategy functions, properties of `merge`, and the whole path
through a real server (design.md, "Conflicts").

A conflict is an `event:update` / `event:delete` whose `version` is older than the
stored one (or an update of an event deleted meanwhile). The strategy gets `base`
(from the changelog), `local` (base + the client's change) and `remote` (stored).
"""

from __future__ import annotations

import copy
import sys
import textwrap
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from barosync.config import ConfigError
from barosync.hooks.conflicts import (
    EDITABLE,
    STRATEGIES,
    Conflict,
    Resolution,
    first_write_wins,
    last_write_wins,
    manual,
    merge,
    merge_attendees,
)
from barosync.domain.models import check_dates
from barosync.core.app import App
from barosync.transports.server import serve

from conftest import Client, make_config, one_node, open_client, running, token

T0 = 1_764_144_000_000  # ms

# -- wire-format helpers ----------------------------------------------------------------


def wire_event(version: int = 1, **fields: Any) -> dict[str, Any]:
    """A stored event exactly as the server sends it (every key present)."""
    event = {
        "id": "ev-1",
        "projectId": "p1",
        "title": "Standup",
        "description": None,
        "startDate": "2026-01-05T09:00:00Z",
        "endDate": "2026-01-05T09:15:00Z",
        "allDay": False,
        "location": None,
        "attendees": ["alice", "bob"],
        "color": None,
        "version": version,
        "createdAt": T0,
        "updatedAt": T0,
        "createdBy": "alice",
        "updatedBy": "alice",
    }
    event.update(fields)
    return event


def remote_of(base: dict[str, Any], *, by: str = "alice", at: int = T0 + 1000, **fields: Any) -> dict[str, Any]:
    """What another user stored on top of ``base``: one version later."""
    return {**base, **fields, "version": base["version"] + 1, "updatedAt": at, "updatedBy": by}


def make_conflict(
    base: dict[str, Any] | None,
    changes: dict[str, Any],
    remote: dict[str, Any] | None,
    *,
    operation: str = "update",
    client_time: int = T0 + 2000,
    remote_time: int | None = None,
    tiebreak: str = "manual",
) -> Conflict:
    """A Conflict built the way commit.Rules builds it."""
    local = {**base, **changes} if base is not None and operation == "update" else None
    if remote_time is None:
        remote_time = remote["updatedAt"] if remote is not None else T0 + 1000
    return Conflict(
        operation=operation,  # type: ignore[arg-type]
        base=base,
        local=local,
        remote=remote,
        changes=changes if operation == "update" else {},
        client_time=client_time,
        remote_time=remote_time,
        user_id="bob",
        merge_tiebreak=tiebreak,
    )


def editable(event: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if event is None else {f: event.get(f) for f in EDITABLE}


def outcome_fields(c: Conflict, r: Resolution) -> dict[str, Any] | None:
    """The editable fields that are current after the resolution."""
    if r.action == "store":
        assert r.event is not None
        return editable(r.event)
    if r.action == "delete":
        return None
    return editable(c.remote)


# -- last_write_wins ----------------------------------------------------------------------


def test_lww_later_client_edit_wins():
    base = wire_event()
    remote = remote_of(base, title="Alice's", at=T0 + 1000)
    c = make_conflict(base, {"title": "Bob's", "location": "Room 2"}, remote, client_time=T0 + 5000)
    r = last_write_wins(c)
    assert r.action == "store" and not r.manual
    assert r.event["title"] == "Bob's" and r.event["location"] == "Room 2"
    assert set(r.fields) == {"title", "location"}


def test_lww_earlier_client_edit_loses():
    base = wire_event()
    remote = remote_of(base, title="Alice's", at=T0 + 5000)
    r = last_write_wins(make_conflict(base, {"title": "Bob's"}, remote, client_time=T0 + 1000))
    assert r.action == "keep" and not r.manual and r.event is None
    assert r.fields == ("title",)


def test_lww_tie_goes_to_the_later_arrival_the_client():
    base = wire_event()
    remote = remote_of(base, title="Alice's", at=T0 + 3000)
    r = last_write_wins(make_conflict(base, {"title": "Bob's"}, remote, client_time=T0 + 3000))
    assert r.action == "store" and r.event["title"] == "Bob's"


def test_lww_keeps_the_remote_changes_the_client_did_not_touch():
    base = wire_event()
    remote = remote_of(base, title="Alice's", color="#ff0000")
    r = last_write_wins(make_conflict(base, {"location": "Room 2"}, remote, client_time=T0 + 9000))
    assert r.action == "store"
    assert r.event["title"] == "Alice's" and r.event["color"] == "#ff0000" and r.event["location"] == "Room 2"


@pytest.mark.parametrize("client_time, action", [(T0 + 9000, "delete"), (T0 + 1000, "keep"), (T0 + 5000, "delete")])
def test_lww_stale_delete(client_time, action):
    base = wire_event()
    remote = remote_of(base, title="Alice's", at=T0 + 5000)
    r = last_write_wins(make_conflict(base, {}, remote, operation="delete", client_time=client_time))
    assert r.action == action and not r.manual


def test_lww_update_after_delete_later_edit_brings_it_back():
    base = wire_event()
    r = last_write_wins(make_conflict(base, {"title": "Bob's"}, None, client_time=T0 + 9000, remote_time=T0 + 5000))
    assert r.action == "store"
    assert r.event["title"] == "Bob's" and r.event["startDate"] == base["startDate"]


def test_lww_update_after_delete_earlier_edit_leaves_it_deleted():
    base = wire_event()
    r = last_write_wins(make_conflict(base, {"title": "Bob's"}, None, client_time=T0 + 1000, remote_time=T0 + 5000))
    assert r.action == "keep" and not r.manual


# -- first_write_wins / manual ----------------------------------------------------------------


@pytest.mark.parametrize("client_time", [T0 + 1, T0 + 10**6])
def test_fww_keeps_remote_whatever_the_times(client_time):
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = first_write_wins(make_conflict(base, {"title": "Bob's", "color": "#00f"}, remote, client_time=client_time))
    assert r == Resolution("keep", fields=("title", "color"))


def test_fww_stale_delete_and_update_after_delete_keep():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    assert first_write_wins(make_conflict(base, {}, remote, operation="delete")).action == "keep"
    r = first_write_wins(make_conflict(base, {"title": "Bob's"}, None))
    assert r.action == "keep" and not r.manual


def test_manual_keeps_and_asks_the_sender():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = manual(make_conflict(base, {"title": "Bob's", "location": "Room 2"}, remote))
    assert r.action == "keep" and r.manual and r.event is None
    assert set(r.fields) == {"title", "location"}
    assert manual(make_conflict(base, {}, remote, operation="delete")) == Resolution("keep", manual=True)
    r = manual(make_conflict(base, {"title": "Bob's"}, None))
    assert r.action == "keep" and r.manual


def test_fields_only_name_what_the_client_really_changed():
    base = wire_event(title="Same")
    remote = remote_of(base, location="Room 9")
    # The client sent the title it had (unchanged) and a new colour.
    for strategy in (last_write_wins, first_write_wins, manual):
        assert strategy(make_conflict(base, {"title": "Same", "color": "#0f0"}, remote)).fields == ("color",)


# -- merge ---------------------------------------------------------------------------------


def test_merge_disjoint_fields_keep_both():
    base = wire_event()
    remote = remote_of(base, title="Alice's", color="#ff0000")
    r = merge(make_conflict(base, {"location": "Room 2", "description": "agenda"}, remote))
    assert r.action == "store" and not r.manual and r.fields == ()
    assert r.event["title"] == "Alice's" and r.event["color"] == "#ff0000"
    assert r.event["location"] == "Room 2" and r.event["description"] == "agenda"
    assert r.event["startDate"] == base["startDate"]


def test_merge_same_field_same_value_is_no_clash():
    base = wire_event()
    remote = remote_of(base, title="Retro")
    r = merge(make_conflict(base, {"title": "Retro"}, remote))
    assert r == Resolution("keep", fields=())  # nothing to store: the remote already says so
    r = merge(make_conflict(base, {"title": "Retro", "location": "Room 2"}, remote))
    assert r.action == "store" and r.fields == ()
    assert r.event["title"] == "Retro" and r.event["location"] == "Room 2"


def test_merge_unchanged_field_sent_by_client_does_not_undo_remote_edit():
    base = wire_event(title="Base")
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"title": "Base", "location": "Room 2"}, remote))
    assert r.action == "store" and r.event["title"] == "Alice's" and r.event["location"] == "Room 2"


def test_merge_clash_defaults_to_manual():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"title": "Bob's", "location": "Room 2"}, remote))
    assert r.action == "keep" and r.manual and r.fields == ("title",)


@pytest.mark.parametrize("client_time, title", [(T0 + 9000, "Bob's"), (T0 + 10, "Alice's")])
def test_merge_clash_tiebreak_last_write_wins(client_time, title):
    base = wire_event()
    remote = remote_of(base, title="Alice's", color="#f00", at=T0 + 5000)
    c = make_conflict(base, {"title": "Bob's", "location": "Room 2"}, remote, client_time=client_time, tiebreak="last_write_wins")
    r = merge(c)
    assert r.action == "store" and not r.manual and r.fields == ("title",)
    assert r.event["title"] == title
    # Non-clashing changes of both sides are kept either way.
    assert r.event["location"] == "Room 2" and r.event["color"] == "#f00"


def test_merge_clash_tiebreak_first_write_wins_still_stores_the_clients_other_changes():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"title": "Bob's", "location": "Room 2"}, remote, client_time=T0 + 10**6,
                            tiebreak="first_write_wins"))
    assert r.action == "store" and not r.manual and r.fields == ("title",)
    assert r.event["title"] == "Alice's" and r.event["location"] == "Room 2"


def test_merge_clash_tiebreak_first_write_wins_with_only_clashes_keeps():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"title": "Bob's"}, remote, tiebreak="first_write_wins"))
    assert r == Resolution("keep", fields=("title",))


def test_merge_tiebreak_merge_or_unknown_falls_back_to_manual():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    for tiebreak in ("merge", "no-such-strategy"):
        r = merge(make_conflict(base, {"title": "Bob's"}, remote, tiebreak=tiebreak))
        assert r.action == "keep" and r.manual


def test_merge_attendees_as_a_set_adds_and_removes_from_both_sides():
    base = wire_event(attendees=["a", "b", "c"])
    # Alice removed "a" and added "e"; Bob removed "c" and added "d".
    remote = remote_of(base, attendees=["b", "c", "e"])
    r = merge(make_conflict(base, {"attendees": ["a", "b", "d"]}, remote))
    assert r.action == "store" and not r.manual and r.fields == ()
    assert sorted(r.event["attendees"]) == ["b", "d", "e"]
    assert len(r.event["attendees"]) == len(set(r.event["attendees"]))


def test_merge_attendees_both_add_the_same_person_once():
    base = wire_event(attendees=["a"])
    remote = remote_of(base, attendees=["a", "z"])
    r = merge(make_conflict(base, {"attendees": ["z", "a", "y"]}, remote))
    assert sorted(r.event["attendees"]) == ["a", "y", "z"]


def test_merge_attendees_one_side_only_takes_that_side():
    base = wire_event(attendees=["a", "b"])
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"attendees": ["b"]}, remote))
    assert r.event["attendees"] == ["b"] and r.event["title"] == "Alice's"


def test_merge_attendees_function():
    assert sorted(merge_attendees(["a", "b"], ["a", "b", "c"], ["b"])) == ["b", "c"]
    assert merge_attendees([], [], []) == []
    assert sorted(merge_attendees(["x"], [], [])) == []


def test_merge_dates_valid_alone_but_not_together_is_manual():
    base = wire_event(startDate="2026-01-05T09:00:00Z", endDate="2026-01-05T10:00:00Z")
    # Alice moved the start later, Bob moved the end earlier: each valid alone.
    remote = remote_of(base, startDate="2026-01-05T09:45:00Z")
    changes = {"endDate": "2026-01-05T09:30:00Z"}
    check_dates(remote["startDate"], remote["endDate"])
    check_dates(base["startDate"], changes["endDate"])
    r = merge(make_conflict(base, changes, remote))
    assert r.action == "keep" and r.manual
    assert set(r.fields) >= {"startDate", "endDate"}


def test_merge_dates_moved_on_both_sides_consistently_store():
    base = wire_event(startDate="2026-01-05T09:00:00Z", endDate="2026-01-05T10:00:00Z")
    remote = remote_of(base, startDate="2026-01-05T08:00:00Z")
    r = merge(make_conflict(base, {"endDate": "2026-01-05T11:00:00Z"}, remote))
    assert r.action == "store"
    assert (r.event["startDate"], r.event["endDate"]) == ("2026-01-05T08:00:00Z", "2026-01-05T11:00:00Z")


def test_merge_without_base_history_gone():
    remote = wire_event(version=7, title="Alice's", attendees=["a", "b"], location="Room 1")
    # Without a base, every differing field counts as changed on both sides.
    r = merge(make_conflict(None, {"title": "Bob's"}, remote))
    assert r.action == "keep" and r.manual and r.fields == ("title",)
    # Equal values are still no clash; attendees still merge (as a union).
    r = merge(make_conflict(None, {"location": "Room 1", "attendees": ["b", "c"]}, remote))
    assert r.action == "store" and not r.manual
    assert sorted(r.event["attendees"]) == ["a", "b", "c"] and r.event["location"] == "Room 1"
    r = merge(make_conflict(None, {"title": "Alice's"}, remote))
    assert r.action == "keep" and not r.manual


def test_merge_stale_delete_keeps_the_newer_edit():
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {}, remote, operation="delete", client_time=T0 + 10**6))
    assert r.action == "keep" and not r.manual


def test_merge_update_after_delete_leaves_it_deleted():
    base = wire_event()
    r = merge(make_conflict(base, {"title": "Bob's"}, None, client_time=T0 + 10**6))
    assert r.action == "keep" and not r.manual and r.fields == ("title",)


def test_merge_result_is_never_server_owned_from_client():
    """The stored event's server-owned fields come from remote; the store bumps them."""
    base = wire_event()
    remote = remote_of(base, title="Alice's")
    r = merge(make_conflict(base, {"location": "Room 2"}, remote))
    for f in ("id", "projectId", "version", "createdAt", "createdBy"):
        assert r.event[f] == remote[f]


# -- merge properties (hypothesis) -------------------------------------------------------------

TITLES = st.sampled_from(["A", "B", "C"])
TEXT = st.one_of(st.none(), st.sampled_from(["x", "y", "z"]))
PEOPLE = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), unique=True, max_size=5)
# Any start with any end stays valid: properties about which side wins are not
# disturbed by the "dates invalid together" rule.
VALID_STARTS = st.sampled_from(["2026-01-05T08:00:00Z", "2026-01-05T09:00:00Z", "2026-01-05T10:00:00Z"])
VALID_ENDS = st.sampled_from(["2026-01-05T11:00:00Z", "2026-01-05T12:00:00Z"])
ANY_DATES = st.sampled_from(["2026-01-05T08:00:00Z", "2026-01-05T10:00:00Z", "2026-01-05T12:00:00Z"])

FIELD_VALUES = {
    "title": TITLES,
    "description": TEXT,
    "startDate": VALID_STARTS,
    "endDate": VALID_ENDS,
    "allDay": st.booleans(),
    "location": TEXT,
    "attendees": PEOPLE,
    "color": TEXT,
    "recurrence": st.sampled_from([None, {"rrule": "FREQ=WEEKLY", "rdates": [], "exdates": [], "overrides": []},
                                   {"rrule": "FREQ=DAILY;COUNT=3", "rdates": [], "exdates": [], "overrides": []}]),
    "timeZone": st.sampled_from([None, "Europe/Berlin", "America/New_York"]),
    "ical": st.sampled_from([None, "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nEND:VCALENDAR\r\n"]),
}


@st.composite
def base_events(draw: st.DrawFn, values: dict[str, st.SearchStrategy[Any]] = FIELD_VALUES) -> dict[str, Any]:
    return wire_event(version=draw(st.integers(1, 50)), **{f: draw(values[f]) for f in EDITABLE})


@st.composite
def edits(draw: st.DrawFn, base: dict[str, Any], fields: list[str], values: dict[str, st.SearchStrategy[Any]] = FIELD_VALUES,
          differ: bool = True) -> dict[str, Any]:
    out = {}
    for f in fields:
        value = draw(values[f].filter(lambda v, f=f: v != base[f]) if differ else values[f])
        out[f] = value
    return out


TIEBREAKS = st.sampled_from(["manual", "last_write_wins", "first_write_wins"])
TIMES = st.integers(T0, T0 + 10)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@PROPS
@given(data=st.data(), tiebreak=TIEBREAKS, client_time=TIMES, remote_time=TIMES)
def test_prop_non_overlapping_edits_keep_both(data, tiebreak, client_time, remote_time):
    base = data.draw(base_events())
    side = {f: data.draw(st.sampled_from(["neither", "mine", "theirs"])) for f in EDITABLE}
    mine = [f for f in EDITABLE if side[f] == "mine"]
    theirs = [f for f in EDITABLE if side[f] == "theirs"]
    assume(mine)
    changes = data.draw(edits(base, mine))
    remote = remote_of(base, **data.draw(edits(base, theirs)))
    r = merge(make_conflict(base, changes, remote, client_time=client_time, remote_time=remote_time, tiebreak=tiebreak))
    assert r.action == "store" and not r.manual and r.fields == ()
    for f in EDITABLE:
        expected = changes[f] if f in mine else remote[f] if f in theirs else base[f]
        assert r.event[f] == expected, f


@PROPS
@given(data=st.data(), tiebreak=TIEBREAKS, client_time=TIMES, remote_time=TIMES)
def test_prop_merge_with_no_remote_change_is_the_local_edit(data, tiebreak, client_time, remote_time):
    base = data.draw(base_events())
    fields = data.draw(st.lists(st.sampled_from(EDITABLE), unique=True))
    changes = data.draw(edits(base, fields, differ=False))
    remote = remote_of(base)  # only version / updatedAt / updatedBy differ
    c = make_conflict(base, changes, remote, client_time=client_time, remote_time=remote_time, tiebreak=tiebreak)
    r = merge(c)
    assert not r.manual and r.fields == ()
    assert outcome_fields(c, r) == editable(c.local)
    assert (r.action == "keep") == (editable(c.local) == editable(base))


@PROPS
@given(data=st.data(), tiebreak=TIEBREAKS, client_time=TIMES, remote_time=TIMES, has_base=st.booleans())
def test_prop_merge_never_invents_values(data, tiebreak, client_time, remote_time, has_base):
    values = {**FIELD_VALUES, "startDate": ANY_DATES, "endDate": ANY_DATES}
    base = data.draw(base_events(values).filter(lambda e: e["startDate"] <= e["endDate"]))
    changes = data.draw(edits(base, data.draw(st.lists(st.sampled_from(EDITABLE), unique=True)), values, differ=False))
    remote_fields = data.draw(edits(base, data.draw(st.lists(st.sampled_from(EDITABLE), unique=True)), values, differ=False))
    remote = remote_of(base, **remote_fields)
    assume(remote["startDate"] <= remote["endDate"])
    c = make_conflict(base if has_base else None, changes, remote,
                      client_time=client_time, remote_time=remote_time, tiebreak=tiebreak)
    r = merge(c)
    assert r.action in ("store", "keep")
    if r.manual:
        assert r.action == "keep" and r.fields
    if r.action != "store":
        return
    local = {**base, **changes}
    for f in EDITABLE:
        if f == "attendees":
            assert set(r.event[f]) <= set(local[f]) | set(remote[f])
            assert len(r.event[f]) == len(set(r.event[f]))
        else:
            assert r.event[f] in (local[f], remote[f], base[f]), f
    # What merge asks to store is always a valid event.
    check_dates(r.event["startDate"], r.event["endDate"])
    # Fields changed by exactly one side (relative to base) take that side.
    if has_base:
        for f in EDITABLE:
            if f == "attendees":
                continue
            if local[f] != base[f] and remote[f] == base[f]:
                assert r.event[f] == local[f]
            if remote[f] != base[f] and local[f] == base[f]:
                assert r.event[f] == remote[f]


@PROPS
@given(data=st.data(), tiebreak=TIEBREAKS, client_time=TIMES, remote_time=TIMES,
       has_base=st.booleans(), operation=st.sampled_from(["update", "update", "delete"]), deleted=st.booleans())
def test_prop_merge_is_deterministic_and_pure(data, tiebreak, client_time, remote_time, has_base, operation, deleted):
    base = data.draw(base_events())
    changes = data.draw(edits(base, data.draw(st.lists(st.sampled_from(EDITABLE), unique=True)), differ=False))
    remote = None if deleted else remote_of(base, **data.draw(edits(base, data.draw(st.lists(st.sampled_from(EDITABLE), unique=True)), differ=False)))
    c = make_conflict(base if has_base else None, changes, remote, operation=operation,
                      client_time=client_time, remote_time=remote_time, tiebreak=tiebreak)
    before = copy.deepcopy((c.base, c.local, c.remote, c.changes))
    first = merge(c)
    assert (c.base, c.local, c.remote, c.changes) == before  # inputs untouched
    assert merge(copy.deepcopy(c)) == first
    assert merge(c) == first


# -- end to end through a real server ------------------------------------------------------------

PROJECTS = ["p1", "lww", "fww", "man", "rec"]
STRATEGY_CONFIG = {"lww": "last_write_wins", "fww": "first_write_wins", "man": "manual"}
PRESENCE = ("user:joined", "user:left", "user:cursor")




async def next_change(c: Client) -> dict[str, Any]:
    """The next message that is not presence (changes, conflicts, acks, errors)."""
    while True:
        msg = await c.recv()
        if msg["type"] not in PRESENCE:
            return msg


async def drain_to_seq(c: Client, seq: int) -> None:
    while True:
        msg = await next_change(c)
        if msg.get("seq") == seq:
            return


async def three_users(app: App, nursery: trio.Nursery, project: str) -> tuple[Client, Client, Client]:
    clients = []
    for user in ("alice", "bob", "carol"):
        c = await open_client(nursery, app, token(user, projects=PROJECTS))
        await c.subscribe(project)
        clients.append(c)
    return clients[0], clients[1], clients[2]


async def alice_edits_first(alice: Client, project: str, event_id: str, **alice_changes: Any) -> dict[str, Any]:
    """Alice creates the event (v1) and changes it (v2); returns the v2 event."""
    await alice.create(project, id=event_id, title="Base", attendees=["alice", "bob", "dave"])
    ack = await alice.request("event:update", {"id": event_id, "version": 1, **alice_changes})
    assert ack["type"] == "ack", ack
    return ack["payload"]["event"]


async def expect_nothing_more(app: App, project: str, watchers: list[Client], after_seq: int) -> None:
    """A sentinel change: the watchers' next change must be it, with the next seq."""
    sentinel = await open_client_for(app, project)
    ack = await sentinel.create(project, title="sentinel")
    assert ack["payload"]["seq"] == after_seq + 1
    for w in watchers:
        msg = await next_change(w)
        assert msg["type"] == "event:created" and msg["payload"]["title"] == "sentinel", msg
        assert msg["seq"] == after_seq + 1


_sentinel_nursery: dict[int, trio.Nursery] = {}


async def open_client_for(app: App, project: str) -> Client:
    return await open_client(_sentinel_nursery[id(app)], app, token("sentinel", projects=PROJECTS))


@asynccontextmanager
async def server(data_dir: Path, **overrides: Any) -> AsyncIterator[tuple[App, trio.Nursery]]:
    overrides.setdefault("conflict_projects", STRATEGY_CONFIG)
    async with running(data_dir, **overrides) as (app, nursery):
        _sentinel_nursery[id(app)] = nursery
        try:
            yield app, nursery
        finally:
            _sentinel_nursery.pop(id(app), None)


async def test_merge_of_disjoint_edits_by_two_users_stores_both(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "p1")
        v2 = await alice_edits_first(alice, "p1", "ev-m", title="Alice's", attendees=["alice", "bob", "dave", "erin"])
        await drain_to_seq(carol, 2)
        answer = await bob.request("event:update", {"id": "ev-m", "version": 1, "location": "Room 2",
                                                    "attendees": ["alice", "bob"]})
        assert answer["type"] == "ack", answer
        stored = answer["payload"]["event"]
        assert answer["payload"]["seq"] == 3
        assert stored["version"] == 3 and stored["updatedBy"] == "bob" and stored["createdBy"] == "alice"
        assert stored["title"] == "Alice's" and stored["location"] == "Room 2"
        # Alice added erin, Bob removed dave: both apply.
        assert sorted(stored["attendees"]) == ["alice", "bob", "erin"]
        conflict = await bob.recv_type("conflict:detected")
        p = conflict["payload"]
        assert p["strategy"] == "merge" and p["fields"] == [] and p["resolved"] == stored
        assert p["ref"] == answer["id"] and p["id"] == "ev-m" and p["projectId"] == "p1"
        assert p["base"]["version"] == 1 and p["base"]["title"] == "Base"
        assert p["remoteVersion"] == v2
        assert p["localVersion"]["location"] == "Room 2" and p["localVersion"]["title"] == "Base"
        assert app.store.get_event("p1", "ev-m") == stored
        # The others see only the stored result, as an ordinary change.
        for other in (alice, carol):
            msg = await next_change(other)
            assert msg["type"] == "event:updated" and msg["seq"] == 3 and msg["payload"] == stored, msg
            assert msg["userId"] == "bob"
        await expect_nothing_more(app, "p1", [alice, carol], after_seq=3)
        # The sender does not get its own change broadcast either.
        assert (await next_change(bob))["payload"]["title"] == "sentinel"


async def test_merge_clash_is_manual_by_default_and_nobody_else_hears_of_it(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "p1")
        v2 = await alice_edits_first(alice, "p1", "ev-c", title="Alice's")
        await drain_to_seq(carol, 2)
        answer = await bob.request("event:update", {"id": "ev-c", "version": 1, "title": "Bob's", "location": "Room 2"})
        assert answer["type"] == "conflict:detected", answer
        p = answer["payload"]
        assert "resolved" not in p and p["fields"] == ["title"] and p["strategy"] == "merge"
        assert p["remoteVersion"] == v2 and p["base"]["title"] == "Base" and p["localVersion"]["title"] == "Bob's"
        assert app.store.get_event("p1", "ev-c") == v2 and app.store.current_seq("p1") == 2
        await expect_nothing_more(app, "p1", [alice, carol], after_seq=2)
        # Resubmitting on the current version goes through.
        again = await bob.request("event:update", {"id": "ev-c", "version": 2, "title": "Bob's"})
        assert again["type"] == "ack" and again["payload"]["event"]["version"] == 3
        assert again["payload"]["seq"] == 4  # seq 3 was the sentinel


async def test_merge_tiebreak_first_write_wins_from_config(data_dir):
    async with server(data_dir, merge_tiebreak="first_write_wins") as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "p1")
        await alice_edits_first(alice, "p1", "ev-t", title="Alice's")
        await drain_to_seq(carol, 2)
        answer = await bob.request("event:update", {"id": "ev-t", "version": 1, "title": "Bob's", "location": "Room 2"})
        assert answer["type"] == "ack", answer
        stored = answer["payload"]["event"]
        assert stored["title"] == "Alice's" and stored["location"] == "Room 2"
        p = (await bob.recv_type("conflict:detected"))["payload"]
        assert p["fields"] == ["title"] and p["resolved"] == stored
        msg = await next_change(carol)
        assert msg["type"] == "event:updated" and msg["payload"] == stored


async def test_manual_project_stores_nothing_and_sends_all_three_versions(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "man")
        v2 = await alice_edits_first(alice, "man", "ev-man", title="Alice's")
        await drain_to_seq(carol, 2)
        # Disjoint edits would merge; manual never decides.
        answer = await bob.request("event:update", {"id": "ev-man", "version": 1, "location": "Room 2"})
        assert answer["type"] == "conflict:detected", answer
        p = answer["payload"]
        assert p["strategy"] == "manual" and "resolved" not in p and p["fields"] == ["location"]
        assert p["base"]["version"] == 1 and p["base"]["title"] == "Base"
        assert p["localVersion"]["location"] == "Room 2" and p["remoteVersion"] == v2
        assert app.store.get_event("man", "ev-man") == v2
        await expect_nothing_more(app, "man", [alice, carol], after_seq=2)
        stale_delete = await bob.request("event:delete", {"id": "ev-man", "version": 1})
        assert stale_delete["type"] == "conflict:detected" and "resolved" not in stale_delete["payload"]
        assert app.store.get_event("man", "ev-man") == v2


async def test_first_write_wins_project_keeps_stored_and_says_so(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "fww")
        v2 = await alice_edits_first(alice, "fww", "ev-f", title="Alice's")
        await drain_to_seq(carol, 2)
        answer = await bob.request("event:update", {"id": "ev-f", "version": 1, "location": "Room 2"},
                                   timestamp=int(time.time() * 1000))
        assert answer["type"] == "conflict:detected", answer  # no ack: nothing was stored
        p = answer["payload"]
        assert p["strategy"] == "first_write_wins" and p["resolved"] == v2 and p["fields"] == ["location"]
        stale_delete = await bob.request("event:delete", {"id": "ev-f", "version": 1})
        assert stale_delete["type"] == "conflict:detected" and stale_delete["payload"]["resolved"] == v2
        assert app.store.get_event("fww", "ev-f") == v2 and app.store.current_seq("fww") == 2
        await expect_nothing_more(app, "fww", [alice, carol], after_seq=2)


async def test_last_write_wins_decides_by_envelope_timestamp(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "lww")
        v2 = await alice_edits_first(alice, "lww", "ev-l", title="Alice's")
        await drain_to_seq(carol, 2)
        stored_at = v2["updatedAt"]
        # Made a millisecond before Alice's edit reached the server: it loses.
        lost = await bob.request("event:update", {"id": "ev-l", "version": 1, "title": "Bob's old"},
                                 timestamp=stored_at - 1)
        assert lost["type"] == "conflict:detected", lost
        assert lost["payload"]["strategy"] == "last_write_wins"
        assert lost["payload"]["resolved"] == v2 and lost["payload"]["fields"] == ["title"]
        assert app.store.get_event("lww", "ev-l") == v2
        await expect_nothing_more(app, "lww", [alice, carol], after_seq=2)  # seq 3: sentinel
        # Made at the same millisecond: arrival order, Bob's arrived later and wins.
        won = await bob.request("event:update", {"id": "ev-l", "version": 1, "title": "Bob's tie"},
                                timestamp=stored_at)
        assert won["type"] == "ack", won
        stored = won["payload"]["event"]
        assert stored["title"] == "Bob's tie" and stored["version"] == 3 and stored["updatedBy"] == "bob"
        p = (await bob.recv_type("conflict:detected"))["payload"]
        assert p["resolved"] == stored and p["remoteVersion"] == v2
        for other in (alice, carol):
            msg = await next_change(other)
            assert msg["type"] == "event:updated" and msg["payload"] == stored and msg["seq"] == 4
        # Without a timestamp the receive time counts: later than anything stored.
        won = await bob.request("event:update", {"id": "ev-l", "version": 2, "location": "Room 9"})
        assert won["type"] == "ack" and won["payload"]["event"]["location"] == "Room 9"
        assert won["payload"]["event"]["title"] == "Bob's tie"


async def test_last_write_wins_stale_delete(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "lww")
        v2 = await alice_edits_first(alice, "lww", "ev-d", title="Alice's")
        await drain_to_seq(carol, 2)
        kept = await bob.request("event:delete", {"id": "ev-d", "version": 1}, timestamp=v2["updatedAt"] - 60_000)
        assert kept["type"] == "conflict:detected" and kept["payload"]["resolved"] == v2
        assert kept["payload"]["operation"] == "delete" and kept["payload"]["localVersion"] is None
        gone = await bob.request("event:delete", {"id": "ev-d", "version": 1})
        assert gone["type"] == "ack", gone
        assert gone["payload"] == {"id": "ev-d", "projectId": "lww", "version": 3, "seq": 3}
        assert (await bob.recv_type("conflict:detected"))["payload"]["resolved"] is None
        msg = await next_change(carol)
        assert msg["type"] == "event:deleted" and msg["payload"] == {"id": "ev-d", "projectId": "lww", "version": 3}
        assert app.store.get_event("lww", "ev-d") is None


async def test_update_after_delete_per_strategy(data_dir):
    async with server(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", projects=PROJECTS))
        bob = await open_client(nursery, app, token("bob", projects=PROJECTS))
        for project in ("p1", "fww", "man", "lww"):
            await alice.create(project, id=f"gone-{project}", title="Base")
            assert (await alice.request("event:delete", {"id": f"gone-{project}", "version": 1}))["type"] == "ack"
            answer = await bob.request("event:update", {"id": f"gone-{project}", "version": 1, "title": "Bob's"},
                                       timestamp=1)  # an edit made long ago
            assert answer["type"] == "conflict:detected", (project, answer)
            p = answer["payload"]
            assert p["remoteVersion"] is None and p["base"]["title"] == "Base"
            if project == "man":
                assert "resolved" not in p
            else:
                assert p["resolved"] is None
            assert app.store.get_event(project, f"gone-{project}") is None
        # Under last_write_wins an edit later than the deletion brings the event back.
        back = await bob.request("event:update", {"id": "gone-lww", "version": 1, "title": "Bob's"})
        assert back["type"] == "ack", back
        event = back["payload"]["event"]
        assert event["title"] == "Bob's" and event["version"] == 3 and event["updatedBy"] == "bob"
        assert app.store.get_event("lww", "gone-lww") == event


async def test_update_based_on_the_deletion_version_does_not_crash_the_server(data_dir):
    with trio.fail_after(15):
        async with server(data_dir) as (app, nursery):
            alice = await open_client(nursery, app, token("alice", projects=PROJECTS))
            await alice.create("lww", id="del-v", title="Base")
            gone = await alice.request("event:delete", {"id": "del-v", "version": 1})
            assert gone["payload"]["version"] == 2
            answer = await alice.request("event:update", {"id": "del-v", "version": 2, "title": "again"})
            assert answer["type"] in ("error", "conflict:detected"), answer
            assert app.store.get_event("lww", "del-v") is None
            # The server still works.
            assert (await alice.create("lww", title="still alive"))["type"] == "ack"


async def test_base_comes_from_the_changelog_across_a_restart(data_dir):
    async with server(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", projects=PROJECTS))
        v1 = (await alice.create("p1", id="ev-r", title="Base", location="Room 1"))["payload"]["event"]
        v2 = (await alice.request("event:update", {"id": "ev-r", "version": 1, "title": "Alice's"}))["payload"]["event"]
    async with server(data_dir) as (app, nursery):
        bob = await open_client(nursery, app, token("bob", projects=PROJECTS))
        carol = await open_client(nursery, app, token("carol", projects=PROJECTS))
        await carol.subscribe("p1", since=2)
        answer = await bob.request("event:update", {"id": "ev-r", "version": 1, "location": "Room 2"})
        assert answer["type"] == "ack", answer
        stored = answer["payload"]["event"]
        assert stored["title"] == "Alice's" and stored["location"] == "Room 2" and stored["version"] == 3
        p = (await bob.recv_type("conflict:detected"))["payload"]
        assert p["base"] == v1 and p["remoteVersion"] == v2 and p["resolved"] == stored
        msg = await next_change(carol)
        assert msg["type"] == "event:updated" and msg["seq"] == 3 and msg["payload"] == stored
        # A clash after the restart: base (v1, from the changelog) had "Base", the
        # stored title is Alice's, Bob's differs from both.
        clash = await bob.request("event:update", {"id": "ev-r", "version": 1, "title": "Bob's"})
        assert clash["type"] == "conflict:detected" and clash["payload"]["fields"] == ["title"]
        assert clash["payload"]["base"] == v1 and "resolved" not in clash["payload"]
        # Based on v2 the title is Bob's change only (v3 did not touch it): merged.
        merged = await bob.request("event:update", {"id": "ev-r", "version": 2, "title": "Bob's"})
        assert merged["type"] == "ack", merged
        assert merged["payload"]["event"]["title"] == "Bob's" and merged["payload"]["event"]["location"] == "Room 2"


async def test_retry_of_a_resolved_conflict_answers_the_original_ack(data_dir):
    async with server(data_dir) as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "p1")
        await alice_edits_first(alice, "p1", "ev-i", title="Alice's")
        env_id = "retry-merge-1"
        first = await bob.request("event:update", {"id": "ev-i", "version": 1, "location": "Room 2"}, id=env_id)
        assert first["type"] == "ack"
        await bob.recv_type("conflict:detected")
        again = await bob.request("event:update", {"id": "ev-i", "version": 1, "location": "Room 2"}, id=env_id)
        assert again["type"] == "ack" and again["payload"] == first["payload"]
        assert app.store.current_seq("p1") == 3


RECORDER = textwrap.dedent('''
    """A third-party strategy: last_write_wins, remembering what it was asked."""
    from barosync.hooks.conflicts import last_write_wins
    from barosync.hooks.hookspecs import hookimpl

    SEEN = []

    @hookimpl
    def barosync_conflict_strategies():
        return ["recording"]

    @hookimpl
    def barosync_resolve_conflict(strategy, conflict):
        if strategy != "recording":
            return None
        SEEN.append(conflict)
        return last_write_wins(conflict)
''')


@one_node
async def test_client_time_is_the_envelope_timestamp_never_later_than_receipt(tmp_path, data_dir):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "conflict_recorder.py").write_text(RECORDER)
    async with server(data_dir, plugin_paths=(plugins,), conflict_projects={**STRATEGY_CONFIG, "rec": "recording"}) as (app, nursery):
        seen = sys.modules["barosync_plugin_conflict_recorder"].SEEN
        alice, bob, carol = await three_users(app, nursery, "rec")
        v2 = await alice_edits_first(alice, "rec", "ev-rec", title="Alice's")
        # In the past: taken as is.
        past = v2["updatedAt"] - 30_000
        lost = await bob.request("event:update", {"id": "ev-rec", "version": 1, "title": "Bob's"}, timestamp=past)
        assert lost["type"] == "conflict:detected" and lost["payload"]["strategy"] == "recording"
        c = seen[-1]
        assert c.client_time == past and c.remote_time == v2["updatedAt"] and c.user_id == "bob"
        assert c.base["version"] == 1 and c.remote == v2 and c.local["title"] == "Bob's"
        assert c.changes == {"title": "Bob's"}
        # In the future (year 2100): capped at the server's receive time.
        before = int(time.time() * 1000)
        won = await bob.request("event:update", {"id": "ev-rec", "version": 1, "title": "Bob's"},
                                timestamp=4_102_444_800_000)
        after = int(time.time() * 1000)
        assert won["type"] == "ack"
        c = seen[-1]
        assert before <= c.client_time <= after
        assert won["payload"]["event"]["updatedAt"] == c.client_time  # = receive time


@one_node  # the plugin module in sys.modules is one node's: the other node may decide the conflict
async def test_merge_tiebreak_can_be_a_plugin_strategy(tmp_path, data_dir):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "conflict_recorder.py").write_text(RECORDER)
    async with server(data_dir, plugin_paths=(plugins,), merge_tiebreak="recording") as (app, nursery):
        alice, bob, carol = await three_users(app, nursery, "p1")
        await alice_edits_first(alice, "p1", "ev-pt", title="Alice's")
        answer = await bob.request("event:update", {"id": "ev-pt", "version": 1, "title": "Bob's"})
        assert answer["type"] == "ack", answer  # "recording" is last_write_wins: Bob's is later
        assert sys.modules["barosync_plugin_conflict_recorder"].SEEN


EXPLODING = textwrap.dedent('''
    from barosync.hooks.hookspecs import hookimpl

    @hookimpl
    def barosync_conflict_strategies():
        return ["exploding"]

    @hookimpl
    def barosync_resolve_conflict(strategy, conflict):
        if strategy == "exploding":
            raise RuntimeError("buggy third-party strategy")
''')


async def test_a_failing_strategy_plugin_answers_an_error_and_the_server_survives(tmp_path, data_dir):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "exploding.py").write_text(EXPLODING)
    with trio.fail_after(15):
        async with server(data_dir, plugin_paths=(plugins,), conflict_projects={"boom": "exploding"}) as (app, nursery):
            alice = await open_client(nursery, app, token("alice", projects=["boom", "p1"]))
            await alice.create("boom", id="ev-b", title="Base")
            await alice.request("event:update", {"id": "ev-b", "version": 1, "title": "v2"})
            answer = await alice.request("event:update", {"id": "ev-b", "version": 1, "title": "stale"})
            assert answer["type"] == "error", answer
            assert app.store.get_event("boom", "ev-b")["title"] == "v2"
            assert (await alice.create("p1", title="still alive"))["type"] == "ack"


async def test_last_write_wins_compares_edit_times_on_both_sides(data_dir):
    async with server(data_dir) as (app, nursery):
        alice = await open_client(nursery, app, token("alice", projects=PROJECTS))
        bob = await open_client(nursery, app, token("bob", projects=PROJECTS))
        now = int(time.time() * 1000)
        await alice.create("lww", id="ev-o", title="Base")
        # Alice edited offline ten minutes ago; it reaches the server only now.
        await alice.request("event:update", {"id": "ev-o", "version": 1, "title": "Alice's (10 min ago)"},
                            timestamp=now - 600_000)
        # Bob edited five minutes ago (after Alice), from version 1.
        answer = await bob.request("event:update", {"id": "ev-o", "version": 1, "title": "Bob's (5 min ago)"},
                                   timestamp=now - 300_000)
        assert answer["type"] == "ack", answer
        assert app.store.get_event("lww", "ev-o")["title"] == "Bob's (5 min ago)"


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    ({"conflict_default": "nope"}, "[conflict] default"),
    ({"merge_tiebreak": "nope"}, "[conflict] merge_tiebreak"),
    ({"conflict_projects": {"team": "nope"}}, "[conflict.projects] team"),
])
def test_unknown_strategy_stops_app_construction(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        App(make_config(tmp_path / "data", **overrides))
    e = info.value
    assert e.key == key
    assert "'nope'" in e.message
    for name in STRATEGIES:
        assert name in e.message
    # Nothing was opened: start-up stopped before the store.
    assert not (tmp_path / "data" / "data.mdb").exists()


async def test_unknown_strategy_stops_serve(tmp_path):
    with pytest.raises(ConfigError) as info:
        await serve(make_config(tmp_path / "data", conflict_default="nope"))
    assert info.value.key == "[conflict] default"
    available = str(info.value).split("available: ", 1)[1].rstrip(")").split(", ")
    assert set(STRATEGIES) <= set(available)


async def test_known_strategies_start(tmp_path):
    for i, name in enumerate(STRATEGIES):
        async with running(tmp_path / f"d{i}", conflict_default=name, merge_tiebreak="last_write_wins",
                           conflict_projects={"x": name}) as (app, _):
            assert app.config.strategy_for("x") == name and app.config.strategy_for("other") == name
