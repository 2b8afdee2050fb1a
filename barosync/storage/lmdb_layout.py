"""The LMDB data file's keys: how an event, a change, a version or an id is found
(store.py's docstring lists the sub-databases). Plain functions, used by the write
rules (commit.py), the store's reads (store.py) and nothing else."""

from __future__ import annotations

import struct

# A seq or a version: big-endian, so keys sort in number order.
U64 = struct.Struct(">Q")


def db_key(*parts: str) -> bytes:
    return "\0".join(parts).encode()


def index_key(event_id: str, project_id: str) -> bytes:
    """``index``: an id, then each project it is known in (live, or deleted within the
    history retention), so a lookup by id alone finds its projects."""
    return db_key(event_id, project_id)


def version_key(project_id: str, event_id: str, version: int) -> bytes:
    """``versions``: ordered like ``index`` (id first), so ids made in sequence are
    appended in place rather than spread over every project's pages."""
    return db_key(event_id, project_id) + b"\0" + U64.pack(version)


def seq_key(project_id: str, seq: int) -> bytes:
    return project_id.encode() + b"\0" + U64.pack(seq)
