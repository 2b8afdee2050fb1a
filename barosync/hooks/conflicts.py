"""Conflict strategies: plain functions on event dicts, and the four built-in plugins.

A conflict is an ``event:update`` or ``event:delete`` based on a version older than
the stored one (or an update of an event deleted meanwhile). The project's strategy
gets ``base`` (the event at the client's version, from history; None when history
no longer has it), ``local`` (base plus the client's change) and ``remote`` (what is
stored; None when it was deleted) and answers with a ``Resolution``.

The strategies run inside the write transaction, in the writer's thread: they must
be synchronous, quick, and do no IO.
"""

from __future__ import annotations

from typing import Callable

from .hookspecs import hookimpl
from ..domain.models import CLIENT_FIELDS, ValidationError, check_dates
from ..domain.recurrence import check_expandable
# The value types live apart so that hookspecs.py need not import this module;
# they stay importable from here.
from .plugin_types import DEFAULT_TIEBREAK, Conflict, Resolution  # noqa: F401

STRATEGIES = ("last_write_wins", "first_write_wins", "merge", "manual")

# Fields a client edits; server-owned fields never take part in a merge.
EDITABLE = tuple(CLIENT_FIELDS)


def changed_by_client(conflict: Conflict) -> tuple[str, ...]:
    base = conflict.base or {}
    return tuple(f for f in EDITABLE if f in conflict.changes and conflict.changes[f] != base.get(f))


def last_write_wins(c: Conflict) -> Resolution:
    fields = changed_by_client(c)
    # Ties go to arrival order: the client's edit arrived later, so it wins.
    local_wins = c.client_time >= c.remote_time
    if not local_wins:
        return Resolution("keep", fields=fields)
    if c.operation == "delete":
        return Resolution("delete", fields=fields)
    if c.remote is None:
        return Resolution("store", event=dict(c.local or {}), fields=fields)
    # Only what the client really changed: a form that resends the whole event must
    # not undo someone else's edits to fields this client never touched.
    return Resolution("store", event={**c.remote, **{f: c.changes[f] for f in fields}}, fields=fields)


def first_write_wins(c: Conflict) -> Resolution:
    return Resolution("keep", fields=changed_by_client(c))


def manual(c: Conflict) -> Resolution:
    return Resolution("keep", fields=changed_by_client(c), manual=True)


def merge_attendees(base: list[str], local: list[str], remote: list[str]) -> list[str]:
    """Three-way set merge: additions and removals from both sides apply."""
    b, lo, r = set(base), set(local), set(remote)
    removed = (b - lo) | (b - r)
    out = [a for a in remote if a not in removed]
    out += [a for a in local if a not in removed and a not in r]
    return list(dict.fromkeys(out))


def merge(c: Conflict) -> Resolution:
    """Field by field: one side changed it, that side wins; both changed it the same
    way, fine; both differently, ``attendees`` merge as a set and other fields go to
    the tie-break strategy."""
    if c.operation == "delete" or c.remote is None:
        # A delete against a newer edit, or an edit of a deleted event: nothing to
        # merge field by field; the edit (or deletion) already stored stands.
        return Resolution("keep", fields=changed_by_client(c))
    base = c.base or {}
    merged = dict(c.remote)
    clashes: list[str] = []
    for f in EDITABLE:
        if f not in c.changes:
            continue
        mine, theirs, was = c.changes[f], c.remote.get(f), (base.get(f) if c.base is not None else None)
        if c.base is not None and mine == was:
            continue  # the client did not really change it
        if mine == theirs:
            continue
        if c.base is not None and theirs == was:
            merged[f] = mine  # changed on the client's side only
        elif f == "attendees":
            merged[f] = merge_attendees(base.get(f) or [], mine or [], theirs or [])
        else:
            clashes.append(f)
    if clashes:
        if c.merge_tiebreak in ("merge", "manual"):
            decided: Resolution | None = manual(c)
        elif c.tiebreak is not None:
            decided = c.tiebreak(c)
        else:
            decided = STRATEGY_FUNCTIONS.get(c.merge_tiebreak, manual)(c)
        if decided is None:
            decided = manual(c)
        if decided.manual:
            return Resolution("keep", fields=tuple(clashes), manual=True)
        if decided.action == "store":
            for f in clashes:
                merged[f] = c.changes[f]
        # otherwise the stored values of the clashing fields stay
    try:
        check_dates(merged["startDate"], merged["endDate"])
        check_expandable(merged.get("recurrence"), merged["startDate"])
    except ValidationError:
        # Each side's dates were valid alone but not together: a person must decide.
        return Resolution("keep", fields=tuple(sorted(set(clashes) | {"startDate", "endDate"})), manual=True)
    if all(merged.get(f) == c.remote.get(f) for f in EDITABLE):
        return Resolution("keep", fields=tuple(clashes))
    return Resolution("store", event=merged, fields=tuple(clashes))


STRATEGY_FUNCTIONS = {
    "last_write_wins": last_write_wins,
    "first_write_wins": first_write_wins,
    "merge": merge,
    "manual": manual,
}


class Strategy:
    """One named conflict strategy as a plugin: the two hooks every strategy
    implements, from one function. The plugin loader registers each ``Strategy``
    found at the top level of a plugin module (plugins.py), so ``@strategy`` is all
    a plugin file needs; the built-ins are four of them."""

    def __init__(self, name: str, resolve: "Callable[[Conflict], Resolution | None]") -> None:
        self.name = name
        self.resolve = resolve

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}>"

    @hookimpl
    def barosync_conflict_strategies(self) -> list[str]:
        return [self.name]

    @hookimpl
    def barosync_resolve_conflict(self, strategy: str, conflict: Conflict) -> Resolution | None:
        if strategy != self.name:
            return None
        return self.resolve(conflict)


def strategy(name: str) -> "Callable[[Callable[[Conflict], Resolution | None]], Strategy]":
    """Make a function ``(Conflict) -> Resolution | None`` the conflict strategy
    ``name`` (``from barosync import strategy``)::

        @strategy("always_remote")
        def always_remote(conflict):
            return Resolution("keep", fields=tuple(conflict.changes))

    It is asked only about conflicts in projects configured with ``name``; None
    leaves the conflict to the sender, as ``manual`` does."""
    if not isinstance(name, str) or not name:
        raise TypeError("@strategy needs the strategy's name, e.g. @strategy(\"always_remote\")")

    def make(resolve: "Callable[[Conflict], Resolution | None]") -> Strategy:
        return Strategy(name, resolve)

    return make


LAST_WRITE_WINS = Strategy("last_write_wins", last_write_wins)
FIRST_WRITE_WINS = Strategy("first_write_wins", first_write_wins)
MERGE = Strategy("merge", merge)
MANUAL = Strategy("manual", manual)
