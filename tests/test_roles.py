"""Each role's implementations have every member of its interface (barosync/roles.py),
with the same parameters: the core uses nothing else, so either can stand in."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from barosync.storage import roles
from barosync.engine.bus import RedisBus
from barosync.engine.presence import RedisPresence
from barosync.storage.pg_store import PgStore
from barosync.storage.store import Store


def members(protocol: type) -> dict[str, Any]:
    found = {name: None for name in getattr(protocol, "__annotations__", {})}
    found.update({name: value for name, value in vars(protocol).items()
                  if callable(value) and not name.startswith("_")})
    return found


def parameters(fn: Any) -> list[tuple[str, Any, bool]]:
    """Names, kinds and whether each has a default; annotations may differ (an LMDB
    transaction is not a PostgreSQL cursor)."""
    fn = inspect.unwrap(fn)
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty)
            for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("protocol, cls", [
    (roles.LogStore, Store),
    (roles.LogStore, PgStore),
    (roles.Bus, RedisBus),
    (roles.SharedPresence, RedisPresence),
])
def test_an_implementation_has_every_member_of_its_role(protocol: type, cls: type) -> None:
    wanted = members(protocol)
    assert len(wanted) >= 4
    for name, spec in wanted.items():
        if spec is None:  # an attribute: a class attribute, or set in __init__
            assert hasattr(cls, name) or name in inspect.getsource(cls.__init__), f"{cls.__name__} has no {name}"
            continue
        assert callable(getattr(cls, name, None)), f"{cls.__name__} has no method {name}"
        assert parameters(getattr(cls, name)) == parameters(spec), f"{cls.__name__}.{name} takes other parameters"


def test_the_two_log_stores_say_where_their_reads_run() -> None:
    assert Store.reads_block is False and PgStore.reads_block is True
    assert PgStore.read_threads >= 2
